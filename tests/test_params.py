"""Every named recipe reproduces its published parameter count to the unit (counted on the meta device)."""

import pytest

from tinylm.cli import main
from tinylm.models import build_model, count_parameters
from tinylm.recipe import load_recipe, recipe_names

PUBLISHED = {
    "aurelius-4m": 4_033_728,
    "aurelius-10m": 9_921_408,
    "godelev-190m": 190_460_160,
    "simpler-llama-834k": 834_644,
    "micromixer-100k": 136_908,
    "micromixer-300k": 331_680,
    "micromixer-500k": 557_328,
    "micromixer-1m": 967_584,
}


def llama_formula(m) -> int:
    """The published architectures' closed form, independent of the module code."""
    hd, kv, hidden = m.resolved_head_dim(), m.resolved_kv_heads(), m.resolved_hidden_dim()
    layer = m.dim * (m.n_heads * hd) + 2 * m.dim * (kv * hd) + (m.n_heads * hd) * m.dim + 3 * m.dim * hidden + 2 * m.dim
    layer += hidden if m.w1_bias else 0
    heads = {"tied": 1, "pinv": 1, "untied": 2}[m.unembedding]
    return m.n_layers * layer + m.dim + heads * m.vocab_size * m.dim


def mixer_formula(m) -> int:
    h, c = m.dim, m.resolved_hidden_dim()
    return m.vocab_size * h + m.n_layers * (199 * h + 2 * h * c + c + 64) + 2 * h


def count(name):
    return count_parameters(build_model(load_recipe(name).model, device="meta"))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts(name):
    assert count(name).total == PUBLISHED[name]


@pytest.mark.parametrize("name", recipe_names())
def test_counts_match_closed_form(name):
    m = load_recipe(name).model
    expected = llama_formula(m) if m.arch == "llama" else mixer_formula(m)
    assert count(name).total == expected


def test_without_embeddings_and_decay_split():
    assert count("aurelius-4m").without_embedding == 3_247_296
    assert count("aurelius-10m").without_embedding == 9_331_584
    assert count("godelev-190m").without_embedding == 151_862_784
    simpler = count("simpler-llama-834k")
    assert (simpler.decayed, simpler.decayed_tensors) == (832_128, 29)
    assert (simpler.not_decayed, simpler.not_decayed_tensors) == (2_516, 13)


def test_llama2c_hidden_rule():
    assert load_recipe("llama2c-260k").model.resolved_hidden_dim() == 172
    assert load_recipe("llama2c-15m").model.resolved_hidden_dim() == 768
    assert load_recipe("simpler-llama-834k").model.resolved_hidden_dim() == 341


@pytest.mark.parametrize("name,lines", [
    ("aurelius-4m", ["total parameters:            4,033,728", "without embeddings:          3,247,296"]),
    ("aurelius-10m", ["total parameters:            9,921,408"]),
    ("godelev-190m", ["total parameters:            190,460,160"]),
    ("simpler-llama-834k", ["total parameters:            834,644",
                            "num decayed parameter tensors: 29, with 832,128 parameters",
                            "num non-decayed parameter tensors: 13, with 2,516 parameters"]),
    ("micromixer-100k", ["total parameters:            136,908"]),
    ("micromixer-300k", ["total parameters:            331,680"]),
    ("micromixer-500k", ["total parameters:            557,328"]),
    ("micromixer-1m", ["total parameters:            967,584"]),
])
def test_params_command_prints_exact_counts(name, lines, capsys):
    assert main(["params", name]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out


def test_recipes_command_lists_every_recipe(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in recipe_names():
        assert name in out
    assert "190,460,160" in out
    assert main(["recipes", "aurelius-10m"]) == 0
    assert "rope_theta = 812.5" in capsys.readouterr().out


def test_every_recipe_has_all_sections():
    import tomllib

    from tinylm.recipe import recipe_text

    for name in recipe_names():
        raw = tomllib.loads(recipe_text(name))
        assert {"model", "tokenizer", "data", "train", "sample"} <= set(raw), name
        assert raw["source"] or name == "tinystories-demo", name
