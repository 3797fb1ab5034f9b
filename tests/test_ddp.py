"""Data-parallel training: two CPU processes under torchrun (gloo) equal one process with twice the accumulation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import set_args, tiny_overrides
from tinylm.recipe import load_recipe
from tinylm.storage.rundir import RunDir
from tinylm.train.loop import prepare_run_data, train
from tinylm.train.runtime import Placement

REPO = Path(__file__).resolve().parents[1]
# batch_size stays the recipe's: the two runs compare accumulation and processes (gloo, on the CPU)
TINY = [o for o in tiny_overrides() if not o.startswith("train.batch_size")] + ["model.n_layers=2", "model.dropout=0.0"]


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run).step_checkpoints()[-1] / "model.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


@pytest.mark.parametrize("choice", [[], ["train.optimizer=muon", "train.schedule=wsd"]], ids=["adamw", "muon-wsd"])
def test_two_processes_equal_one_with_double_accumulation(tmp_path, monkeypatch, choice):
    monkeypatch.setenv("TINYLM_PEAK_FLOPS", "1e11")
    base = tmp_path / "prepared"
    tiny = TINY + choice
    prepare_run_data(load_recipe("llama2c-260k", tiny), RunDir(base), Placement(), progress=False)
    runs = {}
    for name in ("one", "two"):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        shutil.copy(base / "tokenizer.json", runs[name] / "tokenizer.json")
        shutil.copytree(base / "data", runs[name] / "data")

    overrides = tiny + ["train.batch_size=4", "train.grad_accum=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "tinylm.cli", "train", "llama2c-260k", "--out", str(runs["two"]), "--quiet"]
    command += set_args(overrides)
    env = {**os.environ, "TINYLM_PEAK_FLOPS": "1e11", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens per step: 256 = batch 4 x context 32 x accumulation 1 x processes 2" in done.stdout

    train(load_recipe("llama2c-260k", tiny + ["train.batch_size=4", "train.grad_accum=2"]), runs["one"],
          progress=False)
    one, two = _final(runs["one"]), _final(runs["two"])
    assert one.keys() == two.keys()
    for name in one:
        # the same global batch in a different summation order: equal to float tolerance (see test_train.py)
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=2e-5)
    assert _losses(runs["one"]) == pytest.approx(_losses(runs["two"]), rel=1e-5)
    info = json.loads((runs["two"] / "run.json").read_text())
    assert info["world_size"] == 2 and info["tokens_per_step"] == 256
