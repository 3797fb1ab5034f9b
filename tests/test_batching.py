"""Continuous batching: rows at different positions in one cache (logits against full forward passes, for every
architecture and both decode paths), rows joining and leaving a running batch, cancellation."""

from __future__ import annotations

import time

import pytest
import torch

from test_generate import VARIANTS, small_model
from tinylm.infer.batch import COMPACT_AFTER, ContinuousBatch, Row
from tinylm.infer.engine import generate
from tinylm.infer.worker import BatchProcess
from tinylm.recipe import Sampling

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("fast", [True, False])
def test_rows_at_different_positions_equal_full_forward(name, fast):
    model = small_model(name)
    lengths = [3, 11, 1, 7, 5]  # five rows: the packed oneDNN path on a CPU
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), 30))
    step = model.decode_step(fast)
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(0, max_len=40)
        cache.grow(len(lengths))
        for row, length in enumerate(lengths):  # each prompt prefilled on its own, then copied into its slot
            prefill = model.new_cache(1, max_len=length)
            model(ids[row:row + 1, :length], cache=prefill)
            cache.load_rows([row], prefill, [0])
        assert cache.lengths == lengths and not cache.uniform()
        for _ in range(12):
            positions = list(cache.lengths)
            logits = step(ids[torch.arange(len(lengths)), torch.tensor(positions)], cache)
            expected = full[torch.arange(len(lengths)), torch.tensor(positions)]
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert cache.lengths == [n + 12 for n in lengths]


def _row(prompt, sampling, seed):
    return Row(prompt, sampling, seed, 0, budget=sampling.max_new_tokens)


@pytest.mark.parametrize("name", ["tied-gqa", "mixer"])
def test_rows_joining_a_running_batch_get_what_they_get_alone(name):
    model = small_model(name, scale=1.0)
    settings = [Sampling(max_new_tokens=20, temperature=0.9, top_k=40), Sampling(max_new_tokens=9, temperature=0),
                Sampling(max_new_tokens=14, temperature=1.2, top_p=0.8, repetition_penalty=1.3),
                Sampling(max_new_tokens=6, temperature=0.7, min_p=0.1), Sampling(max_new_tokens=17, temperature=1.0)]
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    alone = [generate(model, [p], s, seed=40 + i)[0] for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]
    batch = ContinuousBatch(model)
    rows = [_row(p, s, 40 + i) for i, (p, s) in enumerate(zip(prompts, settings, strict=True))]
    joins = {0: [0], 3: [1, 2], 5: [3], 9: [4]}  # step -> rows that join before it
    sizes, slots = [], []
    for step in range(60):
        for i in joins.get(step, []):
            batch.submit([rows[i]])
        batch.step()
        sizes.append(batch.live())
        slots.append(len(batch.slots))
    assert batch.idle()
    assert max(sizes) >= 3 and sizes[3] > sizes[2]  # rows really shared the batch, joining while others ran
    shrunk = [step for step in range(1, 60) if slots[step] < slots[step - 1] and sizes[step] > 0]
    assert shrunk and shrunk[0] >= 9 + COMPACT_AFTER  # free slots were dropped with rows still running, not at once
    assert [r.new for r in rows] == alone
    assert all(len(r.new) == s.max_new_tokens and r.finish_reason == "length"
               for r, s in zip(rows, settings, strict=True))


def test_a_group_shares_one_prefill_and_a_cancelled_row_leaves_at_once():
    model = small_model("tied-gqa", scale=1.0)
    sampling = Sampling(max_new_tokens=30, temperature=1.0)
    group = [_row([7, 8, 9], sampling, seed) for seed in (1, 2, 3)]
    batch = ContinuousBatch(model, max_rows=3)
    batch.submit(group)
    waiting = _row([1], sampling, 9)
    batch.submit([waiting])  # no room until a row leaves
    for _ in range(4):
        batch.step()
    assert batch.live() == 3 and batch.waiting() == 1 and len({tuple(r.new) for r in group}) == 3
    group[1].cancel()
    batch.step()
    assert group[1].finish_reason == "cancelled" and len(group[1].new) == 4
    assert waiting.new and batch.live() == 3  # the freed slot was taken at the same step
    while not batch.idle():
        batch.step()
    assert waiting.new == generate(model, [[1]], sampling, seed=9)[0]
    assert group[0].new == generate(model, [[7, 8, 9]], sampling, seed=1)[0]


def _wait(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_the_servers_batch_process_gives_what_generate_gives_and_drops_a_stopped_row():
    model = small_model("tied-gqa", scale=1.0)
    sampling = Sampling(max_new_tokens=200, temperature=1.0)
    worker = BatchProcess(model)
    try:
        streamed = []
        stopped = Row([1, 2, 3], sampling, 5, 0, budget=200, stop=lambda ids: len(ids) == 3)
        full = Row([4], sampling, 6, 1, budget=20, on_token=lambda row, token, _: streamed.append(token))
        worker.submit([stopped])
        worker.submit([full])
        assert _wait(lambda: full.finish_reason is not None and stopped.finish_reason is not None)
        assert _wait(lambda: worker.live() == 0)
        assert stopped.finish_reason == "stop" and stopped.new == generate(model, [[1, 2, 3]], sampling, seed=5)[0][:3]
        assert full.finish_reason == "length" and streamed == full.new == _alone(model, [4], sampling, 6, 1, 20)
        # The child let the stopped row go at once, not after its 200 tokens: the few it drew while the message
        # crossed (more on a loaded machine) are dropped.
        assert worker.dropped < 20
    finally:
        worker.stop(10)


def _alone(model, prompt, sampling, seed, seed_row, budget):
    batch = ContinuousBatch(model)
    row = Row(prompt, sampling, seed, seed_row, budget=budget)
    batch.submit([row])
    while not batch.idle():
        batch.step()
    return row.new


def test_rows_of_a_batch_process_that_dies_end_with_an_error():
    model = small_model("tied-gqa", scale=1.0)
    worker = BatchProcess(model)
    try:
        row = Row([1], Sampling(max_new_tokens=100_000, temperature=1.0), 1, 0, budget=100_000)
        worker.submit([row])
        assert _wait(lambda: worker.live() == 1)
        worker.process.kill()
        assert _wait(lambda: row.finish_reason is not None)
        assert row.finish_reason == "error" and "process has ended" in row.error
        late = Row([1], Sampling(max_new_tokens=3), 1, 0, budget=3)
        worker.submit([late])
        assert late.finish_reason == "error"  # refused at once, not left waiting
    finally:
        worker.stop(10)
