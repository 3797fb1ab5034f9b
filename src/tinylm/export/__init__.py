"""Exports of a model in memory (with its recipe and tokenizer) to the formats people run: `hf` (a Hugging Face
directory, hf.py; read back by hf_import.py), `llama2c` (run.c's model.bin + tokenizer.bin, llama2c.py) and `gguf`
(one file for llama.cpp, Ollama and LM Studio, gguf.py)."""

from __future__ import annotations

from pathlib import Path

from tinylm.errors import TinylmError
from tinylm.recipe import Recipe

FORMATS = ("hf", "llama2c", "gguf")  # the command line lists them: the formats' modules load only when used
GGUF_DTYPES = ("f32", "f16", "q8_0")


def format_problems(fmt: str, recipe: Recipe) -> list[str]:
    """Why `fmt` cannot hold this recipe's model (empty when it can): checked before any weights are loaded."""
    if fmt not in FORMATS:
        raise TinylmError(f"unknown export format '{fmt}' ({', '.join(FORMATS)})")
    if fmt == "llama2c":
        from tinylm.export.llama2c import llama2c_problems

        return llama2c_problems(recipe)
    if fmt == "gguf":
        from tinylm.export.gguf import gguf_problems

        return gguf_problems(recipe)
    return []


def export_model(model, recipe: Recipe, tokenizer, fmt: str, out_dir: str | Path, card: str | None = None,
                 attachments: dict[str, Path] | None = None, dtype: str | None = None) -> list[str]:
    """Write `model` in format `fmt` to out_dir (atomically); returns lines worth printing. Each format refuses what
    it cannot hold with one line. `card` and `attachments` (name -> file beside the card) go into an hf export;
    `dtype` is GGUF's storage type (f32, f16 or q8_0; default f32)."""
    format_problems(fmt, recipe)  # an unknown format
    if dtype is not None and fmt != "gguf":
        raise TinylmError(f"--dtype applies to the gguf format only ({fmt} is written in float32)")
    if fmt == "gguf":
        from tinylm.export.gguf import export_gguf_model

        return export_gguf_model(model, recipe, tokenizer, out_dir, dtype or "f32")
    if fmt == "hf":
        from tinylm.export.hf import export_hf_model

        return export_hf_model(model, recipe, tokenizer, out_dir, card, attachments)
    from tinylm.export.llama2c import export_llama2c_model

    return export_llama2c_model(model, recipe, tokenizer, out_dir)
