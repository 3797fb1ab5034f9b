"""A model's continuous batch in a process of its own, for the server.

The decode step is a few hundred small PyTorch calls, each giving up Python's global lock and taking it back; an
event loop in the same process that spends a hundred microseconds of Python on each streamed token takes the lock in
between and stalls the step (at 64 rows, 30% of the throughput). So the batch runs in a child process (spawned; the
model's tensors are shared with it, not copied) and the server's process keeps the rows' callbacks: the child sends,
after each step, one message with every row's new token (and log-probabilities) and every row that ended; the parent
applies them on a reader thread, where stop strings are checked (a row that stops is cancelled in the child, which
may have drawn one more token by then: it is dropped).
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import threading
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from tinylm.infer.batch import ContinuousBatch, Row


class BatchProcess:
    """Runs a model's ContinuousBatch in a child process. `submit` a group of rows (one prompt's, prefilled once);
    `cancel()` on a row reaches the child with the next step's message; `stop` ends the child."""

    def __init__(self, model, fast: bool = True, max_rows: int | None = None, name: str = "tinylm-batch",
                 compiled: str | None = None):
        context = mp.get_context("spawn")  # a fork would copy the parent's threads' state, OpenMP's pool included
        self.connection, child_end = context.Pipe()
        self.process = context.Process(target=_run_batch, name=name, daemon=True,
                                       args=(child_end, model, fast, max_rows, torch.get_num_threads(), compiled))
        self.process.start()
        child_end.close()
        self.rows: dict[int, Row] = {}  # in flight: sent to the child, not yet ended
        self.started: set[int] = set()  # keys of rows the child has taken into its batch
        self.child_live = 0  # rows in the child's batch after its last step
        self.dropped = 0  # tokens the child drew for rows that had already stopped here
        self.keys = itertools.count()
        self.lock = threading.Lock()  # the row tables (the reader thread and the event loop both use them)
        self.sending = threading.Lock()
        self.ended: str | None = None  # why the child is gone, once it is
        self.reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self.reader.start()

    def submit(self, rows: list[Row]) -> None:
        with self.lock:
            if self.ended is not None:
                for row in rows:
                    _end(row, "error", self.ended)
                return
            keyed = [(next(self.keys), row) for row in rows]
            self.rows.update(keyed)
        self._send(("submit", [(key, _bare(row)) for key, row in keyed]))

    def live(self) -> int:
        """Rows in the child's batch (as of its last step)."""
        return self.child_live

    def waiting(self) -> int:
        """Rows sent that have not joined the batch yet."""
        with self.lock:
            return len(self.rows) - len(self.started)

    def in_flight(self) -> list[Row]:
        with self.lock:
            return list(self.rows.values())

    def stop(self, timeout: float | None = None) -> None:
        try:
            self._send(("stop",))
        except OSError:  # already gone
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
        self.reader.join(timeout)

    def _send(self, message: tuple) -> None:
        with self.sending:
            self.connection.send(message)

    def _read(self) -> None:
        """Apply the child's messages to the rows until the child is gone; then end what is left with an error."""
        while True:
            try:
                tokens, finished, self.child_live = self.connection.recv()
            except (EOFError, OSError):
                break
            stopped = [key for key, token, logprobs in tokens if self._token(key, token, logprobs)]
            for key, reason, error in finished:
                self._finish(key, reason, error)
            cancelled = stopped + [key for key, row in list(self.rows.items()) if row.cancelled]
            if cancelled:
                try:
                    self._send(("cancel", cancelled))
                except OSError:
                    break
        with self.lock:
            self.ended = "the model's process has ended"
            left, self.rows = list(self.rows.values()), {}
            self.started.clear()
            self.child_live = 0
        for row in left:
            _end(row, "error", self.ended)

    def _token(self, key: int, token: int, logprobs) -> bool:
        """Apply one new token; True when a stop string ended its row here (the child is to drop the row)."""
        row = self.rows.get(key)
        if row is None:  # ended here already (a stop string): the child's later tokens are dropped
            self.dropped += 1
            return False
        with self.lock:
            self.started.add(key)
        row.new.append(token)
        stopped = row.stop is not None and row.stop(row.new)
        if row.on_token is not None:
            row.on_token(row, token, logprobs)
        if stopped:
            self._finish(key, "stop", None)
        return stopped

    def _finish(self, key: int, reason: str, error: str | None) -> None:
        with self.lock:
            row = self.rows.pop(key, None)
            self.started.discard(key)
        if row is not None:
            _end(row, reason, error)


def _end(row: Row, reason: str, error: str | None) -> None:
    row.finish_reason, row.error = reason, error
    if row.on_finish is not None:
        row.on_finish(row)


def _bare(row: Row) -> Row:
    """The row as the child needs it: no callbacks (they stay in this process), nothing generated yet."""
    return dataclasses.replace(row, stop=None, on_token=None, on_finish=None, new=[])


# ---------------------------------------------------------------------------------------------------- the child
def _run_batch(connection, model, fast: bool, max_rows: int | None, threads: int, compiled: str | None) -> None:
    """The child: take what the parent sends, step while rows are live, send each step's tokens and endings."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the server ends streams first, then says stop
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(threads)
    model.eval()
    batch = ContinuousBatch(model, fast, max_rows=max_rows, compiled=compiled)
    rows: dict[int, Row] = {}
    tokens: list[tuple] = []
    finished: list[tuple] = []

    def on_token(key: int) -> Callable:
        return lambda row, token, logprobs: tokens.append((key, token, logprobs))

    def on_finish(key: int) -> Callable:
        def ended(row: Row) -> None:
            finished.append((key, row.finish_reason, row.error))
            rows.pop(key, None)
        return ended

    while True:
        try:
            while batch.idle() or connection.poll():  # block only when there is nothing to step
                message = connection.recv()
                if message[0] == "stop":
                    return
                if message[0] == "cancel":
                    for key in message[1]:
                        if key in rows:
                            rows[key].cancel()
                    continue
                group = [dataclasses.replace(row, on_token=on_token(key), on_finish=on_finish(key))
                         for key, row in message[1]]
                rows.update((key, row) for (key, _), row in zip(message[1], group, strict=True))
                batch.submit(group)
        except (EOFError, OSError):  # the parent is gone
            return
        try:
            batch.step()
        except Exception as exc:  # a failed step ends its rows with the error; the batch goes on
            batch.fail_all(f"{type(exc).__name__}: {exc}")
        if tokens or finished:
            connection.send((tokens[:], finished[:], batch.live()))
            tokens.clear()
            finished.clear()
