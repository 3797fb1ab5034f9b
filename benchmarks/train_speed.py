"""Training speed: tinylm's training step against transformers' LlamaForCausalLM, and against the machine's matmul rate.

    python benchmarks/train_speed.py [--rounds 10] [--steps 1] [--threads N] [--default-malloc]

Measured interleaved (round r times every contender in turn), so that other load on the machine touches all of them
alike; each figure is the best round (the least disturbed), the median is printed beside it.
- aurelius-4m: batch 16 x 256 tokens; micromixer-1m: its recipe's batch x 256. Our step is the trainer's own
  (tinylm.runtime.training_step: forward without logits, backward, clip, AdamW with llama2.c's groups), in a process
  set up as the trainer sets it up on a CPU (all cores, freed memory kept for reuse: runtime.keep_freed_memory).
- transformers: LlamaForCausalLM with aurelius-4m's configuration (SDPA attention, tied embeddings), the same batch,
  a plain loop: loss = model(input_ids=x, labels=x).loss; backward; AdamW (torch defaults) step; zero_grad. It runs
  twice: as a plain script runs it, in a fresh child process with glibc's allocator defaults (the headline ratio),
  and in our process with our allocator setting (the ratio of the step code alone).
- FLOPs per token = 6 N + 12 L (n_heads head_dim) T  (N: parameters that multiply, T: context; tinylm.monitor),
  for transformers the same formula with the same N; GFLOP/s = FLOPs per token x tokens per second.
- matmul peak: the best fp32 rate of a 2048 x 2048 product on the same threads, timed in the same rounds, with
  torch.mm (MKL) and with oneDNN's kernel (which tinylm trains with on a CPU); the peak is the faster of the two.
  Our rate is given as a fraction of both: of the peak, and of torch.mm's rate (what a plain PyTorch matmul gets).
--default-malloc runs everything in one process with glibc's defaults (tinylm's step as a plain script would get it).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys

import torch

from timing import interleaved_times
from tinylm.models import build_model
from tinylm.models.ops import onednn_matmul
from tinylm.recipe import load_recipe
from tinylm.train.optimizer import build_optimizer
from tinylm.train.runtime import keep_freed_memory, training_step


def ours(name: str, batch_size: int | None = None):
    recipe = load_recipe(name)
    torch.manual_seed(0)
    model = build_model(recipe.model)
    optimizer = build_optimizer(model, recipe.train, report=lambda *_: None)
    batch = batch_size or recipe.train.batch_size
    x = torch.randint(0, recipe.model.vocab_size, (batch, recipe.model.context_length))
    y = torch.randint(0, recipe.model.vocab_size, (batch, recipe.model.context_length))

    def step():
        training_step(model, optimizer, [(x, y)], recipe.train.grad_clip)

    flops = model.flops_per_token()
    return step, batch * recipe.model.context_length, flops


def transformers_llama(name: str, batch_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    m = load_recipe(name).model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.resolved_hidden_dim(),
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.resolved_kv_heads(), head_dim=m.resolved_head_dim(),
                         max_position_embeddings=m.context_length, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                         tie_word_embeddings=m.unembedding == "tied", attention_bias=False, mlp_bias=False,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, m.vocab_size, (batch_size, m.context_length))

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch_size * m.context_length


def _plain_transformers_worker(connection, threads: int) -> None:
    """Child process: transformers' step at glibc's defaults, one step per request."""
    torch.set_num_threads(threads)
    step, _ = transformers_llama("aurelius-4m", batch_size=16)
    while connection.recv():
        step()
        connection.send(True)


def plain_transformers(threads: int):
    """transformers' step in a fresh process (spawned, so no setting of ours reaches it); returns (step, stop)."""
    context = multiprocessing.get_context("spawn")
    ours_end, child_end = context.Pipe()
    child = context.Process(target=_plain_transformers_worker, args=(child_end, threads), daemon=True)
    child.start()

    def step():
        ours_end.send(True)
        ours_end.recv()

    def stop():
        ours_end.send(False)
        child.join()

    return step, stop


def matmul_contender(kernel: str, size: int = 2048):
    a, b = torch.randn(size, size), torch.randn(size, size)
    product = torch.mm if kernel == "torch" else onednn_matmul()

    def step():
        product(a, b)

    return step, 2.0 * size**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=1, help="steps per round and contender")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--default-malloc", action="store_true",
                        help="run every contender in this process with glibc's allocator defaults")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    contenders, stop = {}, None
    if not args.default_malloc:
        keep_freed_memory()
        contenders["transformers"], stop = plain_transformers(args.threads)

    aurelius, tokens, flops = ours("aurelius-4m", batch_size=16)
    mixer, mixer_tokens, mixer_flops = ours("micromixer-1m")
    same_process = "transformers" if args.default_malloc else "transformers-same-malloc"
    contenders.update({"aurelius-4m": aurelius, same_process: transformers_llama("aurelius-4m", batch_size=16)[0],
                       "micromixer-1m": mixer})
    kernels = ["torch"] + (["onednn"] if onednn_matmul() is not None else [])
    for kernel in kernels:
        contenders[f"matmul-{kernel}"], matmul_flops = matmul_contender(kernel)
    times = interleaved_times(contenders, args.rounds, args.steps)
    if stop is not None:
        stop()
    per_step = {name: min(t) for name, t in times.items()}
    rates = {kernel: matmul_flops / per_step.pop(f"matmul-{kernel}") for kernel in kernels}
    peak = max(rates.values())
    token_counts = {name: mixer_tokens if name == "micromixer-1m" else tokens for name in per_step}
    flop_counts = {name: mixer_flops if name == "micromixer-1m" else flops for name in per_step}

    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds, "
          f"{'all at glibc defaults' if args.default_malloc else 'transformers plain in a child process'}; "
          "fp32 2048^2 matmul, best round: "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()) + f"; peak = {peak / 1e9:.1f}")
    print(f"{'contender':<24} {'tokens/step':>11} {'best ms':>9} {'median ms':>10} {'tokens/s':>10} "
          f"{'GFLOP/s':>8} {'of peak':>8}")
    tokens_per_s = {}
    for name, best in per_step.items():
        tokens_per_s[name] = token_counts[name] / best
        rate = flop_counts[name] * tokens_per_s[name]
        print(f"{name:<24} {token_counts[name]:>11,} {best * 1e3:>9.1f} {statistics.median(times[name]) * 1e3:>10.1f} "
              f"{tokens_per_s[name]:>10,.0f} {rate / 1e9:>8.1f} {rate / peak:>8.1%}")
    ratio = per_step["transformers"] / per_step["aurelius-4m"]
    fraction = flop_counts["aurelius-4m"] * tokens_per_s["aurelius-4m"] / peak
    result = {"ratio_vs_transformers": round(ratio, 3)}
    summary = f"aurelius-4m vs transformers: {ratio:.2f}x"
    if "transformers-same-malloc" in per_step:
        result["ratio_vs_transformers_same_malloc"] = round(per_step["transformers-same-malloc"]
                                                           / per_step["aurelius-4m"], 3)
        summary += f" (vs transformers given our allocator setting: {result['ratio_vs_transformers_same_malloc']:.2f}x)"
    of_torch_mm = flop_counts["aurelius-4m"] * tokens_per_s["aurelius-4m"] / rates["torch"]
    print(f"{summary}; {fraction:.1%} of the matmul peak, {of_torch_mm:.1%} of torch.mm's rate "
          f"(FLOPs/token {flops:,.0f} = 6N + 12 L H Q T)")
    print(json.dumps({**result, "fraction_of_matmul_peak": round(fraction, 3),
                      "fraction_of_torch_mm_rate": round(of_torch_mm, 3),
                      "matmul_peak_gflops": round(peak / 1e9, 1),
                      "matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
                      "tokens_per_s": {k: round(v) for k, v in tokens_per_s.items()}}))


if __name__ == "__main__":
    sys.exit(main())
