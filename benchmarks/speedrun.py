"""More model per CPU-minute: the tinystories-demo recipe as it was (AdamW, warmup + cosine, one rate) against
candidate training choices at the same token budget, two seeds each, scored on the whole validation split.

Every run trains on the same tokenizer and shards (prepared once), evaluates bits per byte on the whole validation
split every 100 steps (the trainer's periodic evaluation with enough batches to cover the split; training is
unaffected), and is a separate `tinylm train` process. Runs are deterministic, so the figures compare across machines
of one kind; wall time and ms per step do not (they depend on what else held the machine). So after the runs the
best candidate's training step and the baseline's are timed taking turns in this process: that is ms_per_step_ratio.

    python benchmarks/speedrun.py --out runs/speedrun

The last line is JSON: baseline_bpb (the better baseline seed), best_bpb_at_1200 (the best full-budget candidate's
worse seed) and that candidate's ms_per_step_ratio, best_steps_to_baseline_bpb (the fewest steps to the baseline's
figure, worse seed, over every candidate and budget; which one is fastest_to_baseline_bpb, the lower figure breaking
a tie), with every run's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from timing import interleaved_times
from tinylm.data.shards import TokenShard
from tinylm.models import build_model
from tinylm.recipe import differences, load_recipe
from tinylm.train.optimizer import build_optimizer
from tinylm.train.runtime import keep_freed_memory, training_step

RECIPE = "tinystories-demo"
# The recipe as llama2.c would train it (tinystories-demo's settings before the speedrun): every candidate starts here.
BASELINE = ["model.unembedding=tied", "train.optimizer=adamw", "train.schedule=cosine", "train.min_lr=2e-4",
            "train.matrix_lr=0.0", "train.embedding_lr=0.0", "train.head_lr=0.0"]
# The candidates, each alone and combined; the settings were chosen before any run, not tuned on the validation split.
WSD = ["train.schedule=wsd", "train.decay_fraction=0.4", "train.min_lr=0.0"]
MUON, MUON_3X = ["train.optimizer=muon"], ["train.optimizer=muon", "train.matrix_lr=6e-3"]
EMBED_3X, ZERO_INIT = ["train.embedding_lr=6e-3"], ["model.zero_init_projections=true"]
WINNER = MUON_3X + WSD + EMBED_3X
CANDIDATES: dict[str, list[str]] = {name: BASELINE + changes for name, changes in {
    "baseline": [],
    "wsd": WSD,
    "embed3x": EMBED_3X,
    "zero-init": ZERO_INIT,
    "muon": MUON,
    "muon3x": MUON_3X,
    "muon+wsd": MUON + WSD,
    "muon3x+wsd": MUON_3X + WSD,
    "muon3x+wsd+embed3x": WINNER,  # the first winner
    "muon3x+wsd+zero-init": MUON_3X + WSD + ZERO_INIT,
    # The half budget's finding at the full budget: an untied head at 3x, the input embedding at 30x (the winner since:
    # tinystories-demo's settings).
    "muon3x+wsd+untied+embed30x+head3x": MUON_3X + WSD + ["model.unembedding=untied", "train.embedding_lr=6e-2",
                                                          "train.head_lr=6e-3"],
    # Half the budget: the winner's whole schedule (warmup, stable, decay) compressed into 600 steps, as a user with
    # half the time would train, and variants for the shorter run: a longer and a shorter decay, a decay over the
    # whole run, and every rate at 1.5x.
    "winner@600": WINNER,
    "winner+decay0.2@600": WINNER + ["train.decay_fraction=0.2"],
    "winner+decay0.6@600": WINNER + ["train.decay_fraction=0.6"],
    "winner+decay1.0@600": WINNER + ["train.decay_fraction=1.0"],
    "winner+rates1.5x@600": WINNER + ["train.lr=3e-3", "train.matrix_lr=9e-3", "train.embedding_lr=9e-3"],
    # A second handful for half the budget, chosen together before their runs: an untied output head (its own
    # parameters at no cost in FLOPs, at train.lr) with the embedding at 3x or 10x, no gradient clipping, no weight
    # decay.
    "winner+untied@600": WINNER + ["model.unembedding=untied"],
    "winner+untied+embed10x@600": WINNER + ["model.unembedding=untied", "train.embedding_lr=2e-2"],
    "winner+noclip@600": WINNER + ["train.grad_clip=0.0"],
    "winner+wd0@600": WINNER + ["train.weight_decay=0.0"],
    # A third handful, once the untied head with a 10x embedding rate had led: the rates of the input embedding and the
    # head, untied, and the 10x embedding rate on the tied matrix.
    "winner+untied+embed30x@600": WINNER + ["model.unembedding=untied", "train.embedding_lr=6e-2"],
    "winner+untied+embed10x+head3x@600": WINNER + ["model.unembedding=untied", "train.embedding_lr=2e-2",
                                                   "train.head_lr=6e-3"],
    "winner+untied+embed30x+head3x@600": WINNER + ["model.unembedding=untied", "train.embedding_lr=6e-2",
                                                   "train.head_lr=6e-3"],
    "winner+embed10x@600": WINNER + ["train.embedding_lr=2e-2"],
}.items()}
BUDGETS = {name: 600 for name in CANDIDATES if name.endswith("@600")}  # candidates with a budget of their own
SEEDS = (1337, 42)
EVAL_EVERY = 100


def tinylm(*args: str, log: Path, cpu: int | None = None) -> None:
    """`tinylm ARGS` in a child process; pinned to one core when `cpu` is given (it then trains on one thread)."""
    command = [sys.executable, "-m", "tinylm.cli", *args]
    print("$ tinylm " + " ".join(args), flush=True)
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    with open(log, "w") as sink:
        done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=pin)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}); see {log}")


def prepare(out: Path) -> tuple[Path, int]:
    """One tokenizer and one set of shards for every run; returns the folder and the evaluation batches that cover
    the whole validation split."""
    prepared = out / "prepared"
    tinylm("data", "prepare", RECIPE, "--out", str(prepared), "--quiet", log=out / "prepare.log")
    recipe = load_recipe(RECIPE)
    blocks = math.ceil((TokenShard(prepared / "data" / "val.bin").n_tokens - 1) / recipe.model.context_length)
    return prepared, math.ceil(blocks / recipe.train.batch_size)


def train_run(name: str, seed: int, steps: int, out: Path, prepared: Path,
              val_batches: int, extra: list[str], cpu: int | None = None) -> dict:
    """One candidate's run, or its figures read back when a run with the same settings finished before (runs are
    deterministic: an interrupted benchmark picks up where it stopped)."""
    run = out / f"{name}-seed{seed}"
    steps = BUDGETS.get(name, steps)
    sets = CANDIDATES[name] + [f"train.seed={seed}", f"train.max_steps={steps}", f"train.eval_interval={EVAL_EVERY}",
                        f"train.eval_batches={val_batches}", f"train.checkpoint_interval={steps}",
                        "train.max_minutes=0", *extra]
    result = finished_result(run, name, seed, steps, sets)
    if result is not None:
        print(f"  {name} seed {seed}: {result['bpb']:.4f} bits per byte (finished before, read back)", flush=True)
        return result
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copy(prepared / "tokenizer.json", run / "tokenizer.json")
    shutil.copytree(prepared / "data", run / "data")
    tinylm("train", RECIPE, *[w for s in sets for w in ("--set", s)], "--out", str(run), "--quiet",
           log=run / "train.log", cpu=cpu)
    result = finished_result(run, name, seed, steps, sets)
    print(f"  {name} seed {seed}: {result['bpb']:.4f} bits per byte, {result['ms_per_step']:.1f} ms/step",
          flush=True)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return result


def finished_result(run: Path, name: str, seed: int, steps: int, sets: list[str]) -> dict | None:
    """The figures of a run that trained with these settings to its last evaluation, else None. Settings compare as
    the model and training sections they resolve to (the run's recipe.toml), so a change of the recipe's defaults
    that the candidate's overrides undo keeps its finished runs."""
    saved = run / "recipe.toml"
    if not saved.exists() or not (run / "run.json").exists():
        return None
    if differences(load_recipe(str(saved)), load_recipe(RECIPE, sets), ("model", "train")):
        return None
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = {x["step"]: x["val_bpb"] for x in lines if "val_bpb" in x}
    info = json.loads((run / "run.json").read_text())
    if steps not in curve or "wall_time_s" not in info:  # stopped early, or still training
        return None
    step_ms = [x["ms_per_step"] for x in lines if "ms_per_step" in x][1:]  # the first interval includes warm-up
    return {"name": name, "seed": seed, "steps": steps, "tokens": steps * info["tokens_per_step"],
            "wall_s": info["wall_time_s"], "ms_per_step": statistics.median(step_ms), "bpb": curve[steps],
            "curve": curve}


def first_step_at_or_below(curve: dict[int, float], target: float) -> int | None:
    return next((step for step, bpb in sorted(curve.items()) if step > 0 and bpb <= target), None)


def summarise(runs: list[dict], steps: int) -> dict:
    baseline_bpb = min(r["bpb"] for r in runs if r["name"] == "baseline")
    base_ms = statistics.median(r["ms_per_step"] for r in runs if r["name"] == "baseline")
    per_candidate = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        reached = [first_step_at_or_below(r["curve"], baseline_bpb) for r in mine]
        per_candidate[name] = {
            "bpb_worse_seed": max(r["bpb"] for r in mine),
            "steps_to_baseline_bpb_worse_seed": None if None in reached else max(reached),
            "runs_ms_per_step_ratio": statistics.median(r["ms_per_step"] for r in mine) / base_ms}
    full_budget = [n for n in per_candidate if n != "baseline" and n not in BUDGETS]
    best = min(full_budget, key=lambda n: per_candidate[n]["bpb_worse_seed"])
    # The fewest steps to the baseline's figure, over every candidate and budget (the worse seed of each).
    reaching = [n for n in per_candidate if n != "baseline" and per_candidate[n]["steps_to_baseline_bpb_worse_seed"]]
    fastest = min(reaching, key=lambda n: (per_candidate[n]["steps_to_baseline_bpb_worse_seed"],
                                           per_candidate[n]["bpb_worse_seed"]), default=None)
    return {"recipe": RECIPE, "steps": steps, "seeds": sorted({r["seed"] for r in runs}), "baseline_bpb": baseline_bpb,
            "best": best,
            "best_bpb_at_1200": per_candidate[best]["bpb_worse_seed"],
            "fastest_to_baseline_bpb": fastest,
            "best_steps_to_baseline_bpb": fastest and per_candidate[fastest]["steps_to_baseline_bpb_worse_seed"],
            "candidates": per_candidate,
            "overrides": {n: CANDIDATES[n] for n in per_candidate},
            "runs": [{k: v for k, v in r.items() if k != "curve"} | {"curve": r["curve"]} for r in runs]}


def print_table(runs: list[dict], summary: dict) -> None:
    print(f"\n| candidate | seed | steps | tokens | wall s | ms/step | bits per byte | steps to "
          f"{summary['baseline_bpb']:.4f} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        reached = first_step_at_or_below(r["curve"], summary["baseline_bpb"])
        print(f"| {r['name']} | {r['seed']} | {r['steps']:,} | {r['tokens']:,} | {r['wall_s']:.0f} | "
              f"{r['ms_per_step']:.1f} | {r['bpb']:.4f} | {reached if reached else '-'} |")
    print("\n| candidate | bits per byte (worse seed) | steps to baseline (worse seed) | runs' ms/step vs baseline |")
    print("|---|---:|---:|---:|")
    for name, c in summary["candidates"].items():
        print(f"| {name} | {c['bpb_worse_seed']:.4f} | {c['steps_to_baseline_bpb_worse_seed'] or '-'} | "
              f"{c['runs_ms_per_step_ratio']:.3f} |")


def step_timing(names: list[str], rounds: int, extra: list[str]) -> dict[str, dict]:
    """The time of one training step (forward, backward, update) of each candidate in this process, the candidates
    taking turns; the ratio of medians against the baseline's (the first name)."""
    contenders = {}
    for name in names:
        recipe = load_recipe(RECIPE, CANDIDATES[name] + extra)
        torch.manual_seed(0)
        model = build_model(recipe.model)
        optimizer = build_optimizer(model, recipe.train, report=lambda *_: None)
        x = torch.randint(0, recipe.model.vocab_size, (recipe.train.batch_size, recipe.model.context_length))
        y = torch.randint(0, recipe.model.vocab_size, x.shape)
        contenders[name] = lambda m=model, o=optimizer, b=[(x, y)], c=recipe.train.grad_clip: training_step(m, o, b, c)
    keep_freed_memory()
    times = interleaved_times(contenders, rounds, steps=5)
    base = statistics.median(times[names[0]])
    return {name: {"ms_per_step": statistics.median(t) * 1000, "ratio": statistics.median(t) / base}
            for name, t in times.items()}


def print_step_timing(timing: dict[str, dict]) -> None:
    print("| candidate | ms per step (median, taking turns) | vs baseline |\n|---|---:|---:|")
    for name, row in timing.items():
        print(f"| {name} | {row['ms_per_step']:.1f} | {row['ratio']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/speedrun")
    parser.add_argument("--steps", type=int, default=1200, help="training steps per run (the token budget)")
    parser.add_argument("--only", nargs="*", default=list(CANDIDATES), help="candidates to run (baseline always)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS),
                        help="seeds to run (a finished run with the same settings is read back, not retrained)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every run, e.g. train.device=cuda")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each pinned to one core (the figures stay the same; wall time and ms "
                        "per step are then shared)")
    parser.add_argument("--step-timing", type=int, default=0, metavar="ROUNDS",
                        help="instead of training: time one step of each candidate, taking turns, for ROUNDS rounds")
    parser.add_argument("--timing-rounds", type=int, default=10,
                        help="after the runs: rounds of the best candidate's step timing against the baseline's")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the step timing (default all)")
    args = parser.parse_args()
    if args.steps % EVAL_EVERY:
        sys.exit(f"--steps must be a multiple of {EVAL_EVERY}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["baseline"] + [n for n in args.only if n != "baseline"]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.step_timing:
        timing = step_timing(names, args.step_timing, extra=args.set)
        print_step_timing(timing)
        return print(json.dumps({"threads": torch.get_num_threads(), "rounds": args.step_timing,
                                 "step_timing": timing}))
    prepared, val_batches = prepare(out)
    order = [(name, seed) for seed in args.seeds for name in names]
    free_cpus: queue.SimpleQueue = queue.SimpleQueue()  # several at once: each run takes a core no other run holds
    for cpu in sorted(os.sched_getaffinity(0))[:args.jobs]:
        free_cpus.put(cpu)

    def on_a_free_core(name: str, seed: int) -> dict:
        cpu = free_cpus.get()
        try:
            return train_run(name, seed, args.steps, out, prepared, val_batches, args.set,
                             cpu if args.jobs > 1 else None)
        finally:
            free_cpus.put(cpu)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = list(pool.map(lambda job: on_a_free_core(*job), order))
    summary = summarise(runs, args.steps)
    print_table(runs, summary)
    # The runs' own step times depend on what else held the machine while each ran; the ratio that counts is the
    # one measured here, the best candidate and the baseline taking turns.
    timing = step_timing(["baseline", summary["best"]], args.timing_rounds, extra=args.set)
    print_step_timing(timing)
    summary |= {"ms_per_step_ratio": timing[summary["best"]]["ratio"], "step_timing": timing,
                "step_timing_threads": torch.get_num_threads()}
    (out / "speedrun.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
