"""The LLaMA-style decoder: RMSNorm, RoPE (any base, linear or NTK-aware scaling), grouped-query attention, SwiGLU.

Weights are laid out as llama2.c names them (wq/wk/wv/wo, w1/w2/w3) but RoPE uses the half-split ("rotate_half")
layout of Hugging Face Llama, so our q/k rows map to transformers' without permutation; the llama2.c export permutes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.models import rope
from tinylm.models.cache import KVCache
from tinylm.models.decode import fast_llama, forward_step
from tinylm.models.ops import lm_head, normal_init, project
from tinylm.recipe import ModelConfig


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


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
            start = cache.offsets()
            k, v = cache.update(layer, k, v)
            if isinstance(start, torch.Tensor):  # rows at different positions: each sees only its own past
                causal = False
                mask = (torch.arange(k.shape[2], device=x.device) <= start[:, None])[:, None, None, :]
            elif start > 0:
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
    family = "llama"
    transformers_model_type = "llama"  # transformers' LlamaForCausalLM computes exactly this model

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # Tied and pinv heads own no matrix of their own; untied has one.
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False) if config.unembedding == "untied" else None
        self.register_buffer("inv_freq", rope.decoder_inverse_frequencies(config), persistent=False)
        self.max_positions = rope.max_positions(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere, N(0, 0.02/sqrt(2L)) on each residual branch's output projection, or zero there
        with zero_init_projections (so every block starts as the identity, as in the modded-nanogpt speedrun).

        nanoGPT scales the true output projections (wo, w2); llama2.c scales wo and w3, which we take for a slip."""
        normal_init(self)
        branch_std = 0.0 if self.config.zero_init_projections else 0.02 / math.sqrt(2 * self.config.n_layers)
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

    def rope_tables(self, start: int | torch.Tensor, length: int, dtype: torch.dtype):
        """cos and sin for positions start .. start + length - 1: (length, head_dim), or (batch, 1, length,
        head_dim) for a (batch,) tensor of starts."""
        end = int(start.max()) + length if isinstance(start, torch.Tensor) else start + length
        if end > self.max_positions:
            raise ValueError(f"positions up to {end} exceed the model's {self.max_positions}")
        angles = rope.angles(start, length, self.inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        if angles.dim() == 3:
            angles = angles[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def describe(self) -> str:
        c = self.config
        head = {"tied": "tied embeddings", "untied": "untied embeddings",
                "pinv": "unembedding = pseudo-inverse of the embedding"}[c.unembedding]
        attention = "grouped-query" if c.resolved_kv_heads() != c.n_heads else "multi-head"
        scaling = f", {c.rope_scaling} scaling x{c.rope_scaling_factor:g}" if c.rope_scaling != "none" else ""
        return (f"LLaMA-style decoder: RMSNorm, SwiGLU, RoPE base {c.rope_theta:g}{scaling}, {attention} attention, "
                f"{head}")

    def detail_rows(self) -> list[tuple[str, str]]:
        c = self.config
        return [("SwiGLU hidden", str(c.resolved_hidden_dim())),
                ("heads / KV heads", f"{c.n_heads} / {c.resolved_kv_heads()} (head_dim {c.resolved_head_dim()})")]

    def flops_per_token(self) -> float:
        """Training FLOPs per token, forward + backward = 3x forward (PaLM, Chowdhery et al. 2022, appendix B):
        6 N + 12 L (n_heads head_dim) T. N counts the parameters that multiply activations (an untied input table is
        a lookup; a tied or pinv head is counted once, through the embedding); the attention term counts the full
        T x T score matrix, as nanoGPT does."""
        c = self.config
        multiplying = sum(p.numel() for p in self.parameters())
        if self.output is not None:
            multiplying -= self.tok_embeddings.weight.numel()
        return 6.0 * multiplying + 12 * c.n_layers * c.n_heads * c.resolved_head_dim() * c.context_length

    def decode_step(self, fast: bool = True, compiled: str | None = None):
        """step(ids, cache) -> next-token logits for one id per row: the compiled step with weights in `compiled`'s
        dtype ("float32" or "int8", models/compiled.py) where it can run, else the fused FastLlama step, or
        model.forward."""
        if compiled is not None:
            from tinylm.models.compiled import compiled_step

            step = compiled_step(self, compiled)
            if step is not None:
                return step
        return fast_llama(self).step if fast else forward_step(self)

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
        start = cache.offsets() if cache is not None else 0
        x = self.dropout(self.tok_embeddings(ids))
        cos, sin = self.rope_tables(start, ids.shape[1], x.dtype)
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, index)
        if cache is not None:
            cache.advance(ids.shape[1])
        return lm_head(self.norm(x), self.unembedding_matrix(), targets, return_logits)
