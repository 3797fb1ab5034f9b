"""Fuzzing: generated command lines for `tinylm.cli.main` and generated logits/settings for the sampler.

A command line may succeed (0), be refused as a user mistake (2), or be refused by argparse (SystemExit 2; 0 for
--help): never anything else. The sampler, for any logits and any settings in range, returns one valid id per row
that its filters kept; settings out of range are refused with TinylmError."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import set_args, tiny_overrides
from tinylm import cli
from tinylm.errors import TinylmError
from tinylm.infer.engine import generate
from tinylm.infer.sampling import pick, processed_scores
from tinylm.models import build_model
from tinylm.recipe import (
    SECTIONS,
    ModelConfig,
    Sampling,
    apply_override,
    load_recipe,
    recipe_from_dict,
    recipe_from_toml,
    recipe_to_toml,
)
from tinylm.train.loop import train

TINY = tiny_overrides(steps=2, eval_batches=1, stories=60, batch=2, context=16) + ["model.n_layers=1"]
CLI_EXAMPLES = 200
SAMPLER_EXAMPLES = 400
GENERATE_EXAMPLES = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the fuzzed command lines point at: a trained run, a tiny recipe, bad files, missing paths."""
    base = tmp_path_factory.mktemp("fuzz")
    run = base / "run"
    train(load_recipe("micromixer-100k", TINY), run, progress=False)
    tiny = base / "tiny.toml"
    tiny.write_text(recipe_to_toml(load_recipe("micromixer-100k", TINY)))
    (base / "bad.toml").write_text("[model\n")
    return base


# Recipe fields and values the fuzzer combines. Values stay small (no huge models); train.compile and remote
# data sources are left out (minutes of compiling, network access): they are not input handling.
KEYS = ["model.n_layers", "model.dim", "model.n_heads", "model.n_kv_heads", "model.head_dim", "model.context_length",
        "model.vocab_size", "model.arch", "model.dropout", "model.unembedding", "model.hidden_dim", "tokenizer.kind",
        "tokenizer.vocab_size", "tokenizer.bos", "data.framing", "data.val_fraction", "train.lr", "train.min_lr",
        "train.batch_size", "train.grad_accum", "train.schedule", "train.dtype", "train.device", "train.keep_last",
        "sample.top_p", "sample.min_p", "sample.temperature", "sample.top_k", "nosuch.key", "model.nosuch", "model"]
VALUES = ["-1", "0", "1", "2", "3", "8", "0.5", "1.5", "1e-9", "nan", "inf", "-inf", "true", '"x"', "[]", "",
          '"mixer"', '"llama"', '"bytes"', '"bpe"', '"eos"', '"none"', '"<s>"', "[1", "'", "=", "\\u0000", "é"]


def overrides():
    pair = st.tuples(st.sampled_from(KEYS), st.sampled_from(VALUES)).map(lambda kv: f"{kv[0]}={kv[1]}")
    odd = st.sampled_from(["", "=", ".", "model.", "model.=1", ".dim=2", "model.dim", "a.b.c=1"])
    return st.lists(st.one_of(pair, odd), max_size=3).map(set_args)


JUNK = ["x", "", "nan", "inf", "-inf", "1e400", "99999999999999999999999", "-99999999999999999999999", "0x10"]


def ints(low: int, high: int):
    """Mostly what a user means (in range or just outside it), sometimes junk."""
    good = st.integers(low, high).map(str)
    return st.one_of(good, good, good, st.integers(-10**6, 10**6).map(str), st.sampled_from(JUNK))


def floats(low: float, high: float):
    good = st.floats(low, high).map(repr)
    return st.one_of(good, good, good, st.floats(allow_nan=True).map(repr), st.sampled_from(JUNK + ["-0.0", "1e-9"]))


def text():
    return st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


def _joined(parts) -> list[str]:
    return [w for p in parts for w in (p if isinstance(p, list) else [p])]


def command_lines():
    recipe = st.sampled_from(["{tiny}", "{bad}", "{missing}.toml", "micromixer-100k", "llama2c-260k", "nope", "",
                              "{text}", "{empty}"])
    run = st.sampled_from(["{run}"] * 6 + ["{missing}", "{text}", "{empty}", "{tiny}", "", "."])
    out = st.sampled_from(["{new}", "{new}", "{run}", "{text}", "{empty}"])
    # "--flag value" or "--flag=value" (the only way argparse takes "-1e-05" as a value)
    option = lambda flag, values: st.one_of(st.just([]), values.map(lambda v: [flag, v]),  # noqa: E731
                                            values.map(lambda v: [f"{flag}={v}"]))
    flag = lambda name: st.one_of(st.just([]), st.just([name]))  # noqa: E731
    cat = lambda *parts: st.tuples(*parts).map(_joined)  # noqa: E731
    checkpoint = option("--checkpoint", st.sampled_from(["best", "latest", "step-00000002", "step-1", "../x", ""]))
    shapes = st.one_of(
        cat(st.just("recipes"), st.one_of(st.just([]), recipe.map(lambda r: [r]))),
        cat(st.just("params"), recipe, overrides()),
        cat(st.just("tokenizer"), st.just("train"), recipe, overrides(), option("--out", out), flag("--force")),
        cat(st.just("tokenizer"), st.just("stats"), st.one_of(recipe, run), overrides()),
        cat(st.just("data"), st.just("prepare"), recipe, overrides(), option("--out", out), flag("--quiet")),
        cat(st.just("train"), recipe, overrides(), option("--out", out), flag("--resume"),
            option("--stop-after", ints(-2, 3)), flag("--quiet")),
        cat(st.just("eval"), run, checkpoint, option("--data", run), option("--batch-size", ints(-2, 64)),
            flag("--json")),
        cat(st.just("sample"), run, option("--prompt", text()), option("--max-new-tokens", ints(-1, 40)),
            option("--temperature", floats(-0.1, 3)), option("--top-k", ints(-1, 300)),
            option("--top-p", floats(-0.1, 1.1)), option("--min-p", floats(-0.1, 1.1)),
            option("--repetition-penalty", floats(-0.1, 3)), option("--seed", ints(-2**63, 2**64)),
            option("--stop", text()), checkpoint,
            option("--device", st.sampled_from(["cpu", "cuda", "bogus", "cuda:3", "meta", ""]))),
        cat(st.just("export"), run, option("--format", st.sampled_from(["hf", "llama2c", "onnx"])),
            option("--out", out), checkpoint),
        st.lists(st.one_of(st.sampled_from(["train", "eval", "sample", "--set", "--out", "--help", "-h", "--resume",
                                            "{run}", "{tiny}", "data", "prepare", "tokenizer", "--top-p"]), text()),
                 max_size=6),
    )
    return shapes


def heavy(argv: list[str]) -> bool:
    """A named recipe trained or tokenised for real would take minutes: those get the tiny settings appended."""
    return bool(argv) and argv[0] in ("train", "data", "tokenizer") and any(
        a in ("micromixer-100k", "llama2c-260k") for a in argv)


@settings(max_examples=CLI_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_command_lines_exit_0_or_2(world, tmp_path_factory, monkeypatch, capsys, data):
    scratch = tmp_path_factory.mktemp("cmd")  # every example starts from the same files
    run = scratch / "run"
    shutil.copytree(world / "run", run)
    (scratch / "text.txt").write_text("Once upon a time.\n")
    (scratch / "empty").mkdir()
    places = {"{tiny}": world / "tiny.toml", "{bad}": world / "bad.toml", "{missing}": scratch / "missing",
              "{text}": scratch / "text.txt", "{empty}": scratch / "empty", "{run}": run, "{new}": scratch / "new"}
    argv = data.draw(command_lines())
    for key, value in places.items():
        argv = [a.replace(key, str(value)) for a in argv]
    if heavy(argv):
        argv += set_args(TINY)
    monkeypatch.chdir(scratch)  # a default --out (runs/NAME) lands in the scratch directory
    monkeypatch.setenv("TINYLM_PEAK_FLOPS", "1e11")
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse: usage errors, --help
        event(f"{argv[0] if argv else '-'}: SystemExit {exc.code}")
        assert exc.code in (0, 2), (argv, exc.code)
        return
    finally:
        captured = capsys.readouterr()
    event(f"{argv[0]}: exit {code}")
    assert code in (0, 2), argv
    assert "Traceback" not in captured.err
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tinylm: error: "), (argv, captured.err)


# ------------------------------------------------------------------------------------------------------ sampler
def in_range_settings():
    return st.fixed_dictionaries({
        "temperature": st.one_of(st.just(0.0), st.floats(1e-3, 5.0), st.floats(1e-30, 1e-3)),
        "top_k": st.integers(0, 80),
        "top_p": st.one_of(st.just(1.0), st.floats(1e-6, 1.0)),
        "min_p": st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0)),
        "repetition_penalty": st.one_of(st.just(1.0), st.floats(1e-3, 10.0)),
    })


@settings(max_examples=SAMPLER_EXAMPLES, deadline=None)
@given(st.integers(1, 4), st.integers(1, 60), in_range_settings(), st.integers(0, 2**63 - 1), st.data())
def test_sampler_in_range_never_fails(batch, vocab, config, seed, data):
    finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    values = data.draw(st.lists(finite, min_size=batch * vocab, max_size=batch * vocab))
    logits = torch.tensor(values, dtype=torch.float32).view(batch, vocab)
    if data.draw(st.booleans()):  # ties and extremes: many equal maxima, or one huge logit
        logits[:, : vocab // 2] = logits[:, :1]
    seen = torch.rand(batch, vocab, generator=torch.Generator().manual_seed(seed % 1000)) < 0.3
    sampling = Sampling(**config)
    generator = torch.Generator().manual_seed(seed)
    ids = pick(sampling, logits, seen, generator)
    assert ids.shape == (batch,) and ids.dtype == torch.long
    assert ((0 <= ids) & (ids < vocab)).all()
    scores = processed_scores(sampling, logits, seen)
    kept = scores.gather(1, ids[:, None]).squeeze(1)
    assert torch.isfinite(kept).all(), "a filtered id (score -inf) was picked"
    if config["temperature"] == 0:
        assert torch.equal(ids, scores.argmax(dim=-1))


OUT_OF_RANGE = [("temperature", -1e-9), ("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
                ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.0000001), ("top_p", math.nan), ("min_p", 1.0000001),
                ("min_p", -1e-9), ("min_p", math.nan), ("top_k", -1), ("repetition_penalty", 0.0),
                ("repetition_penalty", -2.0), ("repetition_penalty", math.nan), ("max_new_tokens", -1)]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    llama = build_model(ModelConfig(arch="llama", n_layers=1, dim=32, n_heads=4, n_kv_heads=2, hidden_dim=48,
                                    context_length=24, vocab_size=40)).eval()
    mixer = build_model(ModelConfig(arch="mixer", n_layers=1, dim=16, hidden_dim=24, hyper_dim=8, context_length=20,
                                    vocab_size=40)).eval()
    return {"llama": llama, "mixer": mixer}


@pytest.mark.parametrize("name,value", OUT_OF_RANGE)
def test_sampling_refuses_settings_out_of_range(name, value):
    with pytest.raises(TinylmError, match=name):
        Sampling(**{"max_new_tokens": 4, name: value})


@pytest.mark.parametrize("prompts,message", [([[]], "empty"), ("full", "context holds"),
                                             ([[1, 40]], "outside the model's vocabulary"),
                                             ([[-1]], "outside the model's vocabulary")])
def test_generate_refuses_bad_prompts(models, prompts, message):
    for model in models.values():
        rows = [[1] * model.max_positions] if prompts == "full" else prompts
        with pytest.raises(TinylmError, match=message):
            generate(model, rows, Sampling(max_new_tokens=3))


@settings(max_examples=GENERATE_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["llama", "mixer"]), st.lists(st.lists(st.integers(0, 39), min_size=1, max_size=19),
                                                     min_size=1, max_size=3),
       st.integers(0, 30), in_range_settings(), st.one_of(st.none(), st.integers(0, 39)), st.integers(0, 2**63 - 1))
def test_generate_in_range_never_fails(models, name, prompts, max_new, config, eos, seed):
    model = models[name]
    context = model.max_positions
    out = generate(model, prompts, Sampling(max_new_tokens=max_new, **config), eos_id=eos, seed=seed)
    assert len(out) == len(prompts)
    for prompt, new in zip(prompts, out, strict=True):
        assert len(new) <= min(max_new, context - len(prompt))
        assert all(0 <= i < 40 for i in new) and eos not in new


# ------------------------------------------------------------------------------------------------------- recipes
RECIPE_EXAMPLES = 500


def toml_values():
    scalar = st.one_of(st.integers(-3, 600), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                       st.text(max_size=6), st.sampled_from(["llama", "mixer", "bpe", "bytes", "chars", "gpt2", "bos",
                                                             "eos", "none", "tied", "cosine", "<s>", "</s>", ""]))
    return st.one_of(scalar, st.lists(scalar, max_size=3), st.dictionaries(st.text(max_size=4), scalar, max_size=2))


WORDS = ["llama", "mixer", "bpe", "bytes", "chars", "gpt2", "bos", "eos", "sink_bos", "none", "tied", "untied", "pinv",
         "cosine", "onecycle", "constant", "linear", "ntk", "quirk", "standard", "<s>", "</s>", "<unk>", "<sink>",
         "auto", "cpu", "float32", "bfloat16", ""]


def typed_value(default):
    """A value of the field's own type (usually), so that validation rules, not only type checks, are reached."""
    if isinstance(default, bool):
        good = st.booleans()
    elif isinstance(default, int):
        good = st.one_of(st.integers(-2, 10), st.sampled_from([16, 32, 64, 128, 256, 260, 512, 4096]))
    elif isinstance(default, float):
        good = st.one_of(st.floats(-0.5, 2.0), st.sampled_from([0.0, 1.0, 1e-5, 3e-4, 10000.0]))
    elif isinstance(default, list):
        good = st.lists(st.sampled_from(WORDS), max_size=3)
    else:
        good = st.sampled_from(WORDS)
    return st.one_of(good, good, good, toml_values())


def recipe_dicts():
    """Known sections and keys with typed values (some of any type), now and then an unknown key or section."""
    def section(name):
        defaults = {f.name: getattr(SECTIONS[name](), f.name) for f in dataclasses.fields(SECTIONS[name])}
        known = st.fixed_dictionaries({}, optional={k: typed_value(v) for k, v in defaults.items()})
        unknown = st.dictionaries(st.text(min_size=1, max_size=5), toml_values(), max_size=1)
        return st.one_of(known, known, known, st.tuples(known, unknown).map(lambda kv: {**kv[0], **kv[1]}))
    known = st.fixed_dictionaries({}, optional={name: section(name) for name in SECTIONS})
    extra = st.dictionaries(st.sampled_from(["name", "source", "notes", "bogus", "model"]), toml_values(), max_size=1)
    return st.one_of(known, known, known, st.tuples(known, extra).map(lambda kv: {**kv[1], **kv[0]}))


@settings(max_examples=RECIPE_EXAMPLES, deadline=None)
@given(recipe_dicts())
def test_fuzzed_recipes_are_valid_and_round_trip_or_refused(raw):
    base = load_recipe("llama2c-260k").to_dict()  # a valid start, so that one bad field is what gets noticed
    merged = {k: ({**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v)
              for k, v in {**base, **raw}.items()}
    try:
        recipe = recipe_from_dict(merged)
    except TinylmError as exc:
        event("refused: " + re.sub(r"^recipe: ", "", str(exc)).split(".")[0].split(" ")[0])
        assert str(exc) and "\n" not in str(exc)
        return
    event("accepted")
    assert recipe_from_toml(recipe_to_toml(recipe)) == recipe  # what is accepted is written back faithfully


@settings(max_examples=RECIPE_EXAMPLES, deadline=None)
@given(st.text(max_size=60))
def test_fuzzed_set_strings_are_applied_or_refused(item):
    raw: dict = {}
    try:
        apply_override(raw, item)
        load_recipe("micromixer-100k", [item])
    except TinylmError as exc:
        assert str(exc)
