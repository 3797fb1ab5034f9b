"""One sampling engine for every architecture, used by `tinylm sample` and the server alike: the continuous batch
(infer/batch.py) prefills each prompt into the model's cache and decodes one token per row per step with the model's
own `decode_step` (the fused FastLlama step for the LLaMA decoder, the running-sum state for MicroMixer). Every row
keeps its own position, so prompts of different lengths share a batch without padding, and each row draws from its
own generator (row i from `seed + i`): a batch gives what each prompt would give alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tinylm.errors import TinylmError
from tinylm.infer.batch import SMALL_BATCH, ContinuousBatch, Row
from tinylm.infer.sampling import check_seed
from tinylm.infer.text import TextStream
from tinylm.recipe import Sampling

StreamFn = Callable[[int, int], None]  # (row, token id), as each new token arrives
StopFn = Callable[[int, list[int]], bool]  # (row, its new ids so far) -> True ends that row


def check_prompts(model, prompts: list[list[int]]) -> None:
    context, vocab = model.max_positions, model.config.vocab_size
    for row, prompt in enumerate(prompts, 1):
        if not prompt:
            raise TinylmError(f"prompt {row} is empty: start it with the recipe's frame prefix (e.g. BOS)")
        if len(prompt) >= context:
            raise TinylmError(f"prompt {row} is {len(prompt)} tokens; the model's context holds {context}, so a "
                              f"prompt may have at most {context - 1}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise TinylmError(f"prompt {row} has ids outside the model's vocabulary of {vocab}")


def end_id_set(eos_id: int | Sequence[int] | None) -> frozenset[int]:
    return frozenset() if eos_id is None else frozenset({int(eos_id)} if isinstance(eos_id, int) else map(int, eos_id))


def generate(model, prompts_ids: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             eos_id: int | Sequence[int] | None = None, seed: int | None = None, stop: StopFn | None = None,
             stream: StreamFn | None = None, fast: bool = True, compiled: str | None = None) -> list[list[int]]:
    """Continue each prompt (a list of ids, frame prefix included); returns the new ids of each row.

    A row ends at `eos_id` (one id or several; not included in its ids), when `stop(row, ids)` says so, after
    `sampling.max_new_tokens`, or when prompt plus new ids fill the model's context. `seed` makes sampling
    repeatable. `fast=False` decodes through model.forward instead of the model's fused step (same results).
    `compiled` ("float32" or "int8") decodes with the compiled step, its weights in that dtype (models/compiled.py;
    float32 gives the fused step's tokens), where it can run; elsewhere one line on stderr says so."""
    prompts = [[int(i) for i in p] for p in prompts_ids]
    check_prompts(model, prompts)
    device = model.tok_embeddings.weight.device
    check_seed(seed)  # before any work
    if not prompts or sampling.max_new_tokens == 0:
        return [[] for _ in prompts]
    end_ids = end_id_set(eos_id)
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append(Row(prompt, sampling, seed, i,
                        budget=min(sampling.max_new_tokens, model.max_positions - len(prompt)), end_ids=end_ids,
                        stop=None if stop is None else lambda ids, i=i: stop(i, ids),
                        on_token=None if stream is None else lambda row, token, _, i=i: stream(i, token)))
    batch = ContinuousBatch(model, fast, max_len=max(len(r.prompt) + r.budget for r in rows), compiled=compiled)
    for row in rows:
        batch.submit([row])
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if device.type == "cpu" and len(prompts) <= SMALL_BATCH:
        torch.set_num_threads(1)  # the prefills too (the batch sets its steps' threads itself)
    try:
        while not batch.idle():
            batch.step()
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return [row.new for row in rows]


def generate_text(model, tokenizer, prompts: Sequence[str], sampling: Sampling = Sampling(),
                  prefix: Sequence[int] = (), stop: Sequence[str] = (), seed: int | None = None,
                  stream: Callable[[int, str], None] | None = None, end_ids: Sequence[int] | None = None,
                  compiled: str | None = None) -> list[str]:
    """Continue each text prompt; returns the new text of each (ending before a stop string, if one occurs).

    `sampling` is usually the recipe's (`recipe.sample.settings`). `prefix` is the recipe's frame prefix
    (data.shards.frame_prefix), so an empty prompt starts a story from BOS (or <sink> <s>). `stream(row, text)`
    receives text as it is decided. A row ends at `end_ids`: by default the tokenizer's EOS and BOS
    (`Tokenizer.story_end_ids`); a model directory written elsewhere names its own (`LoadedModel.end_ids`).
    `compiled`: as in `generate`."""
    if any(s == "" for s in stop):
        raise TinylmError("an empty stop string (--stop \"\") would end every completion before it starts")
    prompts_ids = [list(prefix) + tokenizer.encode(p) for p in prompts]
    for row, ids in enumerate(prompts_ids, 1):
        if not ids:
            raise TinylmError(f"prompt {row} is empty and this recipe starts sequences with no special token "
                              "(framing 'none'): give some text to continue")
    texts = [TextStream(tokenizer, stop) for _ in prompts]
    use_watcher = bool(texts and texts[0].stop) or stream is not None

    def watch(row: int, ids: list[int]) -> bool:
        released, stopped = texts[row].update(ids)
        if released and stream is not None:
            stream(row, released)
        return stopped

    end = tokenizer.story_end_ids if end_ids is None else list(end_ids)
    new = generate(model, prompts_ids, sampling, eos_id=end, seed=seed,
                   stop=watch if use_watcher else None, compiled=compiled)
    out = []
    for row, ids in enumerate(new):
        text, released = texts[row].finish(ids)
        if released and stream is not None:
            stream(row, released)
        out.append(text)
    return out
