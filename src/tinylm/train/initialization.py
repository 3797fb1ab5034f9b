"""A new run that starts from existing weights (`tinylm train --init-from`): continued pre-training, or fine-tuning
on another corpus. The weights come with the tokenizer they were trained with, and the run uses it; the optimizer
and the schedule start afresh. Finding and checking the source is the caller's (runs.loading.initialization)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinylm.data.tokenizer import Tokenizer, load_tokenizer
from tinylm.errors import TinylmError
from tinylm.storage.rundir import RunDir


@dataclass(frozen=True)
class Initialization:
    weights: dict[str, torch.Tensor]  # under tinylm's names, shaped as the recipe's model
    tokenizer: Tokenizer
    source: str  # as the user named it
    hub_id: str | None = None  # the hub model it came from, if it did (the model card's base model)


def adopt_tokenizer(run: RunDir, init: Initialization) -> None:
    """Write the source's tokenizer as RUN/tokenizer.json, so the shards are made with it (one already there must
    be the same)."""
    if run.tokenizer_file.is_file():
        if load_tokenizer(run.tokenizer_file).fingerprint() != init.tokenizer.fingerprint():
            raise TinylmError(f"{run.tokenizer_file} is another tokenizer than the one of {init.source}; "
                              "use another --out")
        return
    init.tokenizer.save(run.tokenizer_file)
