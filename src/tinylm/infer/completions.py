"""One completion request in flight: a row per choice in the model's continuous batch, the events its rows send
from the batch's thread to the event loop, and those events as OpenAI chunks (streamed) or one response."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

from tinylm.infer.batch import Row, TokenLogprobs
from tinylm.infer.openai_api import CompletionRequest, completion_body, logprobs_body, usage
from tinylm.infer.text import TextStream


class Choice:
    """One continuation: its row, its text as the ids arrive (stop strings, held-back text), its log-probabilities."""

    def __init__(self, index: int, prompt: int, request: CompletionRequest, post: Callable[[tuple], None]):
        served, ids = request.model, request.prompt_ids[prompt]
        self.index, self.prompt, self.post = index, prompt, post
        self.tokenizer = served.tokenizer
        self.text = TextStream(served.tokenizer, request.stop)
        self.released = ""
        self.row = Row(ids, request.sampling, request.seed, index,
                       budget=min(request.sampling.max_new_tokens, served.model.max_positions - len(ids)),
                       end_ids=frozenset(served.story_end_ids), stop=self._stop, on_token=self._token,
                       on_finish=self._finish, top_logprobs=request.logprobs)
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top_logprobs: list[dict] = []

    # on the thread that receives the batch's tokens
    def _stop(self, ids: list[int]) -> bool:
        self.released, stopped = self.text.update(ids)
        return stopped

    def _token(self, row: Row, token: int, logprobs: TokenLogprobs | None) -> None:
        self.post(("token", self, self.released, token, logprobs))
        self.released = ""

    def _finish(self, row: Row) -> None:
        _, rest = self.text.finish(row.new)
        self.post(("finish", self, rest, row.finish_reason, row.error))

    # on the event loop
    def logprobs_piece(self, token: int, logprobs: TokenLogprobs | None) -> dict | None:
        if logprobs is None:
            return None
        chosen, top = logprobs
        piece = self.tokenizer.decode([token])
        alternatives = {}
        for alt, value in top:  # keys are text; ids that decode alike (parts of one character) keep their own key
            key = self.tokenizer.decode([alt])
            if key in alternatives or "\ufffd" in key:
                key = self.tokenizer.id_to_token(alt) or f"<id {alt}>"
            alternatives[key if key not in alternatives else f"<id {alt}>"] = value
        self.tokens.append(piece)
        self.token_logprobs.append(chosen)
        self.top_logprobs.append(alternatives)
        return logprobs_body([piece], [chosen], [alternatives], 0)


class Mailbox:
    """Events from the batch's thread to the event loop's queues, delivered in one wake-up of the loop however many
    arrived meanwhile (a step of 64 rows sends 64 events: one wake-up rather than 64)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.items: list[tuple[asyncio.Queue, tuple]] = []

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.items.append((queue, event))
            if len(self.items) > 1:  # a delivery is already on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    def _deliver(self) -> None:
        with self.lock:
            items, self.items = self.items, []
        for queue, event in items:
            queue.put_nowait(event)


class CompletionRun:
    """The rows of one request and the events they send (through the loop's Mailbox)."""

    def __init__(self, request: CompletionRequest, mailbox: Mailbox):
        self.request, self.mailbox = request, mailbox
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = [Choice(p * request.n + j, p, request, self._post)
                        for p in range(len(request.prompts)) for j in range(request.n)]
        self.error: str | None = None

    def groups(self) -> list[list[Row]]:
        """The rows of each prompt (prefilled once)."""
        n = self.request.n
        return [[c.row for c in self.choices[p * n:(p + 1) * n]] for p in range(len(self.request.prompts))]

    def _post(self, event: tuple) -> None:
        self.mailbox.post(self.queue, event)

    def cancel(self) -> None:
        for choice in self.choices:
            choice.row.cancel()

    def usage(self) -> dict:
        return usage(sum(len(i) for i in self.request.prompt_ids), sum(len(c.row.new) for c in self.choices))

    async def batches(self, poll: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[list[tuple]]:
        """The events as they come, each batch holding all that had arrived (a stream behind its model catches up in
        one write), until every choice has finished; `poll()` -> True (the client left) ends it early."""
        left = len(self.choices)
        while left:
            try:
                event = await asyncio.wait_for(self.queue.get(), 0.5) if poll else await self.queue.get()
            except TimeoutError:
                if await poll():
                    return
                continue
            batch = [event]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for event in batch:
                if event[0] == "finish":
                    left -= 1
                    self.error = self.error or event[4]
            yield batch

    def _chunk(self, choice: Choice, text: str, logprobs: dict | None, finish: str | None) -> str:
        piece = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        body = completion_body(self.request, [piece], None)
        return f"data: {json.dumps(body)}\n\n"

    def _event_chunk(self, kind: str, choice: Choice, text: str, *rest) -> str:
        if kind == "token":
            return self._chunk(choice, text, choice.logprobs_piece(rest[0], rest[1]), None)
        if rest[1] is not None:  # the step failed
            error = {"message": rest[1], "type": "server_error", "param": None, "code": None}
            return f"data: {json.dumps({'error': error})}\n\n"
        return self._chunk(choice, text, None, _finish_reason(rest[0]))

    async def sse(self) -> AsyncIterator[str]:
        """Server-sent events: a chunk per token (its text may be empty while a stop string is possible), a last
        chunk per choice with its finish_reason, usage if asked, then [DONE]. Leaving early cancels the rows."""
        try:
            if self.request.echo:
                for choice in self.choices:
                    yield self._chunk(choice, self.request.prompts[choice.prompt], None, None)
            async for batch in self.batches():
                yield "".join(self._event_chunk(*event) for event in batch)
            if self.request.include_usage:
                yield f"data: {json.dumps(completion_body(self.request, [], self.usage()))}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()

    async def collect(self, disconnected: Callable[[], Awaitable[bool]]) -> dict:
        """The whole response once every choice has finished (rows are cancelled if the client leaves)."""
        texts = {c.index: [] for c in self.choices}
        reasons = {}
        try:
            async for batch in self.batches(poll=disconnected):
                for kind, choice, text, *rest in batch:
                    texts[choice.index].append(text)
                    if kind == "token":
                        choice.logprobs_piece(rest[0], rest[1])
                    else:
                        reasons[choice.index] = _finish_reason(rest[0])
        finally:
            self.cancel()
        return completion_body(self.request, [self._choice_body(c, "".join(texts[c.index]), reasons.get(c.index))
                                              for c in self.choices], self.usage())

    def _choice_body(self, choice: Choice, text: str, reason: str | None) -> dict:
        logprobs = None
        prompt = self.request.prompts[choice.prompt] if self.request.echo else ""
        if self.request.logprobs is not None:
            # Echoed prompt tokens are listed without log-probabilities (the prompt is prefilled, not scored).
            framed = self.request.prompt_ids[choice.prompt][len(self.request.model.prefix):]
            echoed = [choice.tokenizer.decode([i]) for i in framed] if prompt else []
            logprobs = logprobs_body(echoed + choice.tokens, [None] * len(echoed) + choice.token_logprobs,
                                     [None] * len(echoed) + choice.top_logprobs, 0)
        return {"index": choice.index, "text": prompt + text, "logprobs": logprobs, "finish_reason": reason}


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
