"""`tinylm demo`: the main job end to end on the shared TinyStories sample, in minutes on a laptop CPU.

tokenizer -> token shards -> training -> evaluation on the whole validation split -> stories -> model card ->
Hugging Face export, each step printing where its result is.
"""

from __future__ import annotations

import time
from pathlib import Path

from .recipe import Recipe

DEMO_RECIPE = "tinystories-demo"


def _say(step: int, text: str) -> None:
    print(f"\n[{step}/6] {text}", flush=True)


def write_samples(run: Path, recipe: Recipe, model, tokenizer, seed: int = 0) -> str:
    """Stories from the recipe's prompts with its recommended sampling settings, as markdown."""
    from .card import format_samples
    from .data import frame_prefix
    from .generate import generate_text, recipe_sampling

    prompts = recipe.sample.prompts
    completions = generate_text(model, tokenizer, prompts, prefix=frame_prefix(tokenizer, recipe.data.framing),
                                seed=seed, **recipe_sampling(recipe.sample))
    return format_samples(prompts, completions)


def run_demo(recipe: Recipe, run: Path, command: str, progress: bool = True) -> dict[str, Path]:
    from .card import write_card
    from .checkpoint import load_run_model
    from .evaluate import evaluate_path, format_result
    from .export import export_hf
    from .pipeline import prepare_run
    from .train import train

    started = time.perf_counter()
    print(f"tinylm demo: recipe {recipe.name} into {run}")
    _say(1, "tokenizer and token shards")
    tokenizer, meta = prepare_run(recipe, run, progress=progress)
    print(f"  {tokenizer.kind} tokenizer with {tokenizer.vocab_size:,} ids -> {run / 'tokenizer.json'}")
    print(f"  {meta['train']['n_tokens']:,} train / {meta['val']['n_tokens']:,} validation tokens -> {run / 'data'}")

    _say(2, "training")
    summary = train(recipe, run, command=command, progress=progress)
    print(f"  {summary['tokens']:,} tokens in {summary['step']} steps -> {run / 'checkpoints'}, {run / 'metrics.jsonl'}")

    _say(3, "evaluation on the whole validation split")
    result = evaluate_path(run)
    print(f"  {format_result(result)} -> {run / 'eval.json'}")

    _say(4, "stories")
    model, _, tokenizer = load_run_model(run, "best")
    samples = write_samples(run, recipe, model, tokenizer)
    print(samples)

    _say(5, "model card")
    card = write_card(run, samples)
    print(f"  {card}, {run / 'loss.png'}, {run / 'samples.md'}")

    _say(6, "Hugging Face export")
    export_hf(run, run / "hf")
    print(f"  {run / 'hf'} (AutoModelForCausalLM.from_pretrained loads it)")

    print(f"\ndone in {(time.perf_counter() - started) / 60:.1f} min: everything is in {run}")
    return {"run": run, "card": card, "hf": run / "hf"}
