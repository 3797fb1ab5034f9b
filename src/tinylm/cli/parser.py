"""The `tinylm` command line: every command, its arguments and their help."""

from __future__ import annotations

import argparse

from tinylm import __version__
from tinylm.cli.commands import (
    cmd_card,
    cmd_compare,
    cmd_data_prepare,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_params,
    cmd_push,
    cmd_recipes,
    cmd_sample,
    cmd_serve,
    cmd_tokenizer_stats,
    cmd_tokenizer_train,
    cmd_train,
)
from tinylm.export import FORMATS, GGUF_DTYPES
from tinylm.models import COMPILED_DTYPES


def add_compile_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="decode with the compiled step (LLaMA models on the CPU): each token one call into C++ "
                             "built for this CPU. The first start builds it with the C++ compiler (about 2 s), later "
                             "starts load it from ~/.cache/tinylm ($TINYLM_CACHE). Without a compiler one line says "
                             "so and decoding is eager")
    parser.add_argument("--dtype", choices=COMPILED_DTYPES,
                        help="the compiled step's weights: float32 (the default; the eager step's tokens) or int8 "
                             "(a quarter of the bytes per token, several times faster; implies --compile)")


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe name (see `tinylm recipes`) or a path to a .toml file")
    add_overrides(parser)


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
    p.add_argument("--dtype", choices=COMPILED_DTYPES,
                   help="score the compiled decode step with weights in this dtype, one position at a time as "
                        "decoding runs, instead of the model's forward pass (not recorded in RUN/eval.json)")
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
    add_compile_options(p)
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
    add_compile_options(p)
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
