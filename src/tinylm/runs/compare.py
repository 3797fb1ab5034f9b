"""`tinylm compare RUN...`: runs side by side, sorted by bits per byte (losses per token do not compare across
vocabularies), and one plot of validation bits per byte against tokens seen and against wall-clock time."""

from __future__ import annotations

import math
from pathlib import Path

from tinylm.errors import TinylmError
from tinylm.runs.info import RunInfo, read_run
from tinylm.storage.atomic import atomic_path


def bits_per_byte(info: RunInfo) -> float:
    """The full-split evaluation when there is one, else the last periodic estimate."""
    if "bits_per_byte" in info.evaluation:
        return float(info.evaluation["bits_per_byte"])
    if info.val_points:
        return float(info.val_points[-1]["val_bpb"])
    return math.nan


def val_loss(info: RunInfo) -> float:
    if "loss" in info.evaluation:
        return float(info.evaluation["loss"])
    return float(info.val_points[-1]["val_loss"]) if info.val_points else math.nan


def measured_on(info: RunInfo) -> str:
    """Which figures a row shows: a whole-split evaluation (eval.json) and a training-time estimate on a few batches
    are not the same measurement."""
    if "bits_per_byte" in info.evaluation:
        return "whole split"
    if info.val_points:
        return f"estimate at step {info.val_points[-1].get('step', '?')} ({info.recipe.train.eval_batches} batches)"
    return "none"


def comparison_table(runs: list[RunInfo]) -> str:
    ordered = sorted(runs, key=lambda r: (math.isnan(bits_per_byte(r)), bits_per_byte(r)))
    lines = ["| run | recipe | vocab | parameters | tokens seen | wall time | val loss | bits per byte | measured on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ordered:
        lines.append(f"| {r.name} | {r.recipe.name} | {r.recipe.model.vocab_size:,} | {r.total_params:,} | "
                     f"{r.tokens_seen:,} | {r.wall_time_s / 60:.1f} min | {val_loss(r):.4f} | "
                     f"{bits_per_byte(r):.4f} | {measured_on(r)} |")
    if len({measured_on(r) == "whole split" for r in runs}) > 1:
        lines.append("\nwhole split: `tinylm eval` on the whole validation split; estimate: the last periodic "
                     "evaluation during training (run `tinylm eval RUN` for the whole split)")
    return "\n".join(lines)


def plot_comparison(runs: list[RunInfo], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in runs:
        points = r.val_points
        if not points:
            continue
        bpb = [p["val_bpb"] for p in points]
        by_tokens.plot([p["tokens"] for p in points], bpb, "o-", label=r.name, markersize=3)
        by_time.plot([p["time_s"] / 60 for p in points], bpb, "o-", label=r.name, markersize=3)
    by_tokens.set_xlabel("tokens seen")
    by_tokens.set_ylabel("validation bits per byte (log scale)")
    by_time.set_xlabel("wall-clock minutes")
    for ax in (by_tokens, by_time):
        ax.set_yscale("log")  # step-0 losses (a pinv head starts near 20 bits per byte) would flatten the rest
        ax.grid(alpha=0.3, which="both")
    by_tokens.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def compare_runs(run_dirs: list[str], plot_path: str | Path) -> str:
    if not run_dirs:
        raise TinylmError("compare needs at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    plot_comparison(runs, Path(plot_path))
    return comparison_table(runs)
