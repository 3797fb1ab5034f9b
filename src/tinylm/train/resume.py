"""Continuing a run: the recipe it continues with and the checkpoint it continues from, both checked before anything
in the run directory is touched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinylm.data.tokenizer import load_tokenizer
from tinylm.errors import TinylmError
from tinylm.recipe import Recipe, differences, load_recipe
from tinylm.storage.atomic import verify_manifest
from tinylm.storage.rundir import RunDir
from tinylm.train import checkpoints as ckpt


def resume_recipe(run_dir: str | Path, name_or_path: str, overrides: list[str]) -> Recipe:
    """What `tinylm train NAME --out RUN --resume --set ...` continues with: the run's own resolved recipe.toml with
    the overrides applied (not the named recipe's defaults), once NAME is checked to be the recipe the run came from."""
    run = RunDir(run_dir)
    requested = load_recipe(name_or_path, overrides)
    if not run.is_run():
        return requested  # check_resumable says there is nothing to resume
    saved = run.read_recipe()
    if requested.name != saved.name:
        raise TinylmError(f"{run.path} was trained from recipe '{saved.name}', not '{requested.name}': resume it "
                          f"with `tinylm train {saved.name} --out {run.path} --resume` (its recipe.toml is used)")
    return run.read_recipe(overrides)


def check_resumable(recipe: Recipe, run: RunDir, processes: int) -> None:
    """Resuming needs the same model, tokenizer, data and rows per step; other training settings may change (e.g.
    more steps)."""
    if not run.is_run():
        raise TinylmError(f"{run.path}: nothing to resume (no run there); drop --resume to start one")
    saved = run.read_recipe()
    for section in ("model", "tokenizer", "data"):
        changed = differences(saved, recipe, (section,))
        if changed:
            raise TinylmError(f"{run.recipe_file}: the run was trained with a different [{section}] section: "
                              f"{'; '.join(changed)}; resume with the same recipe")
    t, before = recipe.train, run.read_run_info().get("tokens_per_step")
    rows = t.batch_size * t.grad_accum * processes
    if isinstance(before, int) and before != rows * recipe.model.context_length:
        raise TinylmError(f"{run.path}: each step of the run drew {before // recipe.model.context_length} rows, now "
                          f"{rows} (train.batch_size {saved.train.batch_size} in the run, {t.batch_size} now; "
                          f"train.batch_size x train.grad_accum x processes must stay the same to resume)")


def _verifies(checkpoint: Path) -> bool:
    try:
        verify_manifest(checkpoint)
    except TinylmError:
        return False
    return True


def resume_checkpoint(run: RunDir, recipe: Recipe, which: str = "latest") -> Path:
    """The verified checkpoint to continue from (its tokenizer checked against the run's). A damaged latest one is
    refused, naming the damage and the newest complete checkpoint to continue from instead."""
    found = run.step_checkpoints()
    checkpoint = run.checkpoint(which)
    try:
        manifest: dict[str, Any] = verify_manifest(checkpoint)
    except TinylmError as exc:
        older = next((p for p in reversed(found) if p != checkpoint and p.name < checkpoint.name and _verifies(p)),
                     None)
        if which != "latest" or older is None:
            raise
        raise TinylmError(f"{exc}; the newest complete checkpoint is {older.name}: continue from it with "
                          f"--resume-from {older.name} (the steps after it are trained again)") from None
    if run.tokenizer_file.is_file():  # a replaced tokenizer must not rebuild the shards and go on
        ckpt.check_tokenizer_fits(load_tokenizer(run.tokenizer_file), recipe, manifest, run.tokenizer_file)
    return checkpoint
