"""oneDNN kernels for the CPU: matmuls for training's linear layers, a blocked linear + cross-entropy, and linears on
pre-packed weights for the decode step.

Training uses them through `project` and `linear_cross_entropy` (both architectures); model inference, autocast,
torch.compile and other devices take the plain PyTorch path, so numerics there are untouched. The sampling engine's
decode step uses `onednn_packed`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


# PyTorch's CPU matmul (MKL) runs AVX2 code on AMD processors; oneDNN's kernel, which PyTorch also ships, uses AVX-512
# there and is faster on these models' shapes (docs/RESULTS.md). Training on a CPU in fp32 sends the projections
# (forward
# and both backward products) through it. Inference, autocast, torch.compile and other devices keep F.linear.
# TINYLM_ONEDNN=0 turns it off.
_ONEDNN_MATMUL = None


def onednn_matmul():
    """oneDNN's `a @ b.T` (dense strided tensors), or None where this PyTorch lacks it or it disagrees with mm."""
    global _ONEDNN_MATMUL
    if _ONEDNN_MATMUL is None:
        _ONEDNN_MATMUL = _checked_onednn(_build_matmul_nt) or False
    return _ONEDNN_MATMUL or None


def _build_matmul_nt():
    op = torch.ops.mkldnn._linear_pointwise

    def matmul_nt(a, b):
        return op(a, b, None, "none", [], "")

    # the three products of a training step, transposed (strided) operands included
    a, b, c = torch.randn(8, 16), torch.randn(12, 16), torch.randn(8, 12)
    if (torch.allclose(matmul_nt(a, b), a @ b.t(), atol=1e-5)
            and torch.allclose(matmul_nt(c, b.t()), c @ b, atol=1e-5)
            and torch.allclose(matmul_nt(a.t(), c.t()), a.t() @ c, atol=1e-5)):
        return matmul_nt
    return None


@dataclass(frozen=True)
class PackedLinear:
    """oneDNN linears on weights packed once into its own layout (an opaque tensor). `pack(weight)` takes an (out, in)
    weight; `linear(x, packed, bias)` is x @ weight.T + bias (bias may be None); `linear_add(residual, x, packed)` is
    residual + x @ weight.T in one kernel."""

    pack: Callable
    linear: Callable
    linear_add: Callable


_PACKED_LINEAR = None


def onednn_packed() -> PackedLinear | None:
    """oneDNN's packed-weight linears in fp32 on a CPU, or None where this PyTorch lacks them or they disagree with mm.
    From a few rows up they beat both the unpacked oneDNN matmul and torch.mm (docs/RESULTS.md)."""
    global _PACKED_LINEAR
    if _PACKED_LINEAR is None:
        _PACKED_LINEAR = _checked_onednn(_build_packed_linear) or False
    return _PACKED_LINEAR or None


def _build_packed_linear() -> PackedLinear | None:
    op = torch.ops.mkldnn._linear_pointwise
    ops = PackedLinear(pack=torch.ops.mkldnn._reorder_linear_weight,
                       linear=lambda x, packed, bias: op(x, packed, bias, "none", [], ""),
                       linear_add=lambda residual, x, packed: op.binary(x, residual, packed, None, "add"))
    x, weight, bias, residual = torch.randn(5, 16), torch.randn(12, 16), torch.randn(12), torch.randn(5, 12)
    packed = ops.pack(weight)
    if (torch.allclose(ops.linear(x, packed, bias), x @ weight.t() + bias, atol=1e-5)
            and torch.allclose(ops.linear_add(residual, x, packed), residual + x @ weight.t(), atol=1e-5)):
        return ops
    return None


def _checked_onednn(build: Callable):
    """build()'s kernel (None when it fails its own check against torch) where oneDNN is on (TINYLM_ONEDNN is not 0)
    and this PyTorch has the ops it calls; else None."""
    if os.environ.get("TINYLM_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return build()
    except (AttributeError, RuntimeError):
        return None


def _cpu_training(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and torch.is_grad_enabled()
            and weight.requires_grad and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and onednn_matmul() is not None)


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T with oneDNN's matmul for the forward product and both gradient products."""

    @staticmethod
    def forward(ctx, x, weight):
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.input_shape = x.shape
        return onednn_matmul()(rows, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        matmul_nt = onednn_matmul()
        grad_x = matmul_nt(grad, weight.t()).view(ctx.input_shape) if ctx.needs_input_grad[0] else None
        grad_weight = weight_gradient(matmul_nt, grad, rows) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight


def weight_gradient(matmul_nt, grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """grad.T @ rows. oneDNN copies its transposed first operand, so transpose the narrower of the two."""
    if grad.shape[1] <= rows.shape[1]:
        return matmul_nt(grad.t(), rows.t())
    return matmul_nt(rows.t(), grad.t()).t()


def project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x), through oneDNN when training on a CPU (same weights, same result to float rounding)."""
    if not _cpu_training(x, linear.weight):
        return linear(x)
    out = _OneDNNLinear.apply(x, linear.weight)
    return out if linear.bias is None else out + linear.bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, `block` rows at a time.

    The (tokens x vocab) logits are never held whole: each block's logits live only while its gradients are formed
    (softmax - one-hot, the closed form of the cross-entropy gradient), and backward just scales those gradients.
    On a CPU this keeps the block in cache and avoids the page faults of fresh 100 MB buffers; on a GPU it saves the
    memory of the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, block: int, matmul_nt):
        valid = targets != IGNORE_INDEX
        # ignored positions (prefixes, padding) need masking; a GPU always masks rather than wait for the check
        masked = hidden.is_cuda or not bool(valid.all())
        safe_targets = torch.where(valid, targets, 0) if masked else targets
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], block):
            h = hidden[start:start + block]
            block_targets = safe_targets[start:start + block, None]
            log_probs = torch.log_softmax(matmul_nt(h, weight).float(), dim=-1)
            picked = log_probs.gather(1, block_targets)
            grad = log_probs.exp_()  # softmax, in place
            minus_one = torch.full(block_targets.shape, -1.0, dtype=grad.dtype, device=grad.device)
            grad.scatter_add_(1, block_targets, minus_one)
            if masked:
                keep = valid[start:start + block, None]
                picked.masked_fill_(~keep, 0.0)
                grad.masked_fill_(~keep, 0.0)
            total -= picked.sum()
            grad = grad.to(weight.dtype)
            grad_hidden[start:start + block] = matmul_nt(grad, weight.t())
            grad_weight += weight_gradient(matmul_nt, grad, h)
        count = valid.sum()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX) for training, without
    materialising the logits. Blocks of 2M logits on a CPU (8 MB: they stay in the L3 cache), 64M on a GPU."""
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    budget = (1 << 26) if hidden.is_cuda else (1 << 21)
    block = max(64, budget // weight.shape[0])
    matmul_nt = onednn_matmul() if _cpu_training(hidden, weight) else _matmul_nt
    return _LinearCrossEntropy.apply(hidden, weight, targets, block, matmul_nt)


def lm_head(h: torch.Tensor, unembedding: torch.Tensor, targets: torch.Tensor | None, return_logits: bool):
    """Both architectures' last step: (logits, loss) from the final hidden states. Training passes
    return_logits=False: the loss is then computed a block of rows at a time (linear_cross_entropy) and the logits,
    the largest tensors of a step, come back as None."""
    h = h.to(unembedding.dtype)
    if targets is not None and not return_logits:
        return None, linear_cross_entropy(h.flatten(0, 1), unembedding, targets.flatten())
    logits = F.linear(h, unembedding)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    return logits, loss


def normal_init(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation (Radford et al. 2019), as nanoGPT and llama2.c use it: N(0, std) on every linear and
    embedding weight, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.t()
