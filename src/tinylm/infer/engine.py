"""One sampling engine for every architecture: prefill the prompts into the model's cache, then decode one token at a
time from it with the model's own `decode_step` (the fused FastLlama step for the LLaMA decoder, the running-sum
state for MicroMixer).

Prompts of different lengths share one batch without padding or masks: every row advances one position per step, in
lockstep. The shortest common length is prefilled in one chunk; after that a row still inside its prompt is fed its
next prompt token (what was sampled for it is dropped) and a row past its prompt is fed its own sample. So every row's
position is the batch's position, the cache's single `pos` is right for all of them, and a batch gives what each
prompt would give alone. Rows that have ended leave the batch once a quarter of it has ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tinylm.errors import TinylmError
from tinylm.infer.sampling import pick
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


def new_generator(device: torch.device, seed: int | None) -> torch.Generator:
    if seed is not None and not -2**63 <= seed < 2**64:  # what torch's generator can hold
        raise TinylmError(f"seed must be an integer in [-2**63, 2**64), got {seed}")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class _Rows:
    """The batch's bookkeeping: each prompt's new ids, which rows have ended, and which prompt each cache row holds."""

    def __init__(self, prompts: list[list[int]], budgets: list[int], end_ids: set[int], stop: StopFn | None,
                 stream: StreamFn | None):
        self.lengths, self.budgets, self.end_ids, self.stop, self.stream = [len(p) for p in prompts], budgets, \
            end_ids, stop, stream
        self.new: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.active = list(range(len(prompts)))

    def take(self, pos: int, chosen: list[int]) -> None:
        """Record the tokens chosen at position `pos` for the rows past their prompts."""
        for row, token in zip(self.active, chosen, strict=True):
            if self.done[row] or pos < self.lengths[row]:
                continue
            if token in self.end_ids:
                self.done[row] = True
                continue
            self.new[row].append(token)
            if self.stream is not None:
                self.stream(row, token)
            if len(self.new[row]) >= self.budgets[row] or (self.stop is not None and self.stop(row, self.new[row])):
                self.done[row] = True

    def leaving(self) -> list[int] | None:
        """Once a quarter of the active rows have ended, the positions of those that stay (the rest stop costing
        compute); else None."""
        if 4 * sum(self.done[row] for row in self.active) < len(self.active):
            return None
        keep = [i for i, row in enumerate(self.active) if not self.done[row]]
        self.active = [self.active[i] for i in keep]
        return keep


@torch.inference_mode()
def generate(model, prompts_ids: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             eos_id: int | Sequence[int] | None = None, seed: int | None = None, stop: StopFn | None = None,
             stream: StreamFn | None = None, fast: bool = True) -> list[list[int]]:
    """Continue each prompt (a list of ids, frame prefix included); returns the new ids of each row.

    A row ends at `eos_id` (one id or several; not included in its ids), when `stop(row, ids)` says so, after
    `sampling.max_new_tokens`, or when prompt plus new ids fill the model's context. `seed` makes sampling
    repeatable. `fast=False` decodes through model.forward instead of the model's fused step (same results)."""
    prompts = [[int(i) for i in p] for p in prompts_ids]
    check_prompts(model, prompts)
    device = model.tok_embeddings.weight.device
    generator = new_generator(device, seed)
    if not prompts or sampling.max_new_tokens == 0:
        return [[] for _ in prompts]
    end_ids = set() if eos_id is None else {int(eos_id)} if isinstance(eos_id, int) else {int(i) for i in eos_id}
    budgets = [min(sampling.max_new_tokens, model.max_positions - len(p)) for p in prompts]
    rows = _Rows(prompts, budgets, end_ids, stop, stream)
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if device.type == "cpu" and len(prompts) <= 4:
        # Ops this small gain nothing from a second thread, and lose much more when another process holds a core.
        torch.set_num_threads(1)
    try:
        _decode(model, prompts, sampling, generator, rows, model.decode_step(fast))
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    return rows.new


def _decode(model, prompts: list[list[int]], sampling: Sampling, generator: torch.Generator, rows: _Rows,
            step) -> None:
    device = generator.device
    lengths = rows.lengths
    start, longest = min(lengths), max(lengths)
    # the longest sequence; its last token is never fed back
    end = max(n + b for n, b in zip(lengths, rows.budgets, strict=True))
    table = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device)
    in_prompt = torch.tensor(lengths, device=device)[:, None] > torch.arange(longest, device=device)
    cache = model.new_cache(len(prompts), max_len=end - 1)
    seen = None
    if sampling.repetition_penalty != 1.0:
        seen = torch.zeros((len(prompts), model.config.vocab_size), dtype=torch.bool, device=device)
        seen.scatter_(1, table[:, :start], True)
    logits = model(table[:, :start], cache=cache)[0][:, -1]
    pos = start  # the position whose token is chosen now
    while True:
        chosen = pick(sampling, logits, seen, generator)
        if pos < longest:
            chosen = torch.where(in_prompt[:, pos], table[:, pos], chosen)
        if seen is not None:
            seen.scatter_(1, chosen[:, None], True)
        rows.take(pos, chosen.tolist())
        if all(rows.done):
            return
        keep = rows.leaving()
        if keep is not None:
            keep = torch.tensor(keep, device=device)
            chosen, table, in_prompt = chosen[keep], table[keep], in_prompt[keep]
            seen = None if seen is None else seen[keep]
            cache.keep_rows(keep)
        logits = step(chosen, cache)
        pos += 1


# ------------------------------------------------------------------------------------------------------ text level
class _TextWatcher:
    """Decodes each row's new ids as they arrive: ends a row at a stop string and streams only text that cannot
    turn into one (nor an unfinished UTF-8 character)."""

    def __init__(self, tokenizer, batch: int, stop: Sequence[str], stream: Callable[[int, str], None] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, list(stop), stream
        self.emitted = [0] * batch

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def __call__(self, row: int, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        cut = self.cut(text)
        safe = cut if cut is not None else len(text.rstrip("\ufffd")) - self._held(text)
        self.emit(row, text[:safe])
        return cut is not None

    def _held(self, text: str) -> int:
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def emit(self, row: int, text: str) -> None:
        if self.stream is not None and len(text) > self.emitted[row]:
            self.stream(row, text[self.emitted[row]:])
            self.emitted[row] = len(text)


def generate_text(model, tokenizer, prompts: Sequence[str], sampling: Sampling = Sampling(),
                  prefix: Sequence[int] = (), stop: Sequence[str] = (), seed: int | None = None,
                  stream: Callable[[int, str], None] | None = None, end_ids: Sequence[int] | None = None) -> list[str]:
    """Continue each text prompt; returns the new text of each (ending before a stop string, if one occurs).

    `sampling` is usually the recipe's (`recipe.sample.settings`). `prefix` is the recipe's frame prefix
    (data.shards.frame_prefix), so an empty prompt starts a story from BOS (or <sink> <s>). `stream(row, text)`
    receives text as it is decided. A row ends at `end_ids`: by default the tokenizer's EOS and BOS
    (`Tokenizer.story_end_ids`); a model directory written elsewhere names its own (`LoadedModel.end_ids`)."""
    if any(s == "" for s in stop):
        raise TinylmError("an empty stop string (--stop \"\") would end every completion before it starts")
    prompts_ids = [list(prefix) + tokenizer.encode(p) for p in prompts]
    for row, ids in enumerate(prompts_ids, 1):
        if not ids:
            raise TinylmError(f"prompt {row} is empty and this recipe starts sequences with no special token "
                              "(framing 'none'): give some text to continue")
    watcher = _TextWatcher(tokenizer, len(prompts), stop, stream)
    use_watcher = bool(watcher.stop) or stream is not None
    end_ids = tokenizer.story_end_ids if end_ids is None else list(end_ids)
    new = generate(model, prompts_ids, sampling, eos_id=end_ids, seed=seed, stop=watcher if use_watcher else None)
    texts = []
    for row, ids in enumerate(new):
        text = tokenizer.decode(ids)
        cut = watcher.cut(text)
        text = text if cut is None else text[:cut]
        watcher.emit(row, text)
        texts.append(text)
    return texts
