"""What many test files share: the overrides of a run that trains in seconds, and `--set` arguments."""

from __future__ import annotations

import shutil
from pathlib import Path


def tiny_overrides(steps: int = 4, eval_every: int = 2, checkpoint_every: int = 2, warmup: int = 1,
                   eval_batches: int = 2, stories: int = 200, batch: int = 4, context: int = 32) -> list[str]:
    """A run of `steps` steps on `stories` stories, on the CPU, evaluated and checkpointed every few steps."""
    return [f"data.max_stories={stories}", f"train.batch_size={batch}", f"model.context_length={context}",
            f"train.max_steps={steps}", "train.log_interval=1", f"train.eval_interval={eval_every}",
            f"train.checkpoint_interval={checkpoint_every}", f"train.eval_batches={eval_batches}",
            f"train.warmup_steps={warmup}", "train.device=cpu"]


def set_args(overrides: list[str]) -> list[str]:
    """["a.b=1", ...] as command-line words: ["--set", "a.b=1", ...]."""
    return [word for item in overrides for word in ("--set", item)]


def copy_run(trained: Path, tmp_path: Path) -> Path:
    """A copy of a module's trained run that one test may damage or change."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run
