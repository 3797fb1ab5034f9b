"""Random-number state: captured into checkpoints in a form `torch.load(weights_only=True)` accepts, and a seed per
(run seed, rank, step) so that dropout masks do not depend on how a run was split into sessions."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed that differs for every (seed, rank, step)."""
    words = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, rank, step]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy's global and Python's generator states, as tensors, numbers and lists."""
    name, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
