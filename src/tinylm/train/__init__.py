"""Training: the loop (loop.py), how one step runs (runtime.py), schedules, RNG state, checkpoints, the periodic
evaluation and the figures it reports. `train(recipe, run_dir)` is the entry point."""

from tinylm.train.loop import TrainSummary, train

__all__ = ["TrainSummary", "train"]
