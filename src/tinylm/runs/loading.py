"""Any model a user names, loaded the same way: a run directory (one of its checkpoints), a Hugging Face directory
(our export or any LlamaForCausalLM), or a hub model id ('owner/name', fetched into the hub cache); and such a model
as the starting point of a new run (`initialization`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from tinylm.data import hub
from tinylm.data.tokenizer import Tokenizer, load_tokenizer
from tinylm.errors import TinylmError
from tinylm.export.hf_import import hf_end_ids, load_hf_dir
from tinylm.models import build_model
from tinylm.models.weights import check_fits, shapes
from tinylm.recipe import ModelConfig, Recipe, TokenizerConfig
from tinylm.storage.atomic import verify_manifest
from tinylm.storage.rundir import RunDir
from tinylm.train.checkpoints import WEIGHTS_FILE, check_tokenizer_fits, load_weights
from tinylm.train.initialization import Initialization


@dataclass
class LoadedModel:
    """A model in eval mode with the recipe and tokenizer that go with it, and where it came from."""

    model: torch.nn.Module
    recipe: Recipe
    tokenizer: Tokenizer
    source: Path  # the checkpoint directory of a run, else the model directory
    run: RunDir | None = None  # set when the model comes from a run directory
    end_ids: list[int] | None = None  # where generation stops when the directory says (else the tokenizer's)
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
    return LoadedModel(model, recipe, tokenizer, checkpoint, run, note=run.checkpoint_note(which, checkpoint))


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
        return LoadedModel(model, recipe, tokenizer, local, end_ids=hf_end_ids(local))
    raise TinylmError(f"{path}: neither a run directory (recipe.toml), a Hugging Face directory (config.json) nor a "
                      "hub model id (owner/name)")


def _model_differences(theirs: ModelConfig, ours: ModelConfig) -> str:
    names = [f.name for f in fields(ModelConfig) if f.name != "dropout"]
    return ", ".join(f"model.{n} {getattr(theirs, n)!r} (the recipe: {getattr(ours, n)!r})" for n in names
                     if getattr(theirs, n) != getattr(ours, n))


def _tokenizer_differences(tokenizer: Tokenizer, wanted: TokenizerConfig) -> list[str]:
    found = []
    if tokenizer.kind != wanted.kind:
        found.append(f"a {tokenizer.kind} tokenizer (the recipe: {wanted.kind})")
    if tokenizer.vocab_size != wanted.vocab_size:
        found.append(f"{tokenizer.vocab_size:,} token ids (the recipe: {wanted.vocab_size:,})")
    for role in ("bos", "eos", "sink"):
        theirs, ours = tokenizer.meta.get(role) or "", getattr(wanted, role)
        if theirs != ours:
            found.append(f"{role} {theirs or 'none'!r} (the recipe: {ours or 'none'!r})")
    return found


def initialization(source: str, recipe: Recipe) -> Initialization:
    """The weights and tokenizer a new run of `recipe` starts from (`tinylm train --init-from`): a run, a Hugging
    Face directory or a hub id. Their shapes and the tokenizer must be the recipe's, or one line says what differs."""
    loaded = load_model(source)
    where = f"--init-from {source}"
    problems = _tokenizer_differences(loaded.tokenizer, recipe.tokenizer)
    if problems:
        raise TinylmError(f"{where}: its tokenizer is not the recipe's: {'; '.join(problems)}")
    weights = loaded.model.state_dict()
    expected = shapes(build_model(recipe.model, device="meta"))
    if {name: tuple(t.shape) for name, t in weights.items()} != expected:
        differences = _model_differences(loaded.recipe.model, recipe.model)
        if not differences:
            check_fits(expected, weights, where, f"recipe {recipe.name}'s model")
        raise TinylmError(f"{where}: its weights do not fit the recipe's model: {differences}")
    hub_id = source if not Path(source).exists() and hub.is_repo_id(source) else None
    return Initialization(weights, loaded.tokenizer, source, hub_id)
