"""`tinylm eval`: a run's checkpoint, a Hugging Face directory or a hub model scored on a whole validation split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tinylm.data import hub
from tinylm.data.shards import TokenShard
from tinylm.errors import TinylmError
from tinylm.runs.loading import load_model
from tinylm.storage.atomic import MANIFEST_NAME, atomic_write_json
from tinylm.train.evaluation import Evaluation, evaluate


def evaluate_path(path: str | Path, which: str = "best", data_dir: str | Path | None = None,
                  batch_size: int | None = None, device: str = "cpu", compiled: str | None = None) -> Evaluation:
    """A run is scored on RUN/data/val.bin and the result recorded in RUN/eval.json (not when `compiled` scores the
    compiled decode step in that dtype instead of the model). A Hugging Face directory needs the shards of a run
    prepared with the same tokenizer (`data_dir`), unless it holds a data/ folder itself; a hub model always needs
    `data_dir`."""
    path = Path(path)
    if batch_size is not None and batch_size < 1:
        raise TinylmError(f"--batch-size: the batch size must be positive, got {batch_size}")
    if data_dir is None and not path.exists() and hub.is_repo_id(str(path)):
        raise TinylmError(f"{path}: a hub model needs --data DIR, the shards of a run prepared with its tokenizer")
    loaded = load_model(path, which, device=device)
    data = Path(data_dir) if data_dir else path / "data"
    if loaded.run is None and data_dir is None and not data.is_dir():
        raise TinylmError(f"{path} is a model directory without token shards: pass --data RUN/data, the shards of a "
                          "run prepared with its tokenizer")
    shard = TokenShard(data / "val.bin")
    result = evaluate(loaded.model, loaded.tokenizer, shard, loaded.recipe.model.context_length,
                      batch_size or loaded.recipe.train.batch_size, device, compiled=compiled)
    step = None
    if loaded.run is not None:
        step = json.loads((loaded.source / MANIFEST_NAME).read_text(encoding="utf-8")).get("step")
    result = dataclasses.replace(result, checkpoint=str(loaded.source), data=str(data), step=step,
                                 note=loaded.note or "")
    if loaded.run is not None and compiled is None:
        atomic_write_json(loaded.run.eval_file, result.to_dict())
    return result
