"""What a finished run directory says about itself, read once for the model card and for run comparison."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TinylmError
from .models import build_model, count_parameters
from .recipe import Recipe, recipe_from_toml


@dataclass
class RunInfo:
    path: Path
    recipe: Recipe
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
        t = self.recipe.train
        return t.batch_size * t.grad_accum * self.recipe.model.context_length * int(self.run.get("world_size", 1))

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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TinylmError(f"{path}: not valid JSON ({exc})") from None


def read_run(run_dir: str | Path) -> RunInfo:
    path = Path(run_dir)
    recipe_file = path / "recipe.toml"
    if not recipe_file.is_file():
        raise TinylmError(f"{path}: not a run directory (no recipe.toml)")
    recipe = recipe_from_toml(recipe_file.read_text(encoding="utf-8"), origin=str(recipe_file))
    count = count_parameters(build_model(recipe.model, device="meta"))
    info = RunInfo(path=path, recipe=recipe, total_params=count.total, non_embedding_params=count.without_embedding,
                   run=_read_json(path / "run.json"), data=_read_json(path / "data" / "meta.json"),
                   evaluation=_read_json(path / "eval.json"))
    metrics = path / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                point = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the rest is still good
            if "val_loss" in point:
                info.val_points.append(point)
            if "loss" in point:
                info.train_points.append(point)
    return info
