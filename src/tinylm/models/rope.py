"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv:2104.09864): the frequencies every user of them shares.

The decoder, MicroMixer's embedding transform, and the exports (llama2.c's tables, the bases written for
transformers and GGUF) all take their numbers from here.
"""

from __future__ import annotations

import torch

from tinylm.recipe import ModelConfig


def inverse_frequencies(width: int, base: float, device: torch.device | str | None = None) -> torch.Tensor:
    """1 / base^(2j / width) for j < width / 2, in float32 (as Meta's and Hugging Face's Llama compute them)."""
    exponents = torch.arange(0, width, 2, dtype=torch.int64, device=device).float() / width
    return 1.0 / (base ** exponents)


def scaled_base(config: ModelConfig) -> float:
    """The base the decoder really uses: NTK-aware scaling (bloc97, 2023) stretches it so that the lowest frequency
    covers `rope_scaling_factor` times the trained context; other settings keep `rope_theta`."""
    if config.rope_scaling != "ntk":
        return config.rope_theta
    head_dim = config.resolved_head_dim()
    return config.rope_theta * config.rope_scaling_factor ** (head_dim / (head_dim - 2))


def decoder_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The decoder's frequencies: linear scaling (Chen et al. 2023, position interpolation) squeezes positions by the
    factor, which is the same as dividing every frequency by it."""
    inv_freq = inverse_frequencies(config.resolved_head_dim(), scaled_base(config))
    if config.rope_scaling == "linear":
        inv_freq = inv_freq / config.rope_scaling_factor
    return inv_freq


def max_positions(config: ModelConfig) -> int:
    """Positions the decoder can address: the trained context, stretched by any scaling."""
    if config.rope_scaling == "none":
        return config.context_length
    return int(config.context_length * config.rope_scaling_factor)


def angles(start: int | torch.Tensor, length: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """(length, len(inv_freq)) rotation angles of positions start .. start + length - 1; with a (batch,) tensor of
    starts (rows at different positions), (batch, length, len(inv_freq))."""
    if isinstance(start, torch.Tensor):
        steps = torch.arange(length, device=inv_freq.device, dtype=torch.float32)
        positions = start.to(device=inv_freq.device, dtype=torch.float32)[:, None] + steps
        return positions[..., None] * inv_freq
    positions = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    return torch.outer(positions, inv_freq)


def interleave_rows(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q or k projection from our half-split layout (j, j + head_dim/2 rotate together, as in Hugging Face
    Llama) to the interleaved one (2j, 2j + 1 rotate together) that llama2.c's run.c and llama.cpp use."""
    return weight.reshape(n_heads, 2, head_dim // 2, weight.shape[1]).transpose(1, 2).reshape(weight.shape)
