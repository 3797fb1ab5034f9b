"""Any model a user names, loaded the same way: a run directory (one of its checkpoints), a Hugging Face directory
(our export or any LlamaForCausalLM), or a hub model id ('owner/name', fetched into the hub cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tinylm.data import hub
from tinylm.data.tokenizer import Tokenizer, load_tokenizer
from tinylm.errors import TinylmError
from tinylm.export.hf_import import load_hf_dir
from tinylm.models import build_model
from tinylm.recipe import Recipe
from tinylm.storage.atomic import verify_manifest
from tinylm.storage.rundir import RunDir
from tinylm.train.checkpoints import WEIGHTS_FILE, check_tokenizer_fits, load_weights


@dataclass
class LoadedModel:
    """A model in eval mode with the recipe and tokenizer that go with it, and where it came from."""

    model: torch.nn.Module
    recipe: Recipe
    tokenizer: Tokenizer
    source: Path  # the checkpoint directory of a run, else the model directory
    run: RunDir | None = None  # set when the model comes from a run directory
    note: str | None = None  # why the checkpoint used is not the one asked for (worth telling the user)

    def __iter__(self):  # model, recipe, tokenizer = load_model(...)
        return iter((self.model, self.recipe, self.tokenizer))


def load_run_model(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedModel:
    """A run's checkpoint `which`. Refuses, naming the file, a checkpoint that fails its manifest (missing,
    truncated, altered), weights that do not fit the recipe's model, or a tokenizer that does not match."""
    run = RunDir(run_dir)
    recipe = run.read_recipe()
    checkpoint = run.checkpoint(which)
    manifest = verify_manifest(checkpoint)
    if not run.tokenizer_file.is_file():
        raise TinylmError(f"{run.tokenizer_file}: not found")
    tokenizer = load_tokenizer(run.tokenizer_file)
    check_tokenizer_fits(tokenizer, recipe, manifest, run.tokenizer_file)
    model = build_model(recipe.model)
    load_weights(model, checkpoint / WEIGHTS_FILE)
    model.to(device).eval()
    return LoadedModel(model, recipe, tokenizer, checkpoint, run, run.checkpoint_note(which, checkpoint))


def load_model(path: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedModel:
    """A run directory (checkpoint `which`), a Hugging Face directory, or a hub repository id of one. A local path
    wins over an id."""
    local = Path(path)
    if not local.exists() and hub.is_repo_id(str(path)):
        try:
            local = hub.model_snapshot(str(path))
        except TinylmError as exc:  # perhaps a mistyped local path: say both
            raise TinylmError(f"{path}: no such directory; as a hub model id, {exc}") from None
    if RunDir(local).is_run():
        return load_run_model(local, which, device=device)
    if (local / "config.json").is_file():
        model, recipe, tokenizer = load_hf_dir(local, device=device)
        return LoadedModel(model, recipe, tokenizer, local)
    raise TinylmError(f"{path}: neither a run directory (recipe.toml), a Hugging Face directory (config.json) nor a "
                      "hub model id (owner/name)")
