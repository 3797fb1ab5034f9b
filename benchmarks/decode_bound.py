"""Where a batch-1 decode step's time goes, and what the roads to a faster one measure on this machine.

aurelius-4m with random weights (16 MB of fp32 matrices read once per token). In one run:

1. the eager step (FastLlama) under torch.profiler: the share of its CPU time spent in matrix products;
2. one token's matrix products alone, the 8 layers' and the head's in order (so the weights stream through the caches
   as in a step): torch.mm in fp32 against bf16 weights (torch.mm) and PyTorch's weight-only int8 and int4 kernels
   (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, the kernels torchao's CPU paths call), with each one's error
   against fp32;
3. the whole eager step with the model in bf16, its products on oneDNN's packed bf16 weights (AMX tiles where the
   CPU has them), against the fp32 step at batch 1 and 64, with the logits' relative error;
4. the whole step compiled by torch.compile (fullgraph; Inductor's C++ kernels and C++ wrapper; a static cache whose
   later positions are masked, as gpt-fast does) against the eager step, at batch 1 and 64, and the compile's seconds.

The contenders take turns round by round (timing.interleaved_times). The last line is JSON.

    python benchmarks/decode_bound.py [--rounds 5] [--steps 100] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from timing import interleaved_times
from tinylm.models import build_model
from tinylm.models.decode import FastLlama, fast_llama
from tinylm.models.ops import onednn_packed
from tinylm.recipe import load_recipe

CONTEXT = 256


def matrices(fast) -> list[torch.Tensor]:
    """The step's (in, out) matrices in the order a step reads them."""
    return [m for layer in fast.layers for m in (layer[0], layer[1], layer[2], layer[4])] + [fast.unembedding]


def low_precision_products(weights: list[torch.Tensor]) -> dict[str, list]:
    """For each weight form, the list of one-token products (callables) and their inputs' shapes."""
    x = {w.shape[0]: torch.randn(1, w.shape[0]) for w in weights}
    forms = {"fp32": [lambda w=w: torch.mm(x[w.shape[0]], w) for w in weights]}
    bf16 = [(w.to(torch.bfloat16), x[w.shape[0]].to(torch.bfloat16)) for w in weights]
    forms["bf16"] = [lambda w=w, xb=xb: torch.mm(xb, w) for w, xb in bf16]
    int8, int4 = [], []
    for w in weights:
        out_in = w.t().contiguous()
        scale = out_in.abs().amax(dim=1) / 127  # per output channel
        q8 = torch.round(out_in / scale[:, None]).clamp(-127, 127).to(torch.int8)
        int8.append(lambda q=q8, s=scale, xi=x[w.shape[0]]: torch.ops.aten._weight_int8pack_mm(xi, q, s))
        groups = out_in.view(out_in.shape[0], -1, 32)  # groups of 32 inputs, one scale each, zero point 8
        scale4 = (groups.abs().amax(dim=-1, keepdim=True) / 7).clamp(min=1e-8)
        q4 = (torch.round(groups / scale4) + 8).clamp(0, 15).to(torch.int32).view_as(out_in)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
        scales_zeros = torch.stack([scale4[..., 0].t(), torch.zeros_like(scale4[..., 0]).t()], dim=-1).contiguous()
        int4.append(lambda p=packed, sz=scales_zeros, xi=x[w.shape[0]]:
                    torch.ops.aten._weight_int4pack_mm_for_cpu(xi, p, 32, sz))
    forms["int8"], forms["int4"] = int8, int4
    return forms


def relative_error(reference: list, other: list) -> float:
    return max(((a().float() - b().float()).norm() / a().norm()).item() for a, b in zip(reference, other, strict=True))


def static_step(fast):
    """The step over a static cache (every position attended, later ones masked): the form torch.compile captures
    whole. `keys_t`: one (batch, kv, head_dim, CONTEXT) tensor per layer, `values` one (batch, kv, CONTEXT, head_dim)
    (each a graph input of its own, written in place: a view of one tensor for all layers is copied whole instead)."""
    heads, kv, hd, hidden = fast.n_heads, fast.n_kv, fast.head_dim, fast.hidden

    def normed(x):
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), fast.norm_floor)

    def step(ids, pos, keys_t, values):
        batch, n_qk = ids.shape[0], (heads + kv) * hd
        cos, sin = fast.cos.index_select(0, pos)[0], fast.sin.index_select(0, pos)[0]
        later = torch.arange(CONTEXT) > pos
        x = F.embedding(ids, fast.embedding)
        for layer, (wqkv, wo, w13, b13, w2) in enumerate(fast.layers):
            qkv = normed(x) @ wqkv
            qk = qkv[:, :n_qk].view(batch, heads + kv, 2, hd // 2)
            qk = torch.addcmul(qk * cos, qk.flip(2), sin)
            keys_t[layer].index_copy_(3, pos, qk[:, heads:].reshape(batch, kv, hd, 1))
            values[layer].index_copy_(2, pos, qkv[:, n_qk:].view(batch, kv, 1, hd))
            q = qk[:, :heads].reshape(batch * kv, heads // kv, hd)
            scores = torch.bmm(q, keys_t[layer].view(batch * kv, hd, CONTEXT)).masked_fill(later, -torch.inf)
            x = x + torch.bmm(scores.softmax(dim=-1), values[layer].view(batch * kv, CONTEXT, hd)).view(
                batch, heads * hd) @ wo
            gate_up = normed(x) @ w13 if b13 is None else torch.addmm(b13, normed(x), w13)
            x = x + (F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:]) @ w2
        return normed(x) @ fast.unembedding

    return step


def compiled_against_eager(model, fast, batch: int, steps: int, rounds: int) -> dict:
    step = static_step(fast)
    cache = model.new_cache(batch, max_len=CONTEXT)
    keys, values = list(torch.zeros_like(cache.keys)), list(torch.zeros_like(cache.values))
    ids = torch.randint(0, model.config.vocab_size, (batch,))
    started = time.perf_counter()
    compiled = torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    compiled(ids, torch.tensor([0]), keys, values)
    compile_s = time.perf_counter() - started
    reference = fast.step(ids, model.new_cache(batch, max_len=CONTEXT))
    for tensor in keys + values:
        tensor.zero_()
    error = (compiled(ids, torch.tensor([0]), keys, values) - reference).abs().max().item()

    def eager() -> None:
        cache.lengths = [0] * batch
        for _ in range(steps):
            fast.step(ids, cache)

    def whole() -> None:
        for position in range(steps):
            compiled(ids, torch.tensor([position]), keys, values)

    times = interleaved_times({"eager": eager, "compiled": whole}, rounds)
    eager_s, compiled_s = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"eager_tokens_per_s": batch * steps / eager_s, "compiled_tokens_per_s": batch * steps / compiled_s,
            "compiled_vs_eager": eager_s / compiled_s, "compile_seconds": compile_s, "max_logit_difference": error}


def bf16_step_against_fp32(model, fast, batch: int, steps: int, rounds: int) -> dict:
    """The eager step of a bf16 copy of the model (its products on packed bf16 weights) against the fp32 step, taking
    turns, and the relative error of its first logits."""
    low = copy.deepcopy(model).to(torch.bfloat16)
    fast_low = FastLlama(low)
    fast_low.onednn = onednn_packed()  # the packed ops take bf16 weights as they take fp32 ones
    ids = torch.randint(0, model.config.vocab_size, (batch,))
    reference = fast.step(ids, model.new_cache(batch, max_len=CONTEXT))
    error = (fast_low.step(ids, low.new_cache(batch, max_len=CONTEXT)).float() - reference).norm() / reference.norm()

    def decode(step, cache) -> None:
        cache.lengths = [0] * batch
        for _ in range(steps):
            step(ids, cache)

    caches = {"fp32": model.new_cache(batch, max_len=CONTEXT), "bf16": low.new_cache(batch, max_len=CONTEXT)}
    times = interleaved_times({"fp32": lambda: decode(fast.step, caches["fp32"]),
                               "bf16": lambda: decode(fast_low.step, caches["bf16"])}, rounds)
    fp32_s, bf16_s = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"fp32_tokens_per_s": batch * steps / fp32_s, "bf16_tokens_per_s": batch * steps / bf16_s,
            "bf16_vs_fp32": fp32_s / bf16_s, "logits_relative_error": error.item()}


def matmul_share(model, fast, steps: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(1, max_len=CONTEXT)
    ids = torch.zeros(1, dtype=torch.long)
    fast.step(ids, cache)
    cache.lengths = [0]
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(steps):
            fast.step(ids, cache)
    rows = trace.key_averages()
    total = sum(row.self_cpu_time_total for row in rows)
    return sum(row.self_cpu_time_total for row in rows if row.key in ("aten::mm", "aten::addmm")) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="decode steps per timed round")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes on a small machine)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine decodes up to 4 rows on one thread
    torch.manual_seed(0)
    model = build_model(load_recipe("aurelius-4m").model).eval()
    result = {"threads": 1, "torch": torch.__version__}
    with torch.inference_mode():
        fast = fast_llama(model)
        result["eager_step_matmul_share"] = matmul_share(model, fast, args.steps)
        forms = low_precision_products(matrices(fast))
        times = interleaved_times({name: lambda calls=calls: [c() for c in calls] for name, calls in forms.items()},
                                  args.rounds, steps=args.steps)
        per_token = {name: statistics.median(t) * 1e6 for name, t in times.items()}
        result["products_us_per_token"] = per_token
        result["products_vs_fp32"] = {name: per_token["fp32"] / us for name, us in per_token.items()}
        result["products_relative_error"] = {name: relative_error(forms["fp32"], calls)
                                             for name, calls in forms.items() if name != "fp32"}
        if onednn_packed() is not None:
            for batch in (1, 64):
                result[f"bf16_step_batch{batch}"] = bf16_step_against_fp32(model, fast, batch, args.steps, args.rounds)
        if not args.no_compile:
            with tempfile.TemporaryDirectory() as cache_dir:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
                for batch in (1, 64):
                    result[f"batch{batch}"] = compiled_against_eager(model, fast, batch, args.steps, args.rounds)
    print(f"eager step, batch 1: {100 * result['eager_step_matmul_share']:.0f}% of its CPU time in mm/addmm")
    for name, us in per_token.items():
        print(f"one token's products, {name:>4}: {us:7.0f} us ({result['products_vs_fp32'][name]:.2f}x fp32's speed)")
    for batch in (1, 64):
        if f"bf16_step_batch{batch}" in result:
            r = result[f"bf16_step_batch{batch}"]
            print(f"batch {batch}: fp32 step {r['fp32_tokens_per_s']:.0f}, bf16 step {r['bf16_tokens_per_s']:.0f} "
                  f"tokens/s ({r['bf16_vs_fp32']:.2f}x; logits' relative error {r['logits_relative_error']:.4f})")
    for batch in (1, 64):
        if f"batch{batch}" in result:
            r = result[f"batch{batch}"]
            print(f"batch {batch}: eager {r['eager_tokens_per_s']:.0f}, compiled {r['compiled_tokens_per_s']:.0f} "
                  f"tokens/s ({r['compiled_vs_eager']:.2f}x; compiled in {r['compile_seconds']:.0f} s)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
