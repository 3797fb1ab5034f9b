"""Each architecture's parameters as names and shapes, read from the recipe alone: `tinylm recipes` and `tinylm params`
count parameters without importing torch or building a model. tests/test_everyday_use.py checks every count against
the built model, tensor by tensor."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tinylm.recipe import ModelConfig

Shapes = list[tuple[str, tuple[int, ...]]]  # (parameter name, shape), in the model's named_parameters() order


@dataclass
class ParameterCount:
    total: int
    embedding: int
    by_module: OrderedDict[str, int]
    decayed: int
    decayed_tensors: int
    not_decayed: int
    not_decayed_tensors: int

    @property
    def without_embedding(self) -> int:
        return self.total - self.embedding


def module_group(name: str) -> str:
    """Where a parameter is counted in `by_module`: summed over layers (layers.attention.wq, ...)."""
    top = name.split(".")[0]
    return "layers." + ".".join(name.split(".")[2:-1]) if top == "layers" else top


def llama_shapes(c: ModelConfig) -> Shapes:
    """models/llama.py: RMSNorm weights, q/k/v/o projections (grouped keys and values), SwiGLU (w1 bias optional);
    an output matrix only when untied."""
    head_dim, kv, hidden = c.resolved_head_dim(), c.resolved_kv_heads(), c.resolved_hidden_dim()
    layer = [("attention_norm.weight", (c.dim,)),
             ("attention.wq.weight", (c.n_heads * head_dim, c.dim)), ("attention.wk.weight", (kv * head_dim, c.dim)),
             ("attention.wv.weight", (kv * head_dim, c.dim)), ("attention.wo.weight", (c.dim, c.n_heads * head_dim)),
             ("ffn_norm.weight", (c.dim,)), ("feed_forward.w1.weight", (hidden, c.dim))]
    layer += [("feed_forward.w1.bias", (hidden,))] if c.w1_bias else []
    layer += [("feed_forward.w2.weight", (c.dim, hidden)), ("feed_forward.w3.weight", (hidden, c.dim))]
    head = [("output.weight", (c.vocab_size, c.dim))] if c.unembedding == "untied" else []
    return _stack(c, layer, [("norm.weight", (c.dim,))] + head)


def mixer_shapes(c: ModelConfig) -> Shapes:
    """models/mixer.py: LayerNorms with biases, the HyperMix hypernetwork (summary, generate) and the channel MLP."""
    hidden = c.resolved_hidden_dim()
    layer = [("norm1.weight", (c.dim,)), ("norm1.bias", (c.dim,)),
             ("mix.summary.weight", (c.hyper_dim, c.dim)), ("mix.summary.bias", (c.hyper_dim,)),
             ("mix.generate.weight", (2 * c.dim, c.hyper_dim)), ("mix.generate.bias", (2 * c.dim,)),
             ("norm2.weight", (c.dim,)), ("norm2.bias", (c.dim,)),
             ("mlp.up.weight", (hidden, c.dim)), ("mlp.up.bias", (hidden,)),
             ("mlp.down.weight", (c.dim, hidden)), ("mlp.down.bias", (c.dim,))]
    return _stack(c, layer, [("norm.weight", (c.dim,)), ("norm.bias", (c.dim,))])


def _stack(c: ModelConfig, layer: Shapes, after: Shapes) -> Shapes:
    layers = [(f"layers.{i}.{name}", shape) for i in range(c.n_layers) for name, shape in layer]
    return [("tok_embeddings.weight", (c.vocab_size, c.dim)), *layers, *after]


SHAPES: dict[str, Callable[[ModelConfig], Shapes]] = {"llama": llama_shapes, "mixer": mixer_shapes}


def count_from_shapes(config: ModelConfig) -> ParameterCount:
    """What models.count_parameters says of the built model, from the shapes alone (llama2.c's decay split: weight
    decay on tensors of 2 or more dimensions)."""
    shapes = SHAPES[config.arch](config)
    by_module: OrderedDict[str, int] = OrderedDict()
    for name, shape in shapes:
        by_module[module_group(name)] = by_module.get(module_group(name), 0) + math.prod(shape)
    decayed = [math.prod(s) for _, s in shapes if len(s) >= 2]
    not_decayed = [math.prod(s) for _, s in shapes if len(s) < 2]
    return ParameterCount(total=sum(decayed) + sum(not_decayed), embedding=config.vocab_size * config.dim,
                          by_module=by_module, decayed=sum(decayed), decayed_tensors=len(decayed),
                          not_decayed=sum(not_decayed), not_decayed_tensors=len(not_decayed))
