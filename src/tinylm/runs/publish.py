"""A run's checkpoint exported to a format (`tinylm export`), its problems found before any weights are loaded; a
Hugging Face export is a complete hub repository (card, loss plot, samples), and `tinylm push` uploads it."""

from __future__ import annotations

from pathlib import Path

from tinylm.data import hub
from tinylm.errors import TinylmError
from tinylm.export import export_model, format_problems
from tinylm.runs.card import render_card
from tinylm.runs.info import read_run
from tinylm.runs.loading import load_run_model
from tinylm.storage.atomic import verify_manifest
from tinylm.storage.rundir import RunDir


def hub_card(run: RunDir) -> tuple[str, dict[str, Path]]:
    """README.md for the export (the run's card; written from the run when `tinylm card` has not run yet) and the
    files it shows."""
    attachments = {path.name: path for path in (run.loss_plot, run.samples_file) if path.is_file()}
    if run.card_file.is_file():
        return run.card_file.read_text(encoding="utf-8"), attachments
    samples = run.samples_file.read_text(encoding="utf-8").strip() if run.samples_file.is_file() else ""
    return render_card(read_run(run.path), samples, has_plot=run.loss_plot.is_file()), attachments


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path | None = None, which: str = "best",
               card: str | None = None, dtype: str | None = None) -> list[str]:
    """Export the run's checkpoint `which` (default folder RUN/FORMAT); README.md of an hf export is `card`, else
    the run's card (see hub_card). Returns lines worth printing."""
    run = RunDir(run_dir)
    problems = format_problems(fmt, run.read_recipe())
    if problems:
        raise TinylmError(f"{run.path} cannot be exported to {fmt}: {'; '.join(problems)}")
    loaded = load_run_model(run.path, which)
    attachments = None
    if fmt == "hf":
        run_card, attachments = hub_card(run)
        card = run_card if card is None else card
    lines = export_model(loaded.model, loaded.recipe, loaded.tokenizer, fmt, out_dir or run.export_dir(fmt), card,
                         attachments, dtype)
    return ([f"note: {loaded.note}"] if loaded.note else []) + lines


def commit_message(run: RunDir) -> str:
    info = read_run(run.path)
    e = info.evaluation
    figures = f", val bits per byte {e['bits_per_byte']:.4f}" if e else ""
    return f"{info.recipe.name}: {info.steps:,} steps, {info.tokens_seen:,} tokens{figures} (tinylm)"


def push_run(run_dir: str | Path, repo_id: str, private: bool = False, api=None) -> str:
    """Create the hub repository `repo_id` (if needed) and upload the run's Hugging Face export, RUN/hf, checked
    against its manifest first; returns the repository's address. `api` is an HfApi (made here when None; the
    token comes from HF_TOKEN or `hf auth login`)."""
    run = RunDir(run_dir)
    if not run.is_run():
        raise TinylmError(f"{run.path}: not a run directory (no recipe.toml)")
    if not hub.is_repo_id(repo_id):
        raise TinylmError(f"{repo_id!r} is not a hub repository id (owner/name)")
    folder = run.export_dir("hf")
    if not (folder / "config.json").is_file():
        raise TinylmError(f"{folder}: no Hugging Face export; run `tinylm export {run.path} --format hf` first")
    verify_manifest(folder)  # a damaged export is not published
    return hub.upload_model_folder(folder, repo_id, commit_message(run), private=private, api=api)
