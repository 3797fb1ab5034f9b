"""One sampling engine for every architecture: prefill the prompts into the model's cache, then decode one token at a
time from it (a KVCache for the LLaMA decoder, a MixerState for MicroMixer).

Prompts of different lengths share one batch without padding or masks: every row advances one position per step, in
lockstep. The shortest common length is prefilled in one chunk; after that a row still inside its prompt is fed its
next prompt token (what was sampled for it is dropped) and a row past its prompt is fed its own sample. So every row's
position is the batch's position, the cache's single `pos` is right for all of them, and a batch gives what each
prompt would give alone. Rows that have ended leave the batch once a quarter of it has ended.

Logits processors follow transformers' order: repetition penalty, temperature, top-k, top-p, min-p; temperature 0 is
greedy. LLaMA steps run on `FastLlama`, an inference-only copy of the weights with fewer, fused operations per token;
the copy is kept with the model between calls (`fast_llama`) until a weight changes.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import TinylmError
from .models import Llama
from .models.ops import onednn_packed
from .recipe import SampleConfig, validate_sampling

StreamFn = Callable[[int, int], None]  # (row, token id), as each new token arrives
StopFn = Callable[[int, list[int]], bool]  # (row, its new ids so far) -> True ends that row


# ---------------------------------------------------------------------------------------------- logits processors
def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on every id already in the sequence (prompt included): negative scores are multiplied by it,
    positive ones divided. `seen` is a (batch, vocab) bool mask of those ids."""
    if penalty == 1.0:
        return scores
    return torch.where(seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)


def apply_temperature(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    return scores if temperature == 1.0 else scores / temperature


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores (ties with the k-th kept too)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: drop the least likely tokens whose total probability stays within 1 - p (at least one is kept)."""
    if p >= 1.0:
        return scores
    ascending, order = torch.sort(scores, dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
    drop[..., -1] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), -math.inf)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens with probability >= min_p * p_max (the most likely token always stays, as min_p <= 1)."""
    if min_p <= 0.0:
        return scores
    probs = scores.softmax(dim=-1)
    return scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def process(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The processed scores (filtered tokens at -inf); at temperature 0 only the penalty applies."""
        scores = self._up_to_top_p(logits, seen)
        return scores if self.temperature == 0 else min_p_filter(scores, self.min_p)

    def weights(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """Sampling weights (temperature > 0): softmax(process(logits)) up to a per-row scale, as exp(scores - max),
        whose top weight is 1. So min-p keeps the weights >= min_p, and the work is two in-place passes over the
        vocabulary instead of a softmax, a maximum, a comparison and a masked fill (about half the time at batch 64)."""
        scores = self._up_to_top_p(logits, seen)
        weights = scores.sub(scores.amax(dim=-1, keepdim=True)).exp_()
        if self.min_p > 0:  # threshold keeps what is above its bound: the float32 just below min_p keeps min_p itself
            F.threshold_(weights, torch.nextafter(torch.tensor(self.min_p), torch.tensor(0.0)).item(), 0.0)
        return weights

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
        """One id per row: argmax at temperature 0, else a draw from softmax(processed scores)."""
        if self.temperature == 0:
            return self.process(logits, seen).argmax(dim=-1)
        return sample_from(self.weights(logits, seen), generator)

    def _up_to_top_p(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        scores = logits.float()
        if seen is not None:
            scores = apply_repetition_penalty(scores, seen, self.repetition_penalty)
        if self.temperature == 0:
            return scores
        return top_p_filter(top_k_filter(apply_temperature(scores, self.temperature), self.top_k), self.top_p)


def sample_from(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Inverse-CDF draw from non-negative (batch, vocab) weights, one uniform number per row (torch.multinomial
    costs milliseconds per step on a CPU). u < 1, so u * total < total (fp32 rounding included) and the first
    cumulative sum above it ends on an id of non-zero weight."""
    cdf = weights.cumsum(dim=-1)
    u = torch.rand((weights.shape[0], 1), generator=generator, device=weights.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=weights.shape[-1] - 1).squeeze(-1)


# --------------------------------------------------------------------------------------------- LLaMA decode path
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

    def __init__(self, model: Llama):
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
        positions = torch.arange(model.max_positions, device=model.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, model.inv_freq)
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
        """Feed one id per row at position cache.pos; returns (batch, vocab) logits for the next position."""
        pos, batch = cache.pos, ids.shape[0]
        heads, kv, hd = self.n_heads, self.n_kv, self.head_dim
        n_qk = (heads + kv) * hd
        cos, sin = self.cos[pos], self.sin[pos]
        # This step's views of the cache, a few ops per step rather than per layer: each layer's slot at `pos`, and
        # its attended keys (stored transposed) and values with batch and kv heads in one dimension, ready for bmm.
        # `view` fails loudly rather than copy silently.
        key_slots, value_slots = cache.keys[..., pos].unbind(0), cache.values[:, :, :, pos].unbind(0)
        layers = len(self.layers)
        keys_t = cache.keys.view(layers, batch * kv, hd, -1)[..., :pos + 1].unbind(0)
        values = cache.values.view(layers, batch * kv, -1, hd)[:, :, :pos + 1].unbind(0)
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
                layer_weights, key_slots, value_slots, keys_t, values):
            qkv = project(normed(x), wqkv, None)
            qk = qkv[:, :n_qk].view(batch, heads + kv, 2, hd // 2)
            qk = torch.addcmul(qk * cos, qk.flip(2), sin)
            key_slot.copy_(qk[:, heads:].reshape(batch, kv, hd))
            value_slot.copy_(qkv[:, n_qk:].view(batch, kv, hd))
            # Grouped-query attention without repeating k/v: query heads of one kv head form a (group, hd) block.
            q = qk[:, :heads].reshape(batch * kv, heads // kv, hd)
            weights = torch.bmm(q, layer_keys_t).softmax(dim=-1)
            out = torch.bmm(weights, layer_values).view(batch, heads * hd)
            x = add_projected(x, out, wo)
            gate_up = project(normed(x), w13, b13)
            x = add_projected(x, F.silu(gate_up[:, :self.hidden]) * gate_up[:, self.hidden:], w2)
        cache.advance(1)
        return project(normed(x), unembedding, None)


def _mm(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, matrix) if bias is None else torch.addmm(bias, x, matrix)


_FAST_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_llama(model: Llama) -> FastLlama:
    """The model's FastLlama, kept between generate calls (building one copies every weight) and rebuilt once any
    parameter or buffer has changed: replaced (new storage) or updated in place (its version counter moves)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if any(t.is_inference() for t in tensors):  # inference tensors keep no version counter: nothing to compare
        return FastLlama(model)
    state = tuple((t.data_ptr(), t._version) for t in tensors)
    kept = _FAST_COPIES.get(model)
    if kept is None or kept[0] != state:
        kept = _FAST_COPIES[model] = (state, FastLlama(model))
    return kept[1]


def _keep_rows(cache, keep: torch.Tensor) -> None:
    """Keep only the rows `keep` of a KVCache or MixerState: every state tensor holds the batch in dimension 1."""
    for name, value in vars(cache).items():
        if torch.is_tensor(value) and value.dim() > 1:
            setattr(cache, name, value.index_select(1, keep))


def _forward_step(model) -> Callable:
    def step(ids: torch.Tensor, cache) -> torch.Tensor:
        return model(ids[:, None], cache=cache)[0][:, -1]
    return step


# ------------------------------------------------------------------------------------------------------ the engine
@torch.inference_mode()
def generate(model, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             eos_id: int | Sequence[int] | None = None, seed: int | None = None, stop: StopFn | None = None,
             stream: StreamFn | None = None, fast: bool = True) -> list[list[int]]:
    """Continue each prompt (a list of ids, frame prefix included); returns the new ids of each row.

    A row ends at `eos_id` (one id or several; not included in its ids), when `stop(row, ids)` says so, after
    `max_new_tokens`, or when prompt plus new ids fill the model's context. `seed` makes sampling repeatable.
    `fast=False` decodes through model.forward instead of FastLlama (same results)."""
    validate_sampling(temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens)
    if seed is not None and not -2**63 <= seed < 2**64:  # what torch's generator can hold
        raise TinylmError(f"seed must be an integer in [-2**63, 2**64), got {seed}")
    prompts = [[int(i) for i in p] for p in prompts_ids]
    end_ids = set() if eos_id is None else {int(eos_id)} if isinstance(eos_id, int) else {int(i) for i in eos_id}
    context, vocab = model.max_positions, model.config.vocab_size
    for row, prompt in enumerate(prompts, 1):
        if not prompt:
            raise TinylmError(f"prompt {row} is empty: start it with the recipe's frame prefix (e.g. BOS)")
        if len(prompt) >= context:
            raise TinylmError(f"prompt {row} is {len(prompt)} tokens; the model's context holds {context}, so a "
                              f"prompt may have at most {context - 1}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise TinylmError(f"prompt {row} has ids outside the model's vocabulary of {vocab}")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]

    batch, lengths = len(prompts), [len(p) for p in prompts]
    budgets = [min(max_new_tokens, context - n) for n in lengths]
    end = max(n + b for n, b in zip(lengths, budgets))  # longest sequence; its last token is never fed back
    start, longest = min(lengths), max(lengths)
    device = model.tok_embeddings.weight.device
    table = torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device)
    in_prompt = torch.tensor(lengths, device=device)[:, None] > torch.arange(longest, device=device)
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if device.type == "cpu" and batch <= 4:
        # Ops this small gain nothing from a second thread, and lose 10x or more when another process holds a core.
        torch.set_num_threads(1)
    try:
        cache = model.new_cache(batch, max_len=end - 1)
        step = fast_llama(model).step if fast and isinstance(model, Llama) else _forward_step(model)
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros((batch, model.config.vocab_size), dtype=torch.bool, device=device)
            seen.scatter_(1, table[:, :start], True)
        logits = model(table[:, :start], cache=cache)[0][:, -1]
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * batch
        active = list(range(batch))  # the prompt each cache row holds (finished rows get dropped)
        pos = start  # the position whose token is chosen now
        while True:
            chosen = sampling.pick(logits, seen, generator)
            if pos < longest:
                chosen = torch.where(in_prompt[:, pos], table[:, pos], chosen)
            if seen is not None:
                seen.scatter_(1, chosen[:, None], True)
            for row, token in zip(active, chosen.tolist()):
                if done[row] or pos < lengths[row]:
                    continue
                if token in end_ids:
                    done[row] = True
                    continue
                new[row].append(token)
                if stream is not None:
                    stream(row, token)
                if len(new[row]) >= budgets[row] or (stop is not None and stop(row, new[row])):
                    done[row] = True
            if all(done):
                return new
            if 4 * sum(done[row] for row in active) >= len(active):  # a quarter has ended: stop computing them
                keep = torch.tensor([i for i, row in enumerate(active) if not done[row]], device=device)
                active = [row for row in active if not done[row]]
                chosen, table, in_prompt = chosen[keep], table[keep], in_prompt[keep]
                seen = None if seen is None else seen[keep]
                _keep_rows(cache, keep)
            logits = step(chosen, cache)
            pos += 1
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------------ text level
def recipe_sampling(sample: SampleConfig) -> dict:
    """The keyword arguments of `generate` that a recipe's [sample] section sets."""
    return {"max_new_tokens": sample.max_new_tokens, "temperature": sample.temperature, "top_k": sample.top_k,
            "top_p": sample.top_p, "min_p": sample.min_p, "repetition_penalty": sample.repetition_penalty}


class _TextWatcher:
    """Decodes each row's new ids as they arrive: ends a row at a stop string and streams only text that cannot
    turn into one (nor an unfinished UTF-8 character)."""

    def __init__(self, tokenizer, batch: int, stop: Sequence[str], stream: Callable[[int, str], None] | None):
        self.tokenizer, self.stop, self.stream = tokenizer, [s for s in stop if s], stream
        self.emitted = [0] * batch

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stop if s in text]
        return min(hits) if hits else None

    def __call__(self, row: int, ids: list[int]) -> bool:
        text = self.tokenizer.decode(ids)
        cut = self.cut(text)
        safe = cut if cut is not None else len(text.rstrip("\ufffd")) - self._held(text)
        self.emit(row, text[:safe])
        return cut is not None

    def _held(self, text: str) -> int:
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def emit(self, row: int, text: str) -> None:
        if self.stream is not None and len(text) > self.emitted[row]:
            self.stream(row, text[self.emitted[row]:])
            self.emitted[row] = len(text)


def generate_text(model, tokenizer, prompts: Sequence[str], prefix: Sequence[int] = (), stop: Sequence[str] = (),
                  stream: Callable[[int, str], None] | None = None, **settings) -> list[str]:
    """Continue each text prompt; returns the new text of each (ending before a stop string, if one occurs).

    `prefix` is the recipe's frame prefix (data.frame_prefix), so an empty prompt starts a story from BOS (or
    <sink> <s>). `stream(row, text)` receives text as it is decided. `settings` are generate's keyword arguments
    (recipe_sampling(recipe.sample) gives a recipe's). The tokenizer's EOS ends a row, and so does its BOS: a model
    trained on BOS-framed stories starts the next story with it."""
    prompts_ids = [list(prefix) + tokenizer.encode(p) for p in prompts]
    for row, ids in enumerate(prompts_ids, 1):
        if not ids:
            raise TinylmError(f"prompt {row} is empty and this recipe starts sequences with no special token "
                              "(framing 'none'): give some text to continue")
    watcher = _TextWatcher(tokenizer, len(prompts), stop, stream)
    use_watcher = bool(watcher.stop) or stream is not None
    end_ids = [i for i in (tokenizer.eos_id, tokenizer.bos_id) if i is not None]
    new = generate(model, prompts_ids, eos_id=end_ids, stop=watcher if use_watcher else None, **settings)
    texts = []
    for row, ids in enumerate(new):
        text = tokenizer.decode(ids)
        cut = watcher.cut(text)
        text = text if cut is None else text[:cut]
        watcher.emit(row, text)
        texts.append(text)
    return texts
