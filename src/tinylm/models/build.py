"""Building a recipe's model, placing it on a device, and counting its parameters (see the package docstring)."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from tinylm.errors import TinylmError
from tinylm.models.cache import KVCache, MixerState
from tinylm.models.llama import Llama
from tinylm.models.mixer import MicroMixer
from tinylm.models.ops import IGNORE_INDEX
from tinylm.models.shapes import ParameterCount, module_group
from tinylm.recipe import ModelConfig

ARCHITECTURES = {"llama": Llama, "mixer": MicroMixer}  # recipe model.arch -> class

__all__ = ["build_model", "count_parameters", "ParameterCount", "KVCache", "MixerState", "IGNORE_INDEX",
           "Llama", "MicroMixer", "decay_split", "ARCHITECTURES", "resolve_device"]


def build_model(config: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
    """Build the architecture a recipe names; device="meta" allocates nothing (parameter counts of large models)."""
    cls = ARCHITECTURES[config.arch]
    if device is None:
        return cls(config)
    with torch.device(device):
        return cls(config)


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """cpu, cuda or cuda:N as a device, refused in one line when it is malformed or not on this machine."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise TinylmError(f"{what} must be cpu or cuda[:N], got '{name}'")
    if not torch.cuda.is_available():
        raise TinylmError(f"{what} {name}: no CUDA device is available")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise TinylmError(f"{what} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def decay_split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """llama2.c's optimizer groups: weight decay on tensors of 2 or more dimensions, none on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts each tensor once (tied weights are shared); the embedding is the input token table."""
    by_module: OrderedDict[str, int] = OrderedDict()
    for name, param in model.named_parameters():
        by_module[module_group(name)] = by_module.get(module_group(name), 0) + param.numel()
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


def parameter_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each trainable tensor's role, for per-group learning rates and Muon: "embedding" (token tables, the tied head
    with them), "head" (an output matrix of its own), "matrix" (the other 2-D tensors: the hidden layers' weights) and
    "scalar" (norm gains, biases: under 2 dimensions)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.unembedding_matrix()
    roles: dict[str, list[nn.Parameter]] = {"embedding": [], "head": [], "matrix": [], "scalar": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            roles["embedding"].append(p)
        elif p is head:
            roles["head"].append(p)
        else:
            roles["matrix" if p.dim() >= 2 else "scalar"].append(p)
    return roles
