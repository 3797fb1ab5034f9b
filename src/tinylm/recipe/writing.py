"""A resolved recipe written back as TOML (each run directory's recipe.toml)."""

from __future__ import annotations

import dataclasses
from typing import Any

from tinylm.recipe.sections import SECTIONS, TOP_LEVEL_KEYS, Recipe


def recipe_to_toml(recipe: Recipe) -> str:
    """Serialise a resolved recipe (written into each run directory as recipe.toml)."""
    lines = [f"{key} = {_toml_value(getattr(recipe, key))}" for key in TOP_LEVEL_KEYS]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for key, value in dataclasses.asdict(getattr(recipe, section)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    escaped = "".join(ch if ch.isprintable() or ch in "\\" else _toml_escape(ord(ch)) for ch in escaped)
    return f'"{escaped}"'


def _toml_escape(code: int) -> str:
    """\\uXXXX holds four hex digits; a character beyond U+FFFF needs \\UXXXXXXXX."""
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
