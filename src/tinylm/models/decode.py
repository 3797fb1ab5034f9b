"""The fused one-token decode step of the LLaMA decoder, and the plain step any model can take through its forward.

`FastLlama` is an inference-only copy of a Llama's weights for one-token steps with fewer, fused operations per token;
`fast_llama(model)` keeps it with the model between generate calls until a weight changes. Its logits equal
model.forward's within float rounding (tests/test_generate.py).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinylm.models import rope
from tinylm.models.ops import onednn_packed


class FastLlama:
    """An inference-only copy of a Llama's weights for one-token steps (kept with the model: `fast_llama`).

    What stays constant is folded into the matrices: each RMSNorm gain into the matrix after it, 1/sqrt(head_dim) into
    wq (RoPE is linear, so the scale commutes), q/k/v into one matrix and w1/w3 into another; a pinv head is
    computed once. Matrices are stored transposed, (in, out), which is the faster layout for a one-row product.
    RMSNorm becomes one division, RMSNorm(x) @ W = (x / sqrt(|x|^2 + dim eps)) @ sqrt(dim) W, which costs half of
    rms_norm on a one-row step. RoPE angles are tabulated for every position. Logits equal
    model.forward's within ~1e-6.

    On a CPU in fp32, batches of PACKED_ROWS or more run on oneDNN with the matrices packed into its own layout, a
    second copy made the first time such a batch comes; fewer rows, and other devices, run torch.mm on the (in, out)
    matrices."""

    PACKED_ROWS = 4  # where the packed kernel overtakes torch.mm on this model family's shapes

    def __init__(self, model: nn.Module):
        c = model.config
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.resolved_kv_heads(), c.resolved_head_dim()
        self.hidden = c.resolved_hidden_dim()
        scale, root_dim = 1.0 / math.sqrt(self.head_dim), math.sqrt(c.dim)

        def stored(matrix: torch.Tensor) -> torch.Tensor:
            return matrix.t().contiguous()

        self.layers = []
        for layer in model.layers:
            att, ffn = layer.attention, layer.feed_forward
            wqkv = torch.cat([att.wq.weight * scale, att.wk.weight, att.wv.weight]) * layer.attention_norm.weight
            w13 = torch.cat([ffn.w1.weight, ffn.w3.weight]) * layer.ffn_norm.weight
            b13 = None if ffn.w1.bias is None else torch.cat([ffn.w1.bias, torch.zeros_like(ffn.w1.bias)])
            self.layers.append((stored(wqkv * root_dim), stored(att.wo.weight), stored(w13 * root_dim), b13,
                                stored(ffn.w2.weight)))
        self.embedding = model.tok_embeddings.weight
        dtype = self.embedding.dtype
        self.unembedding = stored((model.unembedding_matrix() * model.norm.weight * root_dim).to(dtype))
        self.norm_floor = torch.tensor(math.sqrt(c.dim * c.norm_eps), dtype=dtype, device=self.embedding.device)
        angles = rope.angles(0, model.max_positions, model.inv_freq)
        # Half-split RoPE on (heads, 2, head_dim/2) views: out = x * cos + swap_halves(x) * (-sin, +sin).
        self.cos = angles.cos().to(dtype)[:, None, None, :].contiguous()
        self.sin = torch.stack([-angles.sin(), angles.sin()], dim=1).to(dtype)[:, None].contiguous()
        self.onednn = onednn_packed() if self.embedding.device.type == "cpu" and dtype == torch.float32 else None
        self.packed = None  # (layers, unembedding) packed by oneDNN, made when first needed

    def _packed_weights(self) -> tuple[list, object]:
        if self.packed is None:
            def pack(matrix: torch.Tensor | None):  # biases stay as they are
                return matrix if matrix is None or matrix.dim() == 1 else self.onednn.pack(matrix.t().contiguous())
            self.packed = ([tuple(map(pack, layer)) for layer in self.layers], pack(self.unembedding))
        return self.packed

    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Feed one id per row, each at its row's position (cache.lengths); returns (batch, vocab) logits for the
        next position. Rows at different positions attend up to the furthest one, their later slots masked."""
        batch = ids.shape[0]
        heads, kv, hd = self.n_heads, self.n_kv, self.head_dim
        n_qk = (heads + kv) * hd
        pos, mask = cache.offsets(), None
        layers = len(self.layers)
        if isinstance(pos, torch.Tensor):
            end = int(pos.max()) + 1
            mask = torch.zeros((batch, 1, end), dtype=self.cos.dtype, device=ids.device)
            mask.masked_fill_(torch.arange(end, device=ids.device) > pos[:, None, None], -math.inf)
            rows = torch.arange(batch, device=ids.device)
            key_slots = [_RowSlots(cache.keys[layer], (rows, slice(None), slice(None), pos)) for layer in range(layers)]
            value_slots = [_RowSlots(cache.values[layer], (rows, slice(None), pos)) for layer in range(layers)]
        else:
            end = pos + 1
            key_slots, value_slots = cache.keys[..., pos].unbind(0), cache.values[:, :, :, pos].unbind(0)
        cos, sin = self.cos[pos], self.sin[pos]
        # This step's views of the cache, a few ops per step rather than per layer: each layer's slot at `pos`, and
        # its attended keys (stored transposed) and values with batch and kv heads in one dimension, ready for bmm.
        # `view` fails loudly rather than copy silently.
        keys_t = cache.keys.view(layers, batch * kv, hd, -1)[..., :end].unbind(0)
        values = cache.values.view(layers, batch * kv, -1, hd)[:, :, :end].unbind(0)
        if self.onednn is not None and batch >= self.PACKED_ROWS:
            layer_weights, unembedding = self._packed_weights()
            project, add_projected = self.onednn.linear, self.onednn.linear_add
        else:
            layer_weights, unembedding = self.layers, self.unembedding
            project, add_projected = _mm, torch.addmm

        def normed(x: torch.Tensor) -> torch.Tensor:
            return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.norm_floor)

        x = F.embedding(ids, self.embedding)
        for (wqkv, wo, w13, b13, w2), key_slot, value_slot, layer_keys_t, layer_values in zip(
                layer_weights, key_slots, value_slots, keys_t, values, strict=True):
            qkv = project(normed(x), wqkv, None)
            qk = qkv[:, :n_qk].view(batch, heads + kv, 2, hd // 2)
            qk = torch.addcmul(qk * cos, qk.flip(2), sin)
            key_slot.copy_(qk[:, heads:].reshape(batch, kv, hd))
            value_slot.copy_(qkv[:, n_qk:].view(batch, kv, hd))
            # Grouped-query attention without repeating k/v: query heads of one kv head form a (group, hd) block.
            q = qk[:, :heads].reshape(batch * kv, heads // kv, hd)
            scores = torch.bmm(q, layer_keys_t)
            if mask is not None:
                scores = (scores.view(batch, heads, end) + mask).view(batch * kv, heads // kv, end)
            weights = scores.softmax(dim=-1)
            out = torch.bmm(weights, layer_values).view(batch, heads * hd)
            x = add_projected(x, out, wo)
            gate_up = project(normed(x), w13, b13)
            x = add_projected(x, F.silu(gate_up[:, :self.hidden]) * gate_up[:, self.hidden:], w2)
        cache.advance(1)
        return project(normed(x), unembedding, None)


class _RowSlots:
    """Each row's slot at its own position in one layer's keys or values: `copy_` writes a (batch, ...) tensor
    there, as the uniform case's slice view does."""

    def __init__(self, tensor: torch.Tensor, index: tuple):
        self.tensor, self.index = tensor, index

    def copy_(self, rows: torch.Tensor) -> None:
        self.tensor[self.index] = rows


def _mm(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, matrix) if bias is None else torch.addmm(bias, x, matrix)


_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {kind: (weights' state, copy)}


def kept_copy(model: nn.Module, kind: str, build: Callable[[], object]):
    """`build()`'s copy of the model's weights for decoding (FastLlama, a compiled step), kept with the model between
    generate calls (building one copies every weight) and rebuilt once any parameter or buffer has changed: replaced
    (new storage) or updated in place (its version counter moves)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if any(t.is_inference() for t in tensors):  # inference tensors keep no version counter: nothing to compare
        return build()
    state = tuple((t.data_ptr(), t._version) for t in tensors)
    copies = _KEPT.setdefault(model, {})
    if kind not in copies or copies[kind][0] != state:
        copies[kind] = (state, build())
    return copies[kind][1]


def fast_llama(model: nn.Module) -> FastLlama:
    """The model's FastLlama, kept with it (`kept_copy`)."""
    return kept_copy(model, "fast", lambda: FastLlama(model))


def forward_step(model: nn.Module) -> Callable[[torch.Tensor, object], torch.Tensor]:
    """A one-token step through model.forward: any architecture, and the reference for the fused steps."""
    def step(ids: torch.Tensor, cache) -> torch.Tensor:
        return model(ids[:, None], cache=cache)[0][:, -1]
    return step
