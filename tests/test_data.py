"""Data: every reader format, clean-up, the hash split, the hub cache path, shards, batches and the CLI."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from tinylm.cli import main
from tinylm.data.corpus import Corpus, load_corpus, resolve_data_files, split_stories
from tinylm.data.shards import BatchSampler, TokenShard, eval_batches, frame_prefix, prepare_data
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.errors import TinylmError
from tinylm.models import IGNORE_INDEX
from tinylm.recipe import DataConfig, TokenizerConfig, recipe_from_dict
from tinylm.storage.atomic import verify_manifest

SHARED = Path("../shared/data/tinystories")
A, B, C = "Once upon a time there was a cat.\nThe cat sat.", "Tom had a red ball.", "Sue smiled. The end."


def stories_of(path, **kw) -> list[str]:
    return list(Corpus(resolve_data_files(DataConfig(paths=[str(path)])), **kw))


# ---------------------------------------------------------------- readers

@pytest.mark.parametrize("name,payload", [
    ("raw.txt", f"{A}\r\n<|endoftext|>\r\n{B}\n<|endoftext|>\n\n{C}\n<|endoftext|>\n"),
    ("blank.txt", f"{A}\n\n{B}\n  \n\n{C}\n"),
    ("list.json", json.dumps([A, B, C])),
    ("records.json", json.dumps([{"story": A}, {"story": B}, {"story": C}])),
    ("texts.json", json.dumps({"texts": [A, B, C]})),
    ("stories.json", json.dumps({"stories": [A, B, C]})),
    ("lines.jsonl", "\n".join(json.dumps({"text": s, "id": i}) for i, s in enumerate([A, B, C])) + "\n"),
    ("nosuffix", "\n".join(json.dumps({"story": s}) for s in [A, B, C])),
])
@pytest.mark.parametrize("gzipped", [False, True])
def test_every_reader_format(tmp_path, name, payload, gzipped):
    path = tmp_path / (name + (".gz" if gzipped else ""))
    data = payload.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gzipped else data)
    assert stories_of(path) == [A, B, C]


def test_directory_glob_dedup_and_cap(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text(f"{A}\n<|endoftext|>\n{B}\n<|endoftext|>\n \n<|endoftext|>\n")
    (tmp_path / "d" / "sub" / "b.jsonl").write_text(json.dumps({"text": f"  {B}  "}) + "\n" + json.dumps({"text": C}))
    (tmp_path / "d" / "README.md").write_text("not stories")
    (tmp_path / "d" / ".hidden.txt").write_text("hidden")
    corpus = Corpus(resolve_data_files(DataConfig(paths=[str(tmp_path / "d")])))
    assert list(corpus) == [A, B, C] and corpus.duplicates == 1
    assert stories_of(tmp_path / "d" / "**" / "*.jsonl") == [B, C]
    assert list(Corpus(resolve_data_files(DataConfig(paths=[str(tmp_path / "d")])), max_stories=2)) == [A, B]


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait\n<|endoftext|>\nna\xefve \xff\n")
    corpus = Corpus([tmp_path / "latin.txt"])
    assert list(corpus) == ["caf\ufffd au lait", "na\ufffdve \ufffd"] and corpus.replaced_bytes == 3


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "not found"),
    (lambda p: p.write_bytes(b""), "no stories"),
    (lambda p: p.write_bytes(b"\n \n<|endoftext|>\n"), "no stories"),
    (lambda p: p.write_bytes(b"PK\x03\x04\x00\x00binary"), "not a text file"),
    (lambda p: p.write_bytes(bytes(range(128, 256)) * 4), "not UTF-8"),
    (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00broken gzip"), "cannot read"),
])
def test_bad_inputs_raise_one_line(tmp_path, make, message):
    path = tmp_path / "input.txt"
    make(path)
    with pytest.raises(TinylmError, match=message) as info:
        list(load_corpus(DataConfig(paths=[str(path)])))
    assert "\n" not in str(info.value)


def test_malformed_json_and_bad_records(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2")
    with pytest.raises(TinylmError, match="malformed JSON"):
        stories_of(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text(json.dumps({"title": "no text"}))
    with pytest.raises(TinylmError, match="'text' or 'story'"):
        stories_of(tmp_path / "b.jsonl")
    with pytest.raises(TinylmError, match="not found"):
        load_corpus(DataConfig(paths=[str(tmp_path / "*.nothing")]))
    with pytest.raises(TinylmError, match="empty entry"):
        load_corpus(DataConfig(paths=[""]))


def test_shared_sample_files_read():
    corpus = load_corpus(DataConfig(paths=[str(SHARED / "TinyStoriesV2-GPT4-train.head-1727stories.txt.gz")]))
    stories = list(corpus)
    assert len(stories) == 1727 == corpus.stories and stories[0].startswith("Once upon a time there was a little boy")
    assert corpus.replaced_bytes == 0 and all("<|endoftext|>" not in s for s in stories)


# ---------------------------------------------------------------- hub cache, offline

def test_hub_download_from_a_prefilled_cache_offline(offline_hub):
    text = f"{A}\n<|endoftext|>\n{B}\n<|endoftext|>\n".encode()
    snapshot = offline_hub("dataset", "roneneldan/TinyStories", {"TinyStoriesV2-GPT4-valid.txt": text})
    config = DataConfig(paths=[], hub_dataset="roneneldan/TinyStories", hub_files=["TinyStoriesV2-GPT4-valid.txt"])
    files = resolve_data_files(config)
    assert files[0].resolve() == (snapshot / "TinyStoriesV2-GPT4-valid.txt").resolve()
    assert list(load_corpus(config)) == [A, B]
    config.hub_files = ["TinyStoriesV2-GPT4-train.txt"]  # not in the cache: offline, so a clear error
    with pytest.raises(TinylmError, match="offline"):
        resolve_data_files(config)
    config.hub_files = []
    with pytest.raises(TinylmError, match="hub_files is empty"):
        resolve_data_files(config)


# ---------------------------------------------------------------- split

def test_split_is_deterministic_disjoint_and_order_free():
    stories = [f"Story number {i}: a cat met a dog {i * 7919 % 1000}." for i in range(4000)]
    train, val = split_stories(stories, 0.05, 1337)
    shuffled = stories[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_stories(shuffled, 0.05, 1337)
    assert set(val) == set(val2) and set(train) == set(train2)
    assert not set(train) & set(val) and len(train) + len(val) == len(stories)
    assert 0.035 < len(val) / len(stories) < 0.065
    assert set(split_stories(stories, 0.05, 7)[1]) != set(val)
    subset_val = set(split_stories(stories[:1000], 0.05, 1337)[1])
    assert subset_val == set(val) & set(stories[:1000])  # a story's side does not depend on the others


# ---------------------------------------------------------------- shards

def recipe_for(paths, kind="bytes", framing="none", vocab=256, specials=(), sink="", val_fraction=0.2, **data):
    tok = {"kind": kind, "vocab_size": vocab, "special_tokens": list(specials), "bos": "<s>" if "<s>" in specials
           else "", "eos": "</s>" if "</s>" in specials else "", "sink": sink}
    return recipe_from_dict({"model": {"vocab_size": 4096}, "tokenizer": tok,
                             "data": {"paths": [str(p) for p in paths], "framing": framing,
                                      "val_fraction": val_fraction, **data}})


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    stories = list(Corpus([SHARED / "TinyStories-train-sample-2995stories.txt.gz"], max_stories=300))
    path = tmp_path_factory.mktemp("corpus") / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n")
    return path


def test_bytes_shards_hold_exactly_the_joined_text(tmp_path, corpus_file):
    recipe = recipe_for([corpus_file])
    tokenizer = build_tokenizer(recipe.tokenizer)
    meta = prepare_data(recipe, tokenizer, tmp_path / "data", progress=False)
    train, val = split_stories(stories_of(corpus_file), 0.2, recipe.data.split_seed)
    for name, part in (("train", train), ("val", val)):
        shard = TokenShard(tmp_path / "data" / f"{name}.bin", tokenizer)
        expected = "\n\n".join(part).encode("utf-8")
        assert shard.tokens.dtype == np.uint16 and bytes(shard.tokens.astype(np.uint8)) == expected
        assert (shard.n_tokens, shard.n_bytes, shard.n_stories) == (len(expected), len(expected), len(part))
        assert meta[name]["n_stories"] == len(part)
    assert verify_manifest(tmp_path / "data")["files"].keys() == {"train.bin", "val.bin", "meta.json"}
    assert not [p for p in tmp_path.iterdir() if p.name != "data"]  # no temporary leftovers


def test_bos_framing_and_shard_reuse_and_invalidation(tmp_path, corpus_file):
    recipe = recipe_for([corpus_file], kind="bpe", framing="bos", vocab=320, specials=["<s>", "</s>"])
    train, val = split_stories(stories_of(corpus_file), 0.2, recipe.data.split_seed)
    tokenizer = build_tokenizer(recipe.tokenizer, train)
    first = prepare_data(recipe, tokenizer, tmp_path / "data", progress=False)
    tokens = TokenShard(tmp_path / "data" / "val.bin").tokens
    starts = np.flatnonzero(tokens == tokenizer.bos_id)
    assert len(starts) == len(val) and starts[0] == 0
    pieces = np.split(tokens, starts[1:])
    assert [tokenizer.decode(p.tolist()) for p in pieces] == val
    assert first["val"]["n_bytes"] == sum(len(s.encode()) for s in val) and not first["reused"]

    stamp = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    again = prepare_data(recipe, tokenizer, tmp_path / "data", progress=False)
    assert again["reused"] and (tmp_path / "data" / "train.bin").stat().st_mtime_ns == stamp

    other = build_tokenizer(recipe.tokenizer, train[:50])
    with pytest.raises(TinylmError, match="tokenizer does not match the shards"):
        TokenShard(tmp_path / "data" / "train.bin", other)
    assert not prepare_data(recipe, other, tmp_path / "data", progress=False)["reused"]
    TokenShard(tmp_path / "data" / "train.bin", other)  # rebuilt for the new tokenizer

    with open(corpus_file, "a") as handle:  # a changed corpus re-creates the shards
        handle.write("<|endoftext|>\nA brand new story about a frog.\n")
    assert not prepare_data(recipe, other, tmp_path / "data", progress=False)["reused"]


def test_frame_prefix():
    tok = build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=260,
                                          special_tokens=["<s>", "</s>", "<pad>", "<sink>"], sink="<sink>"))
    assert frame_prefix(tok, "bos") == [256] and frame_prefix(tok, "eos") == [257]
    assert frame_prefix(tok, "sink_bos") == [259, 256] and frame_prefix(tok, "none") == []
    with pytest.raises(TinylmError):
        frame_prefix(build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=256, special_tokens=[])), "bos")


# ---------------------------------------------------------------- batches

@pytest.fixture(scope="module")
def sink_run(tmp_path_factory, corpus_file):
    """aurelius-10m's tokenizer settings (sink_bos framing) on the small corpus."""
    out = tmp_path_factory.mktemp("sinkrun")
    assert main(["data", "prepare", "aurelius-10m", "--quiet", "--out", str(out), "--set",
                 f'data.paths=["{corpus_file}"]', "--set", "data.val_fraction=0.2",
                 "--set", "tokenizer.vocab_size=400"]) == 0
    return out


def window_start(tokens: np.ndarray, row: np.ndarray) -> int:
    candidates = np.flatnonzero(tokens[:len(tokens) - len(row) + 1] == row[0])
    hits = [s for s in candidates if np.array_equal(tokens[s:s + len(row)], row)]
    assert hits, "the block is not a contiguous piece of the stream"
    return hits[0]


def test_sampler_blocks_determinism_and_exact_resume(sink_run):
    from tinylm.data.tokenizer import load_tokenizer

    run = sink_run
    shard = TokenShard(run / "data" / "train.bin", load_tokenizer(run))
    sampler = BatchSampler(shard, 4, 32, seed=5, prefix=[])
    x, y = next(sampler)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == __import__("torch").long
    assert (y[:, :-1] == x[:, 1:]).all()
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        s = window_start(shard.tokens, row_x)
        assert np.array_equal(shard.tokens[s + 1:s + 33], row_y)
    again = BatchSampler(shard, 4, 32, seed=5, prefix=[])
    assert all((a == b).all() for a, b in zip(next(again), (x, y), strict=True))
    assert not (next(BatchSampler(shard, 4, 32, seed=6, prefix=[]))[0] == x).all()

    for _ in range(3):
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler) for _ in range(2)]
    resumed = BatchSampler(shard, 4, 32, seed=0, prefix=[])
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(2)]
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(expected, again, strict=True))
    with pytest.raises(TinylmError):
        BatchSampler(shard, 8, 32, seed=0, prefix=[]).load_state_dict(state)


def test_sink_prefix_sits_at_positions_0_and_1(sink_run):
    from tinylm.data.tokenizer import load_tokenizer

    run = sink_run
    tokenizer = load_tokenizer(run)
    shard = TokenShard(run / "data" / "train.bin", tokenizer)
    assert shard.block_prefix == [3, 0] and (tokenizer.sink_id, tokenizer.bos_id) == (3, 0)
    x, y = next(BatchSampler(shard, 6, 24, seed=1))
    assert (x[:, 0] == 3).all() and (x[:, 1] == 0).all() and (y[:, :2] == IGNORE_INDEX).all()
    assert (y[:, 2:-1] == x[:, 3:]).all()
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        s = window_start(shard.tokens, row_x[2:])
        assert row_y[-1] == shard.tokens[s + 22]
    # stories in the stream end with </s> (the pair template's separator)
    assert int(shard.tokens[-1]) == tokenizer.eos_id


@pytest.mark.parametrize("prefix", [None, []])
def test_eval_batches_predict_every_token_once(sink_run, prefix):
    run = sink_run
    shard = TokenShard(run / "data" / "val.bin")
    predicted = []
    for x, y in eval_batches(shard, 3, 20, prefix=prefix):
        assert x.shape[1] == 20 and x.shape[0] <= 3
        keep = y != IGNORE_INDEX
        if prefix is None:
            assert (x[:, :2] == torch_tensor([3, 0])).all() and not keep[:, :2].any()
        predicted += y[keep].tolist()
    assert predicted == shard.tokens[1:].tolist()  # in order, each exactly once


def torch_tensor(values):
    import torch

    return torch.tensor(values)


# ---------------------------------------------------------------- command line

def write_recipe(path: Path, data_path: str, extra: str = "") -> Path:
    path.write_text(f"""
[model]
vocab_size = 512
[tokenizer]
kind = "bpe"
vocab_size = 300
[data]
paths = ["{data_path}"]
val_fraction = 0.2
framing = "bos"
{extra}
""")
    return path


def test_cli_tokenizer_and_data(tmp_path, corpus_file, capsys):
    recipe = write_recipe(tmp_path / "r.toml", str(corpus_file))
    run = tmp_path / "run"
    assert main(["tokenizer", "train", str(recipe), "--out", str(run)]) == 0
    assert (run / "tokenizer.json").is_file() and (run / "recipe.toml").is_file()
    assert main(["tokenizer", "stats", str(run)]) == 0
    assert "bytes per token" in capsys.readouterr().out
    assert main(["data", "prepare", str(recipe), "--quiet", "--out", str(run)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["data", "prepare", str(recipe), "--quiet", "--out", str(run)]) == 0
    assert "reused" in capsys.readouterr().out
    # a different tokenizer over an existing one needs --force
    assert main(["tokenizer", "train", str(recipe), "--set", "tokenizer.vocab_size=290", "--out", str(run)]) == 2
    assert "different tokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["missing", "binary", "kind"])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, corpus_file, capsys, bad):
    data = corpus_file
    if bad == "missing":
        data = tmp_path / "nope" / "*.txt"
    elif bad == "binary":
        data = tmp_path / "blob.txt"
        data.write_bytes(b"\x00\x01\x02" * 100)
    recipe = write_recipe(tmp_path / "r.toml", str(data))
    run = tmp_path / "run"
    if bad == "kind":
        run.mkdir()
        build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=258)).save(run / "tokenizer.json")
    assert main(["data", "prepare", str(recipe), "--quiet", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tinylm: error:") and err.count("\n") == 1
    assert not run.exists() or sorted(p.name for p in run.iterdir()) == ["tokenizer.json"]
