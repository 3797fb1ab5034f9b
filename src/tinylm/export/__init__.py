"""Exports of a model in memory (with its recipe and tokenizer) to the formats people run: `hf` (a Hugging Face
directory, hf.py; read back by hf_import.py) and `llama2c` (run.c's model.bin + tokenizer.bin, llama2c.py)."""

from __future__ import annotations

from pathlib import Path

from tinylm.errors import TinylmError
from tinylm.recipe import Recipe

FORMATS = ("hf", "llama2c")  # the command line lists them: the formats' modules (torch) load only when used


def format_problems(fmt: str, recipe: Recipe) -> list[str]:
    """Why `fmt` cannot hold this recipe's model (empty when it can): checked before any weights are loaded."""
    if fmt not in FORMATS:
        raise TinylmError(f"unknown export format '{fmt}' ({', '.join(FORMATS)})")
    if fmt == "llama2c":
        from tinylm.export.llama2c import llama2c_problems

        return llama2c_problems(recipe)
    return []


def export_model(model, recipe: Recipe, tokenizer, fmt: str, out_dir: str | Path, card: str | None = None,
                 attachments: dict[str, Path] | None = None) -> list[str]:
    """Write `model` in format `fmt` to out_dir (atomically); returns lines worth printing. Each format refuses what
    it cannot hold with one line. `card` and `attachments` (name -> file beside the card) go into an hf export."""
    format_problems(fmt, recipe)  # an unknown format
    if fmt == "hf":
        from tinylm.export.hf import export_hf_model

        return export_hf_model(model, recipe, tokenizer, out_dir, card, attachments)
    from tinylm.export.llama2c import export_llama2c_model

    return export_llama2c_model(model, recipe, tokenizer, out_dir)
