"""Trackers (`train.report_to`) receive the figures metrics.jsonl holds and the resolved recipe: TensorBoard read
back from its event files, Weights & Biases in its offline mode where it is installed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from helpers import tiny_overrides
from tinylm.errors import TinylmError
from tinylm.recipe import load_recipe, recipe_to_toml
from tinylm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(*extra: str):
    overrides = [o for o in tiny_overrides(steps=4, eval_every=2) if not o.startswith("train.device")]
    return load_recipe("llama2c-260k", overrides + ["model.n_layers=2", *extra])


def metrics_by_key(run) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step":
                table.setdefault(key, {})[row["step"]] = float(value)
    return table


def test_tensorboard_receives_the_metrics_and_the_recipe(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is the tracking extra (pip install 'tinylm[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny("train.report_to=[\"tensorboard\"]")
    train(recipe, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = metrics_by_key(tmp_path / "run")
    assert {"loss", "lr", "tokens_per_s", "mfu", "val_loss", "val_bpb", "train_loss"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx(by_step, rel=1e-6), key  # TensorBoard keeps float32
    text = events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()
    assert recipe_to_toml(recipe) in text


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(tmp_path):
    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed here, so it cannot stand for a missing tracker")
    with pytest.raises(TinylmError, match="train.report_to names trackio, which is not installed") as error:
        train(tiny("train.report_to=[\"trackio\"]"), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value) and not (tmp_path / "run").exists()
    with pytest.raises(TinylmError, match="train.report_to must be one of tensorboard, wandb, trackio"):
        tiny("train.report_to=[\"mlflow\"]")


def test_wandb_offline_run_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (an optional tracker; not in the dev extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny("train.report_to=[\"wandb\"]"), tmp_path / "run", progress=False)
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    summary = json.loads((offline_runs[0] / "files" / "wandb-summary.json").read_text())
    expected = metrics_by_key(tmp_path / "run")
    assert summary["val_loss"] == pytest.approx(expected["val_loss"][max(expected["val_loss"])])
    config = (offline_runs[0] / "files" / "config.yaml").read_text()
    assert "llama2c-260k" in config
