"""Train each model family on the shared TinyStories sample under one equal wall-clock budget, then compare.

Each run is sized to its budget: a 12-step probe measures the recipe's training speed on this machine, max_steps is set
so that the cosine schedule ends inside the budget, and train.max_minutes stops it at the budget regardless. Every
command is printed and written to OUT/commands.sh, so docs/RESULTS.md can quote what was run.

    python benchmarks/results.py --minutes 6 --out runs/results
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from tinylm.recipe import load_recipe

# (run name, recipe, overrides): the recipes scaled to a CPU budget (batch 16; their own context lengths).
RUNS = [
    ("aurelius-4m", "aurelius-4m", []),
    ("aurelius-10m", "aurelius-10m", ["train.batch_size=16"]),
    ("aurelius-10m-vocab4096", "aurelius-10m", ["train.batch_size=16", "model.vocab_size=4096",
                                                 "tokenizer.vocab_size=4096"]),
    ("simpler-llama-834k", "simpler-llama-834k", ["train.warmup_steps=100", "train.lr=1e-3"]),
    ("micromixer-1m", "micromixer-1m", ["train.lr=1e-3"]),
    ("llama2c-260k", "llama2c-260k", ["train.batch_size=32"]),
]


def run(command: list[str], log: Path | None = None) -> None:
    print("$ " + shlex.join(command), flush=True)
    with open(log, "w") if log else open("/dev/null", "w") as sink:
        result = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {shlex.join(command)}" + (f"; see {log}" if log else ""))


def probe_tokens_per_second(recipe: str, overrides: list[str], out: Path) -> float:
    probe = out / ".probe"
    shutil.rmtree(probe, ignore_errors=True)
    sets = [w for o in overrides + ["train.max_steps=12", "train.log_interval=4", "train.eval_interval=1000",
                                    "train.checkpoint_interval=1000", "train.warmup_steps=1"] for w in ("--set", o)]
    run(["tinylm", "train", recipe, *sets, "--out", str(probe), "--quiet"])
    lines = [json.loads(x) for x in (probe / "metrics.jsonl").read_text().splitlines()]
    speeds = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x][1:]  # the first interval includes warm-up
    shutil.rmtree(probe / "checkpoints", ignore_errors=True)
    return sum(speeds) / len(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=6.0, help="training budget per run")
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--only", nargs="*", help="run names to do (default all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = []
    for name, recipe, overrides in RUNS:
        if args.only and name not in args.only:
            continue
        resolved = load_recipe(recipe, overrides)
        tokens_per_step = resolved.train.batch_size * resolved.train.grad_accum * resolved.model.context_length
        speed = probe_tokens_per_second(recipe, overrides, out)
        steps = max(20, int(0.92 * args.minutes * 60 * speed / tokens_per_step))
        sets = overrides + [f"train.max_steps={steps}", f"train.max_minutes={args.minutes}",
                            f"train.eval_interval={max(1, steps // 10)}", "train.eval_batches=10",
                            f"train.checkpoint_interval={max(1, steps // 5)}",
                            f"train.log_interval={max(1, steps // 50)}",
                            f"train.warmup_steps={min(resolved.train.warmup_steps, max(1, steps // 10))}"]
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        train = ["tinylm", "train", recipe, *[w for s in sets for w in ("--set", s)], "--out", str(run_dir), "--quiet"]
        commands += [shlex.join(train), f"tinylm eval {run_dir}", f"tinylm card {run_dir}"]
        print(f"{name}: probe {speed:,.0f} tokens/s -> {steps} steps of {tokens_per_step:,} tokens", flush=True)
        run(train, out / f"{name}.log")
        run(["tinylm", "eval", str(run_dir)])
        run(["tinylm", "card", str(run_dir)])
    runs = [str(out / name) for name, _, _ in RUNS if (out / name / "eval.json").is_file()]
    compare = ["tinylm", "compare", *runs, "--plot", str(out / "compare.png")]
    commands.append(shlex.join(compare))
    (out / "commands.sh").write_text("\n".join(commands) + "\n")
    table = subprocess.run(compare, capture_output=True, text=True, check=True).stdout
    (out / "compare.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
