"""TinyStories in: finding the files (paths, globs, directories or hub downloads), the stream of clean, unique
stories (each file read by readers.py), the train/validation split and the tokenizer's training text.

Memory does not grow with the corpus: stories pass one at a time and deduplication keeps a 16-byte digest per story.

The train/validation split is decided per story by a hash of its text (and `split_seed`): it never depends on file
order, and a story is never on both sides (exact duplicates are dropped first).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import heapq
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tinylm.data import hub
from tinylm.data.readers import Progress, StoryFile
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokenizer_training import REPO_ROOT, build_tokenizer
from tinylm.errors import TinylmError
from tinylm.recipe import DataConfig, Recipe

DEDUP_BLOCK = 256  # raw stories checked against the seen digests at once
STORY_SUFFIXES = (".txt", ".json", ".jsonl", ".txt.gz", ".json.gz", ".jsonl.gz", ".parquet")  # taken from directories


# ---------------------------------------------------------------- finding files

def resolve_data_files(config: DataConfig) -> list[Path]:
    """The files a data config names: paths (files, directories, globs) or, when empty, hub downloads."""
    if not config.paths:
        return hub_files(config)
    found: list[Path] = []
    for pattern in config.paths:
        if not pattern.strip():
            raise TinylmError("data.paths has an empty entry")
        matches = _expand(pattern)
        if not matches and not Path(pattern).is_absolute():
            matches = _expand(str(REPO_ROOT / pattern))  # recipes name paths relative to the repository root
        if not matches:
            raise TinylmError(f"data path not found: {pattern}")
        found += [m for m in matches if m not in found]
    return found


def _expand(pattern: str) -> list[Path]:
    names = sorted(glob.glob(os.path.expanduser(pattern), recursive=True)) if glob.has_magic(pattern) else [pattern]
    files: list[Path] = []
    for name in names:
        path = Path(os.path.expanduser(name))
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(STORY_SUFFIXES)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise TinylmError(f"data directory {path} has no story files ({', '.join(STORY_SUFFIXES)})")
            files += inside
        elif path.is_file():
            files.append(path)
    return files


def hub_files(config: DataConfig) -> list[Path]:
    if not config.hub_dataset:
        raise TinylmError("data.paths is empty and data.hub_dataset is not set")
    if not config.hub_files:
        raise TinylmError(f"data.hub_files is empty: name the files of {config.hub_dataset} to use, "
                          "e.g. [\"TinyStoriesV2-GPT4-valid.txt\"]")
    return [hub.dataset_file(config.hub_dataset, name) for name in config.hub_files]


# ---------------------------------------------------------------- reading stories

def clean_story(story: str) -> str:
    return (story.replace("\r\n", "\n").replace("\r", "\n") if "\r" in story else story).strip()


class Corpus:
    """The stories of some files as a stream: cleaned (line endings, strip), without empty and exact-duplicate
    stories, at most `max_stories`. Each pass reads the files again and gives the same stories in the same order;
    `stories`, `duplicates` and `replaced_bytes` count the last finished pass."""

    def __init__(self, files: list[Path], max_stories: int = 0):
        self.paths = [Path(f) for f in files]
        self.files = [str(f) for f in files]
        self.max_stories = max_stories
        self.stories = self.duplicates = self.replaced_bytes = 0

    @property
    def size(self) -> int:
        """Bytes on disk, the unit progress is counted in."""
        return sum(path.stat().st_size for path in self.paths)

    def __iter__(self) -> Iterator[str]:
        return self.read()

    def read(self, progress: Progress | None = None) -> Iterator[str]:
        seen, limit = DigestSet(), self.max_stories or None
        kept = duplicates = replaced = 0
        for path in self.paths:
            source = StoryFile(path, progress)
            for story, new in _marked_new(source.stories(), seen):
                if not new:
                    duplicates += 1
                    continue
                kept += 1
                yield story
                if kept == limit:
                    break
            replaced += source.replaced_bytes
            if kept == limit:
                break
        if not kept:
            raise TinylmError(f"no stories found in {', '.join(self.files)}")
        self.stories, self.duplicates, self.replaced_bytes = kept, duplicates, replaced


def _marked_new(stories: Iterator[str], seen: DigestSet) -> Iterator[tuple[str, bool]]:
    """Each cleaned, non-empty story with whether it is new (its digest added to `seen`). Stories are checked in
    blocks of DEDUP_BLOCK raw ones: one vectorised search per block, not one per story."""
    while raw := list(itertools.islice(stories, DEDUP_BLOCK)):
        block = [story for story in map(clean_story, raw) if story]
        yield from zip(block, seen.add_many([hashlib.blake2b(s.encode(), digest_size=16).digest() for s in block]),
                       strict=True)


class DigestSet:
    """Fixed-size digests of the stories seen so far, so deduplication holds 16 bytes per story, never the story:
    recent ones in a set, older ones in one sorted array (merged when the set fills)."""

    RECENT = 1 << 16

    def __init__(self):
        self.recent: set[bytes] = set()
        self.sorted = np.empty(0, dtype="S16")

    def add_many(self, digests: list[bytes]) -> list[bool]:
        """Add digests in order; for each, whether it was new (False: seen before, earlier in the list included)."""
        old = [False] * len(digests)
        if self.sorted.size and digests:
            probe = np.array(digests, dtype="S16")  # numpy drops trailing NULs of S16 items: compare as arrays
            at = np.searchsorted(self.sorted, probe)
            old = (self.sorted[np.minimum(at, self.sorted.size - 1)] == probe).tolist()
        fresh = []
        for digest, found in zip(digests, old, strict=True):
            new = not found and digest not in self.recent
            if new:
                self.recent.add(digest)
            fresh.append(new)
        if len(self.recent) >= self.RECENT:
            # one merge pass of two sorted runs into a new array: a merge holds two copies, never more
            recent = np.array(sorted(self.recent), dtype="S16")
            self.sorted = np.insert(self.sorted, np.searchsorted(self.sorted, recent), recent)
            self.recent.clear()
        return fresh


def load_corpus(config: DataConfig) -> Corpus:
    return Corpus(resolve_data_files(config), config.max_stories)


def train_tokenizer(recipe: Recipe, corpus: Corpus | None = None, progress: bool = False) -> tuple[Tokenizer, int]:
    """The recipe's tokenizer and the number of stories it learnt from (0 when built without text): bpe/chars
    learn from the TRAIN split only, so validation figures stay honest; `tokenizer.train_stories` caps them."""
    if recipe.tokenizer.kind in ("bytes", "gpt2"):
        return build_tokenizer(recipe.tokenizer), 0
    from tqdm.auto import tqdm

    corpus = corpus if corpus is not None else load_corpus(recipe.data)
    config = recipe.data
    with tqdm(total=corpus.size, unit="B", unit_scale=True, desc="tokenizer training",
              disable=None if progress else True) as bar:
        train = (s for s in corpus.read(bar.update) if not is_validation(s, config.val_fraction, config.split_seed))
        if recipe.tokenizer.train_stories:
            train = iter(seeded_sample(train, recipe.tokenizer.train_stories, config.split_seed))
        counted = _Counted(train)
        tokenizer = build_tokenizer(recipe.tokenizer, counted)
    return tokenizer, counted.n


class _Counted:
    def __init__(self, items: Iterator[str]):
        self.items, self.n = items, 0

    def __iter__(self) -> Iterator[str]:
        for item in self.items:
            self.n += 1
            yield item


def seeded_sample(stories: Iterator[str], n: int, seed: int) -> list[str]:
    """The n stories with the smallest seeded hashes (as llama2.c trains its vocabulary on a subset): the same
    sample whatever the file order, and only n stories held at a time."""
    heap: list[tuple[int, str]] = []
    for story in stories:
        key = -int.from_bytes(hashlib.blake2b(f"sample\0{seed}\0{story}".encode(), digest_size=8).digest(), "big")
        if len(heap) < n:
            heapq.heappush(heap, (key, story))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, story))
    return [story for _, story in sorted(heap, reverse=True)]


# ---------------------------------------------------------------- the split

def is_validation(story: str, val_fraction: float, seed: int) -> bool:
    """Whether the story belongs to the validation split: blake2b-64 of "seed NUL story" below the fraction."""
    hasher = _split_hasher(seed).copy()
    hasher.update(story.encode())
    return int.from_bytes(hasher.digest(), "big") < val_fraction * 2.0**64


@functools.lru_cache(maxsize=8)
def _split_hasher(seed: int):
    return hashlib.blake2b(f"{seed}\0".encode(), digest_size=8)


def split_stories(stories: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    train, val = [], []
    for story in stories:
        (val if is_validation(story, val_fraction, seed) else train).append(story)
    return train, val
