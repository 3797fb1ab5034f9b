"""The `tinylm` command: parses arguments, calls the library, prints, sets the exit code.

Each command is a small function `cmd_NAME(args) -> int`. A TinylmError (a user mistake) ends in one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from .errors import TinylmError


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a recipe name (see `tinylm recipes`) or a path to a .toml file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe field, e.g. --set train.lr=1e-3 (repeatable)")


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
        print(f"{name:<20} {total:>13,}  {recipe.source}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinylm", description="Build tiny language models on TinyStories.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("recipes", help="list the named recipes, or print one in full")
    p.add_argument("name", nargs="?", help="a recipe to print")
    p.set_defaults(func=cmd_recipes)

    p = commands.add_parser("params", help="count a recipe's parameters")
    add_recipe_arguments(p)
    p.set_defaults(func=cmd_params)

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
