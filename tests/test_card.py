"""The main job end to end (`tinylm demo` on a tiny budget), the model card written from the run, and run comparison."""

import json
import re
from pathlib import Path

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
    assert info.total_params == 1_311_872  # the untied head's 262,144 included
    assert "1,311,872 total, 1,049,728 without embeddings" in card
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
    assert re.search(r"\| run \| tinystories-demo \| 2,048 \| 1,311,872 \| 8,192 \|", table)


def test_demo_refuses_to_overwrite_a_run(demo_run, capsys):
    before = sorted(p.name for p in demo_run.iterdir())
    assert main(["demo", "--out", str(demo_run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in demo_run.iterdir()) == before


def test_card_and_compare_refuse_a_non_run(tmp_path, capsys):
    assert main(["card", str(tmp_path), "--no-samples"]) == 2
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_card_metadata_is_what_the_hub_reads(demo_run):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from tinylm.runs.card import card_metadata

    card = ModelCard((demo_run / "README.md").read_text())
    data, evaluation = card.data, json.loads((demo_run / "eval.json").read_text())
    assert (data.license, data.datasets, data.library_name) == ("mit", ["roneneldan/TinyStories"], "transformers")
    assert [w["text"] for w in data.widget] == read_run(demo_run).recipe.sample.prompts
    assert data.base_model is None  # trained from scratch
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "run"
    assert {r.metric_type: r.metric_value for r in results} == {
        "loss": evaluation["loss"], "perplexity": evaluation["perplexity"],
        "bits_per_byte": evaluation["bits_per_byte"]}
    splits = {(r.dataset_type, r.dataset_split) for r in results}
    assert splits == {("roneneldan/TinyStories", "tinylm-hash-validation")}
    assert "tinylm's validation split (0.05 of the stories of ../shared/data/tinystories/" in results[0].dataset_name
    # license, datasets and base model come from the run, not from the code
    info = read_run(demo_run)
    info.recipe.card.license, info.recipe.card.datasets = "apache-2.0", ["someone/stories"]
    info.run["init_from"] = {"source": "someone/base", "hub_id": "someone/base"}
    changed = card_metadata(info)
    assert (changed.license, changed.datasets, changed.base_model) == ("apache-2.0", ["someone/stories"],
                                                                       "someone/base")
    assert changed.eval_results[0].dataset_type == "someone/stories"


def usage_section(card: str) -> str:
    return card.split("## Usage", 1)[1]


def test_hf_export_is_a_complete_hub_repository(demo_run):
    from huggingface_hub import ModelCard

    from tinylm.storage.atomic import verify_manifest

    hf = demo_run / "hf"
    assert (hf / "README.md").read_text() == (demo_run / "README.md").read_text()
    assert (hf / "loss.png").read_bytes() == (demo_run / "loss.png").read_bytes()  # the card shows it
    assert (hf / "samples.md").read_text() == (demo_run / "samples.md").read_text()
    verify_manifest(hf)
    usage = usage_section((hf / "README.md").read_text())
    assert 'repo_id = "USER/MODEL"' in usage and str(demo_run) not in usage
    assert ModelCard((hf / "README.md").read_text()).data.eval_results


def test_export_before_the_card_has_a_valid_card(demo_run, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    from tinylm.runs.publish import export_run

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("hf", "README.md", "loss.png", "samples.md"))
    export_run(run, "hf")
    card = ModelCard((run / "hf" / "README.md").read_text())
    assert card.data.license == "mit" and len(card.data.eval_results) == 3
    assert "![loss curve]" not in card.text and not (run / "hf" / "loss.png").exists()  # no image it lacks


class RecordingHub:
    """HfApi's create_repo and upload_folder, at the network boundary: records what would be sent."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", {**kwargs, "files": files}))


def test_push_uploads_the_export_with_its_figures(demo_run):
    from tinylm.runs.publish import push_run

    hub = RecordingHub()
    url = push_run(demo_run, "someone/tiny-demo", private=True, api=hub)
    bpb = json.loads((demo_run / "eval.json").read_text())["bits_per_byte"]
    assert url == "https://huggingface.co/someone/tiny-demo"
    assert hub.calls == [
        ("create_repo", {"repo_id": "someone/tiny-demo", "repo_type": "model", "private": True, "exist_ok": True}),
        ("upload_folder", {"folder_path": str(demo_run / "hf"), "repo_id": "someone/tiny-demo", "repo_type": "model",
                           "commit_message": f"tinystories-demo: 8 steps, 8,192 tokens, val bits per byte {bpb:.4f} "
                                             "(tinylm)",
                           "files": sorted(p.name for p in (demo_run / "hf").iterdir())})]
    assert {"README.md", "loss.png", "model.safetensors", "generation_config.json"} <= set(hub.calls[1][1]["files"])


def test_push_without_network_fails_in_one_line(demo_run, tmp_path, monkeypatch, capsys):
    from huggingface_hub import HfApi

    from tinylm.errors import TinylmError
    from tinylm.runs.publish import push_run

    closed = HfApi(endpoint="http://127.0.0.1:9", token="hf_placeholder")  # a port nothing listens on
    with pytest.raises(TinylmError, match="cannot upload to the Hugging Face model someone/tiny-demo: ") as error:
        push_run(demo_run, "someone/tiny-demo", api=closed)
    assert "\n" not in str(error.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(demo_run), "someone/tiny-demo"]) == 2
    assert main(["push", str(demo_run), "not a repo id"]) == 2
    assert main(["push", str(tmp_path), "someone/tiny-demo"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("tinylm: error: ") for line in err)
    assert "HF_HUB_OFFLINE" in err[0] and "not a hub repository id" in err[1] and "not a run directory" in err[2]
