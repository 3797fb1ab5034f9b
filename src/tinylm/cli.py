"""The `tinylm` command: parses arguments, calls the library, prints, sets the exit code.

Each command is a small function `cmd_NAME(args) -> int`. A TinylmError (a user mistake) ends in one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from tinylm import __version__
from tinylm.errors import TinylmError
from tinylm.export import FORMATS, GGUF_DTYPES


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe name (see `tinylm recipes`) or a path to a .toml file")
    add_overrides(parser)


def overrides_words(overrides: list[str]) -> list[str]:
    """The --set arguments as they can be typed again."""
    return [w for o in overrides for w in ("--set", o)]


def cmd_recipes(args) -> int:
    from tinylm.recipe import load_recipe, recipe_names, recipe_text

    if args.name:
        load_recipe(args.name)  # validate before printing
        print(recipe_text(args.name), end="")
        return 0
    from tinylm.models import count_from_shapes

    print(f"{'recipe':<20} {'parameters':>13}  source")
    for name in recipe_names():
        recipe = load_recipe(name)
        total = count_from_shapes(recipe.model).total
        print(f"{name:<20} {total:>13,}  {recipe.source or '(no published model)'}")
    return 0


def cmd_params(args) -> int:
    from tinylm.models import count_from_shapes
    from tinylm.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    count = count_from_shapes(recipe.model)
    print(f"{recipe.name} ({recipe.source or 'custom'})")
    print(f"total parameters:            {count.total:,}")
    print(f"without embeddings:          {count.without_embedding:,}")
    print(f"num decayed parameter tensors: {count.decayed_tensors}, with {count.decayed:,} parameters")
    print(f"num non-decayed parameter tensors: {count.not_decayed_tensors}, with {count.not_decayed:,} parameters")
    print("per module (summed over layers):")
    for name, n in count.by_module.items():
        print(f"  {name:<32} {n:>13,}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from tinylm.data.prepare import train_run_tokenizer
    from tinylm.recipe import load_recipe
    from tinylm.storage.rundir import RunDir

    run = RunDir(args.out)
    made = train_run_tokenizer(load_recipe(args.recipe, args.overrides), run, force=args.force)
    source = f" from {made.stories:,} stories" if made.stories is not None else ""
    print(f"{made.tokenizer.kind} tokenizer, {made.tokenizer.vocab_size:,} ids{source} in {made.seconds:.1f} s -> "
          f"{run.tokenizer_file}")
    print(f"special ids: {made.tokenizer.special_ids or 'none'}")
    return 0


def cmd_tokenizer_stats(args) -> int:
    from tinylm.data.prepare import measure_tokenizer

    tokenizer, s = measure_tokenizer(args.target, args.overrides)
    print(f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size:,} ids; validation split: {s['n_texts']:,} stories, "
          f"{s['n_bytes']:,} bytes, {s['n_tokens']:,} tokens")
    print(f"bytes per token:  {s['bytes_per_token']:.3f}")
    print(f"chars per token:  {s['chars_per_token']:.3f}")
    print(f"tokens per story: {s['tokens_per_text']:.1f} (longest {s['max_tokens']:,})")
    if "unknown_fraction" in s:
        print(f"unknown tokens:   {100 * s['unknown_fraction']:.4f}%")
    return 0


def cmd_data_prepare(args) -> int:
    from tinylm.data.prepare import prepare_run_inputs
    from tinylm.recipe import load_recipe
    from tinylm.storage.rundir import RunDir

    recipe = load_recipe(args.recipe, args.overrides)
    run = RunDir(args.out)
    data = prepare_run_inputs(recipe, run, progress=not args.quiet)
    print(f"tokenizer: {run.tokenizer_file} ({data.tokenizer.kind}, {data.tokenizer.vocab_size:,} ids)")
    run.write_recipe(recipe)
    for name, split in (("train", data.train), ("val", data.val)):
        print(f"{name:>5}: {split.stories:>9,} stories {split.tokens:>13,} tokens {split.bytes:>14,} bytes "
              f"({split.bytes / max(1, split.tokens):.2f} bytes/token)")
    print(f"from {len(data.files)} file(s); {data.duplicates:,} duplicate stories dropped, "
          f"{data.replaced_bytes:,} undecodable bytes replaced; framing {data.framing}, {data.dtype}")
    if data.reused:
        print(f"reused the shards in {run.data_dir} (same tokenizer and corpus) in {data.seconds:.1f} s")
    else:
        print(f"wrote {run.data_dir} in {data.seconds:.1f} s")
    return 0


def cmd_train(args) -> int:
    import os
    import shlex
    from pathlib import Path

    from tinylm.recipe import load_recipe
    from tinylm.train import train
    from tinylm.train.resume import resume_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run = Path(args.out or Path("runs") / recipe.name)
    resume = args.resume_from or args.resume
    if resume:  # the run's own recipe, not the named one's defaults
        recipe = resume_recipe(run, args.recipe, args.overrides)
    # The command as it can be typed again (rebuilt from the parsed arguments, whoever called main()).
    words = ["tinylm", "train", args.recipe, *overrides_words(args.overrides), "--out", str(run)]
    words += ["--resume-from", args.resume_from] if args.resume_from else ["--resume"] if args.resume else []
    words += ["--stop-after", str(args.stop_after)] if args.stop_after else []
    words += ["--init-from", args.init_from] if args.init_from else []
    init = None
    if args.init_from:
        from tinylm.runs.loading import initialization

        init = initialization(args.init_from, recipe)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        words = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", "-m", "tinylm.cli",
                 *words[1:]]
    summary = train(recipe, run, resume=resume, command=shlex.join(words), progress=not args.quiet,
                    stop_after=args.stop_after, init=init)
    if summary.rank == 0:
        best = f", best val loss {summary.best_val_loss:.4f}" if summary.best_val_loss is not None else ""
        print(f"{run}: step {summary.step} ({summary.stopped}), {summary.tokens:,} tokens{best}")
    return 0


def cmd_eval(args) -> int:
    import json

    from tinylm.runs.evaluate import evaluate_path

    result = evaluate_path(args.run, which=args.checkpoint, data_dir=args.data, batch_size=args.batch_size)
    if result.note:
        print(f"tinylm: {result.note}", file=sys.stderr)
    if args.json:
        keys = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "checkpoint")
        print(json.dumps({k: getattr(result, k) for k in keys}))
    else:
        print(result.line())
    return 0


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_sample(args) -> int:
    from tinylm.data.shards import frame_prefix
    from tinylm.infer.engine import generate_text
    from tinylm.models import resolve_device
    from tinylm.runs.loading import load_model

    device = resolve_device(args.device)
    loaded = load_model(args.model, args.checkpoint, device=device)
    if loaded.note:
        print(f"tinylm: {loaded.note}", file=sys.stderr)
    model, recipe, tokenizer = loaded
    sampling = recipe.sample.settings.with_changes(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty)
    prompts = args.prompt if args.prompt is not None else recipe.sample.prompts
    options = dict(prefix=frame_prefix(tokenizer, recipe.data.framing), stop=[_unescape(s) for s in args.stop],
                   seed=args.seed, end_ids=loaded.end_ids)
    if len(prompts) == 1:  # one prompt: stream its text as it comes (the prompt first, once it is accepted)
        shown = []

        def show(row: int, text: str) -> None:
            print(("" if shown else prompts[0]) + text, end="", flush=True)
            shown.append(True)

        generate_text(model, tokenizer, prompts, sampling, stream=show, **options)
        print("" if shown else prompts[0])
        return 0
    texts = generate_text(model, tokenizer, prompts, sampling, **options)
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        print(("\n" if i else "") + prompt + text)
    return 0


def cmd_serve(args) -> int:
    from tinylm.infer.openai_api import Limits
    from tinylm.models import resolve_device
    from tinylm.runs.serving import load_served, serve

    if args.max_batch < 1:
        raise TinylmError(f"--max-batch must be >= 1, got {args.max_batch}")
    models = load_served(args.models, args.name, args.checkpoint, resolve_device(args.device))
    serve(models, args.host, args.port, args.api_key, Limits(max_batch=args.max_batch, max_rows=args.max_batch))
    return 0


def cmd_export(args) -> int:
    from tinylm.runs.publish import export_run

    for line in export_run(args.run, args.format, args.out, which=args.checkpoint, dtype=args.dtype):
        print(line)
    return 0


def cmd_push(args) -> int:
    from tinylm.runs.publish import push_run

    print(f"uploaded {args.run}/hf to {push_run(args.run, args.repo_id, private=args.private)}")
    return 0


def cmd_card(args) -> int:
    from tinylm.runs.card import write_card, write_samples
    from tinylm.runs.loading import load_run_model

    samples = None
    if not args.no_samples:
        loaded = load_run_model(args.run, "best")
        if loaded.note:
            print(f"tinylm: {loaded.note}", file=sys.stderr)
        samples = write_samples(loaded.recipe, loaded.model, loaded.tokenizer, seed=args.seed)
    print(write_card(args.run, samples))
    return 0


def cmd_compare(args) -> int:
    from tinylm.runs.compare import compare_runs

    print(compare_runs(args.runs, args.plot))
    print(f"\nplot: {args.plot}")
    return 0


def cmd_demo(args) -> int:
    import shlex

    from tinylm.recipe import load_recipe
    from tinylm.runs.demo import DEMO_RECIPE, run_demo

    recipe = load_recipe(args.recipe, args.overrides)
    words = ["tinylm", "demo", "--out", args.out] + (["--recipe", args.recipe] if args.recipe != DEMO_RECIPE else [])
    words += overrides_words(args.overrides)
    run_demo(recipe, args.out, command=shlex.join(words), progress=not args.quiet, force=args.force)
    return 0


def _add_setup_commands(commands) -> None:
    """Recipes, parameter counts, tokenizers and token shards."""

    p = commands.add_parser("recipes", help="list the named recipes, or print one in full")
    p.add_argument("name", nargs="?", help="a recipe to print")
    p.set_defaults(func=cmd_recipes)

    p = commands.add_parser("params", help="count a recipe's parameters")
    add_recipe_arguments(p)
    p.set_defaults(func=cmd_params)

    p = commands.add_parser("tokenizer", help="train a tokenizer or measure one")
    tokenizer_commands = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    q = tokenizer_commands.add_parser("train", help="build/train the recipe's tokenizer into RUN/tokenizer.json")
    add_recipe_arguments(q)
    q.add_argument("--out", required=True, metavar="RUN", help="run directory")
    q.add_argument("--force", action="store_true", help="replace a different RUN/tokenizer.json")
    q.set_defaults(func=cmd_tokenizer_train)
    q = tokenizer_commands.add_parser("stats", help="bytes per token and tokens per story on the validation split")
    q.add_argument("target", metavar="RUN_OR_RECIPE", help="a run directory with tokenizer.json, or a recipe")
    add_overrides(q)
    q.set_defaults(func=cmd_tokenizer_stats)

    p = commands.add_parser("data", help="prepare token shards")
    data_commands = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = data_commands.add_parser("prepare", help="tokenise the recipe's data into RUN/data (reused when unchanged)")
    add_recipe_arguments(q)
    q.add_argument("--out", required=True, metavar="RUN", help="run directory")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_data_prepare)


def _add_train_commands(commands) -> None:
    """Training and evaluation."""

    p = commands.add_parser("train", help="train a recipe into a run directory (or continue one with --resume)")
    add_recipe_arguments(p)
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's latest complete checkpoint, with the run's own recipe.toml (--set "
                        "may change training settings such as train.max_steps)")
    p.add_argument("--resume-from", metavar="CHECKPOINT",
                   help="continue from this checkpoint (step-NNNNNNNN) instead, e.g. when the latest is damaged")
    p.add_argument("--init-from", dest="init_from", metavar="RUN_OR_HF_DIR_OR_HUB_ID",
                   help="start a new run from these weights and their tokenizer (fresh optimizer and schedule)")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop cleanly (checkpoint) after STEP steps, keeping the schedule; continue with --resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on the whole validation split")
    p.add_argument("run", metavar="RUN", help="a run directory, a Hugging Face model directory or a hub model id "
                                              "(owner/name; needs --data)")
    p.add_argument("--checkpoint", default="best", help="for a run: best (default), latest or step-NNNNNNNN")
    p.add_argument("--data", metavar="DIR", help="the token shards to use (default RUN/data)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per evaluation batch (default: the recipe's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def _add_use_commands(commands) -> None:
    """Sampling and exports."""

    p = commands.add_parser(
        "sample", help="generate text from a run, a Hugging Face directory or a hub model id",
        description="Continue prompts with the model (one prompt streams as it is generated). Settings default to "
                    "the recipe's [sample] section. A prompt longer than the model's context is refused (exit 2); "
                    "generation stops at EOS, at a --stop string, after --max-new-tokens, or when the context is full.")
    p.add_argument("model", metavar="RUN_OR_HF_DIR", help="a run directory, a Hugging Face model directory or a hub "
                                                          "model id (owner/name, fetched into the hub cache)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeatable; \"\" starts a story from BOS); default: the recipe's prompts")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int,
                   help="most new tokens per prompt (default: the recipe's)")
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", dest="top_k", type=int, help="0 = off")
    p.add_argument("--top-p", dest="top_p", type=float, help="1 = off")
    p.add_argument("--min-p", dest="min_p", type=float, help="keep tokens with p >= min_p * p_max; 0 = off")
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, help="1 = off")
    p.add_argument("--seed", type=int, help="make sampling repeatable")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a completion before this text (repeatable; \\n and \\t are understood)")
    p.add_argument("--checkpoint", default="best", help="for a run: best (default), latest or step-NNNNNNNN")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=cmd_sample)

    p = commands.add_parser("serve", help="an OpenAI-compatible completions server and a playground page",
                            description="Serve each model at /v1/completions (streaming, continuous batching) with "
                                        "a playground at / to compare two models side by side.")
    p.add_argument("models", nargs="+", metavar="RUN_OR_DIR", help="run directories, Hugging Face directories or "
                                                                    "hub ids; each is named by its directory")
    p.add_argument("--name", action="append", help="a model's name instead (repeatable, one per model, in order)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key", dest="api_key", help="require 'Authorization: Bearer KEY' on every API request")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=64, help="rows decoding together per model")
    p.add_argument("--checkpoint", default="best", help="for a run: best (default), latest or step-NNNNNNNN")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("export", help="export a run for Hugging Face transformers, llama2.c or llama.cpp",
                            description="hf: a transformers directory (LlamaForCausalLM; MicroMixer runs get a "
                                        "directory only tinylm loads). llama2c: model.bin + tokenizer.bin for run.c. "
                                        "gguf: one .gguf file (f32, f16 or q8_0) for llama.cpp, Ollama and LM Studio.")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf: a Hugging Face directory; llama2c: model.bin + tokenizer.bin for run.c; gguf: one file "
                        "for llama.cpp, Ollama and LM Studio")
    p.add_argument("--dtype", choices=GGUF_DTYPES, help="gguf only: how the matrices are stored (default f32)")
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN/hf or RUN/llama2c)")
    p.add_argument("--checkpoint", default="best", help="best (default), latest or step-NNNNNNNN")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("push", help="upload a run's Hugging Face export (RUN/hf) to a hub model repository")
    p.add_argument("run", metavar="RUN", help="a run directory with an hf export (`tinylm export RUN --format hf`)")
    p.add_argument("repo_id", metavar="REPO_ID", help="owner/name, created when it does not exist")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.set_defaults(func=cmd_push)


def _add_report_commands(commands) -> None:
    """Model cards, comparison and the demo."""

    p = commands.add_parser("card", help="write the model card (README.md), loss plot and samples from a run")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    p.add_argument("--no-samples", action="store_true", help="keep RUN/samples.md instead of sampling again")
    p.set_defaults(func=cmd_card)

    p = commands.add_parser("compare", help="runs side by side, sorted by bits per byte, and a plot")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--plot", default="compare.png", help="where to write the plot (default compare.png)")
    p.set_defaults(func=cmd_compare)

    p = commands.add_parser("demo", help="the whole pipeline on the TinyStories sample, in minutes on a CPU")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory (default runs/demo)")
    p.add_argument("--recipe", default="tinystories-demo", help="the recipe to train (default tinystories-demo)")
    add_overrides(p)
    p.add_argument("--force", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description="Build tiny language models on TinyStories.")
    parser.add_argument("--version", action="version", version=f"tinylm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_setup_commands, _add_train_commands, _add_use_commands, _add_report_commands):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TinylmError as exc:
        print(f"tinylm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinylm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinylm sample ... | head`: the reader is gone, which is no error of ours
        return _closed_pipe()


def _closed_pipe() -> int:
    """Point stdout at /dev/null so the interpreter's last flush cannot fail again, and exit as a process killed by
    SIGPIPE does in a shell (128 + 13), the way `yes | head` ends."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError):  # a stdout without a file descriptor has nothing to flush there
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
