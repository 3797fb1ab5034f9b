"""Trackers that watch a run besides metrics.jsonl (`train.report_to`): TensorBoard (RUN/tensorboard), Weights &
Biases and Trackio. Each receives every metrics.jsonl line as it is written (the same figures, at the same step) and
the resolved recipe as the run's config. They are optional extras (`pip install 'tinylm[tracking]'`); one that is
named but not installed is refused before any work starts."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from tinylm.errors import TinylmError
from tinylm.recipe import Recipe, recipe_to_toml
from tinylm.storage.rundir import RunDir

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def check_trackers(names: list[str]) -> None:
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name]) is None]
    if missing:
        raise TinylmError(f"train.report_to names {', '.join(missing)}, which is not installed (pip install "
                          f"{' '.join(PACKAGES[m] for m in missing)}, or pip install 'tinylm[tracking]')")


def figures(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl line, the step aside."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, int | float)}


class TensorBoardTracker:
    def __init__(self, run: RunDir, recipe: Recipe):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.tensorboard_dir), flush_secs=30)
        self.writer.add_text("recipe", "```toml\n" + recipe_to_toml(recipe) + "```", global_step=0)

    def log(self, row: dict[str, Any]) -> None:
        for name, value in figures(row).items():
            self.writer.add_scalar(name, value, global_step=int(row["step"]))

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A run in the project $WANDB_PROJECT (default tinylm), named after the run directory; WANDB_MODE=offline
    keeps it on disk under RUN/wandb."""

    def __init__(self, run: RunDir, recipe: Recipe):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tinylm"), name=run.path.name,
                              dir=str(run.path), config=recipe.to_dict())

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(figures(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """Trackio's wandb-like API, in the project $TRACKIO_PROJECT (default tinylm)."""

    def __init__(self, run: RunDir, recipe: Recipe):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "tinylm"), name=run.path.name,
                     config=recipe.to_dict())

    def log(self, row: dict[str, Any]) -> None:
        self.trackio.log(figures(row), step=int(row["step"]))

    def close(self) -> None:
        self.trackio.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


class Trackers:
    """The recipe's trackers together (none: every call does nothing)."""

    def __init__(self, names: list[str], run: RunDir, recipe: Recipe):
        check_trackers(names)
        self.open = [TRACKERS[name](run, recipe) for name in names]

    def log(self, row: dict[str, Any]) -> None:
        for tracker in self.open:
            tracker.log(row)

    def close(self) -> None:
        while self.open:
            self.open.pop().close()
