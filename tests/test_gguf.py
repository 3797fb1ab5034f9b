"""GGUF export, checked against independent readers: transformers' GGUF loader (logits, token ids, greedy
continuations, the loss of quantised files), gguf's own reader (metadata, tensor types) and, where its Python
bindings import, llama.cpp itself (token ids, logits, end-of-generation ids)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tinylm.data.corpus import Corpus
from tinylm.data.shards import frame_prefix
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.errors import TinylmError
from tinylm.export.gguf import (
    PRE_TOKENIZER,
    SAMPLER_SEQUENCE,
    export_gguf_model,
    gguf_problems,
    gguf_tensor_names,
    storage_type,
)
from tinylm.infer.engine import generate, generate_text
from tinylm.models import build_model
from tinylm.recipe import Sampling, load_recipe, recipe_names, recipe_to_toml
from tinylm.runs.publish import export_run
from tinylm.storage.atomic import atomic_write_text, verify_manifest
from tinylm.train.checkpoints import save_checkpoint

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path("../shared/data/tinystories")
TRAIN = DATA / "TinyStories-train-sample-2995stories.txt.gz"
VALID = DATA / "TinyStories-V1-valid.head-paragraphs.txt.gz"  # has curly quotes and mojibake: not pure ASCII
ODD = [" ", "a", "Once upon a time", "  two leading, trailing two  ", "tab\there\n\nnew para\n",
       "héllo wörld — “curly” ‘quotes’ 日本語 🙂\u200b", "it's they're I'LL we've 123 4567.89", "\r\n\x01\x7f",
       "   \n\n  \t  ", "end with spaces   "]

SHRINK = ["model.n_layers=2", "model.dim=64", "model.hidden_dim=96", "model.n_heads=4", "model.n_kv_heads=2",
          "model.head_dim=16", "model.context_length=64"]
BPE = ["tokenizer.vocab_size=512", "model.vocab_size=520"]  # 8 padding rows beyond the tokenizer
BYTES_EOS = ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=258", "model.vocab_size=258", "data.framing=\"eos\""]
BYTES_NONE = ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=256", "model.vocab_size=256",
              "tokenizer.special_tokens=[]", "tokenizer.bos=\"\"", "tokenizer.eos=\"\"", "data.framing=\"none\""]
GPT2 = ["tokenizer.vocab_size=50257", "model.vocab_size=50257"]
CASES = {
    "tied-gqa": ("tinystories-demo", SHRINK + BPE),
    "untied-head32": ("tinystories-demo", SHRINK + BPE + ["model.unembedding=\"untied\"", "model.head_dim=32"]),
    "pinv": ("tinystories-demo", SHRINK + BPE + ["model.unembedding=\"pinv\""]),
    "pinv-w1-bias": ("tinystories-demo", SHRINK + BPE + ["model.unembedding=\"pinv\"", "model.w1_bias=true"]),
    "ntk-rope": ("tinystories-demo", SHRINK + BPE + ["model.rope_scaling=\"ntk\"", "model.rope_scaling_factor=2.0",
                                                     "model.rope_theta=812.5"]),
    "linear-rope": ("tinystories-demo", SHRINK + BPE + ["model.rope_scaling=\"linear\"",
                                                        "model.rope_scaling_factor=2.0"]),
    "bytes-eos": ("tinystories-demo", SHRINK + BYTES_EOS),
    "bytes-none": ("tinystories-demo", SHRINK + BYTES_NONE),
    "gpt2-eos": ("godelev-190m", SHRINK + GPT2),
}
# transformers' GGUF loader reads neither llama.rope.scaling.* nor blk.N.ffn_gate.bias: llama.cpp checks those two
TRANSFORMERS_CASES = ["tied-gqa", "untied-head32", "pinv", "ntk-rope", "bytes-eos", "bytes-none"]
REFUSED = {"aurelius-10m": ["suffix-space", "trailing-space", "sink_bos"], "simpler-llama-834k": ["character"],
           "micromixer-100k": ["MicroMixer"], "micromixer-300k": ["MicroMixer"], "micromixer-500k": ["MicroMixer"],
           "micromixer-1m": ["MicroMixer"]}


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def stories() -> list[str]:
    return list(Corpus([TRAIN], max_stories=300))


@pytest.fixture(scope="module")
def validation() -> list[str]:
    return list(Corpus([VALID], max_stories=300))


@pytest.fixture(scope="module")
def tokenizers(stories):
    """One tokenizer per tokenizer section (BPE trained on 300 stories), built once for the module."""
    built = {}

    def get(recipe):
        key = repr(recipe.tokenizer)
        if key not in built:
            built[key] = build_tokenizer(recipe.tokenizer, stories)
        return built[key]

    return get


@pytest.fixture(scope="module")
def make(tokenizers):
    def make(case: str, seed: int = 0):
        """A random model of a case whose weights are scaled up so that logits differ clearly between ids."""
        name, sets = CASES[case]
        recipe = load_recipe(name, sets)
        torch.manual_seed(seed)
        model = build_model(recipe.model).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.mul_(8.0) if "norm" not in pname else p.uniform_(0.5, 1.5)
                if pname.endswith("bias"):
                    p.normal_(0, 0.5)
        return model, recipe, tokenizers(recipe)

    return make


@pytest.fixture(scope="module")
def trained(stories, tokenizers):
    """A tiny model trained for 150 steps (a few seconds), so quantisation error shows in its loss: random weights
    would make a bound on the loss meaningless."""
    recipe = load_recipe("tinystories-demo", SHRINK + BPE)
    tokenizer = tokenizers(recipe)
    stream = torch.tensor([i for ids in tokenizer.encode_batch(stories) for i in [tokenizer.bos_id, *ids]])
    torch.manual_seed(0)
    model = build_model(recipe.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(stream) - 65, (16,), generator=generator)
        x = torch.stack([stream[s:s + 64] for s in starts])
        y = torch.stack([stream[s + 1:s + 65] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), recipe, tokenizer


def export(tmp_path, model, recipe, tokenizer, dtype="f32") -> tuple[Path, str, list[str]]:
    out = tmp_path / f"gguf-{dtype}"
    lines = export_gguf_model(model, recipe, tokenizer, out, dtype)
    (path,) = out.glob("*.gguf")
    return out, path.name, lines


def hf_model(out: Path, name: str):
    pytest.importorskip("accelerate")  # transformers loads GGUF files only with accelerate installed
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()


def hf_tokenizer(out: Path, name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out, gguf_file=name)


def metadata(path: Path) -> tuple[dict, dict]:
    """({key: value}, {tensor name: (shape in torch order, ggml type name)}) through gguf's own reader."""
    reader = gguf.GGUFReader(path)
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        values[key] = value
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}
    return values, tensors


# --------------------------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("case", TRANSFORMERS_CASES)
def test_transformers_runs_the_f32_file_as_tinylm_does(tmp_path, make, case):
    model, recipe, tokenizer = make(case)
    out, name, _ = export(tmp_path, model, recipe, tokenizer)
    assert name == f"{recipe.name}-f32.gguf"
    hf = hf_model(out, name)
    text = "Once upon a time, a little cat"
    ids = hf_tokenizer(out, name)(text, return_tensors="pt")["input_ids"]
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    assert ids[0].tolist() == prefix + tokenizer.encode(text)  # the file's add_bos_token gives the frame prefix
    assert hf.config.tie_word_embeddings == (recipe.model.unembedding == "tied")
    assert hf.config.head_dim == recipe.model.resolved_head_dim()
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    greedy = generate(model, [ids[0].tolist()], Sampling(max_new_tokens=12, temperature=0))[0]
    out_ids = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          eos_token_id=None, pad_token_id=0)
    assert out_ids[0, ids.shape[1]:].tolist() == greedy


@pytest.mark.parametrize("case", ["tied-gqa", "bytes-eos", "bytes-none", "gpt2-eos"])
def test_transformers_tokenizer_from_the_file_gives_our_ids(tmp_path, make, validation, case):
    """The file's vocabulary, merges and special tokens encode the validation stories as tinylm does. transformers
    splits a 'gpt-2' file with GPT-2's regex; a name it maps to another split (e.g. 'llama-bpe') fails the gpt2 case.
    That llama.cpp's own 'gpt-2' split is ours is checked by the llama.cpp test below."""
    model, recipe, tokenizer = make(case)
    out, name, _ = export(tmp_path, model, recipe, tokenizer, "f16")
    theirs = hf_tokenizer(out, name)
    texts = validation + ODD
    assert [theirs.encode(t, add_special_tokens=False) for t in texts] == tokenizer.encode_batch(texts)
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    assert theirs.encode(validation[0]) == prefix + tokenizer.encode(validation[0])
    for text in validation[:50]:
        ids = tokenizer.encode(text)
        assert theirs.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == text


# ----------------------------------------------------------------------------------------- quantised files
def _bits_per_byte(hf, tokenizer, texts: list[str]) -> float:
    """Bits per byte of `texts`, each scored in 64-token blocks after BOS."""
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = [tokenizer.bos_id] + tokenizer.encode(text)
            for start in range(0, len(ids) - 1, 63):
                block = torch.tensor([ids[start:start + 64]])
                if block.shape[1] < 2:
                    continue
                logits = hf(block).logits[0, :-1]
                nats += torch.nn.functional.cross_entropy(logits, block[0, 1:], reduction="sum").item()
            n_bytes += len(text.encode("utf-8"))
    return nats / math.log(2) / n_bytes


def _gap_where_greedy_parts(model, prompt: list[int], ours: list[int], theirs: list[int]) -> float:
    """0 when two greedy continuations agree; else how far (in logits of tinylm's model) the other continuation's
    token was behind ours where they first part: a near-tie the quantisation tipped, or a real change."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ours[:i]]))[0][0, -1]
            return (logits[a] - logits[b]).item()
    return 0.0


def test_f16_and_q8_0_stay_within_their_bounds_of_f32(tmp_path, trained, validation):
    model, recipe, tokenizer = trained
    texts = validation[:120]
    prompts = [[tokenizer.bos_id] + tokenizer.encode(t[:60]) for t in validation[200:206]]
    results = {}
    for dtype in ("f32", "f16", "q8_0"):
        out, name, _ = export(tmp_path, model, recipe, tokenizer, dtype)
        _, tensors = metadata(out / name)
        for tname, (shape, ggml) in tensors.items():
            assert ggml == storage_type(shape, dtype).upper(), tname
        if dtype == "q8_0":
            assert tensors["blk.0.ffn_down.weight"][1] == "Q8_0" and tensors["output_norm.weight"][1] == "F32"
        hf = hf_model(out, name)
        greedy = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=20, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
                  for p in prompts]
        results[dtype] = (_bits_per_byte(hf, tokenizer, texts), greedy)
    f32_bpb, f32_greedy = results["f32"]
    uniform = math.log2(recipe.model.vocab_size) * sum(len(tokenizer.encode(t)) for t in texts) / \
        sum(len(t.encode()) for t in texts)
    assert f32_bpb < 0.7 * uniform  # the trained model has learned something, so the bounds below mean something
    with torch.no_grad():  # the f32 file is tinylm's model: the same greedy continuations
        assert f32_greedy == [generate(model, [p], Sampling(max_new_tokens=20, temperature=0))[0] for p in prompts]
    assert abs(results["f16"][0] - f32_bpb) <= 0.005 * f32_bpb
    assert abs(results["q8_0"][0] - f32_bpb) <= 0.02 * f32_bpb
    for dtype, tolerance in (("f16", 0.05), ("q8_0", 0.1)):
        for prompt, ours, theirs in zip(prompts, f32_greedy, results[dtype][1], strict=True):
            gap = _gap_where_greedy_parts(model, prompt, ours, theirs)
            assert gap <= tolerance, (dtype, ours, theirs)  # a quantised file changes greedy choices only at ties


def test_q8_0_keeps_rows_that_do_not_fill_blocks_as_f16(tmp_path, make):
    model, recipe, tokenizer = make("tied-gqa")
    recipe.model.hidden_dim = 80  # w2 rows of 80 values: not a multiple of Q8_0's 32
    model = build_model(recipe.model).eval()
    out, name, lines = export(tmp_path, model, recipe, tokenizer, "q8_0")
    _, tensors = metadata(out / name)
    assert tensors["blk.0.ffn_down.weight"][1] == "F16" and tensors["blk.0.ffn_up.weight"][1] == "Q8_0"
    assert any("kept as f16: blk.0.ffn_down.weight" in line for line in lines)


# ------------------------------------------------------------------------------------------------ metadata
@pytest.mark.parametrize("case", ["tied-gqa", "linear-rope", "ntk-rope", "pinv-w1-bias", "bytes-eos", "bytes-none"])
def test_metadata_tensors_and_tokenizer_keys(tmp_path, make, case):
    model, recipe, tokenizer = make(case)
    m = recipe.model
    out, name, lines = export(tmp_path, model, recipe, tokenizer)
    values, tensors = metadata(out / name)
    hd = m.resolved_head_dim()
    assert values["general.architecture"] == "llama" and values["general.name"] == recipe.name
    assert values["general.file_type"] == 0
    assert values["llama.block_count"] == m.n_layers and values["llama.embedding_length"] == m.dim
    assert values["llama.feed_forward_length"] == m.resolved_hidden_dim()
    assert values["llama.attention.head_count"] == m.n_heads
    assert values["llama.attention.head_count_kv"] == m.resolved_kv_heads()
    assert values["llama.attention.key_length"] == values["llama.attention.value_length"] == hd
    assert values["llama.rope.dimension_count"] == hd
    assert values["llama.vocab_size"] == m.vocab_size == len(values["tokenizer.ggml.tokens"])
    assert values["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(m.norm_eps)
    base = m.rope_theta * (m.rope_scaling_factor ** (hd / (hd - 2)) if m.rope_scaling == "ntk" else 1)
    assert values["llama.rope.freq_base"] == pytest.approx(base, rel=1e-6)
    assert values["llama.context_length"] == model.max_positions
    if m.rope_scaling == "linear":
        assert values["llama.rope.scaling.type"] == "linear"
        assert values["llama.rope.scaling.factor"] == pytest.approx(m.rope_scaling_factor)
        assert values["llama.rope.scaling.original_context_length"] == m.context_length
        assert any("ignores llama.rope.scaling" in line for line in lines)
    else:
        assert "llama.rope.scaling.type" not in values

    assert set(tensors) == set(gguf_tensor_names(m))
    assert ("output.weight" in tensors) == (m.unembedding != "tied")
    assert ("blk.0.ffn_gate.bias" in tensors) == m.w1_bias
    reader = gguf.GGUFReader(out / name)
    stored = {t.name: np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
    state = model.state_dict()
    np.testing.assert_array_equal(stored["blk.0.attn_v.weight"], state["layers.0.attention.wv.weight"].numpy())
    q = state["layers.1.attention.wq.weight"].numpy().reshape(m.n_heads, 2, hd // 2, m.dim)
    np.testing.assert_array_equal(stored["blk.1.attn_q.weight"].reshape(m.n_heads, hd // 2, 2, m.dim)[:, :, 0],
                                  q[:, 0])  # row 2j of a head is our row j, row 2j+1 our row j + hd/2
    if m.unembedding == "pinv":
        np.testing.assert_allclose(stored["output.weight"], model.unembedding_matrix().detach().numpy(), atol=1e-6)
    if m.w1_bias:
        np.testing.assert_array_equal(stored["blk.0.ffn_gate.bias"], state["layers.0.feed_forward.w1.bias"].numpy())

    assert values["tokenizer.ggml.model"] == "gpt2" and values["tokenizer.ggml.pre"] == PRE_TOKENIZER
    types = values["tokenizer.ggml.token_type"]
    tokens = values["tokenizer.ggml.tokens"]
    for token, token_id in tokenizer.special_ids.items():
        assert tokens[token_id] == token and types[token_id] == gguf.TokenType.CONTROL
    assert all(t == gguf.TokenType.UNUSED for t in types[tokenizer.vocab_size:])
    merges = values.get("tokenizer.ggml.merges")
    assert len(merges) == (0 if tokenizer.kind == "bytes" else len(tokens) - 256 - len(tokenizer.special_ids)
                           - (m.vocab_size - tokenizer.vocab_size))
    framing = recipe.data.framing
    prefix = frame_prefix(tokenizer, framing)
    assert values["tokenizer.ggml.add_bos_token"] == bool(prefix)
    assert values["tokenizer.ggml.add_eos_token"] is False
    if prefix:
        assert values["tokenizer.ggml.bos_token_id"] == prefix[0]
    story_end = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id}.get(framing)
    if story_end is not None:  # a BOS-framed story ends where the next one starts: llama.cpp must stop at BOS
        assert values["tokenizer.ggml.eos_token_id"] == story_end
        others = {tokenizer.bos_id, tokenizer.eos_id} - {story_end, None}
        assert values.get("tokenizer.ggml.eot_token_id") == (others.pop() if others else None)
    else:  # nothing ends a story: eos points at an id no story contains (here the NUL byte)
        assert tokens[values["tokenizer.ggml.eos_token_id"]] == "Ā"
        assert any("no end-of-story token" in line for line in lines)
    s = recipe.sample
    assert values["general.sampling.sequence"] == SAMPLER_SEQUENCE
    assert values["general.sampling.temp"] == pytest.approx(s.temperature)
    assert values["general.sampling.top_k"] == s.top_k and values["general.sampling.top_p"] == pytest.approx(s.top_p)
    assert values["general.sampling.min_p"] == pytest.approx(s.min_p)
    assert values["general.sampling.penalty_repeat"] == pytest.approx(s.repetition_penalty)
    assert values["general.sampling.penalty_last_n"] == -1


# ------------------------------------------------------------------------------------------ what is refused
@pytest.mark.parametrize("name", recipe_names())
def test_every_named_recipe_is_exportable_or_refused_in_one_line(tmp_path, tokenizers, name):
    recipe = load_recipe(name)
    model = build_model(recipe.model, device="meta")  # no weights: only names, shapes and refusals are checked
    problems = gguf_problems(recipe)
    if name in REFUSED:
        for word in REFUSED[name]:
            assert any(word in p for p in problems), (word, problems)
        if recipe.model.arch == "mixer":
            assert len(problems) == 1
        tokenizer = tokenizers(recipe)
        with pytest.raises(TinylmError) as err:
            export_gguf_model(model, recipe, tokenizer, tmp_path / "out", "q8_0")
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"recipe '{name}' cannot be exported to GGUF: ")
        assert not (tmp_path / "out").exists()
        return
    assert problems == []
    names = gguf_tensor_names(recipe.model)
    state = model.state_dict()
    assert all(ours in state for ours in names.values() if ours)
    assert ("output.weight" in names) == (recipe.model.unembedding != "tied")
    hd, kv = recipe.model.resolved_head_dim(), recipe.model.resolved_kv_heads()
    assert state["layers.0.attention.wk.weight"].shape == (kv * hd, recipe.model.dim)
    kept = {g.split(".", 2)[-1] for g, o in names.items()
            if o and state[o].dim() == 2 and storage_type(tuple(state[o].shape), "q8_0") != "q8_0"}
    # q8_0 quantises every matrix but llama2c-260k's ffn_down, whose rows (hidden_dim 172) do not fill Q8_0 blocks
    assert kept == ({"ffn_down.weight"} if name == "llama2c-260k" else set())


def test_refusals_and_replacing_an_export(tmp_path, make, tokenizers):
    model, recipe, tokenizer = make("tied-gqa")
    with pytest.raises(TinylmError, match="dtype must be one of f32, f16, q8_0"):
        export_gguf_model(model, recipe, tokenizer, tmp_path / "out", "q4_0")
    aurelius = load_recipe("aurelius-10m", SHRINK + ["tokenizer.vocab_size=300", "model.vocab_size=300"])
    problems = gguf_problems(aurelius, tokenizers(aurelius))
    assert len(problems) == 3  # suffix-space split, trailing-space normaliser, sink framing
    out, name, _ = export(tmp_path, model, recipe, tokenizer, "f16")
    assert sorted(p.name for p in out.iterdir()) == sorted([name, "manifest.json"])
    verify_manifest(out)
    export_gguf_model(model, recipe, tokenizer, out, "q8_0")  # the directory is replaced whole
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{recipe.name}-q8_0.gguf", "manifest.json"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(TinylmError, match="not written by tinylm"):
        export_gguf_model(model, recipe, tokenizer, tmp_path / "mine")


def test_export_from_a_run_directory(tmp_path, make):
    model, recipe, tokenizer = make("tied-gqa")
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_text(run / "recipe.toml", recipe_to_toml(recipe))
    tokenizer.save(run / "tokenizer.json")
    save_checkpoint(run / "checkpoints", 1, model, {"step": 1}, {"tokenizer_fingerprint": tokenizer.fingerprint()})
    lines = export_run(run, "gguf", tmp_path / "out", which="latest")
    assert lines[0].startswith(f"wrote {tmp_path / 'out' / (recipe.name + '-f32.gguf')}")
    mixer = tmp_path / "mixer"
    mixer.mkdir()
    atomic_write_text(mixer / "recipe.toml", recipe_to_toml(load_recipe("micromixer-100k")))
    with pytest.raises(TinylmError, match="MicroMixer"):  # refused before any checkpoint is looked for
        export_run(mixer, "gguf", tmp_path / "out2")


# ---------------------------------------------------------------------------------------------- llama.cpp
def _llama_cpp():
    """llama.cpp through llama-cpp-python, or else through llama-cpp-py-sync's prebuilt library; None when neither
    imports (neither is a dependency: building llama-cpp-python needs a C++ toolchain and minutes)."""
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        return "llama_cpp", llama_cpp
    try:
        import llama_cpp_py_sync
        from llama_cpp_py_sync._cffi_bindings import get_lib

        get_lib()  # its wheels need a recent glibc: a library that does not load is a skip, not an error
    except (ImportError, OSError, RuntimeError):
        return None
    return "llama_cpp_py_sync", llama_cpp_py_sync


class LlamaCpp:
    """What the test needs of llama.cpp: token ids and every position's logits (f32 KV cache, so exact)."""

    def __init__(self, path: Path, n_ctx: int):
        self.kind, module = LLAMA_CPP
        if self.kind == "llama_cpp":
            self.llm = module.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                                    verbose=False, type_k=0, type_v=0, n_threads=1)
        else:
            self.llm = module.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, verbose=False,
                                    type_k="f32", type_v="f32")

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        if self.kind == "llama_cpp":
            return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=False)
        return self.llm.tokenize(text, add_special=add_special, parse_special=False)

    def logits(self, ids: list[int]) -> np.ndarray:
        if self.kind == "llama_cpp":
            self.llm.reset()
            self.llm.eval(ids)
            return np.array(self.llm.scores[:len(ids)])
        lib, ffi, llm = self.llm._lib, self.llm._ffi, self.llm
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, 1
                batch.seq_id[i][0] = 0
            assert lib.llama_decode(llm._ctx, batch) == 0
            width = 4 * llm.n_vocab
            return np.stack([np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(llm._ctx, i), width), np.float32)
                             for i in range(len(ids))])
        finally:
            lib.llama_batch_free(batch)

    def end_ids(self, n_vocab: int) -> set[int] | None:
        if self.kind != "llama_cpp_py_sync":
            return None
        return {i for i in range(n_vocab) if self.llm._lib.llama_vocab_is_eog(self.llm._vocab, i)}


LLAMA_CPP = _llama_cpp()


@pytest.mark.skipif(LLAMA_CPP is None, reason="llama.cpp's Python bindings (llama_cpp) are not installed")
@pytest.mark.parametrize("case", ["tied-gqa", "untied-head32", "pinv-w1-bias", "linear-rope", "ntk-rope",
                                  "bytes-none", "gpt2-eos"])
def test_llama_cpp_tokenizes_and_computes_as_tinylm(tmp_path, make, validation, case):
    model, recipe, tokenizer = make(case)
    out, name, _ = export(tmp_path, model, recipe, tokenizer)
    llm = LlamaCpp(out / name, n_ctx=model.max_positions)
    texts = validation + ODD
    assert [llm.tokenize(t) for t in texts] == tokenizer.encode_batch(texts)  # the 'gpt-2' split is ours
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    assert llm.tokenize(validation[1], add_special=True) == prefix + tokenizer.encode(validation[1])
    ids = (prefix + tokenizer.encode(" ".join(validation[:3])))[:model.max_positions]  # linear: past the trained 64
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    np.testing.assert_allclose(llm.logits(ids), ours, atol=1e-4, rtol=0)
    ends = llm.end_ids(recipe.model.vocab_size)
    if ends is not None:
        expected = {tokenizer.bos_id, tokenizer.eos_id} - {None}
        assert ends == (expected or {0})  # where tinylm's generate_text stops (no specials: the NUL byte)



@pytest.mark.skipif(LLAMA_CPP is None or LLAMA_CPP[0] != "llama_cpp",
                    reason="llama-cpp-python (the llama_cpp module) is not installed")
def test_llama_cpp_writes_the_same_greedy_story(tmp_path, trained):
    """A trained model, prompted as users prompt llama.cpp: the same greedy text as tinylm's sampler writes, ending
    where tinylm's ends (llama.cpp adds the BOS and stops at the story-ending token itself)."""
    model, recipe, tokenizer = trained
    out, name, _ = export(tmp_path, model, recipe, tokenizer)
    llm = LLAMA_CPP[1].Llama(model_path=str(out / name), n_ctx=model.max_positions, verbose=False, n_threads=1)
    new_tokens = model.max_positions // 2  # well inside the context, where both stop by length alike
    greedy = Sampling(max_new_tokens=new_tokens, temperature=0)
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    for prompt in ("Once upon a time", "The little dog was sad because"):
        ours = generate_text(model, tokenizer, [prompt], greedy, prefix=prefix)[0]
        theirs = llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
        assert theirs["choices"][0]["text"] == ours
