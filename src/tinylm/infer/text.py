"""Text as a row's ids arrive: where a stop string ends it, and which text is safe to show before the row ends."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Decodes one row's new ids as they arrive: ends the row at a stop string and releases only text that cannot
    turn into one (nor an unfinished UTF-8 character).

    Decoding is incremental, so a token costs the same at any length: the ids since the last settled point are
    decoded with the ids before that point as left context, and the difference is new text once it ends in a whole
    character (the way text-generation-inference streams). The whole text is decoded once, at the end."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.emitted = 0
        self.text = ""  # the text of ids[:read]
        self.context = self.read = 0  # ids[context:read] are decoded again as the next ids' left context

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """(the text newly safe to show, whether a stop string has occurred)."""
        before = self.tokenizer.decode(ids[self.context:self.read])
        window = self.tokenizer.decode(ids[self.context:])
        if len(window) > len(before) and not window.endswith("\ufffd") and window.startswith(before):
            self.text += window[len(before):]
            self.context, self.read = self.read, len(ids)
        text = self.text
        cut = self.cut(text)
        safe = cut if cut is not None else len(text) - self._held(text)
        return self._release(text[:safe]), cut is not None

    def finish(self, ids: list[int]) -> tuple[str, str]:
        """(the row's whole text, ending before a stop string; what of it was not yet released)."""
        text = self.tokenizer.decode(ids)
        cut = self.cut(text)
        text = text if cut is None else text[:cut]
        return text, self._release(text)

    def _held(self, text: str) -> int:
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _release(self, text: str) -> str:
        if len(text) <= self.emitted:
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new
