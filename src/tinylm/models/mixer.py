"""MicroMixer: an attention-free, byte-level MLP mixer (the MicroMixer models' cards: 100K to 1M parameters).

Token mixing is HyperMix: a hypernetwork reads the causal running mean of the layer's input and emits a per-channel
scale and shift. Causality comes only from that running mean, which also makes decoding O(1) per token: the state is
the running sum (models/cache.py: MixerState).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.models import rope
from tinylm.models.cache import MixerState
from tinylm.models.decode import forward_step
from tinylm.models.ops import lm_head, normal_init
from tinylm.recipe import ModelConfig


def embedding_rotation(x: torch.Tensor, start: int | torch.Tensor, mode: str) -> torch.Tensor:
    """The position transform applied once to the embeddings.

    "quirk" is the original's: angles cat(f, f) * t applied to interleaved pairs, so a pair's two members turn by
    different angles (not norm-preserving). "standard" turns both members of a pair by the same angle."""
    if mode == "none":
        return x
    base = rope.angles(start, x.shape[1], rope.inverse_frequencies(x.shape[-1], 10000.0, device=x.device))
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
            start = state.offsets()
            sums = sums + state.sums[layer][:, None, :]
            state.sums[layer] = sums[:, -1]
        counts = torch.arange(1, u.shape[1] + 1, device=u.device, dtype=torch.float32)
        if isinstance(start, torch.Tensor):  # rows at different positions
            counts = start.to(counts)[:, None] + counts
        else:
            counts = (counts + start)[None, :]
        mean = (sums / counts[..., None]).to(u.dtype)
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
    family = "micromixer"
    transformers_model_type = None  # no transformers class: exports are read by tinylm

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
        normal_init(self)

    def unembedding_matrix(self) -> torch.Tensor:
        return self.tok_embeddings.weight

    def describe(self) -> str:
        rotary = {"quirk": "the original's rotary quirk", "standard": "a standard rotary transform",
                  "none": "no position transform"}[self.config.embedding_rotary]
        return f"MicroMixer: attention-free MLP mixer with causal running-mean HyperMixing, {rotary} on the embeddings"

    def detail_rows(self) -> list[tuple[str, str]]:
        return [("channel MLP", str(self.config.resolved_hidden_dim())), ("hypernetwork", str(self.config.hyper_dim))]

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 N (every parameter multiplies; there is no attention term)."""
        return 6.0 * sum(p.numel() for p in self.parameters())

    def decode_step(self, fast: bool = True, compiled: str | None = None):
        """step(ids, cache) -> next-token logits; the running-sum state already makes a step O(1). There is no
        compiled step for this architecture: asking for one says so once and decodes eagerly."""
        if compiled is not None:
            from tinylm.models.compiled import compiled_step

            compiled_step(self, compiled)
        return forward_step(self)

    def new_cache(self, batch_size: int, max_len: int | None = None, device=None, dtype=None) -> MixerState:
        weight = self.tok_embeddings.weight
        return MixerState(self.config.n_layers, batch_size, self.config.dim, device or weight.device)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None, cache: MixerState | None = None,
                return_logits: bool = True):
        """(logits, loss); with targets and return_logits=False, (None, loss) without holding the logits."""
        start = cache.offsets() if cache is not None else 0
        x = embedding_rotation(self.tok_embeddings(ids), start, self.config.embedding_rotary)
        x = self.dropout(x)
        for index, layer in enumerate(self.layers):
            x = layer(x, cache, index)
        if cache is not None:
            cache.advance(ids.shape[1])
        # The layers stay on F.linear: with ops.project (oneDNN) on these widths, a resumed run was not bitwise equal
        # to an uninterrupted one across processes; the blocked loss keeps that guarantee (tests/test_crash.py).
        return lm_head(self.norm(x), self.tok_embeddings.weight, targets, return_logits)
