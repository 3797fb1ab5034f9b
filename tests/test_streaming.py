"""The corpus as a stream: shards equal to a simple in-memory reference, reading in small chunks equal to reading
whole, Parquet, bounded memory, bounded deduplication, the tokenizer's seeded sample, and bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.cli import main
from tinylm.data import readers
from tinylm.data.corpus import Corpus, DigestSet, is_validation, load_corpus, seeded_sample, train_tokenizer
from tinylm.data.readers import StoryFile
from tinylm.data.shards import TokenShard, prepare_data
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.errors import TinylmError
from tinylm.recipe import DataConfig, load_recipe

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
SEP = "<|endoftext|>"


# ---------------------------------------------------------------- the shards against an in-memory reference

def reference_stories(files: list[Path], max_stories: int) -> tuple[list[str], int]:
    """Everything in memory at once, the simple way: each file's whole text, its stories, a set of those seen."""
    stories, seen, duplicates = [], set(), 0
    for path in files:
        text = gzip.decompress(path.read_bytes()).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        for piece in text.split(SEP) if SEP in text else re.split(r"\n[ \t]*\n", text):
            story = piece.strip()
            if story in seen:
                duplicates += 1
            elif story:
                seen.add(story)
                stories.append(story)
    return (stories[:max_stories] if max_stories else stories), duplicates


def reference_shard(stories: list[str], tokenizer, framing: str) -> list[int]:
    ids: list[int] = []
    for i, story in enumerate(stories):
        encoded = tokenizer.encode(story)
        if framing == "bos":
            ids += [tokenizer.bos_id, *encoded]
        elif framing in ("eos", "sink_bos"):
            ids += [*encoded, tokenizer.eos_id]
        else:
            ids += (tokenizer.encode("\n\n") if i else []) + encoded
    return ids


@pytest.mark.parametrize("name,overrides", [
    ("micromixer-100k", []),  # bytes, stories joined by a blank line
    ("micromixer-100k", ["data.max_stories=2000"]),
    ("tinystories-demo", []),  # a BPE trained from the stream, <s> before each story
])
def test_shards_equal_an_in_memory_reference_on_the_shared_sample(tmp_path, name, overrides):
    recipe = load_recipe(name, [f'data.paths=["{SHARED}/*.txt.gz"]', *overrides])
    files = sorted(SHARED.glob("*.txt.gz"))
    stories, duplicates = reference_stories(files, recipe.data.max_stories)
    data = recipe.data
    val = [s for s in stories if int.from_bytes(hashlib.blake2b(f"{data.split_seed}\0{s}".encode(), digest_size=8)
                                                .digest(), "big") < data.val_fraction * 2.0**64]
    train = [s for s in stories if s not in set(val)]

    tokenizer, learnt = train_tokenizer(recipe)
    if recipe.tokenizer.kind == "bpe":  # the stream teaches it exactly what the whole train split would
        assert learnt == len(train)
        assert tokenizer.fingerprint() == build_tokenizer(recipe.tokenizer, train).fingerprint()
    meta = prepare_data(recipe, tokenizer, tmp_path / "data", progress=False)
    for split, part in (("train", train), ("val", val)):
        shard = TokenShard(tmp_path / "data" / f"{split}.bin", tokenizer)
        assert shard.tokens.tolist() == reference_shard(part, tokenizer, data.framing)
        n_bytes = sum(len(s.encode()) for s in part) + (2 * (len(part) - 1) if data.framing == "none" else 0)
        assert (shard.n_stories, shard.n_bytes) == (len(part), n_bytes)
    if not data.max_stories:
        assert meta["duplicates"] == duplicates > 0


# ---------------------------------------------------------------- chunk boundaries

PIECES = ["Once", " upon", "\n", "\r\n", "\r", "\n\n", "\n \t\n", " ", "é", "日本", "🐱", SEP, "\n<|endoftext|>\n",
          "<|endo", "ftext|>"]


def whole_file_stories(text: str) -> list[str]:
    text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    pieces = text.split(SEP) if SEP in text else re.split(r"\n[ \t]*\n", text)
    return [p.strip() for p in pieces if p.strip()]


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=40), chunk=st.integers(1, 9), data=st.data())
def test_small_chunks_cut_stories_as_the_whole_text_does(tmp_path_factory, parts, chunk, data):
    text = "".join(parts)
    raw = text.encode()
    bad = data.draw(st.lists(st.integers(0, len(raw)), max_size=2))  # undecodable bytes anywhere, even mid-character
    for at in sorted(bad, reverse=True):
        raw = raw[:at] + b"\xff" + raw[at:]
    path = tmp_path_factory.mktemp("chunks") / "stories.txt"
    path.write_bytes(raw)
    source = StoryFile(path)
    expected, replaced = re.subn("[\udc80-\udcff]", "\ufffd", raw.decode("utf-8", "surrogateescape"))
    if replaced > 0.2 * len(raw):  # mostly undecodable: not text
        with pytest.raises(TinylmError, match="not UTF-8"):
            list(source.stories())
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readers, "CHUNK_BYTES", chunk)
        got = [s.strip() for s in source.stories() if s.strip()]
    assert got == whole_file_stories(expected)
    assert source.replaced_bytes == replaced


def test_jsonl_lines_and_records_across_small_chunks(tmp_path, monkeypatch):
    stories = ["Tom ran.\nHe fell.", "Sue é 日本 🐱", "The end."]
    path = tmp_path / "s.jsonl"
    path.write_bytes("\r\n".join(json.dumps({"text": s}, ensure_ascii=False) for s in stories).encode() + b"\r\n\r\n")
    monkeypatch.setattr(readers, "CHUNK_BYTES", 3)
    assert list(StoryFile(path).stories()) == stories


# ---------------------------------------------------------------- parquet, hub

def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def test_parquet_in_record_batches_from_files_and_the_hub(tmp_path, offline_hub):
    stories = [f"Story {i}: a cat met a dog." for i in range(7)]
    path = write_parquet(tmp_path / "train.parquet", {"text": stories + [None, stories[0]], "id": list(range(9))})
    corpus = Corpus([path])
    assert list(corpus) == stories and corpus.duplicates == 1
    seen: list[int] = []
    list(Corpus([path]).read(seen.append))
    assert sum(seen) == path.stat().st_size  # progress reaches the file's size

    snapshot = offline_hub("dataset", "roneneldan/TinyStories",
                           {"data/validation-00000-of-00001.parquet": path.read_bytes()})
    config = DataConfig(paths=[], hub_dataset="roneneldan/TinyStories",
                        hub_files=["data/validation-00000-of-00001.parquet"])
    assert list(load_corpus(config)) == stories and snapshot.is_dir()
    (tmp_path / "dir").mkdir()
    write_parquet(tmp_path / "dir" / "a.parquet", {"story": ["Only one."]})
    assert list(load_corpus(DataConfig(paths=[str(tmp_path / "dir")]))) == ["Only one."]


# ---------------------------------------------------------------- bounded memory

def _peak_while_reading(path: Path) -> int:
    corpus = Corpus([path])
    tracemalloc.start()
    n = sum(1 for _ in corpus)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == corpus.stories > 0
    return peak


def test_reading_holds_a_chunk_not_the_file(tmp_path):
    rng = random.Random(0)
    words = "once upon a time there was a little cat who liked to play in the big green park".split()
    sizes, peaks = [], []
    for n in (8_000, 16_000):
        path = tmp_path / f"{n}.txt"
        with open(path, "w") as out:
            for i in range(n):
                out.write(f"Story {i}. " + " ".join(rng.choice(words) for _ in range(150)) + "\n<|endoftext|>\n")
        sizes.append(path.stat().st_size)
        peaks.append(_peak_while_reading(path))
    assert sizes[1] > 10e6
    # a few chunks at a time and a 16-byte digest (plus set overhead) per story: twice the text adds little
    assert peaks[1] - peaks[0] < 0.1 * (sizes[1] - sizes[0]), (sizes, peaks)


def test_digest_set_merges_and_still_finds_old_duplicates(monkeypatch):
    monkeypatch.setattr(DigestSet, "RECENT", 5)
    rng = random.Random(1)
    items = [rng.randbytes(16) for _ in range(60)]
    stream = items + [rng.choice(items) for _ in range(100)] + [rng.randbytes(16) for _ in range(20)]
    digests, reference = DigestSet(), set()
    for item in stream:
        assert digests.add_many([item]) == [item not in reference]
        reference.add(item)
    assert digests.sorted.size + len(digests.recent) == len(reference)


def test_digest_set_in_blocks_finds_duplicates_within_a_block_and_across_merges(monkeypatch):
    monkeypatch.setattr(DigestSet, "RECENT", 7)
    rng = random.Random(2)
    items = [rng.randbytes(15) + b"\0" for _ in range(20)] + [rng.randbytes(16) for _ in range(40)]  # NUL-ended too
    stream = items + [rng.choice(items) for _ in range(200)]
    rng.shuffle(stream)
    digests, reference, at = DigestSet(), set(), 0
    while at < len(stream):
        block = stream[at:at + rng.randint(1, 30)]
        expected = []
        for item in block:
            expected.append(item not in reference)
            reference.add(item)
        assert digests.add_many(block) == expected
        at += len(block)
    assert digests.sorted.size + len(digests.recent) == len(reference) == len(items)
    assert list(digests.sorted) == sorted(digests.sorted)


# ---------------------------------------------------------------- the tokenizer's sample

def test_seeded_sample_is_order_free_and_capped(tmp_path):
    stories = [f"Story {i} about a frog." for i in range(500)]
    shuffled = stories[:]
    random.Random(3).shuffle(shuffled)
    sample = seeded_sample(iter(stories), 40, seed=7)
    assert len(sample) == 40 == len(set(sample)) and set(sample) <= set(stories)
    assert seeded_sample(iter(shuffled), 40, seed=7) == sample
    assert seeded_sample(iter(stories), 40, seed=8) != sample
    assert seeded_sample(iter(stories[:10]), 40, seed=7) == seeded_sample(iter(stories[:10]), 10, seed=7)


def test_tokenizer_train_stories_caps_what_the_tokenizer_learns_from(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("\n<|endoftext|>\n".join(f"Story {i}: Tom saw a {i % 7} cat." for i in range(400)))
    recipe = load_recipe("tinystories-demo", [f'data.paths=["{path}"]', "tokenizer.vocab_size=300",
                                              "tokenizer.train_stories=50"])
    _, learnt = train_tokenizer(recipe)
    assert learnt == 50
    recipe = load_recipe("tinystories-demo", [f'data.paths=["{path}"]', "tokenizer.vocab_size=300"])
    data = recipe.data
    train = [s for s in load_corpus(data) if not is_validation(s, data.val_fraction, data.split_seed)]
    assert train_tokenizer(recipe)[1] == len(train) > 300


# ---------------------------------------------------------------- bad input through the command line

def _prepare(tmp_path, capsys, path: Path) -> tuple[int, str]:
    code = main(["data", "prepare", "micromixer-100k", "--out", str(tmp_path / "run"), "--quiet",
                 "--set", f'data.paths=["{path}"]', "--set", "data.val_fraction=0.3"])
    return code, capsys.readouterr().err


def _stories_text(n: int) -> str:
    return "".join(f"Story {i}: Tom saw a big red ball in the park.\n<|endoftext|>\n" for i in range(n))


@pytest.mark.parametrize("case,message", [
    ("truncated gzip", "cannot read"),
    ("jsonl ending mid-record", r":40: malformed JSON line"),
    ("parquet without a text column", "no 'text' or 'story' column"),
    ("utf-16", "not a text file"),
    ("json over the size limit", "JSONL"),
    ("one endless story", "a story of more than"),
])
def test_bad_corpora_end_in_one_line_and_leave_the_run_as_it_was(tmp_path, capsys, monkeypatch, case, message):
    good = tmp_path / "good.txt"
    good.write_text(_stories_text(60))
    assert _prepare(tmp_path, capsys, good)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run" / "data").iterdir()}
    bad = tmp_path / "bad"
    if case == "truncated gzip":
        data = gzip.compress(_stories_text(3000).encode())
        (bad := bad.with_suffix(".txt.gz")).write_bytes(data[:len(data) // 2])
    elif case == "jsonl ending mid-record":
        lines = [json.dumps({"text": f"Story {i}."}) for i in range(40)]
        (bad := bad.with_suffix(".jsonl")).write_text("\n".join(lines)[:-5])
    elif case == "parquet without a text column":
        bad = write_parquet(bad.with_suffix(".parquet"), {"content": ["a story"], "id": [1]})
    elif case == "utf-16":
        (bad := bad.with_suffix(".txt")).write_bytes(_stories_text(50).encode("utf-16"))
    elif case == "json over the size limit":
        monkeypatch.setattr(readers, "WHOLE_JSON_LIMIT", 1000)
        (bad := bad.with_suffix(".json")).write_text(json.dumps([f"Story {i}." for i in range(500)]))
    else:
        monkeypatch.setattr(readers, "LONGEST_STORY", 5000)
        (bad := bad.with_suffix(".txt")).write_text("Tom ran. " * 2000)
    code, err = _prepare(tmp_path, capsys, bad)
    assert code == 2 and err.startswith("tinylm: error: ") and err.count("\n") == 1 and message in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run" / "data").iterdir()} == before


def test_mixed_encodings_and_a_long_story_are_kept(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "utf8.txt").write_text(_stories_text(40) + "Zoë went to the café.\n<|endoftext|>\n")
    (tmp_path / "c" / "latin1.txt").write_bytes("Zoë ate a crêpe.\n<|endoftext|>\n".encode("latin-1"))
    long_story = "Once upon a time " + "the cat ran and ran. " * 5000  # far longer than any context
    (tmp_path / "c" / "long.txt").write_text(long_story + "\n<|endoftext|>\n")
    assert _prepare(tmp_path, capsys, tmp_path / "c")[0] == 0
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["replaced_bytes"] == 2  # ë and ê in Latin-1, each one undecodable byte
    tokens = np.concatenate([TokenShard(tmp_path / "run" / "data" / f"{s}.bin").tokens for s in ("train", "val")])
    assert long_story.strip().encode() in bytes(tokens.astype(np.uint8))
    assert meta["train"]["n_stories"] + meta["val"]["n_stories"] == 43


def test_a_file_ending_mid_story_keeps_its_last_story(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_text(_stories_text(5) + "Story 5: Tom saw a big")
    assert list(Corpus([path]))[-1] == "Story 5: Tom saw a big"
    with pytest.raises(TinylmError, match="malformed JSON"):
        list(Corpus([_write(tmp_path / "cut.json", json.dumps(["a", "b"])[:-3])]))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
