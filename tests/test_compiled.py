"""The compiled decode step (models/compiled.py, decode_step.cpp): the eager step's greedy tokens in float32 for every
LLaMA recipe, int8 within 1% of float32's loss, the portable build's sums equal to the VNNI build's, a cached build,
and one line with eager decoding where no compiler is found; through generate, the CLI, eval and the server."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tinylm import cli
from tinylm.infer.engine import generate
from tinylm.models import build_model, compiled
from tinylm.models.decode import fast_llama
from tinylm.recipe import Sampling, load_recipe, recipe_names

LLAMA_RECIPES = [name for name in recipe_names() if load_recipe(name).model.arch == "llama"]


def _compiler_found() -> bool:
    try:
        return bool(compiled.compiler())
    except compiled.CompileUnavailable:
        return False


needs_compiler = pytest.mark.skipif(not _compiler_found(), reason="no C++ compiler here (.ci/run installs g++)")


@pytest.fixture(autouse=True)
def build_cache(tmp_path_factory, monkeypatch):
    """One cache directory for the module's builds, so each variant is compiled once."""
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path_factory.getbasetemp() / "compiled-cache"))


def scaled(model: torch.nn.Module, factor: float = 3.0) -> torch.nn.Module:
    """Random weights scaled up: peaked next-token distributions, as a trained model's (and rare greedy ties)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(factor)
    return model.eval()


def small_model(name: str, *sets: str, factor: float = 3.0) -> torch.nn.Module:
    torch.manual_seed(0)
    return scaled(build_model(load_recipe(name, ["model.n_layers=2", *sets]).model), factor)


PROMPTS = [[0, 5, 9, 11], [0, 7], [0, 3, 3, 8, 2, 6, 1]]  # rows at different positions in one batch


def test_recipes_listed():
    assert {"aurelius-4m", "aurelius-10m", "godelev-190m", "llama2c-15m", "simpler-llama-834k"} <= set(LLAMA_RECIPES)


@needs_compiler
@pytest.mark.parametrize("name", LLAMA_RECIPES)
def test_float32_gives_the_eager_greedy_tokens_for_every_llama_recipe(name):
    model = small_model(name)
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    eager = generate(model, PROMPTS, greedy)
    assert generate(model, PROMPTS, greedy, compiled="float32") == eager
    assert generate(model, PROMPTS[:1], greedy, compiled="float32") == eager[:1]  # alone as in a batch


@needs_compiler
@pytest.mark.parametrize("sets", [("model.w1_bias=true",), ("model.rope_scaling=\"linear\"",
                                                             "model.rope_scaling_factor=2.0")])
def test_float32_logits_match_with_a_gate_bias_and_scaled_rope(sets):
    model = small_model("aurelius-4m", *sets)
    ids = torch.tensor([[0, 5, 9, 11, 300, 17, 4000, 2]])
    eager_cache, compiled_cache = model.new_cache(1), model.new_cache(1)
    step = compiled.compiled_step(model, "float32", fallback=False)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            reference = fast_llama(model).step(ids[:, t], eager_cache)
            assert torch.allclose(step(ids[:, t], compiled_cache), reference, rtol=1e-4, atol=1e-4)
    assert torch.allclose(compiled_cache.keys, eager_cache.keys, atol=1e-5)


def losses(model, ids: torch.Tensor, dtype: str | None) -> float:
    from tinylm.train.evaluation import stepped_logits

    with torch.no_grad():
        logits = model(ids)[0] if dtype is None else stepped_logits(model, ids, dtype)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()
@needs_compiler
def test_int8_loss_within_one_percent_of_float32():
    model = small_model("aurelius-4m", factor=5.0)
    with torch.no_grad():  # text the model itself finds likely: a loss far below uniform's ln(4096)
        ids = torch.tensor(generate(model, [[0]] * 4, Sampling(temperature=0.5, max_new_tokens=95), seed=0))
    ids = torch.cat([torch.zeros(4, 1, dtype=torch.long), ids], dim=1)
    reference = losses(model, ids, None)
    assert reference < 0.8 * math.log(4096)
    assert losses(model, ids, "float32") == pytest.approx(reference, rel=1e-5)
    int8 = losses(model, ids, "int8")
    assert int8 != reference and int8 == pytest.approx(reference, rel=0.01)
@needs_compiler
def test_portable_build_sums_as_the_vnni_build():
    model = small_model("aurelius-4m")
    ids = torch.tensor([3, 900, 17])
    native = compiled.CompiledLlama(model, "int8")
    portable = compiled.CompiledLlama(model, "int8", portable=True)
    assert native.library._name != portable.library._name
    a, b = native.step(ids, model.new_cache(3)), portable.step(ids, model.new_cache(3))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
@needs_compiler
def test_the_build_is_kept_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    first = compiled.library_path()
    assert first.parent == tmp_path / "compiled" and first.suffix == ".so"
    built_at = first.stat().st_mtime_ns
    assert compiled.library_path() == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # nothing left from the build


def test_no_compiler_falls_back_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TINYLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(compiled, "_NOTED", set())
    model = small_model("aurelius-4m")
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    assert generate(model, PROMPTS, greedy, compiled="int8") == generate(model, PROMPTS, greedy)
    assert generate(model, PROMPTS, greedy, compiled="int8")  # said once
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["tinylm: no C++ compiler found (c++, g++ or clang++; or set CXX); decoding with the eager step"]
    with pytest.raises(compiled.CompileUnavailable):
        compiled.compiled_step(model, "int8", fallback=False)


def test_other_architectures_and_devices_decode_eagerly(monkeypatch, capsys):
    monkeypatch.setattr(compiled, "_NOTED", set())
    torch.manual_seed(0)
    mixer = build_model(load_recipe("micromixer-100k").model).eval()
    greedy = Sampling(temperature=0.0, max_new_tokens=6)
    assert generate(mixer, [[10, 20]], greedy, compiled="float32") == generate(mixer, [[10, 20]], greedy)
    assert "compiled step is for LLaMA models, not MicroMixer" in capsys.readouterr().err
    half = small_model("llama2c-260k").to(torch.bfloat16)
    assert compiled.compiled_step(half, "float32") is None
    assert "float32 models on the CPU, not torch.bfloat16" in capsys.readouterr().err
@needs_compiler
def test_sample_and_eval_commands(tmp_path, capsys):
    from helpers import tiny_overrides
    from tinylm.train import train

    run = tmp_path / "run"
    train(load_recipe("llama2c-260k", tiny_overrides(eval_batches=1) + ["model.n_layers=2"]), run, progress=False)
    capsys.readouterr()
    args = ["sample", str(run), "--prompt", "Once", "--temperature", "0", "--max-new-tokens", "12"]
    assert cli.main(args) == 0
    eager = capsys.readouterr().out
    assert cli.main([*args, "--compile"]) == 0 and capsys.readouterr().out == eager
    assert cli.main([*args, "--dtype", "int8"]) == 0 and capsys.readouterr().out.startswith("Once")
    scores = {}
    for dtype in (None, "float32", "int8"):
        assert cli.main(["eval", str(run), "--json", *(["--dtype", dtype] if dtype else [])]) == 0
        scores[dtype] = json.loads(capsys.readouterr().out)["bits_per_byte"]
    assert scores["float32"] == pytest.approx(scores[None], rel=1e-5)
    assert scores["int8"] != scores[None] and scores["int8"] == pytest.approx(scores[None], rel=0.01)
    assert json.loads((run / "eval.json").read_text())["bits_per_byte"] == scores[None]  # --dtype records nothing
@needs_compiler
def test_the_server_decodes_with_the_compiled_step(tmp_path):
    from openai import OpenAI

    from live_server import live_server, scaled_run
    from tinylm.data.shards import frame_prefix
    from tinylm.infer.engine import generate_text
    from tinylm.runs.loading import load_model

    run = scaled_run(tmp_path / "story", scale=5.0)
    model, recipe, tokenizer = load_model(run)
    greedy = recipe.sample.settings.with_changes(temperature=0.0, max_new_tokens=24)
    expected = generate_text(model, tokenizer, ["Once"], greedy, prefix=frame_prefix(tokenizer, recipe.data.framing),
                             compiled="int8")[0]
    with live_server([run], compiled="int8") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        answer = client.completions.create(model="story", prompt="Once", max_tokens=24, temperature=0.0)
    assert answer.choices[0].text == expected and len(set(expected)) > 3
