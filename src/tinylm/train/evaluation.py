"""Evaluation: mean loss over a whole split, perplexity, and bits per byte.

    loss           = total nats / predicted tokens                  (every validation token after the first, once)
    perplexity     = exp(loss)
    bits per byte  = total nats / (ln 2 * UTF-8 bytes of the validation stories)
Bits per byte compare models across vocabularies; losses per token do not. The byte count comes from the shard's
meta.json, written when the stories were tokenised. Training's periodic estimate uses the same sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tinylm.data.shards import check_tokenizer, eval_batches
from tinylm.errors import TinylmError
from tinylm.models import IGNORE_INDEX

LOGITS_BUDGET = 1 << 28  # floats of fp32 logits per evaluation batch (1 GiB): large vocabularies get smaller batches


def eval_batch_size(batch_size: int, context_length: int, vocab_size: int) -> int:
    return max(1, min(batch_size, LOGITS_BUDGET // (context_length * vocab_size)))


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: Iterable, device: torch.device | str = "cpu",
              autocast=contextlib.nullcontext, max_batches: int | None = None, rank: int = 0,
              world: int = 1, compiled: str | None = None) -> tuple[float, int]:
    """(total nats, predicted tokens) over `batches`; with world > 1 each rank takes every world-th batch and the
    sums are added across ranks. `compiled` scores the compiled decode step in that dtype instead of the forward
    pass, feeding each batch one position at a time as decoding does (models/compiled.py)."""
    device = torch.device(device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for index, (x, y) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            if index % world != rank:
                continue
            x, y = x.to(device), y.to(device)
            if compiled is not None:
                logits = stepped_logits(model, x, compiled)
            else:
                with autocast():
                    logits, _ = model(x)
            nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                    reduction="sum").double()
            count += (y != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        both = torch.stack([nats, count])
        dist.all_reduce(both)
        nats, count = both[0], both[1]
    return float(nats), int(count)


def stepped_logits(model: torch.nn.Module, ids: torch.Tensor, compiled: str) -> torch.Tensor:
    """(batch, length, vocab) logits of `ids` through the compiled step, one position at a time from an empty cache."""
    from tinylm.models.compiled import compiled_step

    step = compiled_step(model, compiled, fallback=False)
    cache = model.new_cache(ids.shape[0], max_len=ids.shape[1])
    return torch.stack([step(ids[:, t], cache) for t in range(ids.shape[1])], dim=1)


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """Total nats over a text / (ln 2 x its UTF-8 bytes): compares models across vocabularies."""
    return nats / (math.log(2) * n_bytes)


@dataclass(frozen=True)
class Evaluation:
    """Loss, perplexity and bits per byte over a whole split (plus where they came from, for a run)."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    nats: float
    checkpoint: str = ""
    data: str = ""
    split: str = "val"
    step: int | None = None
    note: str = ""  # why the checkpoint used is not the one asked for

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def line(self) -> str:
        return (f"val loss {self.loss:.4f} | perplexity {self.perplexity:.3f} | bits per byte "
                f"{self.bits_per_byte:.4f} | {self.tokens:,} tokens, {self.bytes:,} bytes")


def summarise(nats: float, tokens: int, n_bytes: int) -> Evaluation:
    if tokens == 0:
        raise TinylmError("the validation split has no tokens to predict")
    loss = nats / tokens
    return Evaluation(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bits_per_byte(nats, n_bytes),
                      tokens=tokens, bytes=n_bytes, nats=nats)


def evaluate(model: torch.nn.Module, tokenizer, shard, context_length: int | None = None,
             batch_size: int = 16, device: torch.device | str | None = None,
             compiled: str | None = None) -> Evaluation:
    """Loss, perplexity and bits per byte of `model` over the WHOLE shard (model in any mode; left as it was), by
    its forward pass or, with `compiled` ("float32" or "int8"), by the compiled decode step in that dtype."""
    check_tokenizer(shard.meta, tokenizer, shard.path.parent)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TinylmError(f"the tokenizer's {tokenizer.vocab_size} ids do not fit the model's "
                          f"{model.config.vocab_size} embeddings")
    context_length = context_length or model.config.context_length
    device = device or next(model.parameters()).device
    batch_size = eval_batch_size(batch_size, context_length, model.config.vocab_size)
    nats, tokens = loss_sums(model, eval_batches(shard, batch_size, context_length), device, compiled=compiled)
    return summarise(nats, tokens, shard.n_bytes)
