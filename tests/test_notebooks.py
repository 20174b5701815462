"""Every notebook in notebooks/ runs top to bottom at the smoke scale.

Notebooks read ``SGJAX_NOTEBOOK_PRESET`` (set to ``smoke`` here) to pick a few-step
configuration; the test executes them with nbclient in a fresh kernel and fails on the
first cell that raises.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PRESET_ENV = "SGJAX_NOTEBOOK_PRESET"


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_clean_and_colab_ready(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert PRESET_ENV in source, f"{path.name} must read ${PRESET_ENV} to run at smoke scale"
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "find_spec(\"sgjax\")" in first.source and "pip" in first.source, (
        f"{path.name}: the first code cell should install sgjax only when it is missing")
    for cell in nb.cells:  # committed without outputs: small diffs, no stale results
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_scale(path, monkeypatch):
    monkeypatch.setenv(PRESET_ENV, "smoke")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
