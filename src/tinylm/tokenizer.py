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
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import TinylmError
from .files import atomic_write_text
from .recipe import TokenizerConfig

KINDS = ("bytes", "bpe", "chars", "gpt2")
GPT2_EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer split (tiktoken's r50k pattern; the same as `tokenizers`' ByteLevel regex).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Suffix-space split: a word keeps ONE trailing space ("once ", "upon "); longer whitespace runs stand alone.
SUFFIX_PATTERN = r"""'(?:[sdmt]|ll|ve|re) ?|\p{L}+ ?|\p{N}+ ?|[^\s\p{L}\p{N}]+ ?|\s+"""
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RANKS = Path("..") / "shared" / "data" / "gpt2" / "gpt2.tiktoken"


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


def _bytes_to_symbol(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


class Tokenizer:
    """One tokenizer of any kind. Build with `build_tokenizer`, read with `load_tokenizer`."""

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


def build_tokenizer(config: TokenizerConfig, texts: Iterable[str] | None = None) -> Tokenizer:
    """Build (bytes, gpt2) or train (bpe, chars, from `texts`) the tokenizer a recipe describes."""
    if config.kind not in KINDS:
        raise TinylmError(f"tokenizer.kind must be one of {', '.join(KINDS)}, got '{config.kind}'")
    if config.kind in ("bpe", "chars"):
        texts = [] if texts is None else texts
        if not isinstance(texts, (list, tuple)):
            texts = list(texts)
        if not any(texts):
            raise TinylmError(f"a '{config.kind}' tokenizer needs training text, and none was given")
    builder = {"bytes": _build_bytes, "bpe": _build_bpe, "chars": _build_chars, "gpt2": _build_gpt2}[config.kind]
    hf, meta = builder(config, texts)
    definition = json.loads(hf.to_str())
    definition["model"]["tinylm"] = meta
    return Tokenizer(definition)


def _meta(config: TokenizerConfig, kind: str, specials: list[str], **extra) -> dict:
    meta = {"format": 1, "kind": kind, "special_tokens": list(specials), "bos": config.bos, "eos": config.eos,
            "sink": config.sink, "pad": "<pad>" if "<pad>" in specials else "",
            "unknown": config.unknown if config.unknown in specials else ""}
    meta.update(extra)
    return meta


def _specials(config: TokenizerConfig) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in config.special_tokens]


def _build_bytes(config: TokenizerConfig, texts) -> tuple[HFTokenizer, dict]:
    need = 256 + len(config.special_tokens)
    if config.vocab_size < need:
        raise TinylmError(f"tokenizer.vocab_size {config.vocab_size} is too small: 256 bytes + "
                          f"{len(config.special_tokens)} special tokens need {need}")
    # A BPE with the 256 byte symbols and no merges: id == byte value; special tokens follow at 256+.
    vocab = {symbol: b for b, symbol in byte_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(_specials(config))
    return hf, _meta(config, "bytes", config.special_tokens)


def trailing_space_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.Replace(Regex(r"\z"), " "), normalizers.Replace(Regex(r"\s\s+\z"), " ")])


def _bpe_shell(config: TokenizerConfig) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    if config.trailing_space_normalizer:
        hf.normalizer = trailing_space_normalizer()
    if config.suffix_space:
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SUFFIX_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def _build_bpe(config: TokenizerConfig, texts) -> tuple[HFTokenizer, dict]:
    need = 256 + len(config.special_tokens)
    if config.vocab_size < need:
        raise TinylmError(f"tokenizer.vocab_size {config.vocab_size} is too small for a byte-level BPE: 256 bytes + "
                          f"{len(config.special_tokens)} special tokens need at least {need}")
    hf = _bpe_shell(config)
    trainer = trainers.BpeTrainer(vocab_size=config.vocab_size, special_tokens=_specials(config),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if config.sink:
        hf.post_processor = _sink_template(config, hf)
    return hf, _meta(config, "bpe", config.special_tokens, suffix_space=config.suffix_space,
                     trailing_space_normalizer=config.trailing_space_normalizer)


def _sink_template(config: TokenizerConfig, hf: HFTokenizer) -> processors.TemplateProcessing:
    """transformers users get `<sink> <s> $A` (pair: `... </s> $B`), the layout every training block has."""
    head = [t for t in (config.sink, config.bos) if t]
    single = " ".join([*head, "$A"])
    pair = " ".join([*head, "$A", *([config.eos] if config.eos else []), "$B"])
    used = sorted(set(head + ([config.eos] if config.eos else [])))
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(t, hf.token_to_id(t)) for t in used])


def _fallback_characters():
    """Characters that fill a character vocabulary when the corpus has fewer distinct ones (fixed order)."""
    yield from (chr(c) for c in range(0x20, 0x7F))
    yield from "\n\t"
    for c in range(0xA0, 0x110000):
        ch = chr(c)
        if unicodedata.category(ch) not in ("Cc", "Cs", "Cn", "Co"):
            yield ch


def _build_chars(config: TokenizerConfig, texts) -> tuple[HFTokenizer, dict]:
    specials = list(config.special_tokens)
    if config.unknown not in specials:
        raise TinylmError(f"a chars tokenizer needs its unknown symbol tokenizer.unknown '{config.unknown}' "
                          "in tokenizer.special_tokens")
    slots = config.vocab_size - len(specials)
    if slots < 1:
        raise TinylmError(f"tokenizer.vocab_size {config.vocab_size} leaves no room for characters after "
                          f"{len(specials)} special tokens")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    # Most frequent first; ties by code point, so the vocabulary never depends on the order of the texts.
    chosen = [ch for ch, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
              if ch not in specials][:slots]
    if len(chosen) < slots:
        have = set(chosen) | set(specials)
        for ch in _fallback_characters():
            if len(chosen) == slots:
                break
            if ch not in have:
                chosen.append(ch)
                have.add(ch)
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(chosen)})
    hf = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=config.unknown))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    hf.decoder = decoders.Fuse()  # join the characters with nothing between them
    hf.add_special_tokens(_specials(config))
    covered = sum(counts[ch] for ch in chosen)
    return hf, _meta(config, "chars", specials, corpus_coverage=covered / max(1, sum(counts.values())))


def gpt2_ranks_path(config_path: str = "") -> Path:
    """config.ranks_path, else $TINYLM_GPT2_RANKS, else ../shared/data/gpt2/gpt2.tiktoken (cwd, then repo)."""
    candidates = [Path(config_path)] if config_path else []
    if not candidates and os.environ.get("TINYLM_GPT2_RANKS"):
        candidates = [Path(os.environ["TINYLM_GPT2_RANKS"])]
    if not candidates:
        candidates = [DEFAULT_RANKS, REPO_ROOT / DEFAULT_RANKS]
    for path in candidates:
        if path.is_file():
            return path
    raise TinylmError(f"GPT-2 ranks file not found (tried {', '.join(map(str, candidates))}); "
                      "set tokenizer.ranks_path or $TINYLM_GPT2_RANKS")


def _load_ranks(path: Path) -> dict[bytes, int]:
    from tiktoken.load import load_tiktoken_bpe

    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as exc:  # tiktoken raises ValueError/binascii errors for a malformed file
        raise TinylmError(f"{path}: not a tiktoken ranks file ({exc})") from None
    if len(ranks) != 50256 or sorted(ranks.values()) != list(range(50256)):
        raise TinylmError(f"{path}: expected GPT-2's 50,256 ranks 0..50255, found {len(ranks)}")
    return ranks


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """The merge that made each multi-byte token: replay BPE on its bytes with the lower-ranked tokens only; the
    last step joins exactly two parts. Listing merges in rank order makes HF's BPE reproduce tiktoken."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                raise TinylmError(f"GPT-2 ranks: token {token!r} cannot be built from lower-ranked tokens")
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((_bytes_to_symbol(parts[0]), _bytes_to_symbol(parts[1])))
    return merges


def _build_gpt2(config: TokenizerConfig, texts) -> tuple[HFTokenizer, dict]:
    specials = [GPT2_EOT] + [t for t in config.special_tokens if t != GPT2_EOT]
    if len(specials) > 1:
        raise TinylmError(f"the gpt2 tokenizer has one special token, {GPT2_EOT}; got {config.special_tokens}")
    ranks = _load_ranks(gpt2_ranks_path(config.ranks_path))
    vocab = {_bytes_to_symbol(token): rank for token, rank in ranks.items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_recover_merges(ranks)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
    meta = _meta(config, "gpt2", specials)
    meta.update(bos=config.bos or "", eos=config.eos or "")
    return hf, meta


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
