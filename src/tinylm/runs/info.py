"""What a finished run directory says about itself, read once for the model card and for run comparison."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinylm.models import build_model, count_parameters
from tinylm.recipe import Recipe
from tinylm.storage.rundir import RunDir


@dataclass
class RunInfo:
    path: Path
    recipe: Recipe
    model: torch.nn.Module  # on the meta device: its architecture describes itself to the card
    total_params: int
    non_embedding_params: int
    run: dict[str, Any] = field(default_factory=dict)  # run.json: command, hardware, wall time, ...
    data: dict[str, Any] = field(default_factory=dict)  # data/meta.json
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json
    train_points: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines with a train loss
    val_points: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl lines with a val loss

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def tokens_per_step(self) -> int:
        if "tokens_per_step" in self.run:
            return int(self.run["tokens_per_step"])
        train = self.recipe.train
        processes = int(self.run.get("world_size", 1))
        return train.batch_size * train.grad_accum * self.recipe.model.context_length * processes

    @property
    def steps(self) -> int:
        last = self.train_points[-1] if self.train_points else {}
        return int(self.run.get("final_step", last.get("step", 0)))

    @property
    def tokens_seen(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def wall_time_s(self) -> float:
        if "wall_time_s" in self.run:
            return float(self.run["wall_time_s"])
        return float(self.train_points[-1].get("time_s", 0.0)) if self.train_points else 0.0

    def split(self, name: str) -> dict[str, Any]:
        return self.data.get(name, {}) if isinstance(self.data.get(name), dict) else {}


def read_run(run_dir: str | Path) -> RunInfo:
    run = RunDir(run_dir)
    recipe = run.read_recipe()
    model = build_model(recipe.model, device="meta")
    count = count_parameters(model)
    info = RunInfo(path=run.path, recipe=recipe, model=model, total_params=count.total,
                   non_embedding_params=count.without_embedding, run=run.read_run_info(), data=run.read_data_meta(),
                   evaluation=run.read_evaluation())
    for point in run.read_metrics():
        if "val_loss" in point:
            info.val_points.append(point)
        if "loss" in point:
            info.train_points.append(point)
    return info
