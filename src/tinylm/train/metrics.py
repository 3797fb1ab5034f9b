"""What training reports about itself: MFU, the llama2.c-style log line, metrics.jsonl and the hardware in run.json.

MFU = achieved FLOP/s / peak FLOP/s, with each model's own count of training FLOPs per token
(`model.flops_per_token()`). The peak on a GPU is the vendor's dense bf16 figure; on a CPU it is the measured
fp32 rate of a large matmul on the same threads, the faster of torch.mm (MKL) and oneDNN's kernel (what the hardware
gives PyTorch, not a datasheet number; on AMD processors MKL runs AVX2 code and oneDNN about twice as fast).
TINYLM_PEAK_FLOPS overrides both.
"""

from __future__ import annotations

import json
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from tinylm.models.ops import onednn_matmul
from tinylm.storage.atomic import atomic_write_text

# Dense bf16 tensor-core peaks (FLOP/s), by a substring of torch.cuda.get_device_name().
GPU_BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def matmul_rate(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048,
                repeats: int = 3, kernel: str = "torch") -> float:
    """Measured FLOP/s of a square matmul (best of `repeats`, after one warm-up): torch.mm, or on a CPU "onednn",
    the kernel tinylm trains with there (models/llama.py)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    product = torch.mm
    if kernel == "onednn":
        product = onednn_matmul()
        if product is None:
            return 0.0
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        product(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


@lru_cache(maxsize=4)
def peak_flops(device_type: str, device_name: str = "") -> float:
    """The peak that MFU is measured against (cached per process)."""
    if os.environ.get("TINYLM_PEAK_FLOPS"):
        return float(os.environ["TINYLM_PEAK_FLOPS"])
    if device_type == "cuda":
        for key, value in GPU_BF16_PEAKS.items():
            if key in device_name:
                return value
        return matmul_rate("cuda", torch.bfloat16, size=8192)
    return max(matmul_rate("cpu", torch.float32, size=2048), matmul_rate("cpu", torch.float32, 2048, kernel="onednn"))


def log_line(step: int, loss: float, lr: float, ms: float, tokens_per_s: float, mfu: float) -> str:
    return f"{step} | loss {loss:.4f} | lr {lr:e} | {ms:.2f}ms | {tokens_per_s:,.0f} tok/s | mfu {mfu * 100:.2f}%"


class MetricsFile:
    """metrics.jsonl: one JSON object per line, appended and flushed as training goes."""

    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint we continue from (they will be logged again)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()


def hardware_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu": _cpu_name(),
                            "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
