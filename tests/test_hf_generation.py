"""Exports and imports as transformers' users run them: `generate` with the directory's own generation config stops
where `tinylm sample` stops, and a checkpoint transformers wrote is prompted and stopped as transformers does it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinylm.cli import main
from tinylm.data.shards import frame_prefix
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.export.hf import export_hf_model
from tinylm.infer.engine import generate
from tinylm.models import build_model
from tinylm.recipe import load_recipe
from tinylm.runs.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.n_layers=2", "model.dim=64", "model.hidden_dim=96", "model.n_heads=4", "model.n_kv_heads=2",
         "model.context_length=48", "model.vocab_size=300", "model.unembedding=\"untied\"",
         "tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=260",
         "tokenizer.special_tokens=[\"<s>\", \"</s>\", \"<pad>\", \"<sink>\"]", "tokenizer.sink=\"<sink>\""]
FRAMINGS = ["bos", "eos", "sink_bos", "none"]
PROMPT = "Once upon a time"


def framed_model(framing: str, max_new_tokens: int, seed: int = 0):
    recipe = load_recipe("aurelius-4m", SMALL + [f"data.framing=\"{framing}\"", "sample.temperature=0.5",
                                                 f"sample.max_new_tokens={max_new_tokens}"])
    tokenizer = build_tokenizer(recipe.tokenizer)
    torch.manual_seed(seed)
    model = build_model(recipe.model).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(6.0) if "norm" not in name else p.uniform_(0.5, 1.5)
    return model, recipe, tokenizer


def ends_story_after(model, token: int, end: int) -> None:
    """Swap two rows of the untied output matrix: where the model chose `token`, it now chooses `end`."""
    with torch.no_grad():
        rows = model.output.weight
        rows[[token, end]] = rows[[end, token]]


def ours_greedy(model, recipe, tokenizer) -> list[int]:
    """The ids `tinylm sample` chooses (generate_text's ids and end ids), greedy; end ids are not returned."""
    prompt = frame_prefix(tokenizer, recipe.data.framing) + tokenizer.encode(PROMPT)
    return generate(model, [prompt], recipe.sample.settings.with_changes(temperature=0),
                    eos_id=tokenizer.story_end_ids)[0]


def transformers_run(directory: Path, **changes):
    """`generate(**tokenizer(PROMPT))` with the directory's generation config, changed only by `changes`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    hf = AutoModelForCausalLM.from_pretrained(directory).eval()
    inputs = hf_tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, **changes)[0].tolist()
    return inputs["input_ids"].shape[1], out, hf.config.max_position_embeddings


@pytest.mark.parametrize("framing", FRAMINGS)
def test_export_stops_where_tinylm_sample_stops(tmp_path, framing):
    model, recipe, tokenizer = framed_model(framing, max_new_tokens=30)
    first = ours_greedy(model, recipe, tokenizer)
    assert len(first) >= 6  # the random weights write on, so the swap below is what ends the story
    end = tokenizer.bos_id if framing in ("bos", "sink_bos") else tokenizer.eos_id
    ends_story_after(model, first[5], end)
    story = ours_greedy(model, recipe, tokenizer)
    assert len(story) <= 5
    export_hf_model(model, recipe, tokenizer, tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted([tokenizer.bos_id, tokenizer.eos_id])
    start, out, _ = transformers_run(tmp_path / "hf", do_sample=False)
    assert out[start:] == story + [end]  # the same tokens, and it stops at the story's end


@pytest.mark.parametrize("framing", FRAMINGS)
def test_export_never_generates_past_the_context(tmp_path, framing):
    model, recipe, tokenizer = framed_model(framing, max_new_tokens=200)  # more than the 48-token context
    export_hf_model(model, recipe, tokenizer, tmp_path / "hf")
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["max_length"] == 48 and "max_new_tokens" not in generation
    ends = set(tokenizer.story_end_ids)
    for seed in range(3):  # sampled, as the generation config says
        torch.manual_seed(seed)
        start, out, context = transformers_run(tmp_path / "hf")
        assert len(out) <= context
        assert not ends & set(out[start:-1])  # no story end inside the text
    start, out, _ = transformers_run(tmp_path / "hf", do_sample=False)
    ours = ours_greedy(model, recipe, tokenizer)
    assert [t for t in out[start:] if t not in ends] == ours


def transformers_checkpoint(path: Path, adds_bos: bool):
    """A LLaMA checkpoint as transformers saves it: model, generation config (EOS only) and a fast tokenizer that
    does or does not add BOS; tinylm wrote none of it."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    recipe = load_recipe("aurelius-4m", ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=258"])
    definition = json.loads(build_tokenizer(recipe.tokenizer).to_json())
    del definition["model"]["tinylm"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(json.dumps(definition)),
                                        bos_token="<s>", eos_token="</s>", add_bos_token=adds_bos)
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=258, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def rename_token(model, token: int, other: int, path: Path) -> None:
    """Swap two output rows (where the model chose `token` it now chooses `other`) and save again."""
    with torch.no_grad():
        rows = model.lm_head.weight
        rows[[token, other]] = rows[[other, token]]
    model.save_pretrained(path)


def sample_greedy(path: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["sample", str(path), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "30"]) == 0
    return capsys.readouterr().out.rstrip("\n")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_import_prompts_and_stops_as_transformers(tmp_path, capsys, adds_bos):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = transformers_checkpoint(tmp_path, adds_bos)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    inputs = hf_tokenizer(PROMPT, return_tensors="pt")
    assert (inputs["input_ids"][0, 0].item() == 256) == adds_bos
    assert load_model(tmp_path).recipe.data.framing == ("bos" if adds_bos else "none")

    def theirs() -> tuple[str, list[int]]:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        with torch.no_grad():
            out = hf.generate(**inputs, do_sample=False, max_new_tokens=30)[0, inputs["input_ids"].shape[1]:]
        return PROMPT + hf_tokenizer.decode(out, skip_special_tokens=True), out.tolist()

    text, ids = theirs()
    assert sample_greedy(tmp_path, capsys) == text
    rename_token(model, ids[3], 256, tmp_path)  # BOS mid-story: the generation config does not stop there
    text, ids = theirs()
    assert 256 in ids[:-1] and sample_greedy(tmp_path, capsys) == text
    rename_token(model, ids[8], 257, tmp_path)  # EOS: it does
    text, ids = theirs()
    assert ids[-1] == 257 and len(ids) < 30 and sample_greedy(tmp_path, capsys) == text
