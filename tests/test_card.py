"""The main job end to end (`tinylm demo` on a tiny budget), the model card written from the run, and run comparison."""

import json
import re

import pytest
import torch

from helpers import set_args
from tinylm.cli import main
from tinylm.runs.compare import comparison_table
from tinylm.runs.info import read_run

TINY = set_args(["train.max_steps=8", "train.eval_interval=4", "train.eval_batches=2", "train.checkpoint_interval=4",
                 "train.batch_size=4", "train.log_interval=4", "sample.max_new_tokens=12", "data.max_stories=600"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(run), "--quiet", *TINY]) == 0
    return run


def test_demo_writes_every_result(demo_run):
    for name in ("recipe.toml", "tokenizer.json", "data/train.bin", "metrics.jsonl", "eval.json", "samples.md",
                 "loss.png", "README.md", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json",
                 "hf/README.md", "run.json"):
        assert (demo_run / name).is_file(), name
    assert (demo_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the export is the trained model, loadable by transformers with no custom code
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tinylm.runs.loading import load_run_model

    ours, _, _ = load_run_model(demo_run, "best")
    hf = AutoModelForCausalLM.from_pretrained(demo_run / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(demo_run / "hf")
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(ours(ids)[0], hf(ids).logits, atol=1e-5)


def test_card_holds_the_runs_own_figures(demo_run):
    card = (demo_run / "README.md").read_text()
    info = read_run(demo_run)
    evaluation = json.loads((demo_run / "eval.json").read_text())
    assert info.total_params == 1_049_728
    assert "1,049,728 total, 787,584 without embeddings" in card
    assert "| heads / KV heads | 4 / 2 (head_dim 32) |" in card
    assert f"| {evaluation['loss']:.4f} | {evaluation['perplexity']:.3f} | {evaluation['bits_per_byte']:.4f} |" in card
    assert f"| steps | {info.steps:,} |" in card and info.steps == 8
    assert f"| tokens per step | {4 * 256:,} |" in card
    assert "tinylm demo --out" in card and "train.max_steps=8" in card  # the exact command
    assert "[model]" in card and "vocab_size = 2048" in card  # the resolved recipe
    assert "![loss curve](loss.png)" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "min_p=0.1" in card
    assert "**Prompt:** `Once upon a time`" in card
    train_tokens = info.split("train")["n_tokens"]
    assert f"| epochs | {8 * 4 * 256 / train_tokens:.2f} |" in card


def test_card_is_regenerated_identically(demo_run, capsys):
    before = (demo_run / "README.md").read_text()
    assert main(["card", str(demo_run)]) == 0  # samples again with seed 0
    assert (demo_run / "README.md").read_text() == before


def test_compare_sorts_by_bits_per_byte(demo_run, tmp_path, capsys):
    other = tmp_path / "other"
    import shutil

    shutil.copytree(demo_run, other, ignore=shutil.ignore_patterns("hf", "checkpoints", "data"))
    evaluation = json.loads((other / "eval.json").read_text())
    evaluation["bits_per_byte"] = evaluation["bits_per_byte"] / 2  # a better run
    (other / "eval.json").write_text(json.dumps(evaluation))
    shutil.copytree(demo_run / "data", other / "data")
    plot = tmp_path / "cmp.png"
    assert main(["compare", str(demo_run), str(other), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| recipe |" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["other", "run"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = comparison_table([read_run(demo_run)])
    assert re.search(r"\| run \| tinystories-demo \| 2,048 \| 1,049,728 \| 8,192 \|", table)


def test_demo_refuses_to_overwrite_a_run(demo_run, capsys):
    before = sorted(p.name for p in demo_run.iterdir())
    assert main(["demo", "--out", str(demo_run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in demo_run.iterdir()) == before


def test_card_and_compare_refuse_a_non_run(tmp_path, capsys):
    assert main(["card", str(tmp_path), "--no-samples"]) == 2
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
