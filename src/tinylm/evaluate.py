"""Evaluation: mean loss over the whole validation split, perplexity, and bits per byte.

    loss           = total nats / predicted tokens                  (every validation token after the first, once)
    perplexity     = exp(loss)
    bits per byte  = total nats / (ln 2 * UTF-8 bytes of the validation stories)
Bits per byte compare models across vocabularies; losses per token do not. The byte count comes from the shard's
meta.json, written when the stories were tokenised.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from .errors import TinylmError
from .files import atomic_write_json
from .models import IGNORE_INDEX

LOGITS_BUDGET = 1 << 28  # floats of fp32 logits per evaluation batch (1 GiB): large vocabularies get smaller batches


def eval_batch_size(batch_size: int, context_length: int, vocab_size: int) -> int:
    return max(1, min(batch_size, LOGITS_BUDGET // (context_length * vocab_size)))


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: Iterable, device: torch.device | str = "cpu",
              autocast=contextlib.nullcontext, max_batches: int | None = None, rank: int = 0,
              world: int = 1) -> tuple[float, int]:
    """(total nats, predicted tokens) over `batches`; with world > 1 each rank takes every world-th batch and the
    sums are added across ranks."""
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


def summarise(nats: float, tokens: int, n_bytes: int) -> dict[str, Any]:
    if tokens == 0:
        raise TinylmError("the validation split has no tokens to predict")
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": nats / (math.log(2) * n_bytes),
            "tokens": tokens, "bytes": n_bytes, "nats": nats}


def evaluate(model: torch.nn.Module, tokenizer, shard, context_length: int | None = None,
             batch_size: int = 16, device: torch.device | str | None = None) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of `model` over the WHOLE shard (model in any mode; left as it was)."""
    from .data import check_tokenizer, eval_batches

    check_tokenizer(shard.meta, tokenizer, shard.path.parent)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise TinylmError(f"the tokenizer's {tokenizer.vocab_size} ids do not fit the model's "
                          f"{model.config.vocab_size} embeddings")
    context_length = context_length or model.config.context_length
    device = device or next(model.parameters()).device
    batch_size = eval_batch_size(batch_size, context_length, model.config.vocab_size)
    nats, tokens = loss_sums(model, eval_batches(shard, batch_size, context_length), device)
    return summarise(nats, tokens, shard.n_bytes)


def evaluate_path(path: str | Path, which: str = "best", data_dir: str | Path | None = None,
                  batch_size: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Evaluate a run directory (its checkpoint `which`), a Hugging Face directory or a hub model id on a validation
    shard.

    A run is scored on RUN/data/val.bin and the result recorded in RUN/eval.json. A Hugging Face directory needs the
    shard of a run prepared with the same tokenizer (`data_dir`), unless it holds a data/ folder itself; a hub model
    always needs `data_dir`."""
    from .checkpoint import checkpoint_path
    from .data import TokenShard
    from .export import load_model_dir
    from .hub import is_repo_id

    path = Path(path)
    if data_dir is None and not path.exists() and is_repo_id(str(path)):
        raise TinylmError(f"{path}: a hub model needs --data DIR, the shards of a run prepared with its tokenizer")
    is_run = (path / "recipe.toml").is_file()
    model, recipe, tokenizer = load_model_dir(path, which, device=device)  # a run, or a Hugging Face directory
    source = checkpoint_path(path, which) if is_run else path
    data = Path(data_dir) if data_dir else path / "data"
    shard = TokenShard(data / "val.bin")
    result = evaluate(model, tokenizer, shard, recipe.model.context_length,
                      batch_size or recipe.train.batch_size, device)
    result.update({"checkpoint": str(source), "split": "val", "data": str(data)})
    if is_run:
        result["step"] = json.loads((source / "manifest.json").read_text(encoding="utf-8")).get("step")
        atomic_write_json(path / "eval.json", result)
    return result


def format_result(result: dict[str, Any]) -> str:
    return (f"val loss {result['loss']:.4f} | perplexity {result['perplexity']:.3f} | "
            f"bits per byte {result['bits_per_byte']:.4f} | {result['tokens']:,} tokens, {result['bytes']:,} bytes")
