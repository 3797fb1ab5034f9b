"""One model interface for every architecture: `build_model(config)` gives an nn.Module with
`forward(ids, targets=None, cache=None) -> (logits, loss)`, `new_cache(batch_size, ...)` and `unembedding_matrix()`."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..recipe import ModelConfig
from .cache import KVCache, MixerState
from .llama import Llama
from .ops import IGNORE_INDEX
from .mixer import MicroMixer

__all__ = ["build_model", "count_parameters", "ParameterCount", "KVCache", "MixerState", "IGNORE_INDEX",
           "Llama", "MicroMixer", "decay_split"]


def build_model(config: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
    """Build the architecture a recipe names; device="meta" allocates nothing (parameter counts of large models)."""
    cls = {"llama": Llama, "mixer": MicroMixer}[config.arch]
    if device is None:
        return cls(config)
    with torch.device(device):
        return cls(config)


def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """llama2.c's optimizer groups: weight decay on tensors of 2 or more dimensions, none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


@dataclass
class ParameterCount:
    total: int
    embedding: int
    by_module: "OrderedDict[str, int]"
    decayed: int
    decayed_tensors: int
    not_decayed: int
    not_decayed_tensors: int

    @property
    def without_embedding(self) -> int:
        return self.total - self.embedding


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts each tensor once (tied weights are shared); the embedding is the input token table."""
    by_module: OrderedDict[str, int] = OrderedDict()
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        if top == "layers":
            top = "layers." + ".".join(name.split(".")[2:-1])  # summed over layers: layers.attention.wq, ...
        by_module[top] = by_module.get(top, 0) + param.numel()
    decayed, not_decayed = decay_split(model)
    total = sum(p.numel() for p in model.parameters())
    return ParameterCount(
        total=total,
        embedding=model.tok_embeddings.weight.numel(),
        by_module=by_module,
        decayed=sum(p.numel() for p in decayed),
        decayed_tensors=len(decayed),
        not_decayed=sum(p.numel() for p in not_decayed),
        not_decayed_tensors=len(not_decayed),
    )
