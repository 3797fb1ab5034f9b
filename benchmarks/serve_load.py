"""Server load: `tinylm serve` under 1, 8, 32 and 64 concurrent streaming clients, beside the offline engine.

The model is aurelius-4m with random weights, extended to 512 positions (linear RoPE x2) as in generate_speed.py, with
a byte tokenizer that has no end token, so every stream makes all its tokens; temperature 0.5, min-p 0.15. The server
runs as `tinylm serve` in a child process on a free loopback port. For each client count C, in turn:

- offline: `generate` on C prompts at once in this process (the same engine without the server), tokens/s = C x N /
  wall time, and the time `generate` takes for one prompt and one new token (its prefill and first pick);
- served: C clients, each sending --requests streaming requests one after another (later ones join a running batch),
  all bounded by --timeout; tokens/s = all tokens / wall time, time to first token and inter-token latency (p50,
  p99) from the arrival times of the chunks, errors = failed requests or streams short of N tokens.

Both sides run with --threads intra-op threads (the engine uses 1 for up to 4 rows either way). Clients and server
share this machine's cores: the client side's own work (HTTP, JSON) is counted against the server. The clients use
aiohttp, whose C parser keeps that work small: with httpx, opening 64 requests at once (when a wave of streams ends
together) took up to 0.9 of a core of the two, and new requests reached the server one per decode step. The last
line is one JSON object.

    python benchmarks/serve_load.py [--clients 1 8 32 64] [--new-tokens 128] [--requests 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import torch

from tinylm.data.tokenizer_training import build_tokenizer
from tinylm.infer.engine import generate
from tinylm.models import build_model
from tinylm.recipe import Sampling, load_recipe, recipe_to_toml
from tinylm.storage.atomic import atomic_write_text
from tinylm.train.checkpoints import save_checkpoint

SETTINGS = dict(temperature=0.5, min_p=0.15)
PROMPT = "Once upon a time"
OVERRIDES = ["model.rope_scaling=\"linear\"", "model.rope_scaling_factor=2.0", "tokenizer.kind=\"bytes\"",
             "tokenizer.vocab_size=256", "tokenizer.special_tokens=[]", "tokenizer.bos=\"\"", "tokenizer.eos=\"\"",
             "data.framing=\"none\""]


def make_run(path: Path):
    """A run directory of random aurelius-4m weights with an end-less byte tokenizer."""
    recipe = load_recipe("aurelius-4m", OVERRIDES)
    tokenizer = build_tokenizer(recipe.tokenizer)
    torch.manual_seed(0)
    model = build_model(recipe.model).eval()
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path / "recipe.toml", recipe_to_toml(recipe))
    tokenizer.save(path / "tokenizer.json")
    save_checkpoint(path / "checkpoints", 1, model, {"step": 1}, {"tokenizer_fingerprint": tokenizer.fingerprint()})
    return model, tokenizer


def start_server(run: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen, str, Path]:
    """`tinylm serve` in a child process on a free port; its log goes to a file beside the run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = run.parent / "server.log"
    with open(log, "w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "tinylm.cli", "serve", str(run), "--name", "bench",
                                   "--port", "0", "--max-batch", str(max_batch)], env=env, stdout=sink, stderr=sink)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        found = [line for line in log.read_text().splitlines() if "Uvicorn running on" in line]
        if found:
            return server, "http://127.0.0.1:" + found[0].rsplit(":", 1)[1].split()[0], log
        time.sleep(0.1)
    raise RuntimeError("the server did not start: " + log.read_text()[-2000:])


async def one_stream(http: aiohttp.ClientSession, url: str, seed: int, new_tokens: int, record: dict) -> None:
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": new_tokens, "stream": True, "seed": seed, **SETTINGS}
    start, arrivals, done = time.perf_counter(), [], False
    try:
        async with http.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")
            async for raw in response.content:
                line = raw.rstrip(b"\n")
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: ") and json.loads(line[6:])["choices"][0]["finish_reason"] is None:
                    arrivals.append(time.perf_counter())
        if not done or len(arrivals) != new_tokens:
            raise RuntimeError(f"{len(arrivals)} of {new_tokens} tokens")
    except Exception as exc:  # counted, and the run goes on
        record["errors"].append(f"{type(exc).__name__}: {exc}")
        return
    record["ttft"].append(arrivals[0] - start)
    record["itl"] += [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    record["tokens"] += len(arrivals)


async def load(url: str, clients: int, requests: int, new_tokens: int, timeout: float) -> dict:
    record = {"ttft": [], "itl": [], "tokens": 0, "errors": []}

    async def client(index: int, http: aiohttp.ClientSession) -> None:
        for request in range(requests):
            await one_stream(http, url, index * requests + request, new_tokens, record)

    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        start = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.gather(*(client(i, http) for i in range(clients))), timeout)
        except TimeoutError:
            record["errors"].append("timed out")
        record["wall"] = time.perf_counter() - start
    return record


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def offline(model, tokenizer, clients: int, new_tokens: int) -> tuple[float, float]:
    """(tokens/s of `generate` on `clients` prompts, seconds of `generate` for one prompt and one token)."""
    prompts = [tokenizer.encode(PROMPT)] * clients
    start = time.perf_counter()
    out = generate(model, prompts, Sampling(max_new_tokens=new_tokens, **SETTINGS), seed=0)
    wall = time.perf_counter() - start
    assert all(len(row) == new_tokens for row in out)
    start = time.perf_counter()
    generate(model, prompts[:1], Sampling(max_new_tokens=1, **SETTINGS), seed=0)
    return clients * new_tokens / wall, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per client count, at most")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        run = Path(folder) / "bench"
        model, tokenizer = make_run(run)
        generate(model, [tokenizer.encode(PROMPT)] * 8, Sampling(max_new_tokens=4, **SETTINGS))  # warm up
        server, url, log = start_server(run, args.threads, max(args.clients))
        try:
            asyncio.run(load(url, 1, 1, 4, args.timeout))  # warm up the server
            result = measure(model, tokenizer, url, args)
        finally:
            server.terminate()
            server.wait(30)
        if sum(result["errors"].values()):
            problems = [line for line in log.read_text().splitlines() if "INFO" not in line]
            print("server log, past its access lines:", *problems[-20:], sep="\n  ")
    print(json.dumps(result))


def measure(model, tokenizer, url: str, args) -> dict:
    result = {"clients": args.clients, "new_tokens": args.new_tokens, "requests_per_client": args.requests,
              "threads": args.threads, "errors": {}, "tokens_per_s": {}, "offline_tokens_per_s": {},
              "ttft_ms": {}, "itl_ms": {}, "offline_first_token_ms": {}}
    print(f"{'clients':>7} {'tokens/s':>9} {'offline':>9} {'ratio':>6} {'TTFT p50/p99 ms':>16} "
          f"{'ITL p50/p99 ms':>15} {'offline 1st ms':>14} {'errors':>6}")
    for clients in args.clients:
        offline_rate, first = offline(model, tokenizer, clients, args.new_tokens)
        record = asyncio.run(load(url, clients, args.requests, args.new_tokens, args.timeout))
        rate = record["tokens"] / record["wall"]
        ttft = [1000 * percentile(record["ttft"], q) for q in (50, 99)]
        itl = [1000 * percentile(record["itl"], q) for q in (50, 99)]
        key = str(clients)
        result["errors"][key] = len(record["errors"])
        result["tokens_per_s"][key], result["offline_tokens_per_s"][key] = rate, offline_rate
        result["ttft_ms"][key], result["itl_ms"][key] = ttft, itl
        result["offline_first_token_ms"][key] = 1000 * first
        print(f"{clients:>7} {rate:>9.0f} {offline_rate:>9.0f} {rate / offline_rate:>6.2f} "
              f"{ttft[0]:>7.1f}/{ttft[1]:<8.1f} {itl[0]:>6.1f}/{itl[1]:<8.1f} {1000 * first:>14.1f} "
              f"{len(record['errors']):>6}", flush=True)
        for error in sorted(set(record["errors"]))[:3]:
            print(f"        error: {error}")
    top, one = str(max(args.clients)), str(min(args.clients))
    result["ratio_64_vs_offline"] = result["tokens_per_s"][top] / result["offline_tokens_per_s"][top]
    result["ttft_1_vs_offline_first_token"] = result["ttft_ms"][one][0] / result["offline_first_token_ms"][one]
    result["torch"] = torch.__version__
    return result


if __name__ == "__main__":
    main()
