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


SEEDS_DIR = "seeds"
"""A run with ``--seed N`` (N ≠ 0) writes under ``<out>/<name>/<preset>/seeds/<N>/``, so
that it never replaces seed 0's records; :func:`load_results` reads those repeats with
seed 0's cells."""


def run_dir(out_root: str | os.PathLike, name: str, preset: str, seed: int = 0) -> Path:
    """Where a run of ``name`` at ``preset`` with ``seed`` writes: ``<out>/<name>/<preset>/``
    for seed 0, ``<out>/<name>/<preset>/seeds/<seed>/`` for a repeat with another seed."""
    base = Path(out_root) / name / preset
    return base if seed == 0 else base / SEEDS_DIR / str(int(seed))


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


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def seed_records(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The runs a record holds: itself (its own seed) and the finished repeats with other
    seeds it carries under ``"other_seeds"`` (see :func:`load_results`)."""
    return [record, *record.get("other_seeds", ())]


def _mean_over_seeds(runs: list[Mapping[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """The main metric and every scalar numeric metric averaged over ``runs`` (where every
    run has a number for it); other metrics are the first run's."""
    metrics = dict(runs[0].get("metrics", {}))
    for k in list(metrics):
        values = [r.get("metrics", {}).get(k) for r in runs]
        if all(_is_number(x) for x in values):
            metrics[k] = float(np.mean(values))
    metric = [r.get("metric") for r in runs]
    return (float(np.mean(metric)) if all(_is_number(x) for x in metric)
            else runs[0].get("metric")), metrics


def _mean_curve(runs: list[Mapping[str, Any]], name: str) -> Curve:
    """Curve ``name`` averaged pointwise over ``runs`` where every run logged it at the
    same steps (so a figure's line and its legend's number, the seeds' mean, agree);
    otherwise the first run's."""
    own = runs[0]["curves"][name]
    steps = np.asarray(own["step"])
    values = []
    for run in runs:
        other = run.get("curves", {}).get(name)
        if other is None or not np.array_equal(np.asarray(other["step"]), steps):
            return Curve(steps, np.asarray(own["value"]))
        value = np.asarray(other["value"])
        if not np.issubdtype(value.dtype, np.number):
            return Curve(steps, np.asarray(own["value"]))
        values.append(value)
    return Curve(steps, np.mean(values, axis=0))


def to_result(cell: Cell, record: Mapping[str, Any]) -> CellResult:
    """A record as a :class:`CellResult` (``metric`` is ``None`` for a partial record). A
    record carrying repeats with other seeds (``"other_seeds"``) gives the mean over its
    seeds: the main metric, each scalar numeric metric, and each curve that every seed
    logged at the same steps (pointwise; other curves are its own seed's). The seeds'
    records stay under ``result.record``."""
    curves = {
        k: Curve(np.asarray(v["step"]), np.asarray(v["value"]))
        for k, v in record.get("curves", {}).items()
    }
    metric, metrics = record.get("metric"), record.get("metrics", {})
    if record.get("other_seeds") and not is_partial(record):
        metric, metrics = _mean_over_seeds(seed_records(record))
        curves = {k: _mean_curve(seed_records(record), k) for k in curves}
    return CellResult(
        cell=cell,
        metric=metric,
        metrics=metrics,
        curves=curves,
        seed=record["seed"],
        wall_time_s=record.get("wall_time_s", 0.0),
        record=record,
    )


def seed_repeats(out_dir: Path, cell: Cell, record: Mapping[str, Any]
                 ) -> list[dict[str, Any]]:
    """The finished records of ``cell`` under ``out_dir/seeds/*/`` that ran with the same
    params and config as ``record`` and another seed, in seed order."""
    found = []
    for path in sorted((out_dir / SEEDS_DIR).glob(f"*/cells/{cell.id}.json")):
        other = load_record(path)
        if (other is not None and not is_partial(other)
                and other.get("seed") != record.get("seed")
                and all(other.get(k) == record.get(k) for k in ("params", "config"))):
            found.append(other)
    return sorted(found, key=lambda r: r.get("seed", 0))


def load_results(exp: Experiment, preset: str, out_dir: Path, *, partial: bool = False
                 ) -> dict[str, CellResult | str]:
    """Each cell's result, or why it has none: ``"missing (not run)"``, stale config, or
    ``"partial (stopped at step N)"``. A finished cell's repeats with other seeds
    (``out_dir/seeds/<N>/cells/``, same params and config) come with it: the record gets
    them under ``"other_seeds"`` and the result is their mean (:func:`to_result`). With
    ``partial=True`` a partial record matching the config comes back as a
    :class:`CellResult` too (check :func:`is_partial`; its ``metric`` is ``None``, its
    curves are those logged so far)."""
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
            repeats = [] if is_partial(record) else seed_repeats(Path(out_dir), cell, record)
            if repeats:
                record = {**record, "other_seeds": repeats}
            found[cell.id] = to_result(cell, record)
    return found
