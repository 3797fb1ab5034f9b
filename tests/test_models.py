"""Numerics of both architectures against independent references: transformers' Llama, a full forward pass versus
incremental decoding, causality, and gradients through the pseudo-inverse head."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tinylm.models import build_model
from tinylm.recipe import ModelConfig, load_recipe

torch.manual_seed(0)


def small_llama(**changes) -> ModelConfig:
    base = ModelConfig(arch="llama", n_layers=2, dim=48, hidden_dim=96, n_heads=6, n_kv_heads=2, head_dim=8,
                       context_length=64, vocab_size=97, unembedding="tied", rope_theta=10000.0, norm_eps=1e-5)
    return dataclasses.replace(base, **changes)


def hf_twin(config: ModelConfig, model) -> LlamaForCausalLM:
    """A transformers Llama with the same weights; our RoPE is HF's half-split layout, so no permutation."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": config.rope_theta, "factor": config.rope_scaling_factor}
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.resolved_hidden_dim(),
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.resolved_kv_heads(), head_dim=config.resolved_head_dim(),
        max_position_embeddings=model.max_positions, rms_norm_eps=config.norm_eps, rope_parameters=rope,
        tie_word_embeddings=config.unembedding == "tied", attention_dropout=0.0,
    )
    hf = LlamaForCausalLM(hf_config).eval()
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
             "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    mapped = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if model.output is not None:
        mapped["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        for ours, theirs in names.items():
            module = layer.get_submodule(ours)
            mapped[f"model.layers.{i}.{theirs}.weight"] = module.weight
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in mapped.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    if config.unembedding == "tied":
        hf.tie_weights()
    return hf


@pytest.mark.parametrize("changes", [
    {},  # tied, grouped-query
    {"unembedding": "untied"},
    {"n_kv_heads": 6},  # multi-head
    {"rope_theta": 812.5},
    {"rope_scaling": "linear", "rope_scaling_factor": 2.0},
    {"head_dim": 16, "n_kv_heads": 3},  # head_dim independent of dim / n_heads
])
def test_llama_matches_transformers(changes):
    config = small_llama(**changes)
    model = build_model(config).eval()
    hf = hf_twin(config, model)
    ids = torch.randint(0, config.vocab_size, (3, model.max_positions))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_named_recipe_matches_transformers():
    config = dataclasses.replace(load_recipe("aurelius-10m").model, n_layers=2)  # rope 812.5, GQA 6/2, head_dim 64
    model = build_model(config).eval()
    hf = hf_twin(config, model)
    ids = torch.randint(0, config.vocab_size, (2, 100))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)


def test_ntk_scaling_equals_a_larger_base():
    scaled = small_llama(rope_scaling="ntk", rope_scaling_factor=2.0)
    model = build_model(scaled).eval()
    assert model.max_positions == 128
    hd = scaled.resolved_head_dim()
    plain = small_llama(rope_theta=10000.0 * 2.0 ** (hd / (hd - 2)), context_length=128)
    hf = hf_twin(plain, model)
    ids = torch.randint(0, scaled.vocab_size, (1, 128))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)


def incremental_logits(model, ids, first_chunk):
    cache = model.new_cache(ids.shape[0])
    outputs = [model(ids[:, :first_chunk], cache=cache)[0]]
    for t in range(first_chunk, ids.shape[1]):
        outputs.append(model(ids[:, t:t + 1], cache=cache)[0])
    return torch.cat(outputs, dim=1)


CACHE_CASES = {
    "llama-gqa-tied": small_llama(),
    "llama-untied": small_llama(unembedding="untied"),
    "llama-pinv-bias": small_llama(unembedding="pinv", w1_bias=True, n_kv_heads=6),
    "mixer-quirk": ModelConfig(arch="mixer", n_layers=3, dim=32, hidden_dim=64, context_length=40, vocab_size=256),
    "mixer-standard": ModelConfig(arch="mixer", n_layers=2, dim=32, hidden_dim=64, context_length=40, vocab_size=256,
                                  embedding_rotary="standard"),
}


@pytest.mark.parametrize("name", sorted(CACHE_CASES))
@pytest.mark.parametrize("first_chunk", [1, 7])
def test_incremental_decoding_equals_full_forward(name, first_chunk):
    config = CACHE_CASES[name]
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 33))
    with torch.no_grad():
        full, _ = model(ids)
        step = incremental_logits(model, ids, first_chunk)
    assert torch.allclose(full, step, atol=1e-5, rtol=0), (full - step).abs().max()


def test_cache_chunks_after_a_prefix():
    """A second multi-token chunk sees the earlier tokens and is causal within itself."""
    model = build_model(small_llama()).eval()
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        full, _ = model(ids)
        cache = model.new_cache(1)
        first, _ = model(ids[:, :10], cache=cache)
        second, _ = model(ids[:, 10:], cache=cache)
    assert torch.allclose(full, torch.cat([first, second], 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rotary", ["quirk", "standard"])
def test_mixer_is_causal(rotary):
    config = ModelConfig(arch="mixer", n_layers=3, dim=32, hidden_dim=64, context_length=64, vocab_size=256,
                         embedding_rotary=rotary)
    model = build_model(config).eval()
    ids = torch.randint(0, 256, (1, 64))
    for t in (0, 17, 63):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % 256
        with torch.no_grad():
            before, after = model(ids)[0], model(changed)[0]
        assert torch.equal(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t], after[:, t])


def test_mixer_rotary_quirk_is_not_norm_preserving():
    from tinylm.models.mixer import embedding_rotation

    x = torch.randn(1, 20, 32)
    quirk = embedding_rotation(x, 0, "quirk")
    standard = embedding_rotation(x, 0, "standard")
    assert torch.allclose(standard.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(quirk[:, 1:].norm(dim=-1), x[:, 1:].norm(dim=-1), atol=1e-3)
    assert torch.allclose(quirk[:, 0], x[:, 0])  # position 0 turns by nothing


def test_llama_is_causal():
    model = build_model(small_llama()).eval()
    ids = torch.randint(0, 97, (1, 40))
    changed = ids.clone()
    changed[0, 20] = (changed[0, 20] + 1) % 97
    with torch.no_grad():
        assert torch.allclose(model(ids)[0][:, :20], model(changed)[0][:, :20], atol=1e-6)


def test_pinv_head_passes_gradients_to_the_embedding():
    config = load_recipe("simpler-llama-834k").model
    model = build_model(config)
    assert model.output is None
    ids = torch.randint(0, config.vocab_size, (2, 16))
    _, loss = model(ids, targets=ids)
    loss.backward()
    grad = model.tok_embeddings.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # The head really is the pseudo-inverse: E^T-shaped, and pinv(E) E = I on the embedding's row space.
    head = model.unembedding_matrix()
    embedding = model.tok_embeddings.weight
    assert head.shape == embedding.shape
    assert torch.allclose(head.t() @ embedding, torch.eye(config.dim), atol=1e-4)
    assert model.layers[0].feed_forward.w1.bias is not None and model.layers[0].feed_forward.w3.bias is None


def test_mixer_matches_its_spec_formula_by_hand():
    """HyperMix output for one layer computed by hand from the MicroMixer card's equations."""
    import torch.nn.functional as F

    config = ModelConfig(arch="mixer", n_layers=1, dim=8, hidden_dim=16, hyper_dim=4, context_length=10,
                         vocab_size=256, embedding_rotary="none", dropout=0.0)
    model = build_model(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 256, (1, 10))
    x = model.tok_embeddings.weight[ids[0]]
    layer = model.layers[0]
    u = F.layer_norm(x, (8,), layer.norm1.weight, layer.norm1.bias, 1e-5)
    mean = torch.stack([u[: t + 1].mean(0) for t in range(10)])
    w = layer.mix.generate(F.gelu(layer.mix.summary(mean)))
    x = x + u * w[:, :8] + w[:, 8:]
    v = F.layer_norm(x, (8,), layer.norm2.weight, layer.norm2.bias, 1e-5)
    x = x + layer.mlp.down(F.gelu(layer.mlp.up(v)))
    logits = F.layer_norm(x, (8,), model.norm.weight, model.norm.bias, 1e-5) @ model.tok_embeddings.weight.t()
    with torch.no_grad():
        assert torch.allclose(model(ids)[0][0], logits, atol=1e-5)
