"""Bad input wherever a user types: one clear line on stderr, exit code 2, no traceback, nothing lost.

Every case runs against a copy of a trained run directory and checks that not one byte of it changed."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import copy_run, set_args, tiny_overrides
from tinylm import cli
from tinylm.recipe import load_recipe, recipe_text
from tinylm.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_overrides(steps=2)
SETS = set_args(TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_recipe("micromixer-100k", TINY), run, progress=False)
    return run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files a user might point tinylm at."""
    d = tmp_path_factory.mktemp("files")
    (d / "malformed.toml").write_text('name = "x"\n[model\nn_layers = 2\n')
    (d / "unknown_key.toml").write_text(recipe_text("micromixer-100k").replace("[model]", "[model]\nlayers = 3"))
    (d / "unknown_section.toml").write_text(recipe_text("micromixer-100k") + "\n[optimizer]\nlr = 1\n")
    (d / "wrong_type.toml").write_text(recipe_text("micromixer-100k").replace("n_layers = 3", 'n_layers = "3"'))
    (d / "not_utf8.toml").write_bytes(b'name = "\xff\xfe"\n')
    (d / "binary.txt").write_bytes(bytes(range(1, 256)) * 40)  # no NUL, mostly not UTF-8
    (d / "nul.txt").write_bytes(b"Once upon a time\x00 there was a cat.\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("\n\n  \n<|endoftext|>\n\n")
    (d / "one_story.txt").write_text("Once upon a time there was a tiny frog who liked to sing.\n")
    (d / "broken.txt.gz").write_bytes(gzip.compress(b"Once upon a time " * 200)[:60])
    (d / "bad.json").write_text('{"texts": [1, 2]}')
    (d / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (d / "a_directory").mkdir()
    (d / "empty_dir").mkdir()
    return d


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def corpus(path: str) -> list[str]:
    return ["--set", f'data.paths=["{path}"]', "--set", "data.max_stories=0"]


# (argv with {run} for the existing run directory and {files} for the bad files, a part of the expected message)
CASES = [
    # recipes: malformed TOML, unknown keys and sections, wrong types, unreadable or missing files
    (["params", "{files}/malformed.toml"], "malformed TOML"),
    (["train", "{files}/malformed.toml", "--out", "{run}"], "malformed TOML"),
    (["params", "{files}/unknown_key.toml"], "model.layers: unknown key"),
    (["params", "{files}/unknown_section.toml"], "unknown key 'optimizer'"),
    (["params", "{files}/wrong_type.toml"], "model.n_layers: expected an integer"),
    (["params", "{files}/not_utf8.toml"], "cannot read recipe"),
    (["params", "{files}/missing.toml"], "recipe file not found"),
    (["params", "{files}/a_directory"], "is a directory"),
    (["params", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (["params", "micromixer-100k", "--set", "model.bogus=1"], "model.bogus: unknown key"),
    (["params", "micromixer-100k", "--set", "optimizer.lr=1"], "unknown section 'optimizer'"),
    (["params", "micromixer-100k", "--set", "lr=1"], "section.key=value"),
    (["params", "micromixer-100k", "--set", "model.n_layers"], "section.key=value"),
    (["params", "micromixer-100k", "--set", "model.n_layers=three"], "model.n_layers: expected an integer"),
    (["params", "micromixer-100k", "--set", "model.dropout=1.5"], "model.dropout"),
    (["train", "micromixer-100k", "--set", "tokenizer.ranks_path=r\udcffs", "--out", "{run}"], "not valid text"),
    # impossible shapes
    (["params", "llama2c-260k", "--set", "model.n_heads=5"], "n_heads (5) must divide model.dim (64)"),
    (["params", "llama2c-260k", "--set", "model.n_kv_heads=3"], "n_kv_heads (3) must divide model.n_heads (8)"),
    (["params", "llama2c-260k", "--set", "model.context_length=0"], "context_length must be positive"),
    (["train", "llama2c-260k", "--set", "model.context_length=-4", "--out", "{run}"], "context_length"),
    (["params", "llama2c-260k", "--set", "model.dim=0"], "model.dim must be positive"),
    (["params", "llama2c-260k", "--set", "model.head_dim=7", "--set", "model.n_heads=8"], "even"),
    (["params", "micromixer-100k", "--set", "model.dim=83"], "even"),
    (["params", "micromixer-100k", "--set", "tokenizer.vocab_size=300"], "exceeds model.vocab_size"),
    (["params", "micromixer-100k", "--set", "train.min_lr=1"], "train.min_lr"),
    (["params", "micromixer-100k", "--set", "data.val_fraction=1"], "data.val_fraction"),
    # sampling settings out of range: in a recipe and on the command line
    (["params", "micromixer-100k", "--set", "sample.top_p=0"], "top_p must be in (0, 1]"),
    (["params", "micromixer-100k", "--set", "sample.top_p=1.01"], "top_p must be in (0, 1]"),
    (["params", "micromixer-100k", "--set", "sample.temperature=-0.1"], "temperature must be finite and >= 0"),
    (["params", "micromixer-100k", "--set", "sample.min_p=1.5"], "min_p must be in [0, 1]"),
    (["sample", "{run}", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["sample", "{run}", "--top-p", "-0.5"], "top_p must be in (0, 1]"),
    (["sample", "{run}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["sample", "{run}", "--top-p", "nan"], "top_p"),
    (["sample", "{run}", "--temperature", "-1"], "temperature must be finite and >= 0"),
    (["sample", "{run}", "--temperature", "inf"], "temperature must be finite and >= 0"),
    (["sample", "{run}", "--temperature", "nan"], "temperature"),
    (["sample", "{run}", "--min-p", "1.01"], "min_p must be in [0, 1]"),
    (["sample", "{run}", "--min-p", "-0.1"], "min_p must be in [0, 1]"),
    (["sample", "{run}", "--min-p", "nan"], "min_p"),
    (["sample", "{run}", "--top-k", "-1"], "top_k must be >= 0"),
    (["sample", "{run}", "--repetition-penalty", "0"], "repetition_penalty must be finite and > 0"),
    (["sample", "{run}", "--max-new-tokens", "-1"], "max_new_tokens must be >= 0"),
    (["sample", "{run}", "--seed", str(2**64)], "seed"),
    (["sample", "{run}", "--seed", str(-2**63 - 1)], "seed"),
    (["sample", "{run}", "--device", "bogus"], "bogus"),
    (["sample", "{run}", "--device", "cuda"] if not torch.cuda.is_available() else ["sample", "{run}", "--device",
                                                                                     "cuda:99"], "cuda"),
    # prompts
    (["sample", "{run}", "--prompt", "x" * 40, "--max-new-tokens", "3"], "context holds 32"),
    (["sample", "{run}", "--prompt", "é" * 20, "--max-new-tokens", "3"], "context holds 32"),
    # corpora: not UTF-8, NUL bytes, empty, too small to split, broken gzip, bad JSON, missing
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/binary.txt")], "is not UTF-8 text"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/nul.txt")], "not a text file"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/empty.txt")], "no stories found"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/blank.txt")], "no stories found"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/one_story.txt")], "split is empty"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/broken.txt.gz")], "cannot read"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/bad.json")], "record 0"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/bad.jsonl")], "malformed JSON line"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/nowhere/*.txt")], "data path not found"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", *corpus("{files}/empty_dir")], "has no story files"),
    (["data", "prepare", "micromixer-100k", "--out", "{run}", "--set", "data.paths=['']"], "empty entry"),
    (["tokenizer", "train", "llama2c-260k", "--out", "{run}", *corpus("{files}/binary.txt")], "is not UTF-8 text"),
    (["tokenizer", "stats", "micromixer-100k", *corpus("{files}/empty.txt")], "no stories found"),
    (["train", "micromixer-100k", "--out", "{run}", "--resume", *SETS, *corpus("{files}/binary.txt")],
     "different [data] section"),
    # runs: existing ones are not overwritten; missing ones are named
    (["train", "micromixer-100k", "--out", "{run}", *SETS], "already holds a trained run"),
    (["train", "llama2c-260k", "--out", "{run}", "--resume", *SETS], "trained from recipe 'micromixer-100k'"),
    (["train", "micromixer-100k", "--out", "{run}", "--resume", *SETS, "--set", "model.n_layers=2"],
     "different [model] section: model.n_layers (3 in the run, 2 now)"),
    (["tokenizer", "train", "llama2c-260k", "--out", "{run}", *SETS], "holds a different tokenizer"),
    (["data", "prepare", "llama2c-260k", "--out", "{run}", *SETS], "is a bytes tokenizer"),
    (["train", "micromixer-100k", "--out", "{files}/no-run", "--resume", *SETS], "nothing to resume"),
    (["eval", "{files}/no-run"], "neither a run directory"),
    (["eval", "{files}/empty.txt"], "neither a run directory"),
    (["eval", "{run}", "--checkpoint", "step-00009999"], "no such complete checkpoint"),
    (["eval", "{run}", "--checkpoint", "../../etc"], "no such complete checkpoint"),
    (["eval", "{run}", "--data", "{files}/empty_dir"], "token shard not found"),
    (["sample", "{files}/no-run"], "neither a run directory"),
    (["export", "{run}", "--format", "llama2c", "--out", "{files}/out"], "llama2.c"),
    (["export", "{files}/no-run", "--format", "hf"], "not a run directory"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:3]) + f" [{m}]" for a, m in CASES])
def test_bad_input_exits_2_with_one_line_and_loses_nothing(trained, files, tmp_path, capsys, argv, message):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    argv = [a.replace("{run}", str(run)).replace("{files}", str(files)) for a in argv]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinylm: error: "), captured.err
    assert message in lines[0] and "Traceback" not in captured.err + captured.out
    assert snapshot(run) == before
    assert not (files / "out").exists()


def test_a_few_undecodable_bytes_are_replaced_and_counted(files, tmp_path, capsys):
    text = "".join(f"Story {i}: a dog ran to the park and saw a bird.\n<|endoftext|>\n" for i in range(40))
    path = tmp_path / "mostly.txt"
    path.write_bytes(text.encode() + b"A bad byte \xff here.\n")
    assert cli.main(["data", "prepare", "micromixer-100k", "--out", str(tmp_path / "run"), "--quiet",
                     *corpus(str(path)), "--set", "data.val_fraction=0.3"]) == 0
    assert "1 undecodable bytes replaced" in capsys.readouterr().out


def test_the_installed_command_exits_2_without_a_traceback(files):
    """The real process: exit status 2 and one line, for a recipe error and for a missing run."""
    for argv in (["params", str(files / "malformed.toml")], ["eval", str(files / "no-run")]):
        done = subprocess.run([sys.executable, "-m", "tinylm.cli", *argv], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "TINYLM_PEAK_FLOPS": "1e11"}, timeout=60)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.startswith("tinylm: error: ")


def test_argparse_errors_exit_2(capsys):
    for argv in ([], ["nope"], ["train"], ["sample", "x", "--top-p", "high"], ["export", "x", "--format", "onnx"],
                 ["eval", "x", "--batch-size", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_a_failed_start_leaves_a_prepared_run_as_it_was(trained, tmp_path, capsys):
    """A run directory with only data prepared (no checkpoint yet), then `train` with another recipe."""
    run = tmp_path / "prepared"
    run.mkdir()
    for name in ("recipe.toml", "tokenizer.json", "data"):
        (shutil.copytree if (trained / name).is_dir() else shutil.copy)(trained / name, run / name)
    before = snapshot(run)
    assert cli.main(["train", "llama2c-260k", "--out", str(run), "--quiet", *SETS]) == 2
    assert "is a bytes tokenizer" in capsys.readouterr().err
    assert snapshot(run) == before


@pytest.mark.parametrize("argv", [
    ["export", "{run}", "--format", "hf", "--out", "{target}"],
    ["data", "prepare", "micromixer-100k", "--out", "{target}/..", *SETS],
])
def test_output_never_replaces_a_directory_tinylm_did_not_write(trained, tmp_path, capsys, argv):
    """`--out ~` must not delete a home directory: only empty folders or ones with a tinylm manifest are replaced."""
    run = copy_run(trained, tmp_path)
    target = tmp_path / "home" / "data"  # also what `data prepare --out home` would replace
    target.mkdir(parents=True)
    (target / "thesis.tex").write_text("years of work")
    argv = [a.replace("{run}", str(run)).replace("{target}", str(target)) for a in argv]
    assert cli.main(argv) == 2
    assert "not written by tinylm" in capsys.readouterr().err
    assert (target / "thesis.tex").read_text() == "years of work" and len(list(target.iterdir())) == 1


@pytest.mark.parametrize("layout", ["a folder of the user's", "a run holding a file of the user's"])
def test_demo_force_never_deletes_what_tinylm_did_not_write(trained, tmp_path, capsys, layout):
    """`tinylm demo --out ~/Documents --force` goes through the same guard as every replaced output."""
    target = copy_run(trained, tmp_path) if layout.startswith("a run") else tmp_path / "Documents"
    target.mkdir(exist_ok=True)
    (target / "thesis.tex").write_text("years of work")
    before = snapshot(target)
    assert cli.main(["demo", "--out", str(target), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to replace" in err[0], err
    assert snapshot(target) == before


def test_output_onto_a_file_is_refused(trained, files, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    for argv in (["export", str(run), "--format", "hf", "--out", str(precious)],
                 ["tokenizer", "train", "micromixer-100k", "--out", str(precious)],
                 ["data", "prepare", "micromixer-100k", "--out", str(precious), *SETS],
                 ["train", "micromixer-100k", "--out", str(precious), *SETS]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(precious) in err[0], err
    assert precious.read_text() == "keep me"
