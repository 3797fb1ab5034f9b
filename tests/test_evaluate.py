"""Evaluation: loss, perplexity and bits per byte over the whole validation split, against figures computed by hand."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import tiny_overrides
from tinylm import cli
from tinylm.data.shards import TokenShard
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.recipe import TokenizerConfig, load_recipe
from tinylm.train.evaluation import evaluate
from tinylm.train.loop import train

TEXT = "hello world"


class FixedLogits(nn.Module):
    """Predicts the same distribution everywhere: logits 0, except 2.0 for the byte 'l'."""

    def __init__(self, vocab_size: int, context_length: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, context_length=context_length)
        self.logits = nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.logits[ord("l")] = 2.0

    def forward(self, ids, targets=None, cache=None):
        return self.logits.expand(*ids.shape, -1), None


@pytest.fixture
def byte_shard(tmp_path):
    tokenizer = build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=256, special_tokens=[], bos="", eos=""))
    tokens = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.uint16)
    (tmp_path / "val.bin").write_bytes(tokens.tobytes())
    meta = {"format": 1, "dtype": "uint16", "tokenizer_fingerprint": tokenizer.fingerprint(), "block_prefix": [],
            "frame_prefix": [], "val": {"n_tokens": len(tokens), "n_bytes": len(TEXT), "n_stories": 1}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tokenizer, TokenShard(tmp_path / "val.bin")


@pytest.mark.parametrize("context_length,batch_size", [(4, 2), (32, 16), (2, 1)])
def test_bits_per_byte_by_hand(byte_shard, context_length, batch_size):
    tokenizer, shard = byte_shard
    result = evaluate(FixedLogits(256, context_length), tokenizer, shard, context_length, batch_size, "cpu")
    # Every byte after the first is predicted once: "ello world", 10 targets, three of them 'l'.
    log_z = math.log(255 + math.exp(2.0))
    nats = 10 * log_z - 3 * 2.0
    assert result.tokens == 10 and result.bytes == 11
    assert result.loss == pytest.approx(nats / 10, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(nats / 10), rel=1e-6)
    assert result.bits_per_byte == pytest.approx(nats / (math.log(2) * 11), rel=1e-6)


def test_evaluate_refuses_shards_of_another_tokenizer(byte_shard, tmp_path):
    from tinylm.errors import TinylmError

    _, shard = byte_shard
    other = build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=258, special_tokens=["<s>", "</s>"]))
    with pytest.raises(TinylmError, match="does not match the shards"):
        evaluate(FixedLogits(258, 8), other, shard, 8, 2, "cpu")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TINYLM_PEAK_FLOPS", "1e11")
    run = tmp_path_factory.mktemp("eval") / "run"
    overrides = tiny_overrides(eval_batches=1) + ["model.n_layers=2"]
    train(load_recipe("llama2c-260k", overrides), run, progress=False)
    mp.undo()
    return run


def test_eval_cli_json_covers_the_whole_split(run, capsys):
    assert cli.main(["eval", str(run), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    result = json.loads(out[0])
    meta = json.loads((run / "data" / "meta.json").read_text())["val"]
    assert result["tokens"] == meta["n_tokens"] - 1 and result["bytes"] == meta["n_bytes"]
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    nats = result["loss"] * result["tokens"]
    assert result["bits_per_byte"] == pytest.approx(nats / (math.log(2) * result["bytes"]))
    assert 3.0 < result["loss"] < math.log(512) + 0.5  # barely trained: close to uniform over 512 ids
    recorded = json.loads((run / "eval.json").read_text())
    assert recorded["loss"] == pytest.approx(result["loss"]) and recorded["checkpoint"].endswith("best")


def test_eval_cli_text_and_latest(run, capsys):
    assert cli.main(["eval", str(run), "--checkpoint", "latest"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("val loss ") and "bits per byte" in out and "perplexity" in out


def test_eval_accepts_a_hugging_face_export(run, tmp_path, capsys):
    from tinylm.runs.publish import export_run

    export_run(run, "hf", tmp_path / "hf")
    assert cli.main(["eval", str(tmp_path / "hf"), "--data", str(run / "data"), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", str(run), "--json"]) == 0
    original = json.loads(capsys.readouterr().out)
    assert exported["tokens"] == original["tokens"]
    assert exported["loss"] == pytest.approx(original["loss"], rel=1e-5)


@pytest.mark.parametrize("args,message", [
    (["{tmp}"], "neither a run directory"),
    (["{run}", "--checkpoint", "step-00000099"], "no such complete checkpoint"),
    (["{run}", "--data", "{tmp}"], "token shard not found"),
])
def test_eval_cli_bad_input_exits_2(run, tmp_path, capsys, args, message):
    args = [a.format(tmp=tmp_path, run=run) for a in args]
    assert cli.main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
