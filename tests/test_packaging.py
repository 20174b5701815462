"""Packaging: the library's runtime needs only jax, flax, optax and numpy (the reproduction
suite's packages are the ``experiments`` extra), and its version is written once, in
``sgjax/__init__.py``."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import sgjax

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {"jax", "flax", "optax", "numpy"}
EXPERIMENTS_ONLY = ("tensorflow_datasets", "tensorflow", "matplotlib", "tqdm", "PIL", "pandas",
                    "pooch", "requests")

# Runs in a fresh interpreter: imports each statement's module in turn and reports which of
# EXPERIMENTS_ONLY are in sys.modules after each.
_PROBE = """
import importlib, json, sys
banned = set({banned!r})
found = {{}}
for name in {modules!r}:
    importlib.import_module(name)
    found[name] = sorted({{m.split(".")[0] for m in sys.modules}} & banned)
print(json.dumps(found))
"""


def heavy_imports(modules: list[str]) -> dict[str, list[str]]:
    """For each module imported in order in a fresh interpreter, the packages of
    ``EXPERIMENTS_ONLY`` loaded by then."""
    code = _PROBE.format(banned=EXPERIMENTS_ONLY, modules=modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def public_submodules() -> list[str]:
    return sorted(f"sgjax.{p.stem}" for p in (ROOT / "sgjax").glob("*.py")
                  if not p.stem.startswith("_"))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~\[;]", spec, maxsplit=1)[0].lower()


def test_import_sgjax_loads_no_experiments_package():
    modules = ["sgjax", *public_submodules()]
    assert "sgjax.feedback" in modules and "sgjax.split" in modules
    found = heavy_imports(modules)
    assert found == {name: [] for name in modules}


def test_the_probe_sees_an_experiments_package():
    """The check above can fail: the same probe finds tqdm once it is imported."""
    pytest.importorskip("tqdm")
    assert heavy_imports(["tqdm"]) == {"tqdm": ["tqdm"]}


def test_runtime_dependencies_are_the_library_only():
    meta = pyproject()["project"]
    assert {requirement_name(r) for r in meta["dependencies"]} == RUNTIME
    extra = {requirement_name(r) for r in meta["optional-dependencies"]["experiments"]}
    assert extra == {"pooch", "matplotlib", "tqdm", "pillow"}


def test_version_is_single_sourced():
    data = pyproject()
    assert "version" not in data["project"]
    assert "version" in data["project"]["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sgjax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", sgjax.__version__)
    # the installed metadata is built from it (reinstall after a bump: `make install`)
    assert importlib.metadata.version("sgjax") == sgjax.__version__
