"""Text as a row's ids arrive: where a stop string ends it, and which text is safe to show before the row ends."""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    """Decodes one row's new ids as they arrive: ends the row at a stop string and releases only text that cannot
    turn into one (nor an unfinished UTF-8 character)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.emitted = 0

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def update(self, ids: list[int]) -> tuple[str, bool]:
        """(the text newly safe to show, whether a stop string has occurred)."""
        text = self.tokenizer.decode(ids)
        cut = self.cut(text)
        safe = cut if cut is not None else len(text.rstrip("\ufffd")) - self._held(text)
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
