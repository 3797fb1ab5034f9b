"""TinyStories in: finding the files (paths, globs, directories or hub downloads), reading every form the dataset is
met in, cleaning, and the train/validation split.

Readers accept raw text with `<|endoftext|>` separator lines (V1, V2), text whose stories are separated by blank
lines, JSON lists / {"texts"|"stories": [...]} / JSONL records with a `text` or `story` field; gzipped or not.

The train/validation split is decided per story by a hash of its text (and `split_seed`): it never depends on file
order, and a story is never on both sides (exact duplicates are dropped first).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from tinylm.data import hub
from tinylm.data.tokenizer import Tokenizer
from tinylm.data.tokenizer_training import REPO_ROOT, build_tokenizer
from tinylm.errors import TinylmError
from tinylm.recipe import DataConfig, Recipe

SEPARATOR = "<|endoftext|>"
STORY_SUFFIXES = (".txt", ".json", ".jsonl", ".txt.gz", ".json.gz", ".jsonl.gz")  # taken from directories


@dataclass
class Corpus:
    stories: list[str]
    files: list[str]
    replaced_bytes: int = 0  # undecodable bytes replaced by U+FFFD
    duplicates: int = 0


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

def _read_text(path: Path) -> tuple[str, int]:
    """Decoded text of a (possibly gzipped) file and the number of undecodable bytes replaced."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise TinylmError(f"cannot read {path}: {exc}") from None
    if b"\x00" in raw:
        raise TinylmError(f"{path} is not a text file (it has NUL bytes)")
    try:
        text, replaced = raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text, replaced = re.subn("[\udc80-\udcff]", "\ufffd", raw.decode("utf-8", "surrogateescape"))
        if replaced > 0.2 * len(raw):
            raise TinylmError(f"{path} is not UTF-8 text ({replaced:,} of {len(raw):,} bytes undecodable)") from None
    return text.removeprefix("\ufeff"), replaced


def _stories_from_json(value, path: Path) -> list[str]:
    if isinstance(value, dict):
        for key in ("texts", "stories"):
            if isinstance(value.get(key), list):
                return _stories_from_json(value[key], path)
        value = [value]
    if not isinstance(value, list):
        raise TinylmError(f"{path}: expected a JSON list of stories or {{\"texts\": [...]}}")
    stories = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            item = item.get("text", item.get("story"))
        if not isinstance(item, str):
            raise TinylmError(f"{path}: record {i} is not a string and has no 'text' or 'story' string field")
        if re.search("[\ud800-\udfff]", item):  # JSON escapes can make lone surrogates, which UTF-8 cannot hold
            item = re.sub("[\ud800-\udfff]", "\ufffd", item)
        stories.append(item)
    return stories


def _parse_jsonl(text: str, path: Path) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise TinylmError(f"{path}:{number}: malformed JSON line ({exc.msg})") from None
    return records


def split_raw_stories(text: str, path: Path = Path("text")) -> list[str]:
    """The stories of one file's text, before clean-up."""
    name = path.name.lower().removesuffix(".gz")
    head = text.lstrip()[:1]
    if name.endswith(".jsonl"):
        return _stories_from_json(_parse_jsonl(text, path), path)
    if name.endswith(".json") or head in ("[", "{"):
        try:
            return _stories_from_json(json.loads(text), path)
        except json.JSONDecodeError as exc:
            if head == "{":
                try:
                    return _stories_from_json(_parse_jsonl(text, path), path)
                except TinylmError:
                    pass
            if name.endswith(".json"):
                raise TinylmError(f"{path}: malformed JSON ({exc})") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if SEPARATOR in text:
        return text.split(SEPARATOR)
    return re.split(r"\n[ \t]*\n", text)  # no separators: each blank-line-separated block is a story


def clean_story(story: str) -> str:
    return story.replace("\r\n", "\n").replace("\r", "\n").strip()


def read_stories(files: list[Path], max_stories: int = 0) -> Corpus:
    """Read, clean (line endings, strip), drop empty and exact-duplicate stories; stop after max_stories."""
    corpus = Corpus(stories=[], files=[str(f) for f in files])
    seen: set[str] = set()
    for path in files:
        text, replaced = _read_text(path)
        corpus.replaced_bytes += replaced
        for story in split_raw_stories(text, path):
            story = clean_story(story)
            if not story:
                continue
            if story in seen:
                corpus.duplicates += 1
                continue
            seen.add(story)
            corpus.stories.append(story)
            if max_stories and len(corpus.stories) >= max_stories:
                break
        if max_stories and len(corpus.stories) >= max_stories:
            break
    if not corpus.stories:
        raise TinylmError(f"no stories found in {', '.join(corpus.files)}")
    return corpus


def load_corpus(config: DataConfig) -> Corpus:
    return read_stories(resolve_data_files(config), config.max_stories)


def train_tokenizer(recipe: Recipe, corpus: Corpus | None = None) -> tuple[Tokenizer, Corpus | None]:
    """The recipe's tokenizer: bpe/chars learn from the TRAIN split only, so validation figures stay honest."""
    if recipe.tokenizer.kind in ("bytes", "gpt2"):
        return build_tokenizer(recipe.tokenizer), corpus
    corpus = corpus if corpus is not None else load_corpus(recipe.data)
    train, _ = split_stories(corpus.stories, recipe.data.val_fraction, recipe.data.split_seed)
    return build_tokenizer(recipe.tokenizer, train), corpus


# ---------------------------------------------------------------- the split

def is_validation(story: str, val_fraction: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{story}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2.0**64


def split_stories(stories: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    train, val = [], []
    for story in stories:
        (val if is_validation(story, val_fraction, seed) else train).append(story)
    return train, val
