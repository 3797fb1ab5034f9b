"""Checkpoints: one directory per save, `checkpoints/step-00000200/{model.safetensors, state.pt, manifest.json}`.

- model.safetensors: the weights, under the model's own (llama2.c) names.
- state.pt: everything else a resumed run needs (optimizer, step, data sampler, RNG states). It holds only tensors,
  numbers, strings, lists and dicts, so it is read with `torch.load(weights_only=True)`: loading it runs no code.
- manifest.json: sizes and sha256 of the other two, written last. A directory without it is incomplete; each
  directory is built under a temporary name and renamed into place, so a crash never leaves a half-written one.
`checkpoints/best` is a copy of the checkpoint with the lowest validation loss, in the same layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tinylm.errors import TinylmError
from tinylm.models.weights import load_checked
from tinylm.recipe import Recipe
from tinylm.storage.atomic import MANIFEST_NAME, atomic_directory, remove_directory, write_manifest
from tinylm.storage.rundir import RunDir, step_dir_name

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = "tinylm-checkpoint-1"


# ---------------------------------------------------------------------------------------------------------- weights
def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the model's state dict as safetensors (CPU copies; the caller makes the write atomic)."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load safetensors weights into `model` (every tensor present, none extra, every shape equal)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise TinylmError(f"{path}: weights file not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TinylmError(f"{path}: not a readable safetensors file ({exc})") from None
    load_checked(model, tensors, str(path))


# ------------------------------------------------------------------------------------------------------ directories
def save_checkpoint(checkpoints: Path, step: int, model: nn.Module, state: dict[str, Any],
                    info: dict[str, Any] | None = None, name: str | None = None) -> Path:
    """Write checkpoints/step-NNNNNNNN (or checkpoints/NAME) atomically; `info` (val loss, tokenizer fingerprint)
    goes in the manifest."""
    path = checkpoints / (name or step_dir_name(step))
    with atomic_directory(path, kind=CHECKPOINT_FORMAT) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE)
        torch.save(state, tmp / STATE_FILE)
        write_manifest(tmp, MANIFEST_NAME, extra={"format": CHECKPOINT_FORMAT, "step": step, **(info or {})})
    return path


def copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a complete checkpoint directory (e.g. to checkpoints/best), atomically, manifest included."""
    with atomic_directory(target, kind=CHECKPOINT_FORMAT) as tmp:
        for name in (WEIGHTS_FILE, STATE_FILE, MANIFEST_NAME):
            shutil.copy2(source / name, tmp / name)


def prune_checkpoints(run: RunDir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step directories (checkpoints/best is never touched)."""
    for old in run.step_checkpoints()[:-keep_last]:
        remove_directory(old)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """state.pt of a verified checkpoint, loaded without running pickled code."""
    try:
        return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types for a damaged file
        raise TinylmError(f"{checkpoint / STATE_FILE}: cannot be read ({str(exc).splitlines()[0]})") from None


def check_tokenizer_fits(tokenizer, recipe: Recipe, manifest: dict[str, Any], tokenizer_file: Path) -> None:
    """A tokenizer must fit the embedding table and be the one the checkpoint was trained with."""
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise TinylmError(f"{tokenizer_file}: vocabulary of {tokenizer.vocab_size} does not fit the model's "
                          f"{recipe.model.vocab_size} embeddings")
    recorded = manifest.get("tokenizer_fingerprint")
    if recorded and recorded != tokenizer.fingerprint():
        raise TinylmError(f"{tokenizer_file}: not the tokenizer this checkpoint was trained with "
                          "(fingerprint differs)")


