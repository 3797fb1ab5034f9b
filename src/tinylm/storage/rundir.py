"""The run directory, the unit a user holds: one class owns its paths and the readers of what training wrote.

    RUN/recipe.toml      the resolved recipe            RUN/metrics.jsonl   one JSON object per log line
    RUN/tokenizer.json   the tokenizer                  RUN/run.json        command, hardware, wall time
    RUN/data/            token shards (+ meta.json)     RUN/eval.json       the whole-split evaluation
    RUN/checkpoints/     step-NNNNNNNN/ and best/       RUN/README.md, loss.png, samples.md: the model card
    RUN/hf/              the Hugging Face export        RUN/tensorboard/    events, when train.report_to names it
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinylm.errors import TinylmError
from tinylm.recipe import Recipe, recipe_from_toml, recipe_to_toml
from tinylm.storage.atomic import MANIFEST_NAME, atomic_write_text, check_replaceable

STEP_PATTERN = re.compile(r"^step-(\d{8})$")
# Everything tinylm writes at the top of a run directory (exports go to RUN/FORMAT by default).
RUN_ENTRIES = {"recipe.toml", "tokenizer.json", "data", "checkpoints", "metrics.jsonl", "run.json", "eval.json",
               "README.md", "loss.png", "samples.md", "hf", "llama2c", "gguf", "tensorboard", "wandb", MANIFEST_NAME}


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when it does not exist, one clear line when it is damaged."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise TinylmError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TinylmError(f"{path}: expected a JSON object")
    return value


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # ----------------------------------------------------------------------------------------------------- paths
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.toml"

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def run_file(self) -> Path:
        return self.path / "run.json"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    @property
    def eval_file(self) -> Path:
        return self.path / "eval.json"

    @property
    def card_file(self) -> Path:
        return self.path / "README.md"

    @property
    def loss_plot(self) -> Path:
        return self.path / "loss.png"

    @property
    def samples_file(self) -> Path:
        return self.path / "samples.md"

    def export_dir(self, fmt: str) -> Path:
        return self.path / fmt

    def is_run(self) -> bool:
        return self.recipe_file.is_file()

    def check_replaceable(self) -> None:
        """Only a run holding nothing but what tinylm writes there (or any directory the generic guard accepts) may
        be replaced: `--out ~/Documents --force` must never delete a folder of the user's."""
        if not self.is_run():
            check_replaceable(self.path)
            return
        foreign = sorted(p.name for p in self.path.iterdir()
                         if p.name not in RUN_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise TinylmError(f"{self.path} holds files tinylm did not write ({', '.join(foreign[:3])}"
                              f"{', ...' if len(foreign) > 3 else ''}): refusing to replace it; choose another --out")

    def write_recipe(self, recipe: Recipe, replace: bool = False) -> None:
        """Record the resolved recipe (an existing one is left as it is, since it describes what was trained,
        unless `replace`)."""
        if replace or not self.recipe_file.exists():
            atomic_write_text(self.recipe_file, recipe_to_toml(recipe))

    # --------------------------------------------------------------------------------------------------- readers
    def read_recipe(self, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
        if not self.recipe_file.is_file():
            raise TinylmError(f"{self.path}: not a run directory (no recipe.toml)")
        return recipe_from_toml(self.recipe_file.read_text(encoding="utf-8"), overrides, origin=str(self.recipe_file))

    def read_metrics(self) -> list[dict[str, Any]]:
        """metrics.jsonl's records; a line cut short by a crash is skipped (the rest is still good)."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def read_run_info(self) -> dict[str, Any]:
        return read_json(self.run_file)

    def read_evaluation(self) -> dict[str, Any]:
        return read_json(self.eval_file)

    def read_data_meta(self) -> dict[str, Any]:
        return read_json(self.data_dir / "meta.json")

    # ----------------------------------------------------------------------------------------------- checkpoints
    def step_checkpoints(self) -> list[Path]:
        """Complete step-N directories (manifest present), oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if p.is_dir() and STEP_PATTERN.match(p.name)
                 and (p / MANIFEST_NAME).is_file()]
        return sorted(found, key=lambda p: p.name)

    def checkpoint(self, which: str = "best") -> Path:
        """The checkpoint directory that "best", "latest" or "step-NNNNNNNN" names ("best" falls back to the latest
        when no validation has been run yet)."""
        best = self.checkpoints_dir / "best"
        if which == "best" and (best / MANIFEST_NAME).is_file():
            return best
        if which in ("best", "latest"):
            found = self.step_checkpoints()
            if not found:
                raise TinylmError(f"{self.checkpoints_dir}: no complete checkpoint (nothing saved yet?)")
            return found[-1]
        path = self.checkpoints_dir / which
        if not (path / MANIFEST_NAME).is_file():
            raise TinylmError(f"{path}: no such complete checkpoint (use best, latest or step-NNNNNNNN)")
        return path

    def checkpoint_note(self, which: str, chosen: Path) -> str | None:
        """One line saying why `chosen` stands in for the checkpoint `which` names (a best cut short or damaged
        until its manifest went missing); None when nothing needs saying."""
        best = self.checkpoints_dir / "best"
        if which == "best" and chosen != best and best.exists():
            return f"used {chosen}: {best} is incomplete (no {MANIFEST_NAME})"
        return None

    def has_checkpoints(self) -> bool:
        return bool(self.step_checkpoints()) or (self.checkpoints_dir / "best").exists()
