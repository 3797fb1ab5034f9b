"""Loading tensors into a model: every tensor present, none extra, every shape equal, or one line naming the first
difference. Checkpoints and Hugging Face directories both come through here."""

from __future__ import annotations

import torch
import torch.nn as nn

from tinylm.errors import TinylmError


def some_names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_fits(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], where: str,
               what: str = "the model") -> None:
    """`expected` maps names to shapes; raises TinylmError for missing, unexpected or misshapen tensors."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = ([f"missing tensors {some_names(missing)}"] if missing else []) + \
                ([f"unexpected tensors {some_names(unexpected)}"] if unexpected else [])
        raise TinylmError(f"{where}: does not fit {what}: {'; '.join(parts)}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise TinylmError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, {what} expects "
                              f"{tuple(expected[name])}")


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def load_checked(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    check_fits(shapes(model), tensors, where)
    model.load_state_dict(tensors, strict=True)
