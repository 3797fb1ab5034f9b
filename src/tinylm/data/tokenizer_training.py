"""Building and training tokenizers: raw bytes, byte-level BPE (with the suffix-space and trailing-space variants and
an attention-sink template), a character vocabulary, and GPT-2's BPE from tiktoken's ranks. Each becomes a
`Tokenizer` (tokenizer.py) saved as one standard tokenizer.json."""

from __future__ import annotations

import json
import os
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from tinylm.data.tokenizer import GPT2_EOT, KINDS, SUFFIX_PATTERN, Tokenizer, byte_to_unicode, bytes_to_symbol
from tinylm.errors import TinylmError
from tinylm.recipe import TokenizerConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_RANKS = Path("..") / "shared" / "data" / "gpt2" / "gpt2.tiktoken"


def build_tokenizer(config: TokenizerConfig, texts: Iterable[str] | None = None) -> Tokenizer:
    """Build (bytes, gpt2) or train (bpe, chars, from `texts`) the tokenizer a recipe describes."""
    if config.kind not in KINDS:
        raise TinylmError(f"tokenizer.kind must be one of {', '.join(KINDS)}, got '{config.kind}'")
    seen = _NonEmpty([] if texts is None else texts)
    builder = {"bytes": _build_bytes, "bpe": _build_bpe, "chars": _build_chars, "gpt2": _build_gpt2}[config.kind]
    hf, meta = builder(config, seen)
    if config.kind in ("bpe", "chars") and not seen.any:
        raise TinylmError(f"a '{config.kind}' tokenizer needs training text, and none was given")
    definition = json.loads(hf.to_str())
    definition["model"]["tinylm"] = meta
    return Tokenizer(definition)


class _NonEmpty:
    """Training texts passed through once (a stream is never held whole), noting whether any had characters."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.any = texts, False

    def __iter__(self):
        for text in self.texts:
            self.any = self.any or bool(text)
            yield text


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
    hf.train_from_iterator(texts, trainer=trainer)
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
        merges.append((bytes_to_symbol(parts[0]), bytes_to_symbol(parts[1])))
    return merges


def _build_gpt2(config: TokenizerConfig, texts) -> tuple[HFTokenizer, dict]:
    specials = [GPT2_EOT] + [t for t in config.special_tokens if t != GPT2_EOT]
    if len(specials) > 1:
        raise TinylmError(f"the gpt2 tokenizer has one special token, {GPT2_EOT}; got {config.special_tokens}")
    ranks = _load_ranks(gpt2_ranks_path(config.ranks_path))
    vocab = {bytes_to_symbol(token): rank for token, rank in ranks.items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=_recover_merges(ranks)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
    meta = _meta(config, "gpt2", specials)
    meta.update(bos=config.bos or "", eos=config.eos or "")
    return hf, meta
