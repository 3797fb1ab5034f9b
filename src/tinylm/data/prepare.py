"""The run directory's inputs: RUN/tokenizer.json and RUN/data/, built on first use and reused after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tinylm.data.corpus import is_validation, load_corpus, train_tokenizer
from tinylm.data.shards import prepare_data
from tinylm.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_stats
from tinylm.errors import TinylmError
from tinylm.recipe import Recipe, differences, load_recipe
from tinylm.storage.rundir import RunDir


@dataclass(frozen=True)
class SplitStats:
    stories: int
    tokens: int
    bytes: int


@dataclass(frozen=True)
class PreparedData:
    """What `prepare_run_inputs` made or found: the tokenizer and the shards' statistics."""

    tokenizer: Tokenizer = field(repr=False)
    train: SplitStats
    val: SplitStats
    files: list[str]
    duplicates: int
    replaced_bytes: int
    framing: str
    dtype: str
    reused: bool
    seconds: float

    @classmethod
    def from_meta(cls, tokenizer: Tokenizer, meta: dict[str, Any]) -> PreparedData:
        splits = {name: SplitStats(meta[name]["n_stories"], meta[name]["n_tokens"], meta[name]["n_bytes"])
                  for name in ("train", "val")}
        return cls(tokenizer, splits["train"], splits["val"], list(meta["files"]), int(meta["duplicates"]),
                   int(meta["replaced_bytes"]), meta["framing"], meta["dtype"], bool(meta["reused"]),
                   float(meta["seconds"]))


def prepare_run_inputs(recipe: Recipe, run: RunDir, progress: bool = True) -> PreparedData:
    """Load or train the run's tokenizer, then write (or reuse) its token shards.

    The tokenizer is saved only once the shards exist, so a failure leaves nothing half-made."""
    if run.tokenizer_file.is_file():
        tokenizer = load_tokenizer(run.tokenizer_file)
        if tokenizer.kind != recipe.tokenizer.kind:
            raise TinylmError(f"{run.tokenizer_file} is a {tokenizer.kind} tokenizer but the recipe asks for "
                              f"{recipe.tokenizer.kind}; use another --out")
        changed = differences(run.read_recipe(), recipe, ("tokenizer",)) if run.is_run() else []
        if changed:
            raise TinylmError(f"{run.tokenizer_file} holds a different tokenizer: {'; '.join(changed)}; use another "
                              "--out, or replace it with `tinylm tokenizer train ... --force`")
    else:
        tokenizer, _ = train_tokenizer(recipe, progress=progress)  # bpe/chars learn from the training split only
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise TinylmError(f"{run.tokenizer_file}: {tokenizer.vocab_size} ids do not fit model.vocab_size "
                          f"{recipe.model.vocab_size}")
    meta = prepare_data(recipe, tokenizer, run.data_dir, progress=progress)
    if not run.tokenizer_file.is_file():
        tokenizer.save(run.tokenizer_file)
    return PreparedData.from_meta(tokenizer, meta)


@dataclass(frozen=True)
class TrainedTokenizer:
    tokenizer: Tokenizer
    stories: int | None  # stories it learnt from (None: built without training text)
    seconds: float


def train_run_tokenizer(recipe: Recipe, run: RunDir, force: bool = False, progress: bool = True) -> TrainedTokenizer:
    """Build or train the recipe's tokenizer into RUN/tokenizer.json; a different one already there is replaced
    only with `force` (shards and checkpoints made with it stop matching)."""
    started = time.perf_counter()
    tokenizer, stories = train_tokenizer(recipe, progress=progress)
    replaced = run.tokenizer_file.exists() and \
        load_tokenizer(run.tokenizer_file).fingerprint() != tokenizer.fingerprint()
    if replaced and not force:
        raise TinylmError(f"{run.tokenizer_file} exists and holds a different tokenizer; pass --force to replace it "
                          "(shards and checkpoints made with the old one stop matching)")
    tokenizer.save(run.tokenizer_file)
    run.write_recipe(recipe, replace=replaced)  # recipe.toml says which tokenizer the run now holds
    return TrainedTokenizer(tokenizer, stories if recipe.tokenizer.kind in ("bpe", "chars") else None,
                            time.perf_counter() - started)


def measure_tokenizer(target: str, overrides: list[str]) -> tuple[Tokenizer, dict[str, Any]]:
    """`tinylm tokenizer stats`: a run's tokenizer (on the run's data) or a recipe's, measured on the validation
    split."""
    run = RunDir(target)
    if run.path.is_dir() and run.tokenizer_file.is_file():
        if not run.is_run():
            raise TinylmError(f"{run.path} has no recipe.toml, so its data is unknown")
        if overrides:
            raise TinylmError(f"--set does not apply to a run ({run.path}): its tokenizer and data are fixed; give a "
                              "recipe to measure another setting")
        recipe = run.read_recipe()
        tokenizer = load_tokenizer(run.tokenizer_file)
    else:
        recipe = load_recipe(target, overrides)
        tokenizer, _ = train_tokenizer(recipe)
    data = recipe.data
    val = [s for s in load_corpus(data) if is_validation(s, data.val_fraction, data.split_seed)]
    if not val:
        raise TinylmError("the validation split is empty: add data or raise data.val_fraction")
    return tokenizer, tokenizer_stats(tokenizer, val)
