"""The LLaMA-style decoder: RMSNorm, RoPE (any base, linear or NTK-aware scaling), grouped-query attention, SwiGLU.

Weights are laid out as llama2.c names them (wq/wk/wv/wo, w1/w2/w3) but RoPE uses the half-split ("rotate_half")
layout of Hugging Face Llama, so our q/k rows map to transformers' without permutation; the llama2.c export permutes.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..recipe import ModelConfig
from .cache import KVCache

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype, as the originals do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    head_dim = config.resolved_head_dim()
    base = config.rope_theta
    if config.rope_scaling == "ntk":
        # NTK-aware scaling stretches the base so the lowest frequency covers factor x the trained context.
        base = base * config.rope_scaling_factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / config.rope_scaling_factor  # positions squeezed by the factor
    return inv_freq


def max_positions(config: ModelConfig) -> int:
    if config.rope_scaling == "none":
        return config.context_length
    return int(config.context_length * config.rope_scaling_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


# ---------------------------------------------------------------------------------------- training matmuls on a CPU
# PyTorch's CPU matmul (MKL) runs AVX2 code on AMD processors; oneDNN's kernel, which PyTorch also ships, uses AVX-512
# there and is measured 2.2x faster on this model's shapes. Training on a CPU in fp32 sends the projections (forward
# and both backward products) through it. Inference, autocast, torch.compile and other devices keep F.linear.
# TINYLM_ONEDNN=0 turns it off.
_ONEDNN_MATMUL = None


def onednn_matmul():
    """oneDNN's `a @ b.T` (dense strided tensors), or None where this PyTorch lacks it or it disagrees with mm."""
    global _ONEDNN_MATMUL
    if _ONEDNN_MATMUL is None:
        _ONEDNN_MATMUL = False
        if os.environ.get("TINYLM_ONEDNN", "1") != "0" and torch.backends.mkldnn.is_available():
            try:
                op = torch.ops.mkldnn._linear_pointwise

                def matmul_nt(a, b):
                    return op(a, b, None, "none", [], "")

                # the three products of a training step, transposed (strided) operands included
                a, b, c = torch.randn(8, 16), torch.randn(12, 16), torch.randn(8, 12)
                if (torch.allclose(matmul_nt(a, b), a @ b.t(), atol=1e-5)
                        and torch.allclose(matmul_nt(c, b.t()), c @ b, atol=1e-5)
                        and torch.allclose(matmul_nt(a.t(), c.t()), a.t() @ c, atol=1e-5)):
                    _ONEDNN_MATMUL = matmul_nt
            except (AttributeError, RuntimeError):
                pass
    return _ONEDNN_MATMUL or None


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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.n_kv_heads = config.resolved_kv_heads()
        self.head_dim = config.resolved_head_dim()
        self.wq = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int) -> torch.Tensor:
        batch, length, _ = x.shape
        q = project(self.wq, x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = project(self.wk, x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = project(self.wv, x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        mask, causal = None, True
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)
            if start > 0:
                causal = False
                if length > 1:  # a chunk after earlier tokens: each query sees the past and its own prefix
                    keys = torch.arange(start + length, device=x.device)
                    queries = torch.arange(start, start + length, device=x.device)
                    mask = keys[None, :] <= queries[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and length > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.resid_dropout(project(self.wo, out))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.resolved_hidden_dim()
        self.w1 = nn.Linear(config.dim, hidden, bias=config.w1_bias)  # gate
        self.w2 = nn.Linear(hidden, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, hidden, bias=False)  # up
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(project(self.w2, F.silu(project(self.w1, x)) * project(self.w3, x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, cos, sin, cache, layer):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied and pinv heads own no matrix of their own; untied has one.
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False) if config.unembedding == "untied" else None
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        self.max_positions = max_positions(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere, N(0, 0.02/sqrt(2L)) on each residual branch's output projection.

        nanoGPT scales the true output projections (wo, w2); llama2.c scales wo and w3, which we take for a slip."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        branch_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for layer in self.layers:
            nn.init.normal_(layer.attention.wo.weight, mean=0.0, std=branch_std)
            nn.init.normal_(layer.feed_forward.w2.weight, mean=0.0, std=branch_std)

    def unembedding_matrix(self) -> torch.Tensor:
        """The (vocab x dim) matrix that maps hidden states to logits."""
        if self.output is not None:
            return self.output.weight
        if self.config.unembedding == "pinv":
            # pinv(E) is (dim x vocab); recomputed every call so gradients reach E.
            return torch.linalg.pinv(self.tok_embeddings.weight.float()).t()
        return self.tok_embeddings.weight

    def rope_tables(self, start: int, length: int, dtype: torch.dtype):
        if start + length > self.max_positions:
            raise ValueError(f"positions up to {start + length} exceed the model's {self.max_positions}")
        positions = torch.arange(start, start + length, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> KVCache:
        weight = self.tok_embeddings.weight
        return KVCache(
            n_layers=self.config.n_layers, batch_size=batch_size, n_kv_heads=self.config.resolved_kv_heads(),
            max_len=max_len or self.max_positions, head_dim=self.config.resolved_head_dim(),
            device=device or weight.device, dtype=dtype or weight.dtype,
        )

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                return_logits: bool = True):
        """(logits, loss). Training passes return_logits=False: the loss is then computed a block of rows at a time
        (linear_cross_entropy) and logits come back as None, which saves the largest tensors of the step."""
        start = cache.pos if cache is not None else 0
        x = self.dropout(self.tok_embeddings(ids))
        cos, sin = self.rope_tables(start, ids.shape[1], x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, index)
        if cache is not None:
            cache.advance(ids.shape[1])
        h = self.norm(x)
        unembedding = self.unembedding_matrix()
        h = h.to(unembedding.dtype)
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(h.flatten(0, 1), unembedding, targets.flatten())
        logits = F.linear(h, unembedding)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


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
            t = safe_targets[start:start + block, None]
            log_probs = torch.log_softmax(matmul_nt(h, weight).float(), dim=-1)
            picked = log_probs.gather(1, t)
            grad = log_probs.exp_()  # softmax, in place
            grad.scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=grad.dtype, device=grad.device))
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


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.t()
