"""The `tinylm` command: parses arguments, calls the library, prints, sets the exit code.

Each command is a small function `cmd_NAME(args) -> int`. A TinylmError (a user mistake) ends in one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TinylmError


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
    from .recipe import load_recipe, recipe_names, recipe_text

    if args.name:
        load_recipe(args.name)  # validate before printing
        print(recipe_text(args.name), end="")
        return 0
    from .models import build_model, count_parameters

    print(f"{'recipe':<20} {'parameters':>13}  source")
    for name in recipe_names():
        recipe = load_recipe(name)
        total = count_parameters(build_model(recipe.model, device="meta")).total
        print(f"{name:<20} {total:>13,}  {recipe.source or '(no published model)'}")
    return 0


def cmd_params(args) -> int:
    from .models import build_model, count_parameters
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    count = count_parameters(build_model(recipe.model, device="meta"))
    print(f"{recipe.name} ({recipe.source or 'custom'})")
    print(f"total parameters:            {count.total:,}")
    print(f"without embeddings:          {count.without_embedding:,}")
    print(f"num decayed parameter tensors: {count.decayed_tensors}, with {count.decayed:,} parameters")
    print(f"num non-decayed parameter tensors: {count.not_decayed_tensors}, with {count.not_decayed:,} parameters")
    print("per module (summed over layers):")
    for name, n in count.by_module.items():
        print(f"  {name:<32} {n:>13,}")
    return 0


def _write_run_recipe(run, recipe) -> None:
    """RUN/recipe.toml records the resolved recipe; an existing one is left as it is."""
    from pathlib import Path

    from .files import atomic_write_text
    from .recipe import recipe_to_toml

    path = Path(run) / "recipe.toml"
    if not path.exists():
        atomic_write_text(path, recipe_to_toml(recipe))


def cmd_tokenizer_train(args) -> int:
    import time
    from pathlib import Path

    from .corpus import train_tokenizer
    from .recipe import load_recipe
    from .tokenizer import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    path = Path(args.out) / "tokenizer.json"
    started = time.perf_counter()
    tokenizer, corpus = train_tokenizer(recipe)
    if path.exists() and not args.force and load_tokenizer(path).fingerprint() != tokenizer.fingerprint():
        raise TinylmError(f"{path} exists and holds a different tokenizer; pass --force to replace it "
                          "(shards and checkpoints made with the old one stop matching)")
    tokenizer.save(path)
    _write_run_recipe(args.out, recipe)
    source = f" from {len(corpus.stories):,} stories" if corpus is not None else ""
    print(f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size:,} ids{source} in {time.perf_counter() - started:.1f} s"
          f" -> {path}")
    print(f"special ids: {tokenizer.special_ids or 'none'}")
    return 0


def cmd_tokenizer_stats(args) -> int:
    from pathlib import Path

    from .corpus import load_corpus, split_stories, train_tokenizer
    from .recipe import load_recipe
    from .tokenizer import load_tokenizer, tokenizer_stats

    target = Path(args.target)
    if target.is_dir() and (target / "tokenizer.json").is_file():
        if not (target / "recipe.toml").is_file():
            raise TinylmError(f"{target} has no recipe.toml, so its data is unknown")
        recipe = load_recipe(str(target / "recipe.toml"), args.overrides)
        tokenizer, corpus = load_tokenizer(target), load_corpus(recipe.data)
    else:
        recipe = load_recipe(args.target, args.overrides)
        tokenizer, corpus = train_tokenizer(recipe)
        corpus = corpus if corpus is not None else load_corpus(recipe.data)
    _, val = split_stories(corpus.stories, recipe.data.val_fraction, recipe.data.split_seed)
    if not val:
        raise TinylmError("the validation split is empty: add data or raise data.val_fraction")
    s = tokenizer_stats(tokenizer, val)
    print(f"{tokenizer.kind} tokenizer, {tokenizer.vocab_size:,} ids; validation split: {s['n_texts']:,} stories, "
          f"{s['n_bytes']:,} bytes, {s['n_tokens']:,} tokens")
    print(f"bytes per token:  {s['bytes_per_token']:.3f}")
    print(f"chars per token:  {s['chars_per_token']:.3f}")
    print(f"tokens per story: {s['tokens_per_text']:.1f} (longest {s['max_tokens']:,})")
    if "unknown_fraction" in s:
        print(f"unknown tokens:   {100 * s['unknown_fraction']:.4f}%")
    return 0


def cmd_data_prepare(args) -> int:
    from pathlib import Path

    from .pipeline import prepare_run
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run = Path(args.out)
    tokenizer, meta = prepare_run(recipe, run, progress=not args.quiet)
    print(f"tokenizer: {run / 'tokenizer.json'} ({tokenizer.kind}, {tokenizer.vocab_size:,} ids)")
    _write_run_recipe(run, recipe)
    for split in ("train", "val"):
        m = meta[split]
        print(f"{split:>5}: {m['n_stories']:>9,} stories {m['n_tokens']:>13,} tokens {m['n_bytes']:>14,} bytes "
              f"({m['n_bytes'] / max(1, m['n_tokens']):.2f} bytes/token)")
    print(f"from {len(meta['files'])} file(s); {meta['duplicates']:,} duplicate stories dropped, "
          f"{meta['replaced_bytes']:,} undecodable bytes replaced; framing {meta['framing']}, {meta['dtype']}")
    if meta["reused"]:
        print(f"reused the shards in {run / 'data'} (same tokenizer and corpus) in {meta['seconds']:.1f} s")
    else:
        print(f"wrote {run / 'data'} in {meta['seconds']:.1f} s")
    return 0


def cmd_train(args) -> int:
    import os
    import shlex
    from pathlib import Path

    from .recipe import load_recipe
    from .train import train

    recipe = load_recipe(args.recipe, args.overrides)
    run = Path(args.out or Path("runs") / recipe.name)
    # The command as it can be typed again (rebuilt from the parsed arguments, whoever called main()).
    words = ["tinylm", "train", args.recipe, *overrides_words(args.overrides), "--out", str(run)]
    words += (["--resume"] if args.resume else []) + (["--stop-after", str(args.stop_after)] if args.stop_after else [])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        words = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}", "-m", "tinylm.cli",
                 *words[1:]]
    command = shlex.join(words)
    summary = train(recipe, run, resume=args.resume, command=command, progress=not args.quiet,
                    stop_after=args.stop_after)
    best = summary["best_val_loss"]
    if summary["rank"] == 0:
        print(f"{run}: step {summary['step']} ({summary['stopped']}), {summary['tokens']:,} tokens"
              + (f", best val loss {best:.4f}" if best is not None else ""))
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import evaluate_path, format_result

    result = evaluate_path(args.run, which=args.checkpoint, data_dir=args.data, batch_size=args.batch_size)
    if args.json:
        keys = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "checkpoint")
        print(json.dumps({k: result[k] for k in keys}))
    else:
        print(format_result(result))
    return 0



def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def cmd_sample(args) -> int:
    from .data import frame_prefix
    from .export import load_model_dir
    from .generate import generate_text, recipe_sampling
    from .recipe import validate_sampling

    if args.device != "cpu":
        import torch

        if not args.device.startswith("cuda"):
            raise TinylmError(f"--device must be cpu or cuda[:N], got '{args.device}'")
        if not torch.cuda.is_available():
            raise TinylmError("--device cuda: no CUDA device is available")
    model, recipe, tokenizer = load_model_dir(args.model, args.checkpoint, device=args.device)
    settings = recipe_sampling(recipe.sample)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    validate_sampling(**settings)
    prompts = args.prompt if args.prompt is not None else recipe.sample.prompts
    stop = [_unescape(s) for s in args.stop]
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    if len(prompts) == 1:  # one prompt: stream its text as it comes (the prompt first, once it is accepted)
        shown = []

        def show(row: int, text: str) -> None:
            print(("" if shown else prompts[0]) + text, end="", flush=True)
            shown.append(True)

        generate_text(model, tokenizer, prompts, prefix=prefix, stop=stop, seed=args.seed, stream=show, **settings)
        print("" if shown else prompts[0])
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, generate_text(model, tokenizer, prompts, prefix=prefix,
                                                                 stop=stop, seed=args.seed, **settings))):
        print(("\n" if i else "") + prompt + text)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from .export import export

    out = Path(args.out) if args.out else Path(args.run) / args.format
    for line in export(args.run, args.format, out, which=args.checkpoint):
        print(line)
    return 0


def cmd_card(args) -> int:
    from pathlib import Path

    from .card import write_card
    from .checkpoint import load_run_model
    from .demo import write_samples

    samples = None
    if not args.no_samples:
        model, recipe, tokenizer = load_run_model(args.run, "best")
        samples = write_samples(Path(args.run), recipe, model, tokenizer, seed=args.seed)
    print(write_card(args.run, samples))
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_runs

    print(compare_runs(args.runs, args.plot))
    print(f"\nplot: {args.plot}")
    return 0


def cmd_demo(args) -> int:
    import shlex
    from pathlib import Path

    from .demo import DEMO_RECIPE, run_demo
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run = Path(args.out)
    if (run / "recipe.toml").exists() and not args.force:
        raise TinylmError(f"{run} already holds a run; choose another --out or pass --force to train it again")
    if args.force and run.exists():
        import shutil

        shutil.rmtree(run)
    words = ["tinylm", "demo", "--out", str(run)] + (["--recipe", args.recipe] if args.recipe != DEMO_RECIPE else [])
    words += overrides_words(args.overrides)
    run_demo(recipe, run, command=shlex.join(words), progress=not args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description="Build tiny language models on TinyStories.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    p = commands.add_parser("train", help="train a recipe into a run directory (or continue one with --resume)")
    add_recipe_arguments(p)
    p.add_argument("--out", metavar="RUN", help="run directory (default runs/<recipe name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop cleanly (checkpoint) after STEP steps, keeping the schedule; continue with --resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on the whole validation split")
    p.add_argument("run", metavar="RUN", help="a run directory, a Hugging Face model directory or a hub model id "
                                              "(owner/name; needs --data)")
    p.add_argument("--checkpoint", default="best", help="best (default), latest or step-NNNNNNNN")
    p.add_argument("--data", metavar="DIR", help="the token shards to use (default RUN/data)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (default: the recipe's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = commands.add_parser(
        "sample", help="generate text from a run, a Hugging Face directory or a hub model id",
        description="Continue prompts with the model (one prompt streams as it is generated). Settings default to "
                    "the recipe's [sample] section. A prompt longer than the model's context is refused (exit 2); "
                    "generation stops at EOS, at a --stop string, after --max-new-tokens, or when the context is full.")
    p.add_argument("model", metavar="RUN_OR_HF_DIR", help="a run directory, a Hugging Face model directory or a hub "
                                                          "model id (owner/name, fetched into the hub cache)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeatable; \"\" starts a story from BOS); default: the recipe's prompts")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
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

    p = commands.add_parser("export", help="export a run for Hugging Face transformers or llama2.c",
                            description="hf: a transformers directory (LlamaForCausalLM; MicroMixer runs get a "
                                        "directory only tinylm loads). llama2c: model.bin + tokenizer.bin for run.c.")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--format", required=True, choices=("hf", "llama2c"))
    p.add_argument("--out", metavar="DIR", help="output directory (default RUN/hf or RUN/llama2c)")
    p.add_argument("--checkpoint", default="best", help="best (default), latest or step-NNNNNNNN")
    p.set_defaults(func=cmd_export)

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


if __name__ == "__main__":
    sys.exit(main())
