"""Finished cells on disk: ``<out>/<name>/<preset>/cells/<cell id>.json``, their identity
(what must match for a stored result to count) and the provenance recorded with them.

A record flagged ``"partial": true`` (with ``"last_step"``) belongs to a cell that is still
running or was stopped (time limit, kill): it holds the curves so far and no final metric
(``metric`` is ``None``). It never counts as finished: the skip logic reruns (resumes) the
cell and :func:`load_results` reports it as ``"partial (stopped at step N)"`` unless asked
for partial results.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.framework.declare import Cell, CellResult, Curve, Experiment, canonical

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The checkout holding the ``experiments`` package (its git commit is the code version)."""


def cell_identity(exp: Experiment, preset: str, cell: Cell, seed: int) -> dict[str, Any]:
    """What must match for a stored result to count as this cell's: params, config, seed.

    Prose (``Experiment.notes``/``preset_notes``) is not part of it, and neither is the
    code version (recorded with each result, see :func:`code_version`): editing a sentence
    or committing must not rerun finished cells.
    """
    return canonical({"params": cell.params, "config": exp.presets[preset], "seed": seed})


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None, "sgjax": version}``: the git commit of
    the checkout the experiments run from (``None`` outside a git checkout) and whether it
    had uncommitted changes."""
    import sgjax

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = None
    if commit is not None:
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"commit": commit, "dirty": dirty, "sgjax": sgjax.__version__}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def describe_machine() -> dict[str, Any]:
    """What ran the cell: the devices ``jax.devices()`` sees, the CPU, cores, versions."""
    devices = jax.devices()
    kinds = sorted({f"{d.device_kind} ({d.platform})" for d in devices})
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": f"{len(devices)}x " + ", ".join(kinds),
        "devices": [str(d) for d in devices],
        "cpu": _cpu_model(),
        "cpu_cores": cores,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def load_record(path: Path) -> dict[str, Any] | None:
    """A cell's JSON, or ``None`` if it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_partial(record: Mapping[str, Any] | CellResult) -> bool:
    """Whether a record (or a result read from one) is a partial one: the cell has not
    finished (still running, stopped at a time limit, or killed)."""
    if isinstance(record, CellResult):
        record = record.record
    return bool(record.get("partial"))


def partial_status(record: Mapping[str, Any]) -> str:
    """How a table shows a partial record: ``"partial (stopped at step N)"``."""
    return f"partial (stopped at step {record.get('last_step', '?')})"


def load_matching(out_dir: Path, cell: Cell, identity: Mapping) -> CellResult | None:
    """The stored *finished* result of ``cell`` if its params/config/seed equal ``identity``
    (a partial record is not finished: ``None``)."""
    record = load_record(out_dir / "cells" / f"{cell.id}.json")
    if record is None or is_partial(record) or any(record.get(k) != v
                                                   for k, v in identity.items()):
        return None
    return to_result(cell, record)


def to_result(cell: Cell, record: Mapping[str, Any]) -> CellResult:
    """A record as a :class:`CellResult` (``metric`` is ``None`` for a partial record)."""
    curves = {
        k: Curve(np.asarray(v["step"]), np.asarray(v["value"]))
        for k, v in record.get("curves", {}).items()
    }
    return CellResult(
        cell=cell,
        metric=record.get("metric"),
        metrics=record.get("metrics", {}),
        curves=curves,
        seed=record["seed"],
        wall_time_s=record.get("wall_time_s", 0.0),
        record=record,
    )


def load_results(exp: Experiment, preset: str, out_dir: Path, *, partial: bool = False
                 ) -> dict[str, CellResult | str]:
    """Each cell's result, or why it has none: ``"missing (not run)"``, stale config, or
    ``"partial (stopped at step N)"``. With ``partial=True`` a partial record matching the
    config comes back as a :class:`CellResult` too (check :func:`is_partial`; its
    ``metric`` is ``None``, its curves are those logged so far)."""
    config = canonical(exp.presets[preset])
    found: dict[str, CellResult | str] = {}
    for cell in exp.cells_for(preset):
        record = load_record(Path(out_dir) / "cells" / f"{cell.id}.json")
        if record is None:
            found[cell.id] = "missing (not run)"
        elif record.get("config") != config or record.get("params") != canonical(cell.params):
            found[cell.id] = "missing (stale: config changed, rerun)"
        elif is_partial(record) and not partial:
            found[cell.id] = partial_status(record)
        else:
            found[cell.id] = to_result(cell, record)
    return found
