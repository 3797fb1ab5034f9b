"""Learning-rate schedules: a pure function of the step, so resuming needs no scheduler state.

`step` counts optimizer updates from 0; the rate returned is the one used for update number `step`.
- "cosine": linear warmup to `lr` over `warmup_steps` updates (update 0 already moves: lr/warmup, as nanoGPT's
  newer code, not llama2.c's wasted update at lr 0), then a half cosine from `lr` at update `warmup_steps` down to
  `min_lr` at update `max_steps`; `min_lr` after that.
- "onecycle": torch's OneCycleLR with its defaults (cosine annealing, div_factor 25, final_div_factor 1e4,
  two phases) and pct_start = warmup_steps / max_steps, which is how Test-1-4000 was trained. It rises from lr/25 to
  `lr` at update warmup_steps - 1, then anneals to `min_lr` (or lr/25/1e4 when min_lr is 0) at update max_steps - 1.
  Momentum is not cycled (cycle_momentum=False): beta1 stays the recipe's.
- "wsd": warmup-stable-decay (Hu et al. 2024, "MiniCPM"; the modded-nanogpt speedrun): the same linear warmup, `lr`
  until the last `decay_fraction` of max_steps, then a straight line down to `min_lr` at update `max_steps`.
- "constant": the same linear warmup, then `lr`.

Each optimizer group has its own peak rate; the trainer scales them all by learning_rate(step) / lr.
"""

from __future__ import annotations

import math

from tinylm.recipe import TrainConfig

ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4


def _cosine_between(start: float, end: float, fraction: float) -> float:
    """From `start` at fraction 0 to `end` at fraction 1 along half a cosine."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * fraction))


def learning_rate(step: int, train: TrainConfig) -> float:
    lr, warmup, total = train.lr, train.warmup_steps, train.max_steps
    if train.schedule == "onecycle":
        return _onecycle(step, lr, train.min_lr, warmup, total)
    if step < warmup:
        return lr * (step + 1) / warmup
    if train.schedule == "constant":
        return lr
    if step >= total:
        return train.min_lr
    if train.schedule == "wsd":
        decay_start = max(warmup, total - round(train.decay_fraction * total))
        if step < decay_start:
            return lr
        return lr + (train.min_lr - lr) * (step - decay_start) / max(1, total - decay_start)
    return _cosine_between(lr, train.min_lr, (step - warmup) / max(1, total - warmup))


def _onecycle(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    initial = lr / ONECYCLE_DIV_FACTOR
    final = min_lr if min_lr > 0 else initial / ONECYCLE_FINAL_DIV_FACTOR
    peak_step = warmup - 1  # torch: float(pct_start * total_steps) - 1
    last_step = total - 1
    if step <= peak_step:
        return _cosine_between(initial, lr, step / peak_step) if peak_step > 0 else lr
    if step >= last_step:
        return final
    return _cosine_between(lr, final, (step - peak_step) / (last_step - peak_step))
