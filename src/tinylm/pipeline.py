"""The run directory's inputs: RUN/tokenizer.json and RUN/data/, built on first use and reused after."""

from __future__ import annotations

from pathlib import Path

from .errors import TinylmError
from .recipe import Recipe


def prepare_run(recipe: Recipe, run: str | Path, progress: bool = True):
    """Load or train the run's tokenizer, then write (or reuse) its token shards; returns (tokenizer, data meta).

    The tokenizer is saved only once the shards exist, so a failure leaves nothing half-made."""
    from .corpus import train_tokenizer
    from .data import prepare_data
    from .tokenizer import load_tokenizer

    run = Path(run)
    tokenizer_file = run / "tokenizer.json"
    corpus = None
    if tokenizer_file.is_file():
        tokenizer = load_tokenizer(tokenizer_file)
        if tokenizer.kind != recipe.tokenizer.kind:
            raise TinylmError(f"{tokenizer_file} is a {tokenizer.kind} tokenizer but the recipe asks for "
                              f"{recipe.tokenizer.kind}; use another --out")
    else:
        tokenizer, corpus = train_tokenizer(recipe)  # bpe/chars learn from the training split only
    if tokenizer.vocab_size > recipe.model.vocab_size:
        raise TinylmError(f"{tokenizer_file}: {tokenizer.vocab_size} ids do not fit model.vocab_size "
                          f"{recipe.model.vocab_size}")
    meta = prepare_data(recipe, tokenizer, run / "data", progress=progress, corpus=corpus)
    if not tokenizer_file.is_file():
        tokenizer.save(tokenizer_file)
    return tokenizer, meta
