"""Timing shared by the speed benchmarks."""

from __future__ import annotations

import time


def interleaved_times(contenders: dict, rounds: int, steps: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, one figure per round. The contenders take turns within each round, so a
    slow spell of a shared machine falls on all of them alike; each is called once first to warm up (first-touch
    allocations, lazy initialisation)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for call in contenders.values():
        call()
    for _ in range(rounds):
        for name, call in contenders.items():
            start = time.perf_counter()
            for _ in range(steps):
                call()
            times[name].append((time.perf_counter() - start) / steps)
    return times
