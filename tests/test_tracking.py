"""Trackers (`train.report_to`) receive the figures metrics.jsonl holds and the resolved recipe: TensorBoard read
back from its event files, Weights & Biases in its offline mode where it is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: a 7-byte header, then LevelDB log blocks of 32 KiB whose
    chunks (checksum, length, type; 1 = whole, 2/3/4 = first/middle/last) carry serialized Record messages."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_holds_the_metrics_and_the_recipe(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (an optional tracker, too heavy for the dev extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = tiny("train.report_to=[\"wandb\"]")
    train(recipe, tmp_path / "run", progress=False)
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # the writer process finishes the file after the run's finish() returns
    (events,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    logged: dict[str, dict[int, float]] = {}
    config = {}
    kinds = []
    for record in wandb_records(events):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "history":
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # wandb's own _runtime, _timestamp, _step
                    logged.setdefault(key, {})[step] = json.loads(item.value_json)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in updates})
    assert kinds[-1] == "exit"  # the whole file
    assert logged == metrics_by_key(tmp_path / "run")
    assert {k: v for k, v in config.items() if not k.startswith("_")} == recipe.to_dict()
