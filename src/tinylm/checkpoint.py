"""Checkpoints: one directory per save, `checkpoints/step-00000200/{model.safetensors, state.pt, manifest.json}`.

- model.safetensors: the weights, under the model's own (llama2.c) names.
- state.pt: everything else a resumed run needs (optimizer, step, data sampler, RNG states). It holds only tensors,
  numbers, strings, lists and dicts, so it is read with `torch.load(weights_only=True)`: loading it runs no code.
- manifest.json: sizes and sha256 of the other two, written last. A directory without it is incomplete; each
  directory is built under a temporary name and renamed into place, so a crash never leaves a half-written one.
`checkpoints/best` is a copy of the checkpoint with the lowest validation loss, in the same layout.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import TinylmError
from .files import atomic_directory, remove_directory, verify_manifest, write_manifest
from .models import build_model
from .recipe import Recipe, recipe_from_toml

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FORMAT = "tinylm-checkpoint-1"
STEP_PATTERN = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------------------- weights
def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict as safetensors (CPU copies; the caller makes the write atomic)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into `model`: every tensor present, none extra, every shape equal, or TinylmError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TinylmError(f"{path}: weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TinylmError(f"{path}: not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_names(unexpected)}")
        raise TinylmError(f"{path}: does not fit this model: {'; '.join(parts)}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise TinylmError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                              f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=True)


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ------------------------------------------------------------------------------------------------------ directories
def save_checkpoint(checkpoints: Path, step: int, model: nn.Module, state: dict[str, Any],
                    info: dict[str, Any] | None = None, name: str | None = None) -> Path:
    """Write checkpoints/step-NNNNNNNN (or checkpoints/NAME) atomically; `info` (val loss, tokenizer fingerprint)
    goes in the manifest."""
    path = checkpoints / (name or step_dir_name(step))
    with atomic_directory(path) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        torch.save(state, tmp / STATE_FILE)
        write_manifest(tmp, MANIFEST_FILE, extra={"format": CHECKPOINT_FORMAT, "step": step, **(info or {})})
    return path


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a complete checkpoint directory (e.g. to checkpoints/best), atomically, manifest included."""
    with atomic_directory(target) as tmp:
        for name in (WEIGHTS_FILE, STATE_FILE, MANIFEST_FILE):
            shutil.copy2(source / name, tmp / name)


def step_checkpoints(checkpoints: Path) -> list[Path]:
    """Complete step-N directories (manifest present), oldest first."""
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)
             and (p / MANIFEST_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune_checkpoints(checkpoints: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step directories (checkpoints/best is never touched)."""
    for old in step_checkpoints(checkpoints)[:-keep_last]:
        remove_directory(old)


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """The checkpoint directory that "best", "latest" or "step-NNNNNNNN" names in a run.

    "best" falls back to the latest when no validation has been run yet."""
    checkpoints = Path(run_dir) / "checkpoints"
    if which == "best" and (checkpoints / "best" / MANIFEST_FILE).is_file():
        return checkpoints / "best"
    if which in ("best", "latest"):
        found = step_checkpoints(checkpoints)
        if not found:
            raise TinylmError(f"{checkpoints}: no complete checkpoint (nothing saved yet?)")
        return found[-1]
    path = checkpoints / which
    if not (path / MANIFEST_FILE).is_file():
        raise TinylmError(f"{path}: no such complete checkpoint (use best, latest or step-NNNNNNNN)")
    return path


def load_state(checkpoint: Path) -> dict[str, Any]:
    """state.pt of a verified checkpoint, loaded without running pickled code."""
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types for a damaged file
        raise TinylmError(f"{checkpoint / STATE_FILE}: cannot be read ({str(exc).splitlines()[0]})") from None


def read_run_recipe(run_dir: str | Path) -> Recipe:
    path = Path(run_dir) / "recipe.toml"
    if not path.is_file():
        raise TinylmError(f"{Path(run_dir)}: not a run directory (no recipe.toml)")
    return recipe_from_toml(path.read_text(encoding="utf-8"), origin=str(path))


def check_tokenizer_fits(tokenizer, recipe: Recipe, manifest: dict[str, Any], tokenizer_file: Path) -> None:
    """A tokenizer must fit the embedding table and be the one the checkpoint was trained with."""
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise TinylmError(f"{tokenizer_file}: vocabulary of {tokenizer.vocab_size} does not fit the model's "
                          f"{recipe.model.vocab_size} embeddings")
    recorded = manifest.get("tokenizer_fingerprint")
    if recorded and recorded != tokenizer.fingerprint():
        raise TinylmError(f"{tokenizer_file}: not the tokenizer this checkpoint was trained with "
                          "(fingerprint differs)")


def load_run_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu"):
    """(model, recipe, tokenizer) from a run directory, the model in eval mode on `device`.

    Refuses, naming the file, a checkpoint that fails its manifest (missing, truncated, altered), weights that do not
    fit the recipe's model, or a tokenizer that does not match."""
    from .tokenizer import load_tokenizer

    run = Path(run_dir)
    recipe = read_run_recipe(run)
    checkpoint = checkpoint_path(run, which)
    manifest = verify_manifest(checkpoint, MANIFEST_FILE)
    tokenizer_file = run / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise TinylmError(f"{tokenizer_file}: not found")
    tokenizer = load_tokenizer(tokenizer_file)
    check_tokenizer_fits(tokenizer, recipe, manifest, tokenizer_file)
    model = build_model(recipe.model)
    load_weights(model, checkpoint / WEIGHTS_FILE)
    model.to(device).eval()
    return model, recipe, tokenizer
