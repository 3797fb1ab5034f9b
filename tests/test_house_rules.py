"""The house rules a tool can check: module and function sizes, and packaging metadata that matches the code."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "src" / "tinylm").rglob("*.py"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
# distribution name -> the module it is imported as
IMPORT_NAMES = {"huggingface_hub": "huggingface_hub", "safetensors": "safetensors", "tokenizers": "tokenizers",
                "tiktoken": "tiktoken", "numpy": "numpy", "torch": "torch", "tqdm": "tqdm", "matplotlib": "matplotlib",
                "gguf": "gguf", "fastapi": "fastapi", "uvicorn": "uvicorn", "pyarrow": "pyarrow"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_modules_and_functions_stay_readable(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 400, f"{path.name} has {len(lines)} lines: split it along a seam"
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 60, f"{path.name}:{node.lineno} {node.name} has {length} lines"


def _third_party_imports() -> set[str]:
    names = set()
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"tinylm"}


def _names(requirements: list[str]) -> set[str]:
    return {IMPORT_NAMES.get(name, name) for name in (re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0] for d in requirements)}


def test_runtime_dependencies_are_exactly_what_the_code_imports():
    extras = PYPROJECT["project"]["optional-dependencies"]
    optional = set().union(*(_names(reqs) for name, reqs in extras.items() if name != "dev"))
    imported = _third_party_imports()
    assert _names(PYPROJECT["project"]["dependencies"]) == imported - optional  # optional: the trackers
    assert imported & optional == {"wandb", "trackio"}  # tensorboard comes in through torch.utils.tensorboard


def test_version_floors_cover_what_the_code_uses():
    # tomllib (recipes) arrived in Python 3.11; scaled_dot_product_attention(enable_gqa=...) in torch 2.5
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    torch_floor = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    major, minor = map(int, re.search(r">=(\d+)\.(\d+)", torch_floor).groups())
    assert (major, minor) >= (2, 5)
    uses_tomllib = any("import tomllib" in p.read_text(encoding="utf-8") for p in SOURCES)
    uses_gqa = any("enable_gqa" in p.read_text(encoding="utf-8") for p in SOURCES)
    assert uses_tomllib and uses_gqa  # the reasons for the floors are still there
