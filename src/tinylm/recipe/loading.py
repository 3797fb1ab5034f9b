"""Recipes in: a shipped name or a TOML path, `--set section.key=value` overrides, every value coerced to its field's
type with the field named when it does not fit."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from tinylm.errors import TinylmError
from tinylm.recipe.checks import validate
from tinylm.recipe.sections import SECTIONS, TOP_LEVEL_KEYS, Recipe


def recipe_names() -> list[str]:
    folder = resources.files("tinylm") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_text(name_or_path: str) -> str:
    """The TOML text of a shipped recipe name or a path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.exists():
        if path.is_dir():
            raise TinylmError(f"recipe {name_or_path} is a directory: give a recipe name or a .toml file")
        if not path.is_file():
            raise TinylmError(f"recipe file not found: {name_or_path}")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TinylmError(f"cannot read recipe {name_or_path}: {exc}") from None
    if name_or_path not in recipe_names():
        raise TinylmError(f"unknown recipe '{name_or_path}' (known: {', '.join(recipe_names())}; or give a .toml path)")
    return (resources.files("tinylm") / "recipes" / f"{name_or_path}.toml").read_text(encoding="utf-8")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return recipe_from_toml(recipe_text(name_or_path), overrides, origin=name_or_path)


def recipe_from_toml(text: str, overrides: list[str] | tuple[str, ...] = (), origin: str = "recipe") -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TinylmError(f"{origin}: malformed TOML: {exc}") from None
    for item in overrides:
        apply_override(raw, item)
    return recipe_from_dict(raw, origin)


def recipe_from_dict(raw: dict[str, Any], origin: str = "recipe") -> Recipe:
    recipe = Recipe()
    for key, value in raw.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise TinylmError(f"{origin}: [{key}] must be a table")
            setattr(recipe, key, _fill(SECTIONS[key], value, f"{origin}: {key}"))
        elif key in TOP_LEVEL_KEYS:
            if not isinstance(value, str):
                raise TinylmError(f"{origin}: {key} must be a string")
            setattr(recipe, key, value)
        else:
            raise TinylmError(f"{origin}: unknown key {_shown(key, quoted=True)} (sections: {', '.join(SECTIONS)})")
    validate(recipe)
    return recipe


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as TOML, falling back to a plain string."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise TinylmError(f"--set expects section.key=value, got '{item}'")
    dotted, text = item.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    if section not in SECTIONS:
        raise TinylmError(f"--set {_shown(dotted)}: unknown section {_shown(section, quoted=True)} "
                          f"(sections: {', '.join(SECTIONS)})")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    raw.setdefault(section, {})[key.strip()] = value


def differences(saved: Recipe, wanted: Recipe, sections: tuple[str, ...]) -> list[str]:
    """'section.key (saved value, now wanted value)' for each field of `sections` that differs."""
    return [f"{name}.{f.name} ({getattr(getattr(saved, name), f.name)!r} in the run, "
            f"{getattr(getattr(wanted, name), f.name)!r} now)"
            for name in sections for f in fields(SECTIONS[name])
            if getattr(getattr(saved, name), f.name) != getattr(getattr(wanted, name), f.name)]


def _shown(text: str, quoted: bool = False) -> str:
    """A name from the user's input as it can stand in a one-line message (newlines and the like escaped)."""
    if not text.isprintable():
        return repr(text)
    return f"'{text}'" if quoted else text


def _fill(cls, values: dict[str, Any], where: str):
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise TinylmError(f"{where}.{_shown(key)}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TinylmError as exc:  # a section that checks itself (sampling): name the section
        raise TinylmError(f"{where}.{exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    if get_origin(hint) is list:
        (item_type,) = get_args(hint)
        if isinstance(value, str):  # --set data.paths=/path/file.gz: a list of one
            value = [value]
        if not isinstance(value, list):
            raise TinylmError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise TinylmError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TinylmError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TinylmError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TinylmError(f"{where}: expected a string, got {value!r}")
        if any("\ud800" <= ch <= "\udfff" for ch in value):  # undecodable bytes on a command line
            raise TinylmError(f"{where}: not valid text (it holds bytes that are not UTF-8)")
        return value
    raise AssertionError(f"unhandled type {hint} at {where}")
