"""Training: accumulation, exact resume, guard rails, checkpoint refusal, the CLI (schedules and optimizers are in
test_optimizer.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import set_args, tiny_overrides
from tinylm import cli
from tinylm.errors import TinylmError
from tinylm.models import build_model
from tinylm.recipe import load_recipe
from tinylm.runs.loading import load_run_model
from tinylm.storage.atomic import verify_manifest, write_manifest
from tinylm.storage.rundir import RunDir
from tinylm.train.checkpoints import load_state
from tinylm.train.loop import prepare_run_data, train
from tinylm.train.runtime import Placement

REPO = Path(__file__).resolve().parents[1]
# Tiny settings: a few milliseconds per step on a CPU.
# on the CPU: these tests compare runs bit for bit, which CUDA's bf16 kernels do not promise
COMMON = tiny_overrides(steps=6, eval_every=3, warmup=2)
TINY = {"llama2c-260k": COMMON + ["model.n_layers=2"], "micromixer-100k": COMMON}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """tokenizer.json + data/ for each tiny recipe, made once and copied into each run directory."""
    base = tmp_path_factory.mktemp("prepared")
    for name, overrides in TINY.items():
        prepare_run_data(load_recipe(name, overrides), RunDir(base / name), Placement(), progress=False)
    return base


def new_run(prepared: Path, tmp_path: Path, name: str, label: str = "run") -> Path:
    run = tmp_path / label
    run.mkdir()
    shutil.copy(prepared / name / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(prepared / name / "data", run / "data")
    return run


def tiny(name: str, *extra: str):
    return load_recipe(name, TINY[name] + list(extra))


def weights(run: Path, which: str = "latest") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / which / "model.safetensors")) if which != "latest" else \
        load_file(str(RunDir(run).step_checkpoints()[-1] / "model.safetensors"))


def test_zero_init_projections_start_each_block_as_the_identity():
    recipe = load_recipe("tinystories-demo", ["model.zero_init_projections=true", "model.n_layers=2"])
    torch.manual_seed(0)
    model = build_model(recipe.model)
    for layer in model.layers:
        assert not layer.attention.wo.weight.any() and not layer.feed_forward.w2.weight.any()
        assert float(layer.attention.wq.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    torch.manual_seed(0)  # everything else is drawn as before
    plain = build_model(load_recipe("tinystories-demo", ["model.n_layers=2"]).model)
    assert torch.equal(plain.tok_embeddings.weight, model.tok_embeddings.weight)


@pytest.mark.parametrize("unembedding", ["tied", "untied", "pinv"])
def test_training_loss_without_logits_matches_cross_entropy(unembedding):
    """The blockwise loss (return_logits=False) against torch's cross-entropy on full logits: value and gradients."""
    overrides = [f"model.unembedding={unembedding!r}".replace("'", '"'), "model.n_layers=1", "model.dropout=0.0"]
    recipe = load_recipe("llama2c-260k", overrides)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    ids = torch.randint(0, 512, (3, 40))
    targets = torch.randint(0, 512, (3, 40))
    targets[0, :5] = -100  # ignored positions (prefix tokens, padding)
    grads = []
    for kwargs in ({}, {"return_logits": False}):
        model.zero_grad()
        logits, loss = model(ids, targets, **kwargs)
        if kwargs:
            assert logits is None
        else:
            assert torch.equal(loss, torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                                       ignore_index=-100))
        (2 * loss).backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for name, grad in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], grad, rtol=1e-4, atol=1e-7)


def test_cpu_training_matmuls_match_torch_linear(monkeypatch):
    """On a CPU, training sends the projections through oneDNN; its loss and gradients must equal F.linear's."""
    from tinylm.models import ops as llama

    if llama.onednn_matmul() is None:
        pytest.skip("this PyTorch has no oneDNN matmul")
    recipe = load_recipe("simpler-llama-834k", ["model.n_layers=2", "model.dropout=0.0"])  # w1 has a bias
    torch.manual_seed(0)
    model = build_model(recipe.model)
    ids, targets = torch.randint(0, 361, (2, 48)), torch.randint(0, 361, (2, 48))
    results = []
    for kernel in (llama.onednn_matmul(), False):  # False: the plain F.linear path
        monkeypatch.setattr(llama, "_ONEDNN_MATMUL", kernel)
        model.zero_grad()
        _, loss = model(ids, targets, return_logits=False)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------- the loop
def test_accumulation_equals_a_larger_batch(prepared, tmp_path):
    a = new_run(prepared, tmp_path, "llama2c-260k", "accum")
    b = new_run(prepared, tmp_path, "llama2c-260k", "batch")
    train(tiny("llama2c-260k", "model.dropout=0.0", "train.grad_accum=2", "train.batch_size=2"), a, progress=False)
    train(tiny("llama2c-260k", "model.dropout=0.0", "train.grad_accum=1", "train.batch_size=4"), b, progress=False)
    wa, wb = weights(a), weights(b)
    for name in wa:
        # Adam divides by sqrt(v): where a gradient is ~0, float summation order shows; 2e-5 is 4% of one update
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=2e-5)
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for r in (a, b)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _tensors(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    return []


@pytest.mark.parametrize("choice", [[], ["train.optimizer=muon", "train.schedule=wsd", "train.embedding_lr=4e-3"]],
                         ids=["adamw-cosine", "muon-wsd"])
def test_resume_is_bitwise_identical(prepared, tmp_path, choice):
    whole = new_run(prepared, tmp_path, "llama2c-260k", "whole")
    split = new_run(prepared, tmp_path, "llama2c-260k", "split")
    # dropout 0.05 stays on: RNG must resume too
    recipe = tiny("llama2c-260k", "train.checkpoint_interval=100", *choice)
    train(recipe, whole, progress=False)
    first = train(recipe, split, progress=False, stop_after=3)
    assert first.step == 3 and first.stopped == "stop_after"
    with pytest.raises(TinylmError, match="--resume"):
        train(recipe, split, progress=False)
    second = train(recipe, split, resume=True, progress=False)
    assert second.step == 6
    wa, wb = weights(whole), weights(split)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    sa = _tensors(load_state(RunDir(whole).step_checkpoints()[-1])["optimizer"])
    sb = _tensors(load_state(RunDir(split).step_checkpoints()[-1])["optimizer"])
    assert len(sa) == len(sb) > 0
    assert all(torch.equal(a, b) for a, b in zip(sa, sb, strict=True))
    # metrics.jsonl of the split run holds each step once, as the unbroken run does
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3, 4, 5, 6]
    info = json.loads((split / "run.json").read_text())
    assert info["resumed_from"] == 3 and info["final_step"] == 6 and len(info["history"]) == 1


def test_metrics_logs_and_checkpoint_rotation(prepared, tmp_path, capsys):
    run = new_run(prepared, tmp_path, "micromixer-100k")
    summary = train(tiny("micromixer-100k", "train.keep_last=2"), run, progress=False)
    out = capsys.readouterr().out
    assert re.search(r"^6 \| loss \d+\.\d{4} \| lr \d\.\d{6}e-\d\d \| \d+\.\d\dms \| [\d,]+ tok/s \| mfu \d+\.\d\d%$",
                     out, re.M), out
    assert "tokens per step: 128 = batch 4 x context 32 x accumulation 1 x processes 1" in out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_points = [r for r in records if "loss" in r]
    val_points = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train_points] == [1, 2, 3, 4, 5, 6]
    assert train_points[-1]["tokens"] == 6 * 128 and train_points[0]["lr"] == pytest.approx(1.5e-4)
    assert [r["step"] for r in val_points] == [0, 3, 6]
    assert all(r["val_bpb"] > 0 for r in val_points)
    assert [p.name for p in RunDir(run).step_checkpoints()] == ["step-00000004", "step-00000006"]
    best = min(val_points[1:], key=lambda r: r["val_loss"])
    assert json.loads((run / "checkpoints/best/manifest.json").read_text())["step"] == best["step"]
    assert summary.best_val_loss == pytest.approx(best["val_loss"])
    model, recipe, tokenizer = load_run_model(run, "latest")
    assert not model.training and recipe.name == "micromixer-100k" and tokenizer.vocab_size == 256


def test_max_minutes_stops_with_a_checkpoint(prepared, tmp_path):
    run = new_run(prepared, tmp_path, "micromixer-100k")
    summary = train(tiny("micromixer-100k", "train.max_minutes=1e-6", "train.max_steps=1000"), run, progress=False)
    assert summary.stopped == "max_minutes" and summary.step == 1
    assert [p.name for p in RunDir(run).step_checkpoints()] == ["step-00000001"]


def test_nan_loss_stops_with_exit_2_and_keeps_the_last_checkpoint(prepared, tmp_path, monkeypatch, capsys):
    from tinylm.models.mixer import MicroMixer

    run = new_run(prepared, tmp_path, "micromixer-100k")
    calls = {"n": 0}
    forward = MicroMixer.forward

    def poisoned(self, ids, targets=None, cache=None, return_logits=True):
        logits, loss = forward(self, ids, targets, cache, return_logits)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # the third training step
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(MicroMixer, "forward", poisoned)
    args = ["train", "micromixer-100k", "--out", str(run), "--quiet"] + set_args(TINY["micromixer-100k"])
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss is nan at step 3" in err[0] and "step-00000002" in err[0]
    assert [p.name for p in RunDir(run).step_checkpoints()] == ["step-00000002"]
    verify_manifest(run / "checkpoints" / "step-00000002")


def test_sigint_writes_a_checkpoint(prepared, tmp_path):
    run = new_run(prepared, tmp_path, "micromixer-100k")
    overrides = TINY["micromixer-100k"] + ["train.max_steps=100000", "train.checkpoint_interval=100000",
                                           "train.eval_interval=100000", "train.log_interval=1"]
    command = [sys.executable, "-m", "tinylm.cli", "train", "micromixer-100k", "--out", str(run), "--quiet"]
    command += set_args(overrides)
    env = {**os.environ, "TINYLM_PEAK_FLOPS": "1e11"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and sum('"loss"' in x for x in metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    found = RunDir(run).step_checkpoints()
    assert len(found) == 1
    step = verify_manifest(found[-1])["step"]
    assert step >= 3 and load_state(found[-1])["step"] == step
    assert f"interrupted at step {step}" in out and "--resume" in out


# --------------------------------------------------------------------------------------- checkpoint refusal
@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    run = new_run(prepared, tmp_path_factory.mktemp("trained"), "micromixer-100k")
    train(tiny("micromixer-100k", "train.max_steps=2"), run, progress=False)
    return run


def _damaged_copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    return run, RunDir(run).step_checkpoints()[-1]


def test_refuses_a_bad_checksum(trained, tmp_path):
    run, checkpoint = _damaged_copy(trained, tmp_path)
    data = bytearray((checkpoint / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (checkpoint / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TinylmError, match="model.safetensors: checksum mismatch"):
        load_run_model(run, "latest")


@pytest.mark.parametrize("damage,message", [
    ("missing", "missing tensors layers.0.norm1.weight"),
    ("extra", "unexpected tensors extra.weight"),
    ("shape", r"tensor norm.bias has shape \(3,\), the model expects \(84,\)"),
])
def test_refuses_weights_that_do_not_fit(trained, tmp_path, damage, message):
    run, checkpoint = _damaged_copy(trained, tmp_path)
    tensors = load_file(str(checkpoint / "model.safetensors"))
    if damage == "missing":
        del tensors["layers.0.norm1.weight"]
    elif damage == "extra":
        tensors["extra.weight"] = torch.zeros(2)
    else:
        tensors["norm.bias"] = torch.zeros(3)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    old = json.loads((checkpoint / "manifest.json").read_text())
    write_manifest(checkpoint, extra={k: v for k, v in old.items() if k != "files"})  # checksums that agree
    with pytest.raises(TinylmError, match=message):
        load_run_model(run, "latest")


def test_refuses_a_tokenizer_that_does_not_match(trained, tmp_path, prepared):
    run, _ = _damaged_copy(trained, tmp_path)
    shutil.copy(prepared / "llama2c-260k" / "tokenizer.json", run / "tokenizer.json")  # 512 ids, model has 256
    with pytest.raises(TinylmError, match="tokenizer.json"):
        load_run_model(run, "latest")


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("args,message", [
    (["no-such-recipe"], "unknown recipe"),
    (["micromixer-100k", "--set", "train.lr=fast"], "train.lr"),
    (["micromixer-100k", "--set", "train.nope=1"], "unknown key"),
    (["micromixer-100k", "--set", "data.paths=['/no/such/file.txt']"], "data path not found"),
    (["micromixer-100k", "--resume"], "nothing to resume"),
    (["micromixer-100k", "--set", "train.optimizer=sgd"], "train.optimizer must be one of adamw, muon"),
    (["micromixer-100k", "--set", "train.schedule=linear"], "train.schedule must be one of"),
    (["micromixer-100k", "--set", "train.decay_fraction=0"], "train.decay_fraction"),
    (["micromixer-100k", "--set", "train.matrix_lr=-1"], "train.matrix_lr"),
    (["micromixer-100k", "--set", "model.zero_init_projections=true"], "model.zero_init_projections"),
])
def test_train_cli_bad_input_exits_2(tmp_path, capsys, args, message):
    assert cli.main(["train", *args, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_train_cli_refuses_a_changed_recipe_on_resume(trained, tmp_path, capsys):
    run, _ = _damaged_copy(trained, tmp_path)
    args = ["train", "micromixer-100k", "--out", str(run), "--resume", "--quiet", "--set", "model.dim=64"]
    assert cli.main(args + set_args(TINY["micromixer-100k"])) == 2
    assert "different [model] section" in capsys.readouterr().err
