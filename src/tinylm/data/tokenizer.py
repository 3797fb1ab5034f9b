"""Tokenizers: raw bytes, byte-level BPE, a character vocabulary and GPT-2, behind one interface.

Every kind is saved as ONE `tokenizer.json` in the Hugging Face `tokenizers` format, so
`transformers.PreTrainedTokenizerFast(tokenizer_file=...)` gives the same ids. tinylm's own metadata (kind and which
special token plays which role) rides inside the "model" object, which `tokenizers` ignores when it loads the file.

Conventions:
- `encode` adds no special tokens (data framing does) and reads special-token strings in the text as plain text.
- `decode` skips special ids and ids outside the vocabulary.
- The trailing-space normaliser (Aurelius-10M) makes every non-empty text end in exactly one space: trailing
  whitespace collapses to " " and a space is appended when there is none. It anchors on the end of the text (`\\z`):
  Oniguruma's `$` matches before every newline, which would add a space to each line and erase blank lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from tinylm.errors import TinylmError
from tinylm.storage.atomic import atomic_write_text

KINDS = ("bytes", "bpe", "chars", "gpt2")
GPT2_EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split (tiktoken's r50k pattern; the same as `tokenizers`' ByteLevel regex).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Suffix-space split: a word keeps ONE trailing space ("once ", "upon "); longer whitespace runs stand alone.
SUFFIX_PATTERN = r"""'(?:[sdmt]|ll|ve|re) ?|\p{L}+ ?|\p{N}+ ?|[^\s\p{L}\p{N}]+ ?|\s+"""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 byte values to printable characters (the ByteLevel alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def bytes_to_symbol(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


class Tokenizer:
    """One tokenizer of any kind. Build with `tokenizer_training.build_tokenizer`, read with `load_tokenizer`."""

    def __init__(self, definition: dict):
        self._definition = definition
        self.meta = dict(definition["model"].get("tinylm") or _infer_meta(definition))
        self.kind: str = self.meta["kind"]
        try:
            self.hf = HFTokenizer.from_str(json.dumps(definition))
        except Exception as exc:  # tokenizers raises plain Exception for malformed definitions
            raise TinylmError(f"not a valid tokenizer definition: {str(exc).splitlines()[0]}") from None
        # Special-token strings inside user text stay text (as tiktoken's encode_ordinary does).
        self.hf.encode_special_tokens = True
        self.special_ids: dict[str, int] = {}
        for token in self.meta["special_tokens"]:
            token_id = self.hf.token_to_id(token)
            if token_id is None:
                raise TinylmError(f"tokenizer definition lacks its special token {token!r}")
            self.special_ids[token] = token_id
        self.vocab_size: int = self.hf.get_vocab_size(with_added_tokens=True)
        self._specials = set(self.special_ids.values())
        self._tiktoken = _tiktoken_from_definition(definition) if self.kind == "gpt2" else None
        self._fingerprint = hashlib.sha256(self.to_json(canonical=True).encode("utf-8")).hexdigest()

    def _role(self, role: str) -> int | None:
        token = self.meta.get(role) or ""
        return self.special_ids.get(token) if token else None

    @property
    def bos_id(self) -> int | None:
        return self._role("bos")

    @property
    def eos_id(self) -> int | None:
        return self._role("eos")

    @property
    def sink_id(self) -> int | None:
        return self._role("sink")

    @property
    def pad_id(self) -> int | None:
        return self._role("pad")

    @property
    def unk_id(self) -> int | None:
        return self._role("unknown")

    @property
    def story_end_ids(self) -> list[int]:
        """The ids that end a generated story: EOS, and BOS (a model trained on BOS-framed stories starts the next
        story with it)."""
        return list(dict.fromkeys(i for i in (self.eos_id, self.bos_id) if i is not None))

    def encode(self, text: str) -> list[int]:
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, on all cores (the Rust and tiktoken batch paths)."""
        texts = list(texts)
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        keep = [int(i) for i in ids if 0 <= int(i) < self.vocab_size and int(i) not in self._specials]
        if self._tiktoken is not None:
            return self._tiktoken.decode(keep)
        return self.hf.decode(keep, skip_special_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def to_json(self, canonical: bool = False) -> str:
        if canonical:
            return json.dumps(self._definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return json.dumps(self._definition, indent=1, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    def fingerprint(self) -> str:
        """sha256 of the canonical definition: equal fingerprints encode identically."""
        return self._fingerprint

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, specials={self.special_ids})"


def read_tokenizer_definition(path: str | Path) -> dict:
    """The JSON of a tokenizer.json (or of the one inside a run directory), checked to be one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TinylmError(f"tokenizer not found: {path}")
    try:
        definition = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TinylmError(f"cannot read tokenizer {path}: {exc}") from None
    if not isinstance(definition, dict) or not isinstance(definition.get("model"), dict):
        raise TinylmError(f"{path}: not a tokenizer.json (no model)")
    return definition


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json (or the one inside a run directory)."""
    return Tokenizer(read_tokenizer_definition(path))


def _tiktoken_from_definition(definition: dict):
    """tiktoken's encoder from the saved vocabulary itself, so a run directory needs no ranks file."""
    import tiktoken

    from_symbol = {s: b for b, s in byte_to_unicode().items()}
    ranks = {bytes(from_symbol[c] for c in symbol): rank for symbol, rank in definition["model"]["vocab"].items()}
    return tiktoken.Encoding(name="tinylm-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={GPT2_EOT: 50256})


def _infer_meta(definition: dict) -> dict:
    """Roles for a tokenizer.json written elsewhere (no tinylm metadata): go by the usual token names."""
    model = definition["model"]
    specials = [t["content"] for t in definition.get("added_tokens", []) if t.get("special")]
    vocab = model.get("vocab") or {}
    if model.get("type") == "WordLevel":
        kind = "chars"
    elif len(vocab) == 256 and not model.get("merges"):
        kind = "bytes"
    elif GPT2_EOT in specials and len(vocab) == 50256:
        kind = "gpt2"
    else:
        kind = "bpe"
    role = lambda name: name if name in specials else ""  # noqa: E731
    meta = {"format": 1, "kind": kind, "special_tokens": specials, "bos": role("<s>"), "eos": role("</s>"),
            "sink": role("<sink>"), "pad": role("<pad>"), "unknown": role("<unk>")}
    if kind == "gpt2":
        meta.update(bos=role(GPT2_EOT), eos=role(GPT2_EOT))
    return meta


def tokenizer_stats(tokenizer: Tokenizer, texts: list[str]) -> dict:
    """Bytes, characters and tokens of `texts` (e.g. the validation split) and their ratios."""
    lengths = [len(ids) for ids in tokenizer.encode_batch(texts)]
    n_tokens = sum(lengths)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    stats = {"n_texts": len(texts), "n_tokens": n_tokens, "n_bytes": n_bytes, "n_chars": n_chars,
             "bytes_per_token": n_bytes / max(1, n_tokens), "chars_per_token": n_chars / max(1, n_tokens),
             "tokens_per_text": n_tokens / max(1, len(texts)), "max_tokens": max(lengths, default=0)}
    if tokenizer.unk_id is not None:
        unk = tokenizer.unk_id
        stats["unknown_fraction"] = sum(ids.count(unk) for ids in tokenizer.encode_batch(texts)) / max(1, n_tokens)
    return stats
