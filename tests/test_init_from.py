"""`tinylm train --init-from`: a new run starts from the weights (and tokenizer) of a run, a directory transformers
saved, or a hub model, with a fresh optimizer and schedule; a source that does not fit is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import set_args, tiny_overrides
from tinylm.cli import main
from tinylm.data.tokenizer import load_tokenizer
from tinylm.recipe import load_recipe
from tinylm.runs.loading import initialization, load_run_model
from tinylm.train.checkpoints import load_state
from tinylm.train.schedule import learning_rate

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = [o for o in tiny_overrides(steps=4, eval_every=2) if not o.startswith("train.device")] + ["model.n_layers=2"]
FINE_TUNE = BASE + ["data.max_stories=120", "data.split_seed=7"]  # other stories, the same tokenizer


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "llama2c-260k", *set_args(BASE), "--out", str(run), "--quiet"]) == 0
    return run


def state_of(run, which="latest"):
    return load_run_model(run, which).model.state_dict()


def test_init_from_a_run(base_run, tmp_path):
    tuned = tmp_path / "tuned"
    # an almost-zero learning rate: the new run's weights are still the source's, so its start was exactly them
    assert main(["train", "llama2c-260k", *set_args(FINE_TUNE + ["train.lr=1e-9", "train.min_lr=0.0"]),
                 "--out", str(tuned), "--init-from", str(base_run), "--quiet"]) == 0
    source, started = state_of(base_run, "best"), state_of(tuned)
    for name, tensor in source.items():
        torch.testing.assert_close(started[name], tensor, atol=1e-6, rtol=0)
    assert load_tokenizer(tuned / "tokenizer.json").fingerprint() == load_tokenizer(base_run / "tokenizer.json") \
        .fingerprint()
    # a fresh optimizer and schedule: warmup from step 0, Adam's step count is this run's own
    recipe = load_recipe("llama2c-260k", FINE_TUNE + ["train.lr=1e-9", "train.min_lr=0.0"])
    lines = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert next(line["lr"] for line in lines if "lr" in line) == learning_rate(0, recipe.train)
    state = load_state(tuned / "checkpoints" / "step-00000004")
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}
    run_info = json.loads((tuned / "run.json").read_text())
    assert run_info["init_from"] == {"source": str(base_run), "hub_id": None}
    assert f"--init-from {base_run}" in run_info["command"]


def transformers_saved(base_run, directory):
    """The base run exported, then loaded and saved again by transformers (no tinylm metadata left)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(base_run), "--format", "hf", "--out", str(directory / "export")]) == 0
    model = AutoModelForCausalLM.from_pretrained(directory / "export")
    del model.config.tinylm
    model.save_pretrained(directory / "saved")
    AutoTokenizer.from_pretrained(directory / "export").save_pretrained(directory / "saved")
    config = json.loads((directory / "saved" / "config.json").read_text())
    assert "tinylm" not in config and not (directory / "saved" / "manifest.json").exists()
    return directory / "saved"


def test_init_from_a_transformers_directory_and_a_hub_id(base_run, tmp_path, offline_hub):
    saved = transformers_saved(base_run, tmp_path)
    recipe = load_recipe("llama2c-260k", FINE_TUNE)
    init = initialization(str(saved), recipe)
    source = state_of(base_run, "best")
    assert init.weights.keys() == source.keys() and init.hub_id is None
    for name, tensor in source.items():
        torch.testing.assert_close(init.weights[name], tensor, atol=0, rtol=0)
    assert init.tokenizer.encode("Once upon a time") == load_tokenizer(base_run / "tokenizer.json") \
        .encode("Once upon a time")
    tuned = tmp_path / "tuned"
    assert main(["train", "llama2c-260k", *set_args(FINE_TUNE), "--out", str(tuned), "--init-from", str(saved),
                 "--quiet"]) == 0
    assert (tuned / "checkpoints" / "step-00000004").is_dir()
    offline_hub("model", "someone/tiny-base", {p.name: p.read_bytes() for p in saved.iterdir() if p.is_file()})
    from_hub = initialization("someone/tiny-base", recipe)
    assert from_hub.hub_id == "someone/tiny-base" and from_hub.weights.keys() == source.keys()


def test_a_source_that_does_not_fit_is_one_line(base_run, tmp_path, capsys):
    cases = [(BASE + ["model.dim=96"], "its weights do not fit the recipe's model: model.dim 64 (the recipe: 96)"),
             (BASE + ["tokenizer.vocab_size=384"],
              "its tokenizer is not the recipe's: 512 token ids (the recipe: 384)"),
             (BASE + ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=259"], "a bpe tokenizer (the recipe: bytes)")]
    for overrides, message in cases:
        out = tmp_path / "refused"
        assert main(["train", "llama2c-260k", *set_args(overrides), "--out", str(out), "--init-from",
                     str(base_run), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("tinylm: error: --init-from ") and message in err, err
        assert not out.exists()
    copy = tmp_path / "copy"
    shutil.copytree(base_run, copy)
    assert main(["train", "llama2c-260k", *set_args(BASE), "--out", str(copy), "--resume", "--init-from",
                 str(base_run), "--quiet"]) == 2
    assert "give one of them" in capsys.readouterr().err
