"""MicroMixer: an attention-free, byte-level MLP mixer (SPEC.md section 2).

Token mixing is HyperMix: a hypernetwork reads the causal running mean of the layer's input and emits a per-channel
scale and shift. Causality comes only from that running mean, which also makes decoding O(1) per token: the state is
the running sum (models/cache.py: MixerState).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..recipe import ModelConfig
from .cache import MixerState
from .ops import IGNORE_INDEX, linear_cross_entropy


def embedding_rotation(x: torch.Tensor, start: int, mode: str) -> torch.Tensor:
    """The position transform applied once to the embeddings.

    "quirk" is the original's: angles cat(f, f) * t applied to interleaved pairs, so a pair's two members turn by
    different angles (not norm-preserving). "standard" turns both members of a pair by the same angle."""
    if mode == "none":
        return x
    dim = x.shape[-1]
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    positions = torch.arange(start, start + x.shape[1], device=x.device, dtype=torch.float32)
    base = torch.outer(positions, freqs)
    angles = torch.cat((base, base), dim=-1) if mode == "quirk" else base.repeat_interleave(2, dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


class HyperMix(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.summary = nn.Linear(config.dim, config.hyper_dim)
        self.generate = nn.Linear(config.hyper_dim, 2 * config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, u: torch.Tensor, state: MixerState | None, layer: int) -> torch.Tensor:
        sums = torch.cumsum(u.float(), dim=1)
        start = 0
        if state is not None:
            start = state.pos
            sums = sums + state.sums[layer][:, None, :]
            state.sums[layer] = sums[:, -1]
        counts = torch.arange(start + 1, start + u.shape[1] + 1, device=u.device, dtype=torch.float32)
        mean = (sums / counts[None, :, None]).to(u.dtype)
        scale, shift = self.generate(F.gelu(self.summary(mean))).chunk(2, dim=-1)
        return self.dropout(u * scale + shift)


class ChannelMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.dim, config.resolved_hidden_dim())
        self.down = nn.Linear(config.resolved_hidden_dim(), config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.dropout(F.gelu(self.up(x)))))


class MixerLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mix = HyperMix(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = ChannelMLP(config)

    def forward(self, x, state, layer):
        x = x + self.mix(self.norm1(x), state, layer)
        return x + self.mlp(self.norm2(x))


class MicroMixer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MixerLayer(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.max_positions = config.context_length
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def unembedding_matrix(self) -> torch.Tensor:
        return self.tok_embeddings.weight

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> MixerState:
        weight = self.tok_embeddings.weight
        return MixerState(self.config.n_layers, batch_size, self.config.dim, device or weight.device)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, cache: MixerState | None = None,
                return_logits: bool = True):
        """(logits, loss); with targets and return_logits=False, (None, loss) without holding the logits."""
        start = cache.pos if cache is not None else 0
        x = embedding_rotation(self.tok_embeddings(ids), start, self.config.embedding_rotary)
        x = self.dropout(x)
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index)
        if cache is not None:
            cache.advance(ids.shape[1])
        h = self.norm(x)
        # The layers stay on F.linear: with ops.project (oneDNN) on these widths, a resumed run was not bitwise equal
        # to an uninterrupted one across processes; the blocked loss keeps that guarantee (tests/test_crash.py).
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(h.flatten(0, 1), self.tok_embeddings.weight, targets.flatten())
        logits = F.linear(h, self.tok_embeddings.weight)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss
