"""Recipes: names and paths, --set overrides, and one clear error for every bad value."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinylm.cli import main
from tinylm.errors import TinylmError
from tinylm.recipe import load_recipe, recipe_from_toml, recipe_text, recipe_to_toml


def test_overrides_parse_as_toml_values():
    recipe = load_recipe("aurelius-4m", ["train.lr=1e-3", "model.dropout=0.1", "tokenizer.suffix_space=true",
                                         "sample.prompts=[\"Hi\"]"])
    assert recipe.train.lr == 1e-3 and recipe.model.dropout == 0.1 and recipe.tokenizer.suffix_space is True
    assert recipe.sample.prompts == ["Hi"]


def test_path_works_where_a_name_does(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(recipe_text("micromixer-100k").replace('name = "micromixer-100k"', 'name = "mine"'))
    assert load_recipe(str(path)).name == "mine"


def test_resolved_recipe_round_trips():
    for name in ("aurelius-10m", "simpler-llama-834k", "micromixer-1m"):
        recipe = load_recipe(name, ["sample.prompts=[\"a \\\"quoted\\\" prompt\\n\"]"])
        assert recipe_from_toml(recipe_to_toml(recipe)) == recipe


@pytest.mark.parametrize("override,message", [
    ("model.n_heads=7", "n_heads"),
    ("model.n_kv_heads=4", "n_kv_heads"),
    ("model.context_length=0", "context_length"),
    ("model.dim=abc", "model.dim"),
    ("model.unembedding=\"both\"", "unembedding"),
    ("train.lr=-1", "train.lr"),
    ("sample.top_p=0", "top_p"),
    ("sample.top_p=1.5", "top_p"),
    ("sample.temperature=-0.5", "temperature"),
    ("sample.min_p=2", "min_p"),
    ("model.bogus=1", "bogus"),
    ("nosection.x=1", "nosection"),
    ("no_equals_sign", "section.key=value"),
])
def test_bad_values_name_the_field(override, message):
    recipe = "aurelius-4m" if not override.startswith("model.n_heads") else "simpler-llama-834k"
    with pytest.raises(TinylmError, match=message):
        load_recipe(recipe, [override])


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layers = 2")
    assert main(["params", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "malformed TOML" in err
    assert main(["params", "no-such-recipe"]) == 2
    assert main(["params", str(tmp_path / "missing.toml")]) == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_fuzzed_toml_is_accepted_or_refused_cleanly(text):
    try:
        recipe_from_toml(text)
    except TinylmError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["model", "train", "sample", "data", "tokenizer"]),
       st.sampled_from(["n_layers", "dim", "lr", "top_p", "temperature", "paths", "kind", "framing", "vocab_size"]),
       st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=8), st.booleans()))
def test_fuzzed_overrides_are_accepted_or_refused_cleanly(section, key, value):
    try:
        load_recipe("micromixer-100k", [f"{section}.{key}={value!r}"])
    except TinylmError:
        pass
