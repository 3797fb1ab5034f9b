"""The optimizer a recipe asks for: AdamW alone (llama2.c's choice) or Muon for the hidden matrices with AdamW for the
rest, each parameter group with its own learning rate.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; the modded-nanogpt speedrun)
orthogonalises the momentum of each 2-D hidden matrix; embeddings, the output head, norms and biases stay with AdamW,
as Muon's authors prescribe. The schedule scales every group's own rate by the same factor, so one schedule drives
all of them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from tinylm.errors import TinylmError
from tinylm.models import decay_split, parameter_roles
from tinylm.recipe import TrainConfig


@dataclass
class _Group:
    optimizer: str  # "adamw" or "muon"
    lr: float
    weight_decay: float
    params: list


def group_learning_rates(train: TrainConfig) -> dict[str, float]:
    """Each parameter role's peak rate: its own setting, or train.lr where that is 0."""
    own = {"embedding": train.embedding_lr, "head": train.head_lr, "matrix": train.matrix_lr, "scalar": 0.0}
    return {role: rate or train.lr for role, rate in own.items()}


def parameter_groups(model: torch.nn.Module, train: TrainConfig) -> list[_Group]:
    """Groups in the order of model.parameters(), one per (optimizer, rate, weight decay): with one rate and AdamW this
    is llama2.c's pair (decayed 2-D tensors, then norms and biases)."""
    role_of = {id(p): role for role, params in parameter_roles(model).items() for p in params}
    rates = group_learning_rates(train)
    groups: dict[tuple, _Group] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        role = role_of[id(p)]
        kind = "muon" if train.optimizer == "muon" and role == "matrix" and p.dim() == 2 else "adamw"
        key = (kind, rates[role], 0.0 if role == "scalar" else train.weight_decay)
        groups.setdefault(key, _Group(*key, params=[])).params.append(p)
    return list(groups.values())


class Optimizers:
    """One or two torch optimizers stepped as one; the trainer sets the schedule's factor with `set_lr_scale`.

    AdamW alone saves torch's own state dict (the format of every earlier checkpoint); with Muon the state is
    {"adamw": ..., "muon": ...}. Both load with torch.load(weights_only=True)."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self.parts = parts
        self.base_lrs = [group["lr"] for part in parts.values() for group in part.param_groups]

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    def set_lr_scale(self, scale: float) -> None:
        for group, base in zip(self.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * scale

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        if list(self.parts) == ["adamw"]:
            return self.parts["adamw"].state_dict()
        return {kind: part.state_dict() for kind, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError or KeyError when the state was written for other optimizers or groups."""
        if list(self.parts) == ["adamw"]:
            self.parts["adamw"].load_state_dict(state)
            return
        if set(state) != set(self.parts):
            raise ValueError(f"optimizer state holds {', '.join(sorted(state))}, this run uses "
                             f"{', '.join(sorted(self.parts))}")
        for kind, part in self.parts.items():
            part.load_state_dict(state[kind])


def _adamw(groups: list[dict], train: TrainConfig) -> torch.optim.AdamW:
    # The fused kernel makes one pass over each tensor (several times faster on a CPU than the multi-tensor path;
    # docs/RESULTS.md); PyTorch builds without a CPU fused AdamW fall back to that path.
    try:
        return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), foreach=True)


def build_optimizer(model: torch.nn.Module, train: TrainConfig, report=print) -> Optimizers:
    """train.optimizer over the model's parameter groups, reported as llama2.c reports its weight-decay split."""
    decayed, not_decayed = decay_split(model)
    report(f"num decayed parameter tensors: {len(decayed)}, with {sum(p.numel() for p in decayed):,} parameters")
    report(f"num non-decayed parameter tensors: {len(not_decayed)}, "
           f"with {sum(p.numel() for p in not_decayed):,} parameters")
    groups = parameter_groups(model, train)
    by_kind: dict[str, list[dict]] = {}
    for g in groups:
        by_kind.setdefault(g.optimizer, []).append({"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay})
    parts: dict[str, torch.optim.Optimizer] = {"adamw": _adamw(by_kind["adamw"], train)}
    if "muon" in by_kind:
        muon = by_kind["muon"]
        if not hasattr(torch.optim, "Muon"):
            raise TinylmError(f"train.optimizer = \"muon\" needs PyTorch 2.9 or later (this is {torch.__version__})")
        report(f"muon for {sum(len(g['params']) for g in muon)} hidden matrices, with "
               f"{sum(p.numel() for g in muon for p in g['params']):,} parameters (lr {muon[0]['lr']:g}); "
               "adamw for the rest")
        # Rates on AdamW's scale (Liu et al. 2025, "Muon is Scalable for LLM Training"): each update is scaled to the
        # RMS an AdamW update has, so train.lr and train.weight_decay mean the same for both optimizers.
        parts["muon"] = ShapeBatchedMuon(muon, lr=muon[0]["lr"], momentum=train.muon_momentum, nesterov=True,
                                         adjust_lr_fn="match_rms_adamw")
    return Optimizers(parts)


class ShapeBatchedMuon(torch.optim.Muon):
    """torch.optim.Muon with the Newton-Schulz iterations of same-shaped matrices run as one batch of products.

    Bitwise the same update as torch's per-matrix loop (the same bf16 products, matrix by matrix:
    tests/test_optimizer.py), the same state dict, at about a third of the cost per step on the demo model, where each
    of the loop's 15 products per matrix is too small to pay for its own call (docs/SPEEDRUN.md)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] != "match_rms_adamw" or not group["nesterov"]:
                raise ValueError("ShapeBatchedMuon implements Nesterov momentum with match_rms_adamw rates only")
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - group["momentum"])
                updates.append(p.grad.lerp(buffer, group["momentum"]))
            orthogonal = _orthogonalised(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
            for p, update in zip(params, orthogonal, strict=True):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                # Each update scaled to an AdamW update's RMS (Liu et al. 2025).
                p.add_(update, alpha=-group["lr"] * 0.2 * math.sqrt(max(p.shape)))
        return loss


def _orthogonalised(updates: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int,
                    eps: float) -> list[torch.Tensor]:
    """Muon's quintic Newton-Schulz iteration in bf16 on each update, same-shaped ones stacked into one batch."""
    a, b, c = coefficients
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i, update in enumerate(updates):
        by_shape[update.shape].append(i)
    result: list[torch.Tensor] = [torch.empty(0)] * len(updates)
    for shape, indices in by_shape.items():
        x = torch.stack([updates[i] for i in indices]).bfloat16()
        tall = shape[0] > shape[1]  # iterate on the wide form: the Gram matrix is the smaller side squared
        if tall:
            x = x.mT
        x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, orthogonal in zip(indices, x.mT if tall else x, strict=True):
            result[i] = orthogonal
    return result
