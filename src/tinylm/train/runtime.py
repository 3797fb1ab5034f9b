"""How one training step runs: the process's place (rank, device, numeric format), the forward and
backward over micro-batches, the update, and a clean stop on SIGINT/SIGTERM. train.py drives these in its loop;
benchmarks/train_speed.py times the same functions."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from tinylm.errors import TinylmError
from tinylm.models import resolve_device
from tinylm.recipe import TrainConfig


@dataclass
class Placement:
    """Where this process trains: its rank among `world` processes, its device and numeric format."""
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: str = "float32"
    threads: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == "bfloat16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_placement(train: TrainConfig) -> Placement:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if train.device == "cuda":
        resolve_device("cuda", "train.device")
    use_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
    place = Placement(world=world, rank=int(os.environ.get("RANK", "0")),
                      local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        if place.local_rank >= torch.cuda.device_count():
            raise TinylmError(f"{int(os.environ.get('LOCAL_WORLD_SIZE', world))} processes on this machine but "
                              f"{torch.cuda.device_count()} CUDA device(s): start one process per GPU, or set "
                              "train.device = \"cpu\"")
        place.device = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(place.device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls outside autocast on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    else:
        # Share the cores among the processes on this machine.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        place.threads = max(1, cores // local_world)
        torch.set_num_threads(place.threads)
        keep_freed_memory()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                device_id=place.device if use_cuda else None)
    place.dtype = train.dtype if train.dtype != "auto" else ("bfloat16" if use_cuda else "float32")
    if place.dtype == "bfloat16" and use_cuda and not torch.cuda.is_bf16_supported():
        raise TinylmError("this GPU has no bfloat16 support: set train.dtype = \"float32\"")
    return place


def accumulate_gradients(model, micro_batches, count: int, place: Placement) -> torch.Tensor:
    """Forward and backward over `count` micro-batches, gradients summed as the mean over all of them; returns the
    mean loss (a detached scalar on the device)."""
    loss_sum = torch.zeros((), device=place.device)
    for k, (x, y) in enumerate(micro_batches):
        if place.device.type == "cuda":
            x = x.pin_memory().to(place.device, non_blocking=True)
            y = y.pin_memory().to(place.device, non_blocking=True)
        if place.world > 1:  # gradients are averaged across ranks once, after the last micro-batch
            model.require_backward_grad_sync = k == count - 1
        with place.autocast():
            _, loss = model(x, y, return_logits=False)  # the loss without holding the logits
        (loss / count).backward()
        loss_sum += loss.detach().float()
    return loss_sum / count


def apply_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> None:
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def training_step(model, optimizer, micro_batches: list, grad_clip: float, place: Placement | None = None) -> float:
    """One whole update on one process, as the trainer does it (for benchmarks); returns the mean loss."""
    place = place or Placement()
    loss = accumulate_gradients(model, micro_batches, len(micro_batches), place)
    apply_update(model, optimizer, grad_clip)
    return float(loss)


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the system.

    A CPU training step frees and re-allocates the same large activation buffers every step; by default glibc hands
    blocks over 32 MB (and trimmed heap tops) back to the kernel, and each step then pays page faults and page
    zeroing to get them again. Raising the mmap and trim thresholds (what jemalloc/tcmalloc would give) removes
    that. Linux with glibc only; returns whether it applied."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


class StopRequest:
    """The first SIGINT/SIGTERM asks the loop to checkpoint and stop at the end of the current step;
    a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
