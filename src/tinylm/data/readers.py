"""One story file in, as a stream of raw stories: `<|endoftext|>` text (V1, V2), blank-line text, JSON documents,
JSONL and Parquet; gzipped or not. Memory stays bounded by the chunk size and the longest story, never the file's size
(a whole JSON document, which cannot be split without parsing it, is the exception: it has a size limit).

Text is decoded as UTF-8 with each undecodable byte replaced by U+FFFD and counted; a file where more than a fifth of
the bytes is undecodable (judged on the whole file, or on what has been read once that is 1 MiB) is not text and is
refused, as is one with NUL bytes.
"""

from __future__ import annotations

import codecs
import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tinylm.errors import TinylmError

SEPARATOR = "<|endoftext|>"
CHUNK_BYTES = 1 << 20
DECODE_CHECK_BYTES = 1 << 20  # from here on the share of undecodable bytes is checked as reading goes
WHOLE_JSON_LIMIT = 128 << 20  # a JSON document is parsed whole; beyond this JSONL is the way to stream it
LONGEST_STORY = 64 << 20  # characters: a "story" this long means the file is not split into stories at all
PARQUET_BATCH = 1024  # rows per record batch
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

Progress = Callable[[int], None]  # told how many more bytes of the file on disk were consumed


class _CountingReader:
    """A binary file that reports the bytes read from it, so a gzipped file's progress is its compressed bytes."""

    def __init__(self, handle, progress: Progress | None):
        self.handle, self.progress = handle, progress

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        if self.progress is not None and data:
            self.progress(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self.handle, name)


class StoryFile:
    """The raw (uncleaned) stories of one file; `replaced_bytes` counts undecodable bytes once it has been read."""

    def __init__(self, path: Path, progress: Progress | None = None):
        self.path, self.progress, self.replaced_bytes = Path(path), progress, 0
        self.name = self.path.name.lower().removesuffix(".gz")

    def stories(self) -> Iterator[str]:
        if self.name.endswith(".parquet") or self._starts_with(b"PAR1"):
            yield from self._parquet()
            return
        chunks = self._text_chunks(self.progress)
        first = next(chunks, "")
        head = first.lstrip()[:1]
        if self.name.endswith(".jsonl"):
            yield from self._jsonl(_chain(first, chunks))
        elif self.name.endswith(".json") or head in ("[", "{"):
            yield from self._json(first, chunks, head)
        else:
            yield from self._text(_chain(first, chunks), SEPARATOR in first or self._has_separator())

    # ------------------------------------------------------------ bytes and text

    def _starts_with(self, magic: bytes) -> bool:
        try:
            with open(self.path, "rb") as handle:
                return handle.read(len(magic)) == magic
        except OSError as exc:
            raise TinylmError(f"cannot read {self.path}: {exc}") from None

    def _byte_chunks(self, progress: Progress | None) -> Iterator[bytes]:
        try:
            with open(self.path, "rb") as raw:
                stream = _CountingReader(raw, progress)
                if raw.read(2) == b"\x1f\x8b":
                    raw.seek(0)
                    stream = gzip.GzipFile(fileobj=stream, mode="rb")
                else:
                    raw.seek(0)
                while chunk := stream.read(CHUNK_BYTES):
                    yield chunk
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or damaged gzip lands here too
            raise TinylmError(f"cannot read {self.path}: {exc}") from None

    def _text_chunks(self, progress: Progress | None, count: bool = True) -> Iterator[str]:
        """Decoded text in pieces; undecodable bytes become U+FFFD and are counted (when `count`)."""
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        read = replaced = 0
        first = True
        for chunk in self._byte_chunks(progress):
            if b"\x00" in chunk:
                raise TinylmError(f"{self.path} is not a text file (it has NUL bytes)")
            read += len(chunk)
            text, bad = _replace_undecodable(decoder.decode(chunk))
            replaced += bad
            if read >= DECODE_CHECK_BYTES:
                self._check_decodable(replaced, read)
            if first:
                text, first = text.removeprefix("\ufeff"), False
            yield text
        tail, bad = _replace_undecodable(decoder.decode(b"", final=True))
        replaced += bad
        self._check_decodable(replaced, read)
        if count:
            self.replaced_bytes = replaced
        if tail:
            yield tail

    def _check_decodable(self, replaced: int, read: int) -> None:
        if replaced > 0.2 * read:
            raise TinylmError(f"{self.path} is not UTF-8 text ({replaced:,} of the first {read:,} bytes undecodable)")

    def _has_separator(self) -> bool:
        """Whether any `<|endoftext|>` occurs: a text without one is split at blank lines instead."""
        carry = ""
        for text in self._text_chunks(None, count=False):
            if SEPARATOR in carry + text:
                return True
            carry = (carry + text)[-len(SEPARATOR):]
        return False

    # ------------------------------------------------------------ text forms

    def _text(self, chunks: Iterator[str], separated: bool) -> Iterator[str]:
        """Stories between separators (or blank lines), cut as the text arrives; line endings become \\n first."""
        pending = ""
        for text in _unix_newlines(chunks):
            pieces = (pending + text).split(SEPARATOR) if separated else _BLANK_LINE.split(pending + text)
            pending = pieces.pop()
            if len(pending) > LONGEST_STORY:
                raise TinylmError(f"{self.path}: a story of more than {LONGEST_STORY:,} characters; stories are "
                                  f"separated by {SEPARATOR} lines or blank lines")
            yield from pieces
        yield pending

    def _jsonl(self, chunks: Iterator[str]) -> Iterator[str]:
        records = 0
        for number, line in enumerate(_lines(chunks), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TinylmError(f"{self.path}:{number}: malformed JSON line ({exc.msg})") from None
                yield story_of_record(record, records, self.path)
                records += 1

    def _json(self, first: str, chunks: Iterator[str], head: str) -> Iterator[str]:
        """A whole JSON document (a list, {"texts"|"stories": [...]} or one record); a file of one JSON object per
        line is JSONL whatever its name."""
        if head == "{":
            line, _, rest = first.partition("\n")
            try:
                json.loads(line)
                one_per_line = bool(rest.strip()) or any(text.strip() for text in chunks)
            except json.JSONDecodeError:
                one_per_line = False
            if one_per_line:
                yield from self._jsonl(self._text_chunks(None))
                return
            chunks = self._text_chunks(None)
            first = next(chunks, "")
        parts, size = [], 0
        for text in _chain(first, chunks):
            parts.append(text)
            size += len(text)
            if size > WHOLE_JSON_LIMIT:
                if self.name.endswith(".json"):
                    raise TinylmError(f"{self.path}: a JSON document over {WHOLE_JSON_LIMIT >> 20} MB is not "
                                      "streamed; write one story per line as JSONL (e.g. `jq -c '.[]'`)")
                yield from self._text(self._text_chunks(None), SEPARATOR in first or self._has_separator())
                return
        text = "".join(parts)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if head == "{":
                try:
                    stories = list(self._jsonl(iter([text])))
                except TinylmError:
                    stories = None
                if stories is not None:
                    yield from stories
                    return
            if self.name.endswith(".json"):
                raise TinylmError(f"{self.path}: malformed JSON ({exc})") from None
            yield from self._text(iter([text]), SEPARATOR in text)
            return
        yield from stories_of_json(value, self.path)

    # ------------------------------------------------------------ parquet

    def _parquet(self) -> Iterator[str]:
        """The `text` (or `story`) column in record batches, as the hub's parquet files hold TinyStories."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(self.path)
            names = table.schema_arrow.names
            column = next((c for c in ("text", "story") if c in names), None)
            if column is None:
                raise TinylmError(f"{self.path}: no 'text' or 'story' column in this parquet file (it has "
                                  f"{', '.join(names) or 'none'})")
            if not pa.types.is_string(table.schema_arrow.field(column).type) and \
                    not pa.types.is_large_string(table.schema_arrow.field(column).type):
                raise TinylmError(f"{self.path}: the '{column}' column holds {table.schema_arrow.field(column).type}, "
                                  "not strings")
            total, size, done = max(1, table.metadata.num_rows), self.path.stat().st_size, 0
            for batch in table.iter_batches(batch_size=PARQUET_BATCH, columns=[column]):
                for story in batch.column(0).to_pylist():
                    yield story or ""
                if self.progress is not None:
                    step = size * (done + batch.num_rows) // total - size * done // total
                    self.progress(step)
                done += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TinylmError(f"cannot read {self.path} as parquet: {first}") from None


def _replace_undecodable(text: str) -> tuple[str, int]:
    """Undecodable bytes (surrogate escapes) -> U+FFFD, and how many; encoding first skips the scan for clean text."""
    try:
        if not text.isascii():  # ASCII text holds no surrogate escapes: no copy to check it
            text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        return _UNDECODABLE.subn("\ufffd", text)


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


def _unix_newlines(chunks: Iterator[str]) -> Iterator[str]:
    """\\r\\n and \\r become \\n; a \\r that ends a chunk waits for the next, which may start with \\n."""
    held = ""
    for text in chunks:
        text = held + text
        if "\r" not in text:  # the common case: nothing to replace, no copies
            held = ""
            yield text
            continue
        held = "\r" if text.endswith("\r") else ""
        yield text[:-1].replace("\r\n", "\n").replace("\r", "\n") if held else \
            text.replace("\r\n", "\n").replace("\r", "\n")
    if held:
        yield "\n"


def _lines(chunks: Iterator[str]) -> Iterator[str]:
    """Lines as str.splitlines() cuts them, across chunk boundaries (an unfinished line, or a \\r that may be the
    first half of \\r\\n, waits for the next chunk)."""
    pending = ""
    for text in chunks:
        lines = (pending + text).splitlines(keepends=True)
        unfinished = lines and (lines[-1].endswith("\r") or lines[-1].splitlines()[0] == lines[-1])
        pending = lines.pop() if unfinished else ""
        yield from (line.splitlines()[0] for line in lines)
    yield from pending.splitlines()


def story_of_record(item, index: int, path: Path) -> str:
    """A JSON record's story: a string, or the `text` (else `story`) field of an object."""
    if isinstance(item, dict):
        item = item.get("text", item.get("story"))
    if not isinstance(item, str):
        raise TinylmError(f"{path}: record {index} is not a string and has no 'text' or 'story' string field")
    if _LONE_SURROGATE.search(item):  # JSON escapes can make lone surrogates, which UTF-8 cannot hold
        item = _LONE_SURROGATE.sub("\ufffd", item)
    return item


def stories_of_json(value, path: Path) -> Iterator[str]:
    if isinstance(value, dict):
        for key in ("texts", "stories"):
            if isinstance(value.get(key), list):
                yield from stories_of_json(value[key], path)
                return
        value = [value]
    if not isinstance(value, list):
        raise TinylmError(f"{path}: expected a JSON list of stories or {{\"texts\": [...]}}")
    for index, item in enumerate(value):
        yield story_of_record(item, index, path)
