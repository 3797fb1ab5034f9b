"""Token shards out: framing stories with special tokens, tokenising once into memory-mapped shards (reused while the
tokenizer and corpus are unchanged), and batches for training and evaluation. Reading the corpus is corpus.py's job.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from tinylm.data.corpus import Corpus, is_validation, resolve_data_files
from tinylm.data.tokenizer import Tokenizer
from tinylm.errors import TinylmError
from tinylm.models import IGNORE_INDEX
from tinylm.recipe import DataConfig, Recipe
from tinylm.storage.atomic import atomic_directory, atomic_write_json, verify_manifest, write_manifest

SHARD_FORMAT = 1
SHARDS_KIND = "tinylm token shards"  # what data/manifest.json says it holds
ENCODE_CHUNK = 4096  # stories per encode_batch call: bounded memory, a moving progress bar

# ---------------------------------------------------------------- framing and shards

def frame_prefix(tokenizer: Tokenizer, framing: str) -> list[int]:
    """The ids a sequence starts with; generation prompts start with it too."""
    roles = {"bos": [tokenizer.bos_id], "sink_bos": [tokenizer.sink_id, tokenizer.bos_id],
             "eos": [tokenizer.eos_id], "none": []}
    if framing not in roles:
        raise TinylmError(f"unknown framing '{framing}' (bos, eos, sink_bos, none)")
    if any(i is None for i in roles[framing]):
        raise TinylmError(f"framing '{framing}' needs special tokens this tokenizer lacks ({tokenizer.special_ids})")
    return [int(i) for i in roles[framing]]


def block_prefix(tokenizer: Tokenizer, framing: str) -> list[int]:
    """Ids placed at the start of EVERY training/evaluation block: only `sink_bos` pins them (<sink> <s>)."""
    return frame_prefix(tokenizer, framing) if framing == "sink_bos" else []


def _frame(ids_list: list[list[int]], tokenizer: Tokenizer, framing: str, separator: list[int], first: bool,
           dtype) -> np.ndarray:
    """One flat token stream in the shard's dtype: bos -> <s> story; eos -> story </s>; sink_bos -> story </s> (each
    block gets <sink> <s> in front, as the pair template `<sink> <s> $A </s> $B`); none -> stories joined by "\\n\\n".
    A list of the ids converted at once is the fastest way from the tokenizer's lists to an array (np.fromiter over
    the pieces, then a cast, took 1.5x as long)."""
    flat: list[int] = []
    for ids in ids_list:
        if framing == "bos":
            flat.append(tokenizer.bos_id)
            flat += ids
        elif framing in ("eos", "sink_bos"):
            flat += ids
            flat.append(tokenizer.eos_id)
        else:
            if not first:
                flat += separator
            flat += ids
        first = False
    return np.array(flat, dtype=dtype)


def corpus_fingerprint(config: DataConfig, files: list[Path]) -> str:
    stats = []
    for f in files:
        st = Path(f).stat()
        stats.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    settings = {"files": stats, "max_stories": config.max_stories, "val_fraction": config.val_fraction,
                "split_seed": config.split_seed, "framing": config.framing, "format": SHARD_FORMAT}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _reusable(data_dir: Path, corpus_fp: str, tokenizer_fp: str) -> dict | None:
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        verify_manifest(data_dir)
    except (TinylmError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None  # incomplete or damaged: rebuild
    if meta.get("corpus_fingerprint") != corpus_fp or meta.get("tokenizer_fingerprint") != tokenizer_fp:
        return None
    return meta


def prepare_data(recipe: Recipe, tokenizer: Tokenizer, data_dir: str | Path, progress: bool = True,
                 corpus: Corpus | None = None) -> dict:
    """Tokenise the corpus once into data_dir/{train,val}.bin + meta.json + manifest.json; reuse matching shards.

    The corpus streams through: each split's stories are encoded ENCODE_CHUNK at a time (on every core) while the
    next chunk is read, and appended to its shard, so memory does not grow with the corpus."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    data_dir, config = Path(data_dir), recipe.data
    corpus = corpus if corpus is not None else Corpus(resolve_data_files(config), config.max_stories)
    corpus_fp, tokenizer_fp = corpus_fingerprint(config, corpus.paths), tokenizer.fingerprint()
    old = _reusable(data_dir, corpus_fp, tokenizer_fp)
    if old is not None:
        return {**old, "reused": True, "seconds": time.perf_counter() - started}
    prefix = frame_prefix(tokenizer, config.framing)  # fails early when the tokenizer lacks the framing's ids
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    meta = {"format": SHARD_FORMAT, "dtype": np.dtype(dtype).name, "tokenizer_fingerprint": tokenizer_fp,
            "tokenizer_kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "corpus_fingerprint": corpus_fp,
            "files": corpus.files, "framing": config.framing, "frame_prefix": prefix,
            "block_prefix": block_prefix(tokenizer, config.framing)}
    with atomic_directory(data_dir, kind=SHARDS_KIND) as tmp, \
            tqdm(total=corpus.size, unit="B", unit_scale=True, desc="tokenising",
                 disable=None if progress else True) as bar:
        writers = {name: _SplitWriter(tmp / f"{name}.bin", tokenizer, config.framing, dtype)
                   for name in ("train", "val")}
        try:
            _write_splits(corpus, writers, config, bar.update)
        finally:
            for writer in writers.values():
                writer.close()
        for name, writer in writers.items():
            if not writer.n_stories:
                raise TinylmError(f"the {name} split is empty ({corpus.stories} stories, data.val_fraction = "
                                  f"{config.val_fraction}): add data or change data.val_fraction")
            meta[name] = {"n_tokens": writer.n_tokens, "n_bytes": writer.n_bytes, "n_stories": writer.n_stories,
                          "file": f"{name}.bin"}
        meta.update(replaced_bytes=corpus.replaced_bytes, duplicates=corpus.duplicates)
        atomic_write_json(tmp / "meta.json", meta)
        write_manifest(tmp, extra={"kind": SHARDS_KIND})
    return {**meta, "reused": False, "seconds": time.perf_counter() - started}


def _write_splits(corpus: Corpus, writers: dict[str, _SplitWriter], config: DataConfig, progress) -> None:
    """Read the stream once, sending each story to its split; a chunk is encoded in a worker thread (the
    tokenizers release the GIL) while reading goes on, and chunks are appended in the order they were cut."""
    in_flight: deque = deque()

    def finish(keep: int) -> None:
        while len(in_flight) > keep:
            writer, job = in_flight.popleft()
            writer.append(job.result())

    with ThreadPoolExecutor(max_workers=1) as pool:
        for story in corpus.read(progress):
            writer = writers["val" if is_validation(story, config.val_fraction, config.split_seed) else "train"]
            chunk = writer.add(story)
            if chunk:
                in_flight.append((writer, pool.submit(writer.encode, *chunk)))
                finish(keep=2)
        for writer in writers.values():
            chunk = writer.add(None)
            if chunk:
                in_flight.append((writer, pool.submit(writer.encode, *chunk)))
        finish(keep=0)


class _SplitWriter:
    """One split's shard file: stories gathered into chunks, framed ids appended, stories and UTF-8 bytes counted
    (bits per byte divides by them)."""

    def __init__(self, path: Path, tokenizer: Tokenizer, framing: str, dtype):
        self.handle = open(path, "wb")  # noqa: SIM115 - closed by prepare_data
        self.tokenizer, self.framing, self.dtype = tokenizer, framing, dtype
        self.separator = tokenizer.encode("\n\n") if framing == "none" else []
        self.pending: list[str] = []
        self.n_tokens = self.n_bytes = self.n_stories = 0

    def add(self, story: str | None) -> tuple[list[str], bool] | None:
        """Take a story (None: the end); a full chunk comes back to be encoded, with whether it starts the split."""
        if story is not None:
            self.pending.append(story)
            size = len(story) if story.isascii() else len(story.encode("utf-8"))  # ASCII: a byte per character
            self.n_bytes += size + (2 if self.framing == "none" and self.n_stories else 0)
            self.n_stories += 1  # the "\n\n" between stories (framing none) is predicted text too
            if len(self.pending) < ENCODE_CHUNK:
                return None
        if not self.pending:
            return None
        chunk, self.pending = self.pending, []
        return chunk, self.n_stories == len(chunk)

    def encode(self, stories: list[str], first: bool) -> np.ndarray:
        array = _frame(self.tokenizer.encode_batch(stories), self.tokenizer, self.framing, self.separator, first,
                       self.dtype)  # an id the dtype cannot hold raises OverflowError
        if array.size and array.max() >= self.tokenizer.vocab_size:
            raise AssertionError("token id outside the vocabulary")
        return array

    def append(self, tokens: np.ndarray) -> None:
        self.handle.write(tokens.tobytes())
        self.n_tokens += tokens.size

    def close(self) -> None:
        self.handle.close()


class TokenShard:
    """One split's tokens as a read-only memory map, with the statistics of meta.json beside it."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer | None = None):
        self.path = Path(path)
        self.split = self.path.stem
        meta_path = self.path.parent / "meta.json"
        if not self.path.is_file() or not meta_path.is_file():
            raise TinylmError(f"token shard not found: {self.path} (run `tinylm data prepare` first)")
        # Shards from prepare_data carry a manifest: a truncated or altered file is named, never read.
        verified = (self.path.parent / "manifest.json").is_file()
        if verified:
            verify_manifest(self.path.parent, only=[self.path.name, "meta.json"])
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
            stats = self.meta[self.split]
            self.dtype = np.dtype(self.meta["dtype"])
            self.n_tokens: int = int(stats["n_tokens"])
            self.n_bytes: int = int(stats["n_bytes"])
            self.n_stories: int = int(stats["n_stories"])
            self.block_prefix: list[int] = [int(i) for i in self.meta.get("block_prefix", [])]
            self.frame_prefix: list[int] = [int(i) for i in self.meta.get("frame_prefix", [])]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError) as exc:
            raise TinylmError(f"{meta_path}: unreadable shard metadata ({exc})") from None
        if tokenizer is not None:
            check_tokenizer(self.meta, tokenizer, self.path.parent)
        size = self.path.stat().st_size
        if size != self.n_tokens * self.dtype.itemsize:
            raise TinylmError(f"{self.path}: {size} bytes, expected {self.n_tokens * self.dtype.itemsize} (truncated?)")
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,)) if self.n_tokens \
            else np.zeros(0, dtype=self.dtype)
        vocab = self.meta.get("vocab_size")
        if not verified and isinstance(vocab, int) and self.n_tokens and int(self.tokens.max()) >= vocab:
            # no checksums to go by: at least never feed an id the embedding table does not have
            raise TinylmError(f"{self.path}: holds token ids >= the vocabulary size {vocab} (corrupted?)")

    def __len__(self) -> int:
        return self.n_tokens


def check_tokenizer(meta: dict, tokenizer: Tokenizer, where: Path | str = "shards") -> None:
    if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint():
        raise TinylmError(f"the tokenizer does not match the shards in {where} (they were made with another "
                          "tokenizer): run `tinylm data prepare` again")


# ---------------------------------------------------------------- batches

def _prefix_for(shard: TokenShard, prefix) -> list[int]:
    return list(shard.block_prefix if prefix is None else prefix)


class BatchSampler:
    """Random blocks from a shard. Batch k depends only on (seed, k), so state is two numbers and resume is exact.

    A block is `prefix` followed by T - len(prefix) consecutive stream tokens; prefix positions get IGNORE_INDEX
    targets (their next token is either fixed or an arbitrary cut), the rest predict the following stream token.
    prefix=None takes the shard's own (<sink> <s> for sink_bos, else none).
    """

    def __init__(self, shard: TokenShard, batch_size: int, context_length: int, seed: int = 0, prefix=None):
        self.shard, self.batch_size, self.context_length, self.seed = shard, batch_size, context_length, seed
        self.prefix = _prefix_for(shard, prefix)
        self.span = context_length - len(self.prefix)
        if batch_size < 1 or self.span < 1:
            raise TinylmError(f"batch size {batch_size} / context {context_length} leave no room for tokens")
        if shard.n_tokens < self.span + 1:
            raise TinylmError(f"the {shard.split} split has {shard.n_tokens} tokens, fewer than one block of "
                              f"{self.span + 1}: add data or shorten the context")
        self.step = 0

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, self.step])
        self.step += 1
        starts = rng.integers(0, self.shard.n_tokens - self.span, size=self.batch_size)
        chunk = torch.from_numpy(self.shard.tokens[starts[:, None] + np.arange(self.span + 1)].astype(np.int64))
        head = torch.tensor(self.prefix, dtype=torch.long).expand(self.batch_size, -1)
        x = torch.cat([head, chunk[:, :-1]], dim=1)
        y = torch.cat([torch.full_like(head, IGNORE_INDEX), chunk[:, 1:]], dim=1)
        return x, y

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "context_length": self.context_length, "prefix": list(self.prefix)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "context_length", "prefix"):
            if key in state and state[key] != self.state_dict()[key]:
                raise TinylmError(f"cannot resume the batch sampler: {key} was {state[key]}, now "
                                  f"{self.state_dict()[key]}")
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_batches(shard: TokenShard, batch_size: int, context_length: int,
                 prefix=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split once, in non-overlapping blocks: tokens 1..n-1 are each predicted exactly once (token 0 has
    no context). The last block is padded (inputs 0, targets IGNORE_INDEX); the last batch may have fewer rows."""
    head = _prefix_for(shard, prefix)
    span = context_length - len(head)
    if batch_size < 1 or span < 1:
        raise TinylmError(f"batch size {batch_size} / context {context_length} leave no room for tokens")
    tokens, n = shard.tokens, shard.n_tokens
    starts = list(range(0, max(n - 1, 0), span))
    for first in range(0, len(starts), batch_size):
        rows = starts[first:first + batch_size]
        x = torch.zeros((len(rows), context_length), dtype=torch.long)
        y = torch.full((len(rows), context_length), IGNORE_INDEX, dtype=torch.long)
        if head:
            x[:, :len(head)] = torch.tensor(head, dtype=torch.long)
        for r, s in enumerate(rows):
            length = min(span, n - 1 - s)
            block = torch.from_numpy(tokens[s:s + length + 1].astype(np.int64))
            x[r, len(head):len(head) + length] = block[:-1]
            y[r, len(head):len(head) + length] = block[1:]
        yield x, y
