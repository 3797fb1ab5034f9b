"""Export and import, checked against independent readers: transformers itself for Hugging Face directories, and a
small reader plus a numpy forward pass (interleaved RoPE, as llama2.c's run.c computes it) for llama2.c files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm.cli import main
from tinylm.data.shards import frame_prefix
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.errors import TinylmError
from tinylm.export.hf import export_hf_model
from tinylm.export.hf_import import load_hf_dir
from tinylm.export.llama2c import export_llama2c_model
from tinylm.infer.engine import generate
from tinylm.models import build_model
from tinylm.recipe import Sampling, load_recipe, recipe_to_toml
from tinylm.runs.evaluate import evaluate_path
from tinylm.runs.loading import load_model
from tinylm.storage.atomic import atomic_write_text
from tinylm.train.checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


SHRINK = ["model.n_layers=2", "model.dim=64", "model.hidden_dim=96", "model.n_heads=4", "model.n_kv_heads=2",
          "model.head_dim=16", "model.context_length=64"]
BYTES = ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=258"]
CASES = {
    "tied-gqa": ("aurelius-4m", SHRINK + BYTES + ["model.vocab_size=300"]),
    "untied": ("aurelius-4m", SHRINK + BYTES + ["model.vocab_size=300", "model.unembedding=\"untied\""]),
    "pinv-w1-bias": ("simpler-llama-834k", ["model.n_layers=2", "tokenizer.kind=\"bytes\"",
                                            "tokenizer.vocab_size=259"]),
    "linear-rope": ("aurelius-4m", SHRINK + BYTES + ["model.vocab_size=300", "model.rope_scaling=\"linear\"",
                                                     "model.rope_scaling_factor=2.0"]),
    "ntk-rope": ("aurelius-4m", SHRINK + BYTES + ["model.vocab_size=300", "model.rope_scaling=\"ntk\"",
                                                  "model.rope_scaling_factor=2.0", "model.rope_theta=812.5"]),
    "sink": ("aurelius-10m", SHRINK + ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=260",
                                       "model.vocab_size=300"]),
}


def make(case: str, seed: int = 0, scale: float = 8.0):
    name, sets = CASES[case]
    recipe = load_recipe(name, sets)
    tokenizer = build_tokenizer(recipe.tokenizer)
    torch.manual_seed(seed)
    model = build_model(recipe.model).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.mul_(scale) if "norm" not in pname else p.uniform_(0.5, 1.5)
            if pname.endswith("bias"):
                p.normal_(0, 0.5)
    return model, recipe, tokenizer


def make_run(path: Path, case: str):
    model, recipe, tokenizer = make(case)
    path.mkdir(parents=True)
    atomic_write_text(path / "recipe.toml", recipe_to_toml(recipe))
    tokenizer.save(path / "tokenizer.json")
    save_checkpoint(path / "checkpoints", 1, model, {"step": 1}, {"tokenizer_fingerprint": tokenizer.fingerprint()})
    return model, recipe, tokenizer


@pytest.mark.parametrize("case", list(CASES))
def test_hf_export_loads_in_transformers(tmp_path, case):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, recipe, tokenizer = make(case)
    export_hf_model(model, recipe, tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Once upon a time, a little cat"
    ids = hf_tokenizer(text, return_tensors="pt")["input_ids"]
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    assert ids[0].tolist() == prefix + tokenizer.encode(text)  # AutoTokenizer adds the frame prefix itself
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    greedy = generate(model, [ids[0].tolist()], Sampling(max_new_tokens=12, temperature=0))[0]
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                      eos_token_id=None, pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist() == greedy
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] == (case not in ("untied", "pinv-w1-bias"))  # pinv: an untied lm_head
    assert generation["do_sample"] == (recipe.sample.temperature > 0)
    context = model.max_positions  # a budget that would reach the context from the frame prefix is a total length
    budget = {"max_new_tokens": recipe.sample.max_new_tokens} if len(prefix) + recipe.sample.max_new_tokens < \
        context else {"max_length": context}
    assert {k: generation[k] for k in ("max_new_tokens", "max_length") if k in generation} == budget


@pytest.mark.parametrize("case", ["tied-gqa", "pinv-w1-bias", "ntk-rope", "sink"])
def test_hf_round_trip(tmp_path, case):
    model, recipe, tokenizer = make(case)
    export_hf_model(model, recipe, tokenizer, tmp_path / "hf")
    loaded, loaded_recipe, loaded_tokenizer = load_hf_dir(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=1e-5, rtol=0)
    assert loaded_tokenizer.fingerprint() == tokenizer.fingerprint()  # still matches the run's shards
    assert loaded_recipe.sample == recipe.sample and loaded_recipe.data.framing == recipe.data.framing


def test_hub_model_id_from_a_prefilled_cache_offline(tmp_path, offline_hub, capsys):
    model, recipe, tokenizer = make("tied-gqa")
    export_hf_model(model, recipe, tokenizer, tmp_path / "hf")
    export = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    offline_hub("model", "someone/tiny-story-llama", export)
    loaded, loaded_recipe, _ = load_model("someone/tiny-story-llama")
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=1e-5, rtol=0)
    assert loaded_recipe.sample == recipe.sample
    assert main(["sample", "someone/tiny-story-llama", "--prompt", "Once", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    with pytest.raises(TinylmError, match="offline"):  # not in the cache, and offline
        load_model("someone/another-model")
    with pytest.raises(TinylmError, match="needs --data"):  # a hub repository holds no shards
        evaluate_path("someone/tiny-story-llama")
    # a damaged download is refused by our export's manifest
    offline_hub("model", "someone/damaged", {**export, "config.json": export["config.json"] + b" "})
    with pytest.raises(TinylmError, match="config.json"):
        load_model("someone/damaged")


def test_micromixer_export(tmp_path):
    recipe = load_recipe("micromixer-100k")
    tokenizer = build_tokenizer(recipe.tokenizer)
    model = build_model(recipe.model).eval()
    export_hf_model(model, recipe, tokenizer, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "tinylm-micromixer"
    loaded, loaded_recipe, _ = load_model(tmp_path / "hf")
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert loaded_recipe.model == recipe.model


def transformers_llama_dir(path: Path, shard: bool = False):
    """A directory written by transformers itself, plus a tokenizer.json with no tinylm metadata."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=270, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, rope_theta=2000.0, bos_token_id=256, eos_token_id=257,
                         initializer_range=0.2)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="100KB" if shard else "5GB")
    tokenizer = build_tokenizer(load_recipe("aurelius-4m", BYTES).tokenizer)
    definition = json.loads(tokenizer.to_json())
    del definition["model"]["tinylm"]
    (path / "tokenizer.json").write_text(json.dumps(definition))
    return hf


@pytest.mark.parametrize("shard", [False, True])
def test_import_directory_saved_by_transformers(tmp_path, shard):
    hf = transformers_llama_dir(tmp_path, shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    model, recipe, tokenizer = load_hf_dir(tmp_path)
    # no tokenizer_config.json and no post-processor: AutoTokenizer adds no BOS, so neither do our prompts
    assert tokenizer.bos_id == 256 and recipe.data.framing == "none" and recipe.model.unembedding == "untied"
    ids = torch.randint(0, 270, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)


def test_import_refuses_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    transformers_llama_dir(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, weights)
    with pytest.raises(TinylmError, match="missing tensors model.layers.1.mlp.up_proj.weight"):
        load_hf_dir(tmp_path)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, weights)
    with pytest.raises(TinylmError, match="unexpected tensors model.extra.weight"):
        load_hf_dir(tmp_path)
    save_file({**tensors, "model.norm.weight": torch.ones(47)}, weights)
    with pytest.raises(TinylmError, match=r"model.norm.weight has shape \(47,\)"):
        load_hf_dir(tmp_path)
    weights.unlink()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(TinylmError, match="only through safetensors"):
        load_hf_dir(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}}))
    with pytest.raises(TinylmError, match="rope type 'yarn'"):
        load_hf_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------- llama2.c
def read_llama2c(directory: Path):
    """An independent reader of run.c's files: header, tensors in run.c's order, the tokenizer entries."""
    data = (directory / "model.bin").read_bytes()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", data[:28])
    body = np.frombuffer(data, dtype="<f4", offset=28)
    shared, vocab = vocab > 0, abs(vocab)
    hd = dim // heads
    shapes = [("emb", (vocab, dim)), ("att_norm", (layers, dim)), ("wq", (layers, heads * hd, dim)),
              ("wk", (layers, kv_heads * hd, dim)), ("wv", (layers, kv_heads * hd, dim)),
              ("wo", (layers, dim, heads * hd)), ("ffn_norm", (layers, dim)), ("w1", (layers, hidden, dim)),
              ("w2", (layers, dim, hidden)), ("w3", (layers, hidden, dim)), ("norm", (dim,)),
              ("cos", (seq_len, hd // 2)), ("sin", (seq_len, hd // 2))] + ([] if shared else [("cls", (vocab, dim))])
    w, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        w[name] = body[offset:offset + size].reshape(shape).astype(np.float64)
        offset += size
    assert offset == body.size  # nothing left over
    w["cls"] = w["emb"] if shared else w["cls"]
    tok = (directory / "tokenizer.bin").read_bytes()
    (max_len,), pos, entries = struct.unpack("<i", tok[:4]), 4, []
    for _ in range(vocab):
        score, length = struct.unpack("<fi", tok[pos:pos + 8])
        entries.append((tok[pos + 8:pos + 8 + length], score))
        pos += 8 + length
    assert pos == len(tok) and max_len == max(len(p) for p, _ in entries)
    return dict(dim=dim, heads=heads, kv_heads=kv_heads, layers=layers), w, entries


def numpy_forward(cfg, w, ids):
    """run.c's computation: RMSNorm eps 1e-5, RoPE on interleaved pairs (2j, 2j+1), GQA, SwiGLU."""
    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x):  # x: (T, heads, hd); pairs (2j, 2j+1) turn by pos * 10000^(-2j/hd)
        hd = x.shape[-1]
        angle = np.arange(len(x))[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)
        cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
        out = x.copy()
        out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
        return out

    heads, kv, T = cfg["heads"], cfg["kv_heads"], len(ids)
    x = w["emb"][ids]
    for layer in range(cfg["layers"]):
        h = rms(x, w["att_norm"][layer])
        q = rope((h @ w["wq"][layer].T).reshape(T, heads, -1))
        k = rope((h @ w["wk"][layer].T).reshape(T, kv, -1))
        v = (h @ w["wv"][layer].T).reshape(T, kv, -1)
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w["wo"][layer].T
        h = rms(x, w["ffn_norm"][layer])
        gate = h @ w["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rms(x, w["norm"]) @ w["cls"].T


@pytest.mark.parametrize("case", ["tied-gqa", "untied"])
def test_llama2c_export_matches_numpy_forward(tmp_path, case):
    model, recipe, tokenizer = make(case, scale=3.0)
    notes = export_llama2c_model(model, recipe, tokenizer, tmp_path / "l2c")
    assert any("BOS" in n for n in notes)  # this tokenizer's BOS is not run.c's id 1
    cfg, w, entries = read_llama2c(tmp_path / "l2c")
    ids = torch.randint(0, 300, (40,))
    with torch.no_grad():
        ours = model(ids[None])[0][0].double().numpy()
    np.testing.assert_allclose(numpy_forward(cfg, w, ids.numpy()), ours, atol=1e-4, rtol=0)
    freqs = np.arange(64)[:, None] * 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(w["cos"], np.cos(freqs), atol=1e-5)
    assert len(entries) == 300 and entries[ord("a")] == (b"a", 0.0) and entries[256][0] == b"\n<s>\n"


def test_llama2c_tokenizer_scores_follow_merges():
    recipe = load_recipe("llama2c-260k")
    tokenizer = build_tokenizer(recipe.tokenizer, ["the cat sat on the mat. the cat ran."] * 50)
    from tinylm.export.llama2c import tokenizer_bin_entries

    entries = tokenizer_bin_entries(tokenizer, recipe.model.vocab_size)
    pieces = {piece: score for piece, score in entries}
    assert entries[1][0] == b"\n<s>\n" and entries[2][0] == b"\n</s>\n" and entries[1][1] == -1e10
    assert pieces[b" cat"] < 0 and pieces[b"t"] == 0.0  # a merge has a rank; a single byte has none
    assert pieces[b"he"] > pieces[b"the"] > pieces[b" the"]  # "he" was merged first, then "t" + "he", ...
    merged = range(3 + 256, tokenizer.vocab_size)  # the trainer gives merged tokens ids in merge order
    assert [entries[i][1] for i in merged] == [-float(rank) for rank in range(len(merged))]
    assert entries[-1] == (b"<unused511>", -1e10)  # ids past the tokenizer's vocabulary


def test_llama2c_refuses_what_run_c_cannot_compute(tmp_path):
    for name, sets, reason in [("simpler-llama-834k", [], "pseudo-inverse"), ("aurelius-10m", [], "RoPE base 10000"),
                               ("micromixer-100k", [], "MicroMixer"),
                               ("aurelius-4m", ["model.head_dim=16"], "head_dim"),
                               ("aurelius-4m", ["model.norm_eps=1e-6"], "eps"),
                               ("llama2c-260k", ["model.rope_scaling=\"linear\"", "model.rope_scaling_factor=2.0"],
                                "scaling")]:
        recipe = load_recipe(name, sets)
        with pytest.raises(TinylmError, match=reason):
            export_llama2c_model(None, recipe, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path, capsys):
    run = tmp_path / "run"
    model, recipe, tokenizer = make_run(run, "tied-gqa")
    assert main(["export", str(run), "--format", "hf"]) == 0
    assert main(["export", str(run), "--format", "hf"]) == 0  # a second export replaces the first
    assert "LlamaForCausalLM" in capsys.readouterr().out
    loaded, _, _ = load_model(run / "hf")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=1e-5, rtol=0)
    assert main(["sample", str(run / "hf"), "--prompt", "Once", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    assert main(["export", str(run), "--format", "llama2c", "--out", str(tmp_path / "l2c")]) == 0
    assert (tmp_path / "l2c" / "model.bin").is_file() and (tmp_path / "l2c" / "tokenizer.bin").is_file()
    assert "note: run.c starts every sequence with id 1" in capsys.readouterr().out
    make_run(tmp_path / "pinv", "pinv-w1-bias")
    assert main(["export", str(tmp_path / "pinv"), "--format", "llama2c"]) == 2
    assert "pseudo-inverse" in capsys.readouterr().err and not (tmp_path / "pinv" / "llama2c").exists()
    assert main(["export", str(tmp_path / "nothing"), "--format", "hf"]) == 2
