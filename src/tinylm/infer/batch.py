"""Continuous batching: sequences join a running batch at the next decode step and leave it when they end.

A `ContinuousBatch` owns one cache whose rows are slots. A new group of rows (one prompt, `n` continuations) is
prefilled on its own, same-length prompts together, into a cache of its own and copied into free slots (the cache
grows when none is free); each row keeps its own position, so the decode step (the model's `decode_step`) takes rows
at different positions. A row that ends frees its slot at once (a later row reuses it); the batch is compacted once a
quarter of its slots are free, nothing waits and no row has joined for a few steps. Every row draws from its own
generator with its own settings, so what a row generates does not depend on what shares its batch. The server runs
one in a process of its own (infer/worker.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinylm.infer.sampling import new_generator, pick
from tinylm.recipe import Sampling

# (chosen token's log-probability, [(id, log-probability)] of the most likely tokens), from the model's distribution
TokenLogprobs = tuple[float, list[tuple[int, float]]]
SMALL_BATCH = 4  # up to this many rows, a CPU step runs on one thread
COMPACT_AFTER = 8  # steps without a new row before free slots are dropped (rows that come and go reuse them)


@dataclass(eq=False)
class Row:
    """One sequence to generate. `budget` counts new tokens (the caller fits it into the context); an id in
    `end_ids` or `stop(new ids) -> True` ends it ("stop"), the budget ("length"), `cancel()` ("cancelled").
    `stop`, then `on_token(row, id, logprobs)`, are called for each new id, and `on_finish(row)` once, all on the
    batch's thread (for the server's batch, on the thread that receives its tokens: infer/worker.py). The row draws
    from its own generator, seeded from `seed + seed_row` (sampling.new_generator) when it joins a batch."""

    prompt: list[int]
    sampling: Sampling
    seed: int | None
    seed_row: int
    budget: int
    end_ids: frozenset[int] = frozenset()
    stop: Callable[[list[int]], bool] | None = None
    on_token: Callable[[Row, int, TokenLogprobs | None], None] | None = None
    on_finish: Callable[[Row], None] | None = None
    top_logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    new: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Leave the batch at the next step (safe from any thread)."""
        self.cancelled = True

    def _settings_key(self) -> tuple:
        s = self.sampling
        return s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty


class ContinuousBatch:
    """Rows of any prompts and settings decoding together; `submit` groups, call `step` until `idle`."""

    def __init__(self, model, fast: bool = True, max_rows: int | None = None, max_len: int | None = None,
                 compiled: str | None = None):
        self.model, self.decode = model, model.decode_step(fast, compiled)
        self.device = model.tok_embeddings.weight.device
        self.max_rows, self.max_len = max_rows, max_len or model.max_positions
        self.cache = model.new_cache(0, max_len=self.max_len)
        self.slots: list[Row | None] = []
        self.logits = torch.zeros((0, model.config.vocab_size), device=self.device)
        self.seen = torch.zeros((0, model.config.vocab_size), dtype=torch.bool, device=self.device)
        self.pending: deque[list[Row]] = deque()
        self.lock = threading.Lock()
        self.threads = torch.get_num_threads()
        self.steps_since_admit = 0

    def submit(self, rows: list[Row]) -> None:
        """Queue rows that share one prompt (prefilled once); they join at the next step with room."""
        with self.lock:
            self.pending.append(rows)

    def live(self) -> int:
        return sum(row is not None for row in self.slots)

    def waiting(self) -> int:
        with self.lock:
            return sum(len(group) for group in self.pending)

    def idle(self) -> bool:
        return self.live() == 0 and not self.pending

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what waits (room permitting), choose one token for every live row, feed the tokens."""
        for slot, row in enumerate(self.slots):
            if row is not None and row.cancelled:
                self._finish(slot, "cancelled")
        self._admit()
        live = [slot for slot, row in enumerate(self.slots) if row is not None]
        if not live:
            return
        chosen = torch.zeros(len(self.slots), dtype=torch.long, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for slot in live:
            groups.setdefault(self.slots[slot]._settings_key(), []).append(slot)
        for slots in groups.values():
            settings = self.slots[slots[0]].sampling
            generators = [self.slots[s].generator for s in slots]
            if len(slots) == len(self.slots):  # every slot, in order: no gather and scatter (a few of a step's ops)
                seen = self.seen if settings.repetition_penalty != 1.0 else None
                chosen = pick(settings, self.logits, seen, generators)
                continue
            index = torch.tensor(slots, device=self.device)
            seen = self.seen[index] if settings.repetition_penalty != 1.0 else None
            chosen[index] = pick(settings, self.logits[index], seen, generators)
        self.seen[torch.arange(len(self.slots), device=self.device), chosen] = True
        logprobs = self._logprobs(live, chosen)
        for slot, token in zip(live, chosen[live].tolist(), strict=True):
            self._take(slot, token, logprobs.get(slot))
        kept = self._compact()
        if kept is not None:
            chosen = chosen[kept]
        if self.live():
            for slot, row in enumerate(self.slots):
                if row is None:
                    self.cache.set_length(slot, 0)  # a free slot computes at position 0 and nothing reads it
            self._set_threads(len(self.slots))
            self.logits = self.decode(chosen, self.cache).float()

    def _set_threads(self, rows: int) -> None:
        """One thread for a few rows on a CPU: ops this small gain nothing from a second thread, and lose 10x or more
        when another process holds a core. More rows get the threads the batch was made with."""
        threads = 1 if self.device.type == "cpu" and rows <= SMALL_BATCH else self.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def fail_all(self, message: str) -> None:
        """End every row with an error (the step raised): the batch starts again empty."""
        with self.lock:
            waiting, self.pending = [row for group in self.pending for row in group], deque()
        for row in waiting + [row for row in self.slots if row is not None]:
            row.finish_reason, row.error = "error", message
            if row.on_finish is not None:
                row.on_finish(row)
        self.slots = []
        self.cache = self.model.new_cache(0, max_len=self.max_len)
        self.logits, self.seen = self.logits[:0], self.seen[:0]

    def _admit(self) -> None:
        self.steps_since_admit += 1
        free = [slot for slot, row in enumerate(self.slots) if row is None]
        admitted: list[list[Row]] = []
        with self.lock:
            room = None if self.max_rows is None else self.max_rows - self.live()
            while self.pending and (room is None or len(self.pending[0]) <= room):
                group = self.pending.popleft()
                for row in group:
                    if row.cancelled or row.budget <= 0:  # nothing to generate: done without a prefill
                        self._end(row, "cancelled" if row.cancelled else "length")
                group = [row for row in group if row.finish_reason is None] or None
                if group is None:
                    continue
                admitted.append(group)
                room = None if room is None else room - len(group)
        if admitted:
            self.steps_since_admit = 0
        by_length: dict[int, list[list[Row]]] = {}
        for group in admitted:
            by_length.setdefault(len(group[0].prompt), []).append(group)
        for length, groups in by_length.items():
            prefill = self.model.new_cache(len(groups), max_len=length)
            ids = torch.tensor([group[0].prompt for group in groups], device=self.device)
            logits = self.model(ids, cache=prefill)[0][:, -1].float()
            for index, group in enumerate(groups):
                slots = self._take_slots(free, len(group))
                self.cache.load_rows(slots, prefill, [index] * len(group))
                self.logits[slots] = logits[index]
                self.seen[slots] = False
                self.seen[torch.tensor(slots, device=self.device)[:, None], ids[index]] = True
                for slot, row in zip(slots, group, strict=True):
                    row.generator = new_generator(self.device, row.seed, row.seed_row)
                    self.slots[slot] = row

    def _take_slots(self, free: list[int], count: int) -> list[int]:
        more = count - len(free)
        if more > 0:
            start = len(self.slots)
            self.cache.grow(more)
            self.slots += [None] * more
            self.logits = torch.cat([self.logits, self.logits.new_zeros((more, self.logits.shape[1]))])
            self.seen = torch.cat([self.seen, self.seen.new_zeros((more, self.seen.shape[1]))])
            free += range(start, start + more)
        taken, free[:] = free[:count], free[count:]
        return taken

    def _logprobs(self, live: list[int], chosen: torch.Tensor) -> dict[int, TokenLogprobs]:
        wanted = [slot for slot in live if self.slots[slot].top_logprobs is not None]
        if not wanted:
            return {}
        index = torch.tensor(wanted, device=self.device)
        logprobs = self.logits[index].log_softmax(dim=-1)
        top = logprobs.topk(max(self.slots[s].top_logprobs for s in wanted), dim=-1)
        chosen_lp = logprobs.gather(1, chosen[index][:, None])[:, 0].tolist()
        out = {}
        for i, slot in enumerate(wanted):
            k = self.slots[slot].top_logprobs
            out[slot] = (chosen_lp[i], list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist(), strict=True)))
        return out

    def _take(self, slot: int, token: int, logprobs: TokenLogprobs | None) -> None:
        row = self.slots[slot]
        if token in row.end_ids:
            self._finish(slot, "stop")
            return
        row.new.append(token)
        stopped = row.stop is not None and row.stop(row.new)
        if row.on_token is not None:
            row.on_token(row, token, logprobs)
        if stopped:
            self._finish(slot, "stop")
        elif len(row.new) >= row.budget:
            self._finish(slot, "length")

    def _finish(self, slot: int, reason: str) -> None:
        row, self.slots[slot] = self.slots[slot], None
        self._end(row, reason)

    @staticmethod
    def _end(row: Row, reason: str) -> None:
        row.finish_reason = reason
        if row.on_finish is not None:
            row.on_finish(row)

    def _compact(self) -> torch.Tensor | None:
        """Drop free slots once they are a quarter of the batch, no row waits to take one and none has joined for
        COMPACT_AFTER steps (copying the cache costs more than a few steps of idle slots); returns the slots kept, or
        None."""
        free = len(self.slots) - self.live()
        if free == 0 or 4 * free < len(self.slots) or self.pending or self.steps_since_admit < COMPACT_AFTER:
            return None
        keep = [slot for slot, row in enumerate(self.slots) if row is not None]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.cache.keep_rows(index)
        self.slots = [self.slots[slot] for slot in keep]
        self.logits, self.seen = self.logits[index], self.seen[index]
        return index
