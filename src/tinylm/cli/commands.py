"""What each `tinylm` command does: call one library function and print its result. Modules are imported inside
each command so that `tinylm --help` stays fast."""

from __future__ import annotations

import sys

from tinylm.errors import TinylmError


def overrides_words(overrides: list[str]) -> list[str]:
    """The --set arguments as they can be typed again."""
    return [w for o in overrides for w in ("--set", o)]


def compiled_dtype(args) -> str | None:
    """The compiled step's dtype that --compile / --dtype ask for (None: eager)."""
    return args.dtype or ("float32" if args.compile else None)


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

    result = evaluate_path(args.run, which=args.checkpoint, data_dir=args.data, batch_size=args.batch_size,
                           compiled=args.dtype)
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
                   seed=args.seed, end_ids=loaded.end_ids, compiled=compiled_dtype(args))
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
    serve(models, args.host, args.port, args.api_key, Limits(max_batch=args.max_batch, max_rows=args.max_batch),
          compiled=compiled_dtype(args))
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
