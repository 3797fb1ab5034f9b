"""The model card (RUN/README.md), its loss plot (RUN/loss.png) and samples (RUN/samples.md), written from the run
itself: regenerate them with `tinylm card RUN`, never edit them by hand."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from tinylm.data.shards import frame_prefix
from tinylm.infer.engine import generate_text
from tinylm.recipe import Recipe, recipe_to_toml
from tinylm.runs.info import RunInfo, read_run
from tinylm.storage.atomic import atomic_path, atomic_write_text
from tinylm.storage.rundir import RunDir

REPO_PLACEHOLDER = "USER/MODEL"  # the usage snippets name no machine's path
TOKENIZER_NAMES = {"bytes": "raw UTF-8 bytes", "bpe": "byte-level BPE", "chars": "character vocabulary",
                   "gpt2": "GPT-2 BPE (tiktoken ranks)"}


def details_rows(info: RunInfo) -> list[tuple[str, str]]:
    m, tokenizer = info.recipe.model, info.recipe.tokenizer
    rows = [("architecture", info.model.describe()), ("layers", str(m.n_layers)), ("width", str(m.dim)),
            *info.model.detail_rows()]
    rows += [("context", f"{m.context_length} tokens"),
             ("vocabulary", f"{m.vocab_size:,} ({TOKENIZER_NAMES[tokenizer.kind]}"
                            + (f"; specials {', '.join(tokenizer.special_tokens)}" if tokenizer.special_tokens else "")
                            + ")"),
             ("parameters", f"{info.total_params:,} total, {info.non_embedding_params:,} without embeddings"),
             ("recipe", f"`{info.recipe.name}`"
              + (f" (reproduces {info.recipe.source})" if info.recipe.source else ""))]
    return rows


def training_rows(info: RunInfo) -> list[tuple[str, str]]:
    train_split, val_split = info.split("train"), info.split("val")
    train_tokens = int(train_split.get("n_tokens", 0))
    rows = [("data", ", ".join(info.recipe.data.paths) or info.recipe.data.hub_dataset),
            ("stories", f"{train_split.get('n_stories', 0):,} train / {val_split.get('n_stories', 0):,} validation"),
            ("tokens in the train split", f"{train_tokens:,}"),
            ("tokens per step", f"{info.tokens_per_step:,}"),
            ("steps", f"{info.steps:,}"),
            ("tokens seen", f"{info.tokens_seen:,}")]
    if train_tokens:
        rows.append(("epochs", f"{info.tokens_seen / train_tokens:.2f}"))
    rows += [("tokens per parameter", f"{info.tokens_seen / info.total_params:.1f}"),
             ("wall time", f"{info.wall_time_s / 60:.1f} min"),
             ("hardware", hardware_text(info.run.get("hardware"))),
             ("optimizer", _optimizer_text(info))]
    return rows


def hardware_text(hardware) -> str:
    if not isinstance(hardware, dict):
        return str(hardware or "unknown")
    where = hardware.get("gpu") or f"{hardware.get('cpu', 'CPU')}, {hardware.get('cpu_cores', '?')} cores"
    return f"{where}; PyTorch {hardware.get('torch', '?')}, Python {hardware.get('python', '?')}"


def _optimizer_text(info: RunInfo) -> str:
    train = info.recipe.train
    group_rates = (("embedding", train.embedding_lr), ("head", train.head_lr), ("matrix", train.matrix_lr))
    rates = "".join(f", {role} lr {rate:g}" for role, rate in group_rates if rate)
    optimizer = "Muon for hidden matrices, AdamW for the rest:" if train.optimizer == "muon" else "AdamW"
    return (f"{optimizer} lr {train.lr:g}{rates} ({train.schedule}, warmup {train.warmup_steps}, min "
            f"{train.min_lr:g}), betas ({train.beta1:g}, {train.beta2:g}), weight decay {train.weight_decay:g} on "
            f"2-D tensors, clip {train.grad_clip:g}, dropout {info.recipe.model.dropout:g}")


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in rows])


def sampling_text(info: RunInfo) -> str:
    s = info.recipe.sample
    parts = [f"temperature {s.temperature:g}"]
    parts += [f"top-k {s.top_k}"] if s.top_k else []
    parts += [f"top-p {s.top_p:g}"] if s.top_p < 1 else []
    parts += [f"min-p {s.min_p:g}"] if s.min_p else []
    parts += [f"repetition penalty {s.repetition_penalty:g}"] if s.repetition_penalty != 1 else []
    return ", ".join(parts)


def usage_text(info: RunInfo) -> str:
    s = info.recipe.sample
    if info.model.transformers_model_type is None:
        return (f"{type(info.model).__name__} has no transformers class; load the export with tinylm:\n\n```bash\n"
                f"tinylm sample {REPO_PLACEHOLDER} --prompt \"Once upon a time\"\n```")
    kwargs = [f"temperature={s.temperature:g}"] if s.temperature > 0 else []
    kwargs += [f"top_k={s.top_k}"] if s.top_k else []
    kwargs += [f"top_p={s.top_p:g}"] if s.top_p < 1 else []
    kwargs += [f"min_p={s.min_p:g}"] if s.min_p else []
    kwargs += [f"repetition_penalty={s.repetition_penalty:g}"] if s.repetition_penalty != 1 else []
    sample = ", do_sample=True, " + ", ".join(kwargs) if kwargs else ""
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"repo_id = \"{REPO_PLACEHOLDER}\"  # the hub repository it was pushed to, or the local hf directory\n"
            "tokenizer = AutoTokenizer.from_pretrained(repo_id)\n"
            "model = AutoModelForCausalLM.from_pretrained(repo_id)\n"
            "inputs = tokenizer(\"Once upon a time\", return_tensors=\"pt\")\n"
            f"out = model.generate(**inputs, max_new_tokens={s.max_new_tokens}{sample})\n"
            "print(tokenizer.decode(out[0], skip_special_tokens=True))\n```")


def evaluation_text(info: RunInfo) -> str:
    e = info.evaluation
    if not e:
        return "Not evaluated yet: run `tinylm eval` on the run directory, then `tinylm card` again."
    return ("Mean over the whole validation split (tinylm's own: stories held out by a hash of their text, not the "
            "dataset's published validation split)"
            f" ({e.get('tokens', 0):,} tokens, {e.get('bytes', 0):,} bytes):\n\n"
            "| val loss (nats/token) | perplexity | bits per byte |\n|---|---|---|\n"
            f"| {e['loss']:.4f} | {e['perplexity']:.3f} | {e['bits_per_byte']:.4f} |\n\n"
            "Losses per token do not compare across vocabularies; bits per byte do.")


def plot_loss(info: RunInfo, path: Path) -> bool:
    """Train and validation loss against tokens seen; False when there is nothing to plot."""
    if not info.train_points and not info.val_points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if info.train_points:
        ax.plot([p["tokens"] for p in info.train_points], [p["loss"] for p in info.train_points],
                label="train (per step)", alpha=0.6)
    if info.val_points:
        ax.plot([p["tokens"] for p in info.val_points], [p["val_loss"] for p in info.val_points], "o-",
                label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{info.name} ({info.recipe.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def base_model(info: RunInfo) -> str | None:
    """The hub model a fine-tuned run started from (--init-from with a hub id), else None."""
    start = info.run.get("init_from")
    return start.get("hub_id") if isinstance(start, dict) else None


def card_metadata(info: RunInfo) -> ModelCardData:
    """The front matter the hub reads: license and datasets from the recipe's [card] section, the whole-split
    evaluation as model-index results, the recipe's prompts as widget examples."""
    recipe, e = info.recipe, info.evaluation
    datasets = recipe.card.datasets
    results = []
    if e and datasets:
        # Honest naming: tinylm holds out stories by a hash of their text, not the dataset's own validation split.
        name = (f"{datasets[0]}, tinylm's validation split ({recipe.data.val_fraction:g} of the stories of "
                f"{', '.join(recipe.data.paths) or recipe.data.hub_dataset} by a hash, seed {recipe.data.split_seed})")
        common = dict(task_type="text-generation", task_name="Text Generation", dataset_type=datasets[0],
                      dataset_name=name, dataset_split="tinylm-hash-validation")
        results = [EvalResult(metric_type="loss", metric_name="val loss (nats/token)", metric_value=e["loss"],
                              **common),
                   EvalResult(metric_type="perplexity", metric_name="perplexity", metric_value=e["perplexity"],
                              **common),
                   EvalResult(metric_type="bits_per_byte", metric_name="bits per byte",
                              metric_value=e["bits_per_byte"], **common)]
    return ModelCardData(
        language="en", license=recipe.card.license, library_name=library_name(info), pipeline_tag="text-generation",
        tags=["tinylm", "tinystories", info.model.family], datasets=list(datasets) or None,
        base_model=base_model(info), model_name=info.name, eval_results=results or None,
        widget=[{"text": prompt} for prompt in recipe.sample.prompts if prompt] or None)


def library_name(info: RunInfo) -> str:
    return "transformers" if info.model.transformers_model_type else "tinylm"


def render_card(info: RunInfo, samples: str, has_plot: bool) -> str:
    command = info.run.get("command") or "unknown"
    front = f"---\n{card_metadata(info).to_yaml()}\n---\n"
    sections = [
        front,
        f"# {info.name}\n\nA {info.total_params / 1e6:.2f}M-parameter language model trained on TinyStories with "
        f"tinylm, recipe `{info.recipe.name}`.{(' ' + info.recipe.notes) if info.recipe.notes else ''}",
        "## Model details\n\n" + _table(details_rows(info)),
        "## Training\n\n" + _table(training_rows(info))
        + f"\n\nCommand:\n\n```bash\n{command}\n```\n\n<details><summary>Resolved recipe</summary>\n\n```toml\n"
        + recipe_to_toml(info.recipe) + "```\n\n</details>",
        "## Evaluation\n\n" + evaluation_text(info),
    ]
    if has_plot:
        sections.append("## Loss curve\n\n![loss curve](loss.png)")
    if samples:
        sections.append(f"## Samples\n\nWith the recommended settings ({sampling_text(info)}):\n\n{samples}")
    sections.append("## Usage\n\n" + usage_text(info))
    sections.append("This card was written by `tinylm card` from the run directory; regenerate it, do not edit it.")
    return "\n\n".join(sections) + "\n"


def format_samples(prompts: list[str], completions: list[str]) -> str:
    blocks = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = (prompt + completion).strip().replace("\n", "\n> ")
        blocks.append(f"**Prompt:** `{prompt}`\n\n> {text}")
    return "\n\n".join(blocks)


def write_samples(recipe: Recipe, model, tokenizer, seed: int = 0) -> str:
    """Stories from the recipe's prompts with its recommended sampling settings, as markdown."""
    prompts = recipe.sample.prompts
    completions = generate_text(model, tokenizer, prompts, recipe.sample.settings,
                                prefix=frame_prefix(tokenizer, recipe.data.framing), seed=seed)
    return format_samples(prompts, completions)


def write_card(run_dir: str | Path, samples: str | None = None) -> Path:
    """Write RUN/loss.png, RUN/samples.md (when samples are given) and RUN/README.md; returns the card's path."""
    info, run = read_run(run_dir), RunDir(run_dir)
    if samples is not None:
        atomic_write_text(run.samples_file, samples + "\n")
    elif run.samples_file.is_file():
        samples = run.samples_file.read_text(encoding="utf-8").strip()
    has_plot = plot_loss(info, run.loss_plot)
    atomic_write_text(run.card_file, render_card(info, samples or "", has_plot))
    return run.card_file
