"""Generation speed: tinylm's engine against transformers' generate on the same weights, in the same process.

aurelius-4m with random weights, extended to 512 positions (linear RoPE x2, the card's extension) so that an 8-token
prompt plus 256 new tokens fit; temperature 0.5, min-p 0.15, EOS ignored so every row makes all 256 tokens.
Tokens/s = new tokens / wall time of the whole generate call (prefill included), the best of --repeats rounds (at
least 3) in which the runs take turns, so the ratio compares runs made under the same machine conditions. Both sides
run with --threads intra-op threads (default 1: on a small shared machine a second thread that waits for a busy core
costs far more than it gives; tinylm's generate uses 1 thread for batches up to 4 whatever the setting).
The compiled step (`generate(..., compiled=...)`, models/compiled.py) runs at batch 1 and 64 in the same rounds with
float32 and int8 weights; `compiled_batch{1,64}_vs_eager` are int8's ratios to the eager engine. Its first start
(building decode_step.cpp into an empty cache directory, then packing the weights) and a cached start (the built
library found, weights packed) are timed before the rounds.
When llama.cpp's Python bindings (llama_cpp) import, the same weights exported as GGUF (f32 and q8_0) run in
llama.cpp at batch 1 in the same rounds, with the same settings and --threads threads.
The last line is one JSON object.

    python benchmarks/generate_speed.py [--threads 1] [--repeats 3] [--new-tokens 256] [--hf-batch64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from functools import partial

import torch

from timing import interleaved_times
from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.export.gguf import export_gguf_model
from tinylm.export.hf import hf_config, hf_state_dict
from tinylm.infer.engine import generate
from tinylm.models import build_model
from tinylm.models.compiled import CompiledLlama
from tinylm.recipe import Sampling, TokenizerConfig, load_recipe

SETTINGS = dict(temperature=0.5, min_p=0.15)


def transformers_model(model, recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = type("Ids", (), {"bos_id": 0, "eos_id": 1, "pad_id": None})()
    config = {k: v for k, v in hf_config(recipe, tokenizer, model.max_positions).items() if k != "tinylm"}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf.load_state_dict(hf_state_dict(model), strict=False)  # tied: lm_head is the embedding
    return hf


def llama_cpp_runs(model, recipe, prompt: list[int], n: int, threads: int, folder: str) -> dict:
    """llama.cpp on the same weights (GGUF f32 and q8_0), batch 1; {} when llama_cpp does not import. The prompt's
    ids are fed as they are: the byte vocabulary written beside them only has to make the file valid."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    tokenizer = build_tokenizer(TokenizerConfig(kind="bytes", vocab_size=258))  # <s> </s> at 256, 257
    runs = {}
    for dtype in ("f32", "q8_0"):
        out = f"{folder}/{dtype}"
        export_gguf_model(model, recipe, tokenizer, out, dtype)
        llm = llama_cpp.Llama(model_path=f"{out}/{recipe.name}-{dtype}.gguf", n_ctx=model.max_positions,
                              n_threads=threads, n_batch=len(prompt), verbose=False)

        def run(batch: int, llm=llm) -> None:  # batch 1 only: llama-cpp-python decodes one sequence
            made = 0
            for _ in llm.generate(prompt, temp=SETTINGS["temperature"], min_p=SETTINGS["min_p"], top_k=0, top_p=1.0,
                                  repeat_penalty=1.0, reset=True):
                made += 1
                if made == n:
                    break
            assert made == n

        runs[f"llama_cpp_{dtype}_batch1"] = (1, run)
    return runs


def compile_seconds(model, folder: str) -> dict:
    """Seconds to a ready int8 compiled step: built into an empty cache directory, then with the build cached."""
    previous, os.environ["TINYLM_CACHE"] = os.environ.get("TINYLM_CACHE"), folder
    try:
        seconds = []
        for _ in range(2):
            started = time.perf_counter()
            CompiledLlama(model, "int8")
            seconds.append(time.perf_counter() - started)
    finally:
        if previous is None:
            del os.environ["TINYLM_CACHE"]
        else:
            os.environ["TINYLM_CACHE"] = previous
    return {"compile_seconds_first": seconds[0], "compile_seconds_cached": seconds[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (at least 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for both sides")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--hf-batch64", action="store_true", help="also time transformers at batch 64 (slow)")
    args = parser.parse_args()
    torch.manual_seed(0)
    recipe = load_recipe("aurelius-4m", ["model.rope_scaling=\"linear\"", "model.rope_scaling_factor=2.0"])
    model = build_model(recipe.model).eval()
    n, vocab = args.new_tokens, recipe.model.vocab_size
    prompts = torch.randint(2, vocab, (64, args.prompt_tokens)).tolist()
    for p in prompts:
        p[0] = 0  # BOS

    def ours(batch: int, compiled: str | None = None) -> None:
        out = generate(model, prompts[:batch], Sampling(max_new_tokens=n, **SETTINGS), eos_id=None, seed=0,
                       compiled=compiled)
        assert all(len(row) == n for row in out)

    hf = transformers_model(model, recipe)

    def theirs(batch: int) -> None:
        ids = torch.tensor(prompts[:batch])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                              max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0, **SETTINGS)
        assert out.shape[1] == ids.shape[1] + n

    torch.set_num_threads(args.threads)  # both sides alike
    # generate itself uses 1 thread up to batch 4; a batch-1 run takes a fraction of a second: at least three rounds
    runs = {"batch1": (1, ours), "transformers_batch1": (1, theirs), "batch64": (64, ours)}
    for dtype in ("float32", "int8"):
        for batch in (1, 64):
            runs[f"compiled_{dtype}_batch{batch}"] = (batch, partial(ours, compiled=dtype))
    if args.hf_batch64:
        runs["transformers_batch64"] = (64, theirs)
    with tempfile.TemporaryDirectory() as folder:
        compiling = compile_seconds(model, folder)
        runs.update(llama_cpp_runs(model, recipe, prompts[0], n, args.threads, folder))
        times = interleaved_times({name: partial(fn, batch) for name, (batch, fn) in runs.items()},
                                  max(3, args.repeats))
    result = {f"{name}_tokens_per_s": batch * n / min(times[name]) for name, (batch, _) in runs.items()}
    result["ratio_batch1"] = result["batch1_tokens_per_s"] / result["transformers_batch1_tokens_per_s"]
    for dtype in ("float32", "int8"):
        for batch in (1, 64):
            result[f"compiled_{dtype}_batch{batch}_vs_eager"] = (result[f"compiled_{dtype}_batch{batch}_tokens_per_s"]
                                                                 / result[f"batch{batch}_tokens_per_s"])
    for batch in (1, 64):
        result[f"compiled_batch{batch}_vs_eager"] = result[f"compiled_int8_batch{batch}_vs_eager"]
    result.update(compiling)
    for dtype in ("f32", "q8_0"):
        if f"llama_cpp_{dtype}_batch1_tokens_per_s" in result:
            result[f"ratio_batch1_vs_llama_cpp_{dtype}"] = (result["batch1_tokens_per_s"]
                                                           / result[f"llama_cpp_{dtype}_batch1_tokens_per_s"])
    result.update(threads=args.threads, new_tokens=n, torch=torch.__version__)
    print(f"tinylm batch 1:        {result['batch1_tokens_per_s']:9.0f} tokens/s")
    print(f"tinylm batch 64:       {result['batch64_tokens_per_s']:9.0f} tokens/s (all rows together)")
    print(f"transformers batch 1:  {result['transformers_batch1_tokens_per_s']:9.0f} tokens/s")
    if "transformers_batch64_tokens_per_s" in result:
        print(f"transformers batch 64: {result['transformers_batch64_tokens_per_s']:9.0f} tokens/s")
    for dtype in ("float32", "int8"):
        for batch in (1, 64):
            name = f"compiled_{dtype}_batch{batch}"
            print(f"compiled {dtype:<7} batch {batch:<2}: {result[f'{name}_tokens_per_s']:7.0f} tokens/s "
                  f"({result[f'{name}_vs_eager']:.2f}x the eager engine)")
    print(f"compiled step's first start {result['compile_seconds_first']:.1f} s, cached start "
          f"{result['compile_seconds_cached']:.2f} s")
    for dtype in ("f32", "q8_0"):
        if f"llama_cpp_{dtype}_batch1_tokens_per_s" in result:
            print(f"llama.cpp {dtype:<4} batch 1: {result[f'llama_cpp_{dtype}_batch1_tokens_per_s']:8.0f} tokens/s")
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
