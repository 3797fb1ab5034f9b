"""A run's checkpoint exported to a format (`tinylm export`): its problems found before any weights are loaded, the
run's model card carried into a Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

from tinylm.errors import TinylmError
from tinylm.export import export_model, format_problems
from tinylm.runs.loading import load_run_model
from tinylm.storage.rundir import RunDir


def export_run(run_dir: str | Path, fmt: str, out_dir: str | Path | None = None, which: str = "best",
               card: str | None = None) -> list[str]:
    """Export the run's checkpoint `which` (default folder RUN/FORMAT); README.md of an hf export is `card`, else
    the run's card when it has one. Returns lines worth printing."""
    run = RunDir(run_dir)
    problems = format_problems(fmt, run.read_recipe())
    if problems:
        raise TinylmError(f"{run.path} cannot be exported to {fmt}: {'; '.join(problems)}")
    loaded = load_run_model(run.path, which)
    if card is None and fmt == "hf" and run.card_file.is_file():
        card = run.card_file.read_text(encoding="utf-8")
    lines = export_model(loaded.model, loaded.recipe, loaded.tokenizer, fmt, out_dir or run.export_dir(fmt), card)
    return ([f"note: {loaded.note}"] if loaded.note else []) + lines
