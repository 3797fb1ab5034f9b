"""`tinylm demo`: the main job end to end on the shared TinyStories sample, in minutes on a laptop CPU.

tokenizer -> token shards -> training -> evaluation on the whole validation split -> stories -> model card ->
Hugging Face export, each step printing where its result is.
"""

from __future__ import annotations

import time
from pathlib import Path

from tinylm.data.prepare import prepare_run_inputs
from tinylm.errors import TinylmError
from tinylm.recipe import Recipe
from tinylm.runs.card import write_card, write_samples
from tinylm.runs.evaluate import evaluate_path
from tinylm.runs.loading import load_run_model
from tinylm.runs.publish import export_run
from tinylm.storage.atomic import remove_directory
from tinylm.storage.rundir import RunDir
from tinylm.train import train

DEMO_RECIPE = "tinystories-demo"


def _say(step: int, text: str) -> None:
    print(f"\n[{step}/6] {text}", flush=True)


def claim_run_directory(run: RunDir, force: bool) -> None:
    """The demo trains from scratch: an existing run is replaced only with `force`, and only if it is one tinylm
    wrote (the guard every replaced output goes through); anything else in its way is refused."""
    if not run.path.exists():
        return
    if run.is_run() and not force:
        raise TinylmError(f"{run.path} already holds a run; choose another --out or pass --force to train it again")
    if force:
        run.check_replaceable()
        remove_directory(run.path)


def run_demo(recipe: Recipe, run_dir: str | Path, command: str, progress: bool = True, force: bool = False) -> RunDir:
    started = time.perf_counter()
    run = RunDir(run_dir)
    claim_run_directory(run, force)
    print(f"tinylm demo: recipe {recipe.name} into {run.path}")
    _say(1, "tokenizer and token shards")
    prepared = prepare_run_inputs(recipe, run, progress=progress)
    print(f"  {prepared.tokenizer.kind} tokenizer with {prepared.tokenizer.vocab_size:,} ids -> {run.tokenizer_file}")
    print(f"  {prepared.train.tokens:,} train / {prepared.val.tokens:,} validation tokens -> {run.data_dir}")

    _say(2, "training")
    summary = train(recipe, run.path, command=command, progress=progress)
    print(f"  {summary.tokens:,} tokens in {summary.step} steps -> {run.checkpoints_dir}, {run.metrics_file}")

    _say(3, "evaluation on the whole validation split")
    print(f"  {evaluate_path(run.path).line()} -> {run.eval_file}")

    _say(4, "stories")
    model, _, tokenizer = load_run_model(run.path, "best")
    samples = write_samples(recipe, model, tokenizer)
    print(samples)

    _say(5, "model card")
    card = write_card(run.path, samples)
    print(f"  {card}, {run.loss_plot}, {run.samples_file}")

    _say(6, "Hugging Face export")
    export_run(run.path, "hf")
    print(f"  {run.export_dir('hf')} (AutoModelForCausalLM.from_pretrained loads it)")

    print(f"\ndone in {(time.perf_counter() - started) / 60:.1f} min: everything is in {run.path}")
    return run
