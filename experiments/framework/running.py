"""Running an experiment: select cells, skip finished ones, run the rest with a
:class:`~experiments.framework.context.RunContext` each, store and report the results."""

from __future__ import annotations

import contextlib
import datetime as _dt
import fnmatch
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from experiments.framework.checkpoints import atomic_write
from experiments.framework.context import (
    DEFAULT_CHECKPOINT_INTERVAL_S,
    NonFiniteError,
    RunContext,
    check_finite,
)
from experiments.framework.declare import (
    Cell,
    Experiment,
    UsageError,
    reproduce_command,
    to_jsonable,
)
from experiments.framework.reports import (
    REPORT_PRESET,
    RunSummary,
    fmt,
    format_duration,
    measured_machine,
    measured_time_s,
    write_reports,
)
from experiments.framework.store import (
    cell_identity,
    code_version,
    describe_machine,
    load_matching,
)

DEFAULT_OUT = "results"


def select_cells(exp: Experiment, preset: str, only: Sequence[str] = ()) -> tuple[Cell, ...]:
    """The cells of ``preset`` whose id matches one of the ``only`` globs (all if empty)."""
    if preset not in exp.presets:
        raise UsageError(
            f"unknown preset {preset!r} for experiment {exp.name!r}; "
            f"valid presets: {', '.join(exp.presets)}"
        )
    cells = exp.cells_for(preset)
    if not only:
        return cells
    unmatched = [p for p in only if not any(fnmatch.fnmatchcase(c.id, p) for c in cells)]
    if unmatched:
        raise UsageError(
            f"--only {' '.join(unmatched)} matches no cell of {exp.name!r} ({preset}); "
            f"valid cells: {', '.join(c.id for c in cells)}"
        )
    return tuple(c for c in cells if any(fnmatch.fnmatchcase(c.id, p) for p in only))


def check_out_dir(out: str | os.PathLike) -> Path:
    """``out`` as a path if results can be written under it, else a :class:`UsageError`
    naming it (a file, or a directory this user cannot write)."""
    path = Path(out)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is a file" if existing == path else f"lies under the file {existing}"
        raise UsageError(f"--out {out}: {what}, not a directory; pass a directory for the "
                         "results (default ./results)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or e}); pass a "
                         "writable directory") from e
    return path


def check_interval(seconds: float) -> float:
    """A valid ``--checkpoint-interval``: a finite number ≥ 0 (else a :class:`UsageError`)."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not math.isfinite(seconds) or seconds < 0:
        raise UsageError(f"--checkpoint-interval {seconds!r}: must be a finite number of "
                         "seconds >= 0 (0 checkpoints at every opportunity)")
    return float(seconds)


def estimate(exp: Experiment, preset: str, cells: Sequence[Cell]) -> tuple[dict[str, float], str]:
    """Measured ``quick`` wall times of ``cells`` from the committed report
    (``reports/<name>/results.csv``; empty for other presets) and a sentence for the log."""
    n = len(cells)
    if preset != REPORT_PRESET:
        return {}, f"{n} cells"
    times = measured_time_s(exp.name)
    known = [times[c.id] for c in cells if c.id in times]
    if not known:
        return times, f"{n} cells (no measured {preset} times in reports/{exp.name}/)"
    total = sum(known) / len(known) * n  # cells without a measurement count as the mean
    where = measured_machine(exp.name) or "the machine of reports/" + exp.name
    partial = "" if len(known) == n else f"; {n - len(known)} cells not measured"
    return times, (f"{n} cells, about {format_duration(total)} as measured on {where}"
                   f"{partial}")


def run_experiment(
    exp: Experiment,
    preset: str,
    *,
    out: str | os.PathLike = DEFAULT_OUT,
    seed: int = 0,
    only: Sequence[str] = (),
    fresh: bool = False,
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
    echo: bool = True,
) -> RunSummary:
    """Run the (selected) cells of ``exp`` at ``preset`` and write the reports.

    ``run_cell(cell, config, ctx)`` returns ``{"metric": float, "curves": {...}, **extra}``
    (or just the metric as a float): ``metric`` is the number in the table (in the units of
    ``exp.metric``); ``curves`` maps names to ``(steps, values)`` and is merged with what
    ``ctx.log`` recorded; every other key is JSON data stored under ``metrics``.
    A cell whose JSON exists with the same params, config and seed is skipped unless
    ``fresh``. Reports always cover all cells of the preset (unrun ones marked missing).
    Before starting it logs how long the cells took when measured (``quick``).
    """
    cells = select_cells(exp, preset, only)
    checkpoint_interval_s = check_interval(checkpoint_interval_s)
    config = exp.presets[preset]
    out_dir = check_out_dir(out) / exp.name / preset
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if echo else (lambda msg: None)
    times, plan = estimate(exp, preset, cells)
    log(f"[{exp.name}/{preset}] {plan}")
    ran, skipped = [], []
    try:
        for i, cell in enumerate(cells, 1):
            tag = f"[{exp.name}/{preset} {i}/{len(cells)}] {cell.id}"
            record = _run_or_skip(exp, preset, cell, config, seed, out_dir, fresh,
                                  checkpoint_interval_s, log, tag, times.get(cell.id))
            (ran if record is not None else skipped).append(cell.id)
    except BaseException:
        with contextlib.suppress(Exception):  # keep table.md current, re-raise the real error
            write_reports(exp, preset, out_dir, ran=ran, skipped=skipped)
        raise
    finally:
        with contextlib.suppress(OSError):
            (out_dir / "checkpoints").rmdir()  # only if empty
    return write_reports(exp, preset, out_dir, ran=ran, skipped=skipped)


def _run_or_skip(exp, preset, cell, config, seed, out_dir, fresh, interval, log, tag,
                 measured_s) -> dict | None:
    identity = cell_identity(exp, preset, cell, seed)
    ckpt_dir = out_dir / "checkpoints" / cell.id
    if fresh:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    elif load_matching(out_dir, cell, identity) is not None:
        log(f"{tag}: done earlier, skipping (--fresh reruns it)")
        return None
    eta = "" if measured_s is None else f" (took {format_duration(measured_s)} when measured)"
    log(f"{tag}: running{eta}")
    record = _run_one(exp, preset, cell, config, seed, identity, out_dir, ckpt_dir, interval)
    atomic_write(out_dir / "cells" / f"{cell.id}.json",
                 lambda f: json.dump(record, f, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    paper = "" if cell.paper is None else f" (paper {fmt(cell.paper)})"
    log(f"{tag}: {exp.metric} = {fmt(record['metric'])}{paper}, {record['wall_time_s']:.1f} s")
    return record


def _run_one(exp, preset, cell, config, seed, identity, out_dir, ckpt_dir, interval):
    ctx = RunContext(
        experiment=exp.name,
        preset=preset,
        cell=cell,
        seed=seed,
        out_dir=out_dir,
        checkpoint_dir=ckpt_dir,
        checkpoint_interval_s=interval,
        fingerprint=identity,
    )
    start = time.monotonic()
    try:
        out = exp.run_cell(cell, config, ctx)
    except Exception as e:
        if not isinstance(e, NonFiniteError):
            e.add_note(f"while running {ctx.where}")
        raise
    finally:
        ctx.close()
    wall = ctx.elapsed_before_s + time.monotonic() - start
    return make_record(exp, preset, cell, seed, identity, out, ctx, wall)


def make_record(exp: Experiment, preset: str, cell: Cell, seed: int, identity: Mapping,
                out: Mapping[str, Any] | float, ctx: RunContext, wall: float) -> dict:
    """The JSON stored for a finished cell: identity, metric, metrics, curves, provenance."""
    out = {"metric": out} if not isinstance(out, Mapping) else dict(out)
    if "metric" not in out:
        raise TypeError(f"{exp.name}.run_cell must return {{'metric': float, ...}}, got {out}")
    metric = float(check_finite(out.pop("metric"), where=f"{ctx.where}, final metric"))
    curves = {
        k: {"step": [p[0] for p in v], "value": [p[1] for p in v]} for k, v in ctx.curves.items()
    }
    for name, curve in dict(out.pop("curves", None) or {}).items():
        steps, values = (curve["step"], curve["value"]) if isinstance(curve, Mapping) else curve
        curves[name] = {"step": to_jsonable(steps), "value": to_jsonable(values)}
    return {
        "experiment": exp.name,
        "paper_ref": exp.paper,
        "preset": preset,
        "cell": cell.id,
        "row": cell.row,
        "column": cell.column,
        "metric_name": exp.metric,
        "metric": metric,
        "paper": cell.paper,
        "metrics": to_jsonable(out),
        **identity,
        "curves": curves,
        "wall_time_s": wall,
        "resumed_from_step": ctx.resumed_from_step,
        "code_version": code_version(),
        **describe_machine(),
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": reproduce_command(exp.name, preset, seed=seed),
    }

