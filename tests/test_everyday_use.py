"""Every command tried as a new user tries it: normal use and the usual mistakes. Nothing is lost, nothing is wrong
without a word, every refusal is one line, and what tinylm writes can be shared as it is."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import copy_run, set_args, tiny_overrides
from tinylm import cli
from tinylm.models import build_model, count_parameters
from tinylm.recipe import load_recipe, recipe_names
from tinylm.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_overrides(steps=4)  # step-00000002, step-00000004 and best (batch 4, context 32)
SETS = set_args(TINY)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_recipe("micromixer-100k", TINY), run, progress=False)
    return run


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinylm: error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------------ data loss
@pytest.mark.parametrize("inside", ["checkpoints/best", "checkpoints/step-00000004", "data"])
def test_an_export_into_a_runs_own_folders_is_refused(trained, tmp_path, capsys, inside):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(run / inside)]) == 2
    assert "refusing to replace" in one_error_line(capsys)
    assert snapshot(run) == before


def test_an_export_replaces_an_export_of_the_same_format(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    for _ in range(2):
        assert cli.main(["export", str(run), "--format", "hf"]) == 0
    assert (run / "hf" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ wrong results silently
def test_data_prepare_refuses_shards_made_with_another_tokenizer_setting(tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--set", "data.max_stories=120", "--quiet"]
    assert cli.main(["data", "prepare", "tinystories-demo", "--out", str(run), "--set", "tokenizer.vocab_size=300",
                     *small]) == 0
    capsys.readouterr()
    before = snapshot(run)
    assert cli.main(["data", "prepare", "tinystories-demo", "--out", str(run), "--set", "tokenizer.vocab_size=280",
                     *small]) == 2
    line = one_error_line(capsys)
    assert "tokenizer.vocab_size" in line and "300" in line and "280" in line
    assert snapshot(run) == before


def test_resume_continues_with_the_runs_own_recipe(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet"]) == 0
    assert "step 4" in capsys.readouterr().out
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet",
                     "--set", "train.max_steps=6"]) == 0  # a training setting given again applies
    assert "step 6" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["micromixer-100k", "--set", "model.dim=64"], ["model.dim", "84", "64"]),
    (["micromixer-100k", "--set", "train.batch_size=8"], ["train.batch_size", "4", "8"]),
    (["micromixer-300k"], ["micromixer-100k", "micromixer-300k"]),
])
def test_resume_refuses_what_contradicts_the_runs_recipe_naming_it(trained, tmp_path, capsys, argv, words):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert cli.main(["train", *argv, "--out", str(run), "--resume", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert all(w in line for w in words), line
    assert snapshot(run) == before


def damage_best(run: Path) -> None:
    (run / "checkpoints" / "best" / "manifest.json").unlink()
    weights = run / "checkpoints" / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def test_a_damaged_best_checkpoint_is_named_when_another_is_used(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    damage_best(run)
    assert cli.main(["sample", str(run), "--prompt", "Once", "--max-new-tokens", "2", "--seed", "1"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-00000004" in err[0] and "best" in err[0] and "incomplete" in err[0], err
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "step-00000004" in out and "incomplete" in out


def test_a_damaged_latest_checkpoint_offers_the_newest_complete_one(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    weights = run / "checkpoints" / "step-00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "step-00000004" in line and "--resume-from step-00000002" in line
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume-from", "step-00000002",
                     "--quiet"]) == 0
    assert "step 4" in capsys.readouterr().out
    assert cli.main(["eval", str(run), "--checkpoint", "latest"]) == 0  # step-00000004 was written again


@pytest.mark.parametrize("argv,words", [
    (["tokenizer", "stats", "{run}", "--set", "tokenizer.vocab_size=300"], "--set"),
    (["eval", "{run}", "--batch-size", "0"], "batch size must be positive"),
    (["eval", "{run}", "--batch-size", "-1"], "batch size must be positive"),
    (["sample", "{run}", "--stop", ""], "--stop"),
])
def test_settings_that_would_be_ignored_are_refused(trained, tmp_path, capsys, argv, words):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert cli.main([a.replace("{run}", str(run)) for a in argv]) == 2
    assert words in one_error_line(capsys)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------------------------- one-line promise
def test_a_closed_pipe_ends_quietly():
    """`tinylm recipes NAME | head -c 10`: the reader goes away before tinylm writes."""
    child = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "recipes", "aurelius-4m"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 141 and err == "", err


# --------------------------------------------------------------------------------------------------------- sharing
def test_checkpoints_and_exports_follow_the_umask(trained, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        train(load_recipe("micromixer-100k", tiny_overrides(steps=2)), run, progress=False)
        assert cli.main(["export", str(run), "--format", "hf"]) == 0
    finally:
        os.umask(old)
    for folder in (run / "checkpoints" / "best", run / "checkpoints" / "step-00000002", run / "hf"):
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


# -------------------------------------------------------------------------------------------------------- friction
def test_progress_written_to_a_file_has_no_carriage_returns(tmp_path, capsys):
    assert cli.main(["train", "micromixer-100k", "--out", str(tmp_path / "run"),
                     *set_args(tiny_overrides(steps=2))]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err + captured.out and "step 2:" in captured.out


def test_recipes_and_params_do_not_import_torch():
    code = ("import sys; from tinylm.cli import main; main(['recipes']); main(['params', 'aurelius-4m']); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert "4,033,728" in done.stdout


@pytest.mark.parametrize("name", recipe_names())
def test_counts_from_shapes_equal_the_built_models(name):
    from tinylm.models.shapes import count_from_shapes

    model = load_recipe(name).model
    assert count_from_shapes(model) == count_parameters(build_model(model, device="meta"))


def test_eval_of_a_hugging_face_directory_without_data_asks_for_data(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    assert cli.main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["eval", str(tmp_path / "hf")]) == 2
    line = one_error_line(capsys)
    assert "--data" in line and "data prepare" not in line


def test_one_data_path_may_be_given_as_a_string():
    assert load_recipe("micromixer-100k", ["data.paths=/x/stories.txt.gz"]).data.paths == ["/x/stories.txt.gz"]


def test_a_recipe_of_only_a_name_is_consistent(tmp_path, capsys):
    path = tmp_path / "x.toml"
    path.write_text('name = "x"\n')
    assert cli.main(["params", str(path)]) == 0
    assert "total parameters" in capsys.readouterr().out


def test_a_directory_given_as_a_recipe_is_named_as_one(tmp_path, capsys):
    assert cli.main(["params", str(tmp_path)]) == 2
    assert "is a directory" in one_error_line(capsys)


def test_compare_marks_whole_split_evaluations_and_estimates(trained, tmp_path, capsys):
    evaluated, estimated = tmp_path / "evaluated", tmp_path / "estimated"
    shutil.copytree(trained, evaluated)
    shutil.copytree(trained, estimated)
    (estimated / "eval.json").unlink(missing_ok=True)
    assert cli.main(["eval", str(evaluated)]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(evaluated), str(estimated), "--plot", str(tmp_path / "c.png")]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert "whole split" in rows["evaluated"] and "estimate" in rows["estimated"]
    assert json.loads((evaluated / "eval.json").read_text())["tokens"] > 0
