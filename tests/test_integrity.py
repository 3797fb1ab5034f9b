"""Integrity and untrusted files: every checkpoint, shard and export carries sizes and checksums; a truncated or
altered file is named and never loaded; weights come only through safetensors and pickles only through
`torch.load(weights_only=True)`; a checkpoint that does not fit its model or tokenizer is refused with exit code 2."""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import set_args, tiny_overrides
from tinylm import cli
from tinylm.data.shards import TokenShard
from tinylm.errors import TinylmError
from tinylm.recipe import load_recipe
from tinylm.runs.loading import load_run_model
from tinylm.storage.atomic import verify_manifest, write_manifest
from tinylm.storage.rundir import RunDir
from tinylm.train.loop import train

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_overrides()
LLAMA = TINY + ["model.n_layers=2"]
RNG = random.Random(7)


@pytest.fixture(scope="module")
def mixer_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mixer") / "run"
    train(load_recipe("micromixer-100k", TINY), run, progress=False)
    return run


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("llama") / "run"
    train(load_recipe("llama2c-260k", LLAMA), run, progress=False)
    return run


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / run.parent.name
    shutil.copytree(run, out)
    return out


def error_line(capsys) -> str:
    """The CLI said exactly one line on stderr, with no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinylm: error: ") and "Traceback" not in err, err
    return lines[0]


def truncate(path: Path) -> None:
    """One byte short (of the JSON itself: a lost final newline changes nothing)."""
    data = path.read_bytes()
    keep = len(data.rstrip(b"\n")) if path.suffix == ".json" else len(data)
    path.write_bytes(data[:keep - 1])


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= mask
    path.write_bytes(bytes(data))


# Each damage: one byte short, one bit flipped at a random place, one byte flipped at a random place, the last byte
# flipped, the 17th byte from the end flipped.
DAMAGES = [("truncate", 0), ("bit", RNG.randrange(1 << 30)), ("byte", RNG.randrange(1 << 30)), ("byte", -1),
           ("byte", -17)]


def damage(path: Path, how: str, offset: int) -> None:
    if how == "truncate":
        truncate(path)
    else:
        flip(path, offset, 0x01 if how == "bit" else 0xFF)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "manifest.json"])
@pytest.mark.parametrize("how,offset", DAMAGES)
def test_a_damaged_checkpoint_is_named_and_not_loaded(mixer_run, tmp_path, capsys, name, how, offset):
    run = copy_run(mixer_run, tmp_path)
    checkpoint = RunDir(run).step_checkpoints()[-1]
    original = (checkpoint / name).read_bytes()
    damage(checkpoint / name, how, offset)
    before = snapshot(run)
    key = original.find(b'"manifest_sha256"')
    if name == "manifest.json" and how != "truncate" and key < offset % len(original) < key + 17:
        # Only the name of the manifest's own checksum changed: every size, hash and value it guards is intact,
        # and it is read as a manifest from before self-checksums (what matters: nothing wrong is loaded).
        load_run_model(run, "latest")
        return
    with pytest.raises(TinylmError, match=re.escape(str(checkpoint))):
        load_run_model(run, "latest")
    assert cli.main(["eval", str(run), "--checkpoint", "latest"]) == 2
    line = error_line(capsys)
    assert str(checkpoint / name) in line or (name == "manifest.json" and str(checkpoint) in line), line
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet",
                     *set_args(TINY + ["train.max_steps=6"])]) == 2
    assert str(checkpoint) in error_line(capsys)
    assert snapshot(run) == before  # refusing touched nothing


def test_a_damaged_best_checkpoint_is_refused_by_sample_and_export(mixer_run, tmp_path, capsys):
    run = copy_run(mixer_run, tmp_path)
    flip(run / "checkpoints" / "best" / "model.safetensors", -5)
    for argv in (["sample", str(run), "--max-new-tokens", "3"], ["eval", str(run)],
                 ["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]):
        assert cli.main(argv) == 2, argv
        assert "best/model.safetensors: checksum mismatch" in error_line(capsys)
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------------------ shards
@pytest.mark.parametrize("name", ["train.bin", "val.bin", "meta.json"])
@pytest.mark.parametrize("how,offset", DAMAGES)
def test_a_damaged_shard_is_named_and_not_read(mixer_run, tmp_path, name, how, offset):
    run = copy_run(mixer_run, tmp_path)
    damage(run / "data" / name, how, offset)
    split = name.split(".")[0] if name != "meta.json" else "val"
    with pytest.raises(TinylmError, match=re.escape(str(run / "data" / name))):
        TokenShard(run / "data" / f"{split}.bin")


@pytest.mark.parametrize("name", ["val.bin", "meta.json"])
def test_eval_names_a_damaged_validation_shard(mixer_run, tmp_path, capsys, name):
    run = copy_run(mixer_run, tmp_path)
    flip(run / "data" / name, 10)
    assert cli.main(["eval", str(run), "--checkpoint", "latest"]) == 2
    assert str(run / "data" / name) in error_line(capsys)
    assert not (run / "eval.json").exists()


def test_resume_rebuilds_a_damaged_training_shard_instead_of_reading_it(mixer_run, tmp_path):
    run = copy_run(mixer_run, tmp_path)
    good = (run / "data" / "train.bin").read_bytes()
    flip(run / "data" / "train.bin", len(good) // 2)
    train(load_recipe("micromixer-100k", TINY + ["train.max_steps=6"]), run, resume=True, progress=False)
    assert (run / "data" / "train.bin").read_bytes() == good
    verify_manifest(run / "data")


def test_shards_without_a_manifest_still_never_feed_out_of_vocabulary_ids(mixer_run, tmp_path):
    run = copy_run(mixer_run, tmp_path)
    (run / "data" / "manifest.json").unlink()  # e.g. shards made by hand
    TokenShard(run / "data" / "val.bin")
    data = bytearray((run / "data" / "val.bin").read_bytes())
    data[1] = 0x7F  # uint16 little-endian: the high byte of token 0 -> an id >= 256
    (run / "data" / "val.bin").write_bytes(bytes(data))
    with pytest.raises(TinylmError, match="vocabulary size 256"):
        TokenShard(run / "data" / "val.bin")


# --------------------------------------------------------------------------------------------------- manifests
def test_a_manifest_covers_itself(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    write_manifest(tmp_path, extra={"step": 4, "val_loss": 1.5})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["a.bin"]["bytes"] == 3 and verify_manifest(tmp_path)["step"] == 4
    for edit in ({"step": 5}, {"val_loss": 1.25}, {"files": {}},
                 {"files": {"a.bin": {"bytes": 3, "sha256": "0" * 64}}}):
        (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **edit}))
        with pytest.raises(TinylmError, match="manifest.json: corrupted manifest"):
            verify_manifest(tmp_path)
    for bad in ("[]", '{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "x"}}}', '{"files": {"a.bin": 3}}',
                "\xff"):
        (tmp_path / "manifest.json").write_text(bad, encoding="latin-1")
        with pytest.raises(TinylmError, match="corrupted manifest"):
            verify_manifest(tmp_path)


# -------------------------------------------------------------------------------------------- untrusted files
def test_no_torch_load_without_weights_only_and_no_other_unpickling():
    """Every torch.load in the package passes weights_only=True; nothing else unpickles or runs loaded code."""
    offenders = []
    for path in sorted((REPO / "src" / "tinylm").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):  # the whole call, across lines
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[match.start():end + 1]
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{path.name}: {call}")
        for pattern in (r"\bpickle\.loads?\(", r"allow_pickle\s*=\s*True", r"trust_remote_code\s*=\s*True",
                        r"(?<![\w.])eval\(", r"(?<![\w.])exec\(", r"\bUnpickler\("):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


class _Payload:
    """Unpickling this runs code: it would create the file named in `target`."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _with_agreeing_manifest(checkpoint: Path) -> None:
    old = json.loads((checkpoint / "manifest.json").read_text())
    write_manifest(checkpoint, extra={k: v for k, v in old.items() if k != "files"})


def test_a_state_file_that_runs_code_is_refused_and_never_runs(mixer_run, tmp_path, capsys):
    run = copy_run(mixer_run, tmp_path)
    checkpoint = RunDir(run).step_checkpoints()[-1]
    target = tmp_path / "pwned"
    with open(checkpoint / "state.pt", "wb") as handle:
        pickle.dump({"step": 4, "optimizer": _Payload(target)}, handle, protocol=2)
    _with_agreeing_manifest(checkpoint)
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet",
                     *set_args(TINY + ["train.max_steps=6"])]) == 2
    assert "state.pt: cannot be read" in error_line(capsys)
    assert not target.exists()


def test_weights_that_are_a_pickle_are_refused_and_never_run(mixer_run, tmp_path, capsys):
    run = copy_run(mixer_run, tmp_path)
    checkpoint = RunDir(run).step_checkpoints()[-1]
    target = tmp_path / "pwned"
    torch.save({"tok_embeddings.weight": _Payload(target)}, checkpoint / "model.safetensors")
    _with_agreeing_manifest(checkpoint)
    assert cli.main(["eval", str(run), "--checkpoint", "latest"]) == 2
    assert "model.safetensors: not a readable safetensors file" in error_line(capsys)
    assert not target.exists()


def test_a_hugging_face_directory_with_only_pickled_weights_is_refused(tmp_path, capsys):
    target = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    torch.save({"x": _Payload(target)}, tmp_path / "pytorch_model.bin")
    assert cli.main(["sample", str(tmp_path), "--max-new-tokens", "2"]) == 2
    error_line(capsys)
    assert not target.exists()


@pytest.mark.parametrize("edit,message", [
    ("missing", "missing tensors layers.0.norm1.weight"),
    ("extra", "unexpected tensors extra.weight"),
    ("shape", r"tensor norm.bias has shape \(3,\), the model expects \(84,\)"),
    ("dtype-only", None),  # float64 of the right shapes: loads (cast), nothing to refuse
])
def test_weights_that_do_not_fit_exit_2(mixer_run, tmp_path, capsys, edit, message):
    run = copy_run(mixer_run, tmp_path)
    checkpoint = RunDir(run).step_checkpoints()[-1]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    if edit == "missing":
        del tensors["layers.0.norm1.weight"]
    elif edit == "extra":
        tensors["extra.weight"] = torch.zeros(2)
    elif edit == "shape":
        tensors["norm.bias"] = torch.zeros(3)
    else:
        tensors = {k: v.double() for k, v in tensors.items()}
    save_file(tensors, str(checkpoint / "model.safetensors"))
    _with_agreeing_manifest(checkpoint)
    code = cli.main(["eval", str(run), "--checkpoint", "latest"])
    if message is None:
        assert code == 0
        return
    assert code == 2 and re.search(message, error_line(capsys))


@pytest.mark.parametrize("content", [{}, {"step": "four"}, [1, 2, 3], {"step": 4, "optimizer": {}, "sampler": {}}])
def test_a_state_of_the_wrong_shape_is_refused(mixer_run, tmp_path, capsys, content):
    run = copy_run(mixer_run, tmp_path)
    checkpoint = RunDir(run).step_checkpoints()[-1]
    torch.save(content, checkpoint / "state.pt")
    _with_agreeing_manifest(checkpoint)
    assert cli.main(["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet",
                     *set_args(TINY + ["train.max_steps=6"])]) == 2
    assert "state.pt" in error_line(capsys)


def test_a_different_tokenizer_is_refused_everywhere(llama_run, tmp_path, capsys):
    """A tokenizer of the same kind and size but other merges (as `tinylm tokenizer train --force` leaves)."""
    run = copy_run(llama_run, tmp_path)
    other = tmp_path / "other"
    assert cli.main(["tokenizer", "train", "llama2c-260k", "--out", str(other),
                     *set_args(LLAMA + ["data.max_stories=60"])]) == 0
    capsys.readouterr()
    shutil.copy(other / "tokenizer.json", run / "tokenizer.json")
    data_before = snapshot(run / "data")
    for argv in (["eval", str(run)], ["sample", str(run), "--max-new-tokens", "2"],
                 ["train", "llama2c-260k", "--out", str(run), "--resume", "--quiet",
                  *set_args(LLAMA + ["train.max_steps=6"])]):
        assert cli.main(argv) == 2, argv
        assert "tokenizer" in error_line(capsys)
    assert snapshot(run / "data") == data_before  # the shards of the real tokenizer are still there
    assert [p.name for p in RunDir(run).step_checkpoints()][-1] == "step-00000004"


def test_a_larger_vocabulary_is_refused(mixer_run, llama_run, tmp_path, capsys):
    run = copy_run(mixer_run, tmp_path)
    shutil.copy(llama_run / "tokenizer.json", run / "tokenizer.json")  # 512 ids, the model has 256
    assert cli.main(["eval", str(run), "--checkpoint", "latest"]) == 2
    assert "512" in error_line(capsys)


# ------------------------------------------------------------------------------------------------------ exports
@pytest.mark.parametrize("fmt,weights", [("hf", "model.safetensors"), ("llama2c", "model.bin")])
def test_exports_carry_a_manifest_and_a_damaged_export_is_refused(llama_run, tmp_path, capsys, fmt, weights):
    out = tmp_path / fmt
    assert cli.main(["export", str(llama_run), "--format", fmt, "--out", str(out)]) == 0
    capsys.readouterr()
    manifest = verify_manifest(out)
    assert weights in manifest["files"] and "tokenizer.json" in manifest["files"] or fmt == "llama2c"
    if fmt != "hf":  # tinylm does not read model.bin back (run.c does): the manifest lets anyone check it
        for how, offset in DAMAGES:
            damaged = tmp_path / f"damaged-{how}{offset}"
            shutil.copytree(out, damaged)
            damage(damaged / weights, how, offset)
            with pytest.raises(TinylmError, match=re.escape(str(damaged / weights))):
                verify_manifest(damaged)
        return
    for how, offset in DAMAGES:
        damaged = tmp_path / f"damaged-{how}{offset}"
        shutil.copytree(out, damaged)
        damage(damaged / weights, how, offset)
        assert cli.main(["sample", str(damaged), "--max-new-tokens", "2"]) == 2
        assert str(damaged / weights) in error_line(capsys)
        assert cli.main(["eval", str(damaged), "--data", str(llama_run / "data")]) == 2
        assert str(damaged / weights) in error_line(capsys)
