"""The sampling engine: KV-cached logits against full forward passes, the fast LLaMA path against model.forward,
greedy decoding and every logits processor against transformers, batching, EOS/stop/context limits, the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tinylm.cli import main
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.errors import TinylmError
from tinylm.export.hf import hf_config, hf_state_dict
from tinylm.infer.engine import generate, generate_text
from tinylm.infer.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    processed_scores,
    sample_from,
    sampling_weights,
    top_k_filter,
    top_p_filter,
)
from tinylm.models import MixerState, build_model
from tinylm.models.decode import FastLlama, fast_llama, forward_step
from tinylm.models.ops import onednn_packed
from tinylm.recipe import ModelConfig, Sampling, load_recipe, recipe_to_toml
from tinylm.storage.atomic import atomic_write_text
from tinylm.train.checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(arch="llama", n_layers=2, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16,
             context_length=48, vocab_size=300)
VARIANTS = {
    "tied-gqa": SMALL,
    "untied-mha": {**SMALL, "n_kv_heads": 4, "unembedding": "untied"},
    "pinv-bias": {**SMALL, "unembedding": "pinv", "w1_bias": True, "head_dim": 0, "rope_theta": 500.0},
    "ntk": {**SMALL, "rope_scaling": "ntk", "rope_scaling_factor": 2.0},
    "wide-heads": {**SMALL, "head_dim": 24, "n_kv_heads": 1, "rope_scaling": "linear", "rope_scaling_factor": 1.5},
    "mixer": dict(arch="mixer", n_layers=2, dim=32, hidden_dim=48, hyper_dim=16, context_length=40, vocab_size=260),
}


def small_model(name: str, scale: float = 3.0, seed: int = 0):
    """A small random model; weights scaled up so logits are far from uniform (and greedy paths vary)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**VARIANTS[name])).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" not in name_:
                p.mul_(scale)
            if name_.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_logits_equal_full_forward(name):
    model = small_model(name)
    ids = torch.randint(0, model.config.vocab_size, (3, 30))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(3)
        chunk, _ = model(ids[:, :7], cache=cache)  # a prefill chunk, then one token at a time
        steps = [model(ids[:, t:t + 1], cache=cache)[0][:, 0] for t in range(7, 30)]
    torch.testing.assert_close(chunk, full[:, :7], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 7:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tied-gqa", "untied-mha", "pinv-bias", "ntk", "wide-heads"])
@pytest.mark.parametrize("batch", [2, 9])  # 9 rows take oneDNN's packed-weight linears on a CPU
def test_fast_path_equals_forward(name, batch):
    model = small_model(name)
    ids = torch.randint(0, model.config.vocab_size, (batch, 40))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(batch)
        model(ids[:, :5], cache=cache)
        fast = FastLlama(model)
        steps = torch.stack([fast.step(ids[:, t], cache) for t in range(5, 40)], 1)
    assert cache.pos == 40
    assert (fast.packed is not None) == (batch >= FastLlama.PACKED_ROWS and onednn_packed() is not None)
    torch.testing.assert_close(steps, full[:, 5:], atol=1e-5, rtol=0)


def test_fast_copy_is_kept_until_a_weight_changes():
    model = small_model("tied-gqa", scale=10.0)
    prompt = [[0, 17, 42, 99, 5]]

    def both_paths():
        greedy = Sampling(max_new_tokens=12, temperature=0)
        return [generate(model, prompt, greedy, fast=fast)[0] for fast in (True, False)]

    first = fast_llama(model)
    assert fast_llama(model) is first
    before = both_paths()
    assert before[0] == before[1]
    with torch.no_grad():
        model.layers[0].attention.wq.weight.mul_(-3.0)  # in place: same storage, new version
    assert fast_llama(model) is not first
    after = both_paths()
    assert after[0] == after[1] != before[0]
    w2 = model.layers[1].feed_forward.w2
    w2.weight = torch.nn.Parameter(torch.randn_like(w2.weight))
    changed = both_paths()
    assert changed[0] == changed[1] != after[0]


def hf_llama(model):
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = load_recipe("aurelius-4m")
    recipe.model = model.config
    tokenizer = type("T", (), {"bos_id": 0, "eos_id": 1, "pad_id": None})()
    config = {k: v for k, v in hf_config(recipe, tokenizer, model.max_positions).items() if k != "tinylm"}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied: lm_head is the embedding
    return hf


@pytest.mark.parametrize("name", ["tied-gqa", "untied-mha", "pinv-bias"])
@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_equals_transformers_generate(name, penalty):
    model = small_model(name, scale=10.0)
    hf = hf_llama(model)
    prompt = [0, 17, 42, 99, 5]
    greedy = Sampling(max_new_tokens=25, temperature=0, repetition_penalty=penalty)
    ours = generate(model, [prompt], greedy, eos_id=1)[0]
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=25, repetition_penalty=penalty, eos_token_id=1, pad_token_id=1)
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[:theirs.index(1)] if 1 in theirs else theirs  # ours leaves EOS out
    assert len(set(ours)) > 3  # a real path, not one token repeated
    assert ours == theirs


def test_processors_equal_transformers_warpers():
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    scores = torch.randn(6, 500) * 3
    input_ids = torch.randint(0, 500, (6, 40))
    seen = torch.zeros(6, 500, dtype=torch.bool).scatter_(1, input_ids, True)
    cases = [
        (apply_repetition_penalty(scores, seen, 1.3), RepetitionPenaltyLogitsProcessor(1.3)),
        (apply_repetition_penalty(scores, seen, 0.7), RepetitionPenaltyLogitsProcessor(0.7)),
        (apply_temperature(scores, 0.6), TemperatureLogitsWarper(0.6)),
        (top_k_filter(scores, 17), TopKLogitsWarper(17)),
        (top_p_filter(scores, 0.8), TopPLogitsWarper(0.8)),
        (top_p_filter(scores, 0.01), TopPLogitsWarper(0.01)),
        (min_p_filter(scores, 0.15), MinPLogitsWarper(0.15)),
        (min_p_filter(scores, 1.0), MinPLogitsWarper(1.0)),
    ]
    for ours, processor in cases:
        theirs = processor(input_ids, scores.clone())
        assert torch.equal(ours, theirs), type(processor).__name__
    # The whole chain in transformers' order.
    settings = Sampling(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(50), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)])
    processed = chain(input_ids, scores.clone())
    assert torch.equal(processed_scores(settings, scores, seen), processed)
    weights = sampling_weights(settings, scores, seen)  # what the sampler draws from
    torch.testing.assert_close(weights / weights.sum(-1, keepdim=True), processed.softmax(-1), atol=1e-7, rtol=1e-5)
    for min_p in (0.15, 1.0):  # min-p on weights keeps the same tokens as transformers' on probabilities
        kept = sampling_weights(Sampling(temperature=0.7, min_p=min_p), scores, None) > 0
        theirs = MinPLogitsWarper(min_p)(input_ids, TemperatureLogitsWarper(0.7)(input_ids, scores.clone()))
        assert torch.equal(kept, theirs > -math.inf)


def test_sample_from_follows_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05]).repeat(40000, 1)
    draws = sample_from(probs * 7.0, torch.Generator().manual_seed(0))  # weights need not sum to 1
    counts = torch.bincount(draws, minlength=5).float() / len(draws)
    assert counts[1] == 0  # a filtered token is never drawn
    torch.testing.assert_close(counts, probs[0], atol=0.01, rtol=0)


@pytest.mark.parametrize("name", ["tied-gqa", "mixer"])
def test_batch_equals_one_by_one(name):
    model = small_model(name, scale=10.0)
    prompts = [[3, 9, 27], [5], [8, 1, 4, 4, 9, 2, 7, 30, 31, 12], [2, 2], [40, 41]]
    sampling = Sampling(max_new_tokens=15, temperature=0, repetition_penalty=1.2)
    eos = generate(model, prompts[:1], sampling)[0][4]  # an id some rows produce: they end early
    single = [generate(model, [p], sampling, eos_id=eos)[0] for p in prompts]
    assert len({len(s) for s in single}) > 1  # rows of different lengths (finished rows leave the batch)
    assert generate(model, prompts, sampling, eos_id=eos) == single
    assert generate(model, prompts, sampling, eos_id=eos, fast=False) == single


def test_seed_makes_sampling_repeatable():
    model = small_model("tied-gqa", scale=1.0)
    sampling = Sampling(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01)
    a = generate(model, [[0, 5], [0]], sampling, seed=7)
    assert a == generate(model, [[0, 5], [0]], sampling, seed=7)
    assert a != generate(model, [[0, 5], [0]], sampling, seed=8)


class Counter(nn.Module):
    """A scripted model: the next token is always (last token + 1) mod vocab. Records every id fed at each position,
    so the test sees exactly what the engine fed."""

    def __init__(self, vocab: int = 20, context: int = 12):
        super().__init__()
        self.config = ModelConfig(arch="mixer", vocab_size=vocab, context_length=context, dim=2)
        self.tok_embeddings = nn.Embedding(vocab, 2)
        self.max_positions = context
        self.fed: list[list[int]] = []

    def new_cache(self, batch_size, max_len=None):
        return MixerState(1, batch_size, 2, "cpu")

    def decode_step(self, fast=True, compiled=None):
        return forward_step(self)

    def forward(self, ids, targets=None, cache=None):
        assert ids.shape[1] + max(cache.lengths) <= self.max_positions
        self.fed.append(ids.tolist())
        cache.advance(ids.shape[1])
        return torch.nn.functional.one_hot((ids + 1) % self.config.vocab_size, self.config.vocab_size).float() * 9, None


def test_engine_feeds_each_row_its_own_sequence():
    model = Counter(vocab=50, context=30)
    prompts = [[1, 2, 3, 4, 5], [10], [20, 30]]
    out = generate(model, prompts, Sampling(max_new_tokens=4, temperature=0))
    assert out == [[6, 7, 8, 9], [11, 12, 13, 14], [31, 32, 33, 34]]
    # Each prompt is prefilled in one pass (prompts of one length together), then every row is fed its own samples,
    # one per step, each at its own position; the last sample of a row is never fed.
    assert model.fed == [[[1, 2, 3, 4, 5]], [[10]], [[20, 30]], [[6], [11], [31]], [[7], [12], [32]], [[8], [13], [33]]]
    model.fed.clear()
    generate(model, [[1, 2], [7, 8], [4]], Sampling(max_new_tokens=2, temperature=0))
    assert model.fed == [[[1, 2], [7, 8]], [[4]], [[3], [9], [5]]]


def test_rows_ending_early_do_not_change_the_others():
    model = Counter(vocab=20, context=20)
    prompts = [[3], [7], [1], [15], [5, 5, 5], [0]]
    together = generate(model, prompts, Sampling(max_new_tokens=12, temperature=0), eos_id=6)
    assert together == [generate(model, [p], Sampling(max_new_tokens=12, temperature=0), eos_id=6)[0] for p in prompts]
    assert together[0] == [4, 5] and together[1] == list(range(8, 20))


def test_eos_stop_context_and_streaming():
    model = Counter(vocab=20, context=12)
    streamed = []
    out = generate(model, [[3], [7]], Sampling(max_new_tokens=50, temperature=0), eos_id=6,
                   stream=lambda row, token: streamed.append((row, token)))
    assert out[0] == [4, 5]  # EOS ends the row and is not returned
    assert out[1] == list(range(8, 19))  # the context is full at 12 tokens
    assert out[1] == [t for r, t in streamed if r == 1] and [t for r, t in streamed if r == 0] == [4, 5]
    greedy = Sampling(max_new_tokens=50, temperature=0)
    assert generate(model, [[1]], greedy, stop=lambda row, ids: ids[-1] == 9) == [[2, 3, 4, 5, 6, 7, 8, 9]]
    # room for one token only
    assert generate(model, [list(range(11))], Sampling(max_new_tokens=5, temperature=0)) == [[11]]
    with pytest.raises(TinylmError, match="context holds 12"):
        generate(model, [list(range(12))], Sampling(max_new_tokens=5))
    with pytest.raises(TinylmError, match="empty"):
        generate(model, [[]], Sampling(max_new_tokens=5))
    with pytest.raises(TinylmError, match="top_p"):
        generate(model, [[1]], Sampling(max_new_tokens=5, top_p=0))


def test_text_stop_strings_and_stream_hold_back():
    tokenizer = build_tokenizer(load_recipe("micromixer-100k").tokenizer)  # raw bytes: id == byte
    model = Counter(vocab=256, context=60)
    pieces = []
    texts = generate_text(model, tokenizer, ["ab", "x"], Sampling(max_new_tokens=30, temperature=0),
                          stop=["fg", "z{"], stream=lambda row, text: pieces.append((row, text)))
    assert texts == ["cde", "y"]
    assert "".join(t for r, t in pieces if r == 0) == "cde" and "".join(t for r, t in pieces if r == 1) == "y"
    assert all("f" not in t for _, t in pieces)  # the stop string's first letter was held back, never shown
    with pytest.raises(TinylmError, match="framing 'none'"):  # no start token to begin an empty prompt with
        generate_text(model, tokenizer, [""], Sampling(max_new_tokens=3))
    assert generate_text(model, tokenizer, [""], Sampling(max_new_tokens=3, temperature=0), prefix=[64]) == ["ABC"]


def make_run(path: Path, name: str = "aurelius-4m", sets: tuple[str, ...] = ()):
    recipe = load_recipe(name, ["tokenizer.kind=\"bytes\"", "tokenizer.vocab_size=258", "model.n_layers=2", *sets])
    tokenizer = build_tokenizer(recipe.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "recipe.toml", recipe_to_toml(recipe))
    tokenizer.save(path / "tokenizer.json")
    save_checkpoint(path / "checkpoints", 1, model, {"step": 1}, {"tokenizer_fingerprint": tokenizer.fingerprint()})
    return model, recipe, tokenizer


def test_cli_sample(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    assert main(["sample", str(run), "--prompt", "Once upon", "--max-new-tokens", "8", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("Once upon") and len(first) > len("Once upon\n")
    assert main(["sample", str(run), "--prompt", "Once upon", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first
    assert main(["sample", str(run), "--prompt", "a", "--prompt", "", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("a")
    assert main(["sample", str(run), "--min-p", "1.5"]) == 2
    assert "min_p" in capsys.readouterr().err
    assert main(["sample", str(run), "--prompt", "x" * 300]) == 2
    captured = capsys.readouterr()
    assert "context holds 256" in captured.err and captured.out == ""
