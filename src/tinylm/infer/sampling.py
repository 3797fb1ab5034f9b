"""Logits processors in transformers' order (repetition penalty, temperature, top-k, top-p, min-p; temperature 0 is
greedy) and the draw of the next token, all driven by one `Sampling` settings object (tinylm.recipe)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tinylm.errors import TinylmError
from tinylm.recipe import Sampling


def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every id already in the sequence (prompt included): negative scores are multiplied by it,
    positive ones divided. `seen` is a (batch, vocab) bool mask of those ids."""
    if penalty == 1.0:
        return scores
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th kept too)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose total probability stays within 1 - p (at least one is kept)."""
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * p_max (the most likely token always stays, as min_p <= 1)."""
    if min_p <= 0.0:
        return scores
    probs = scores.softmax(dim=-1)
    return scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


def processed_scores(settings: Sampling, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """The processed scores (filtered tokens at -inf); at temperature 0 only the penalty applies."""
    scores = _up_to_top_p(settings, logits, seen)
    return scores if settings.temperature == 0 else min_p_filter(scores, settings.min_p)


def sampling_weights(settings: Sampling, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """Sampling weights (temperature > 0): softmax(processed_scores) up to a per-row scale, as exp(scores - max),
    whose top weight is 1. So min-p keeps the weights >= min_p, and the work is two in-place passes over the
    vocabulary instead of a softmax, a maximum, a comparison and a masked fill."""
    scores = _up_to_top_p(settings, logits, seen)
    weights = scores.sub(scores.amax(dim=-1, keepdim=True)).exp_()
    if settings.min_p > 0:  # threshold keeps what is above its bound: the float32 just below min_p keeps min_p itself
        F.threshold_(weights, float(np.nextafter(np.float32(settings.min_p), np.float32(0))), 0.0)
    return weights


def pick(settings: Sampling, logits: torch.Tensor, seen: torch.Tensor | None,
         generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """One id per row: argmax at temperature 0, else a draw from softmax(processed scores). A list holds each
    row's own generator."""
    if settings.temperature == 0:
        return processed_scores(settings, logits, seen).argmax(dim=-1)
    return sample_from(sampling_weights(settings, logits, seen), generator)


def _up_to_top_p(settings: Sampling, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    scores = logits.float()
    if seen is not None:
        scores = apply_repetition_penalty(scores, seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return scores
    scores = apply_temperature(scores, settings.temperature)
    return top_p_filter(top_k_filter(scores, settings.top_k), settings.top_p)


def sample_from(weights: torch.Tensor, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF draw from non-negative (batch, vocab) weights, one uniform number per row (torch.multinomial
    costs milliseconds per step on a CPU), from one generator or from each row's own (so a row draws the same
    numbers whatever shares its batch). u < 1, so u * total < total (fp32 rounding included) and the first
    cumulative sum above it ends on an id of non-zero weight."""
    cdf = weights.cumsum(dim=-1)
    if isinstance(generator, list):
        u = torch.cat([torch.rand((1, 1), generator=g, device=weights.device, dtype=cdf.dtype) for g in generator])
    else:
        u = torch.rand((weights.shape[0], 1), generator=generator, device=weights.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1).squeeze(-1)


def check_seed(seed: int | None) -> None:
    if seed is not None and not -2**63 <= seed < 2**64:  # what torch's generator can hold
        raise TinylmError(f"seed must be an integer in [-2**63, 2**64), got {seed}")


def new_generator(device: torch.device, seed: int | None, row: int = 0) -> torch.Generator:
    """Row `row`'s generator: seeded from `seed + row` (wrapping within what torch's generator holds), or at
    random without a seed."""
    check_seed(seed)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed((seed + row + 2**63) % 2**64 - 2**63)
    return generator
