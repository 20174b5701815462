"""Running an experiment: select cells, skip finished ones, run the rest with a
:class:`~experiments.framework.context.RunContext` each, store and report the results.

``jobs > 1`` runs that many cells at once, one process each
(``python -m experiments cell NAME CELL ...``, started by :func:`run_cells`): each worker
writes its own ``cells/<id>.json`` and ``logs/<id>.log``; the parent collects them and writes
the reports. On a GPU the workers share it: each gets ``XLA_PYTHON_CLIENT_PREALLOCATE=false``
and ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9/jobs`` (unless already set); on a CPU they are
simply processes. A failing cell is reported (``RunOutcome.errors``) and the others go on.

``time_limit_min`` stops the run cleanly within that many minutes (see :class:`Deadlines`):
running cells checkpoint and leave a record flagged ``partial`` with ``last_step`` and the
curves so far; cells not started by then are listed as not run. Rerunning the same command
resumes partial cells from their checkpoints and finishes them::

    python -m experiments run table1 --preset paper --only 'mnist-fcn*' --jobs 20 \
        --time-limit 4
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import difflib
import fnmatch
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.std import tqdm  # text bars everywhere: tqdm.auto warns in a kernel without ipywidgets

from experiments.framework.checkpoints import atomic_write
from experiments.framework.context import (
    DEFAULT_CHECKPOINT_INTERVAL_S,
    NonFiniteError,
    RunContext,
    TimeLimitReached,
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
    REPO_ROOT,
    cell_identity,
    code_version,
    describe_machine,
    is_partial,
    load_matching,
    load_record,
    run_dir,
)

DEFAULT_OUT = "results"


def select_cells(exp: Experiment, preset: str, only: Sequence[str] = ()) -> tuple[Cell, ...]:
    """The cells of ``preset`` whose id matches one of the ``only`` globs (all if empty)."""
    if preset not in exp.presets:
        close = difflib.get_close_matches(preset, list(exp.presets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(
            f"unknown preset {preset!r} for experiment {exp.name!r}{hint}; "
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


TIME_LIMIT_EXIT = 3
"""Exit status of a worker (``python -m experiments cell``) whose cell stopped at the time
limit with a partial record."""

KILL_AFTER_S = 5.0  # a worker still alive this long after SIGTERM gets SIGKILL
POLL_S = 0.1
WORKER_MEM_FRACTION = 0.9  # of the accelerator's memory, shared by the workers


def check_jobs(jobs: Any) -> int:
    """A valid ``--jobs``: a whole number >= 1 (else a :class:`UsageError`)."""
    try:
        n = int(jobs) if not isinstance(jobs, bool | float) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1 or (isinstance(jobs, str) and jobs.strip() != str(n)):
        raise UsageError(f"--jobs {jobs}: must be a whole number >= 1 (how many cells run at "
                         "once, one process each; e.g. --jobs 4)")
    return n


def check_time_limit(minutes: Any) -> float | None:
    """A valid ``--time-limit``: ``None`` or a finite number of minutes > 0 (else a
    :class:`UsageError`)."""
    if minutes is None:
        return None
    try:
        value = float(minutes) if not isinstance(minutes, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--time-limit {minutes}: must be a finite number of minutes > 0 "
                         "(e.g. --time-limit 4, or 0.5 for 30 seconds)")
    return value


@dataclasses.dataclass(frozen=True)
class Deadlines:
    """When a time-limited run stops (:func:`time.time` values).

    ``soft``: no cell starts after it, and running cells stop at their next checkpoint (or
    log, if they never checkpoint), saving their state and a partial record. ``hard``: a
    cell still running is interrupted (its last checkpoint and progressive record stand).
    ``end``: the limit itself; a worker process still alive then is terminated. The grace
    between ``soft`` and ``end`` is a tenth of the limit, at most a minute.
    """

    soft: float
    hard: float
    end: float

    @classmethod
    def after(cls, minutes: float | None, now: float | None = None) -> Deadlines | None:
        if minutes is None:
            return None
        now = time.time() if now is None else now
        limit = 60.0 * minutes
        grace = min(60.0, 0.1 * limit)
        return cls(soft=now + limit - grace, hard=now + limit - grace / 4, end=now + limit)


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """What :func:`run_cells` did: the reports' :class:`RunSummary` (``ran``: finished now,
    ``skipped``: finished earlier), the cells stopped at the time limit with a partial
    record, the cells not started, and ``(cell id, one-line message)`` per failed cell
    (``jobs > 1``; with one job a failure raises)."""

    summary: RunSummary
    partial: tuple[str, ...] = ()
    not_run: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = ()


class CellsFailed(RuntimeError):
    """Cells run by worker processes failed (:func:`run_experiment` with ``jobs > 1``)."""


@dataclasses.dataclass
class _Tally:
    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    partial: list[str] = dataclasses.field(default_factory=list)
    not_run: list[str] = dataclasses.field(default_factory=list)
    errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def order_cells(cells: Sequence[Cell], only: Sequence[str] = ()) -> tuple[Cell, ...]:
    """``cells`` in the order they start: by the first ``only`` pattern each matches (so
    ``--only 'x-*-dni' 'x-*'`` starts the slow DNI cells first), else as declared."""
    if not only:
        return tuple(cells)

    def rank(cell):
        return next((i for i, p in enumerate(only) if fnmatch.fnmatchcase(cell.id, p)),
                    len(only))

    return tuple(sorted(cells, key=rank))  # stable: declared order within a pattern


def run_experiment(
    exp: Experiment,
    preset: str,
    *,
    out: str | os.PathLike = DEFAULT_OUT,
    seed: int = 0,
    only: Sequence[str] = (),
    fresh: bool = False,
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
    jobs: int = 1,
    time_limit_min: float | None = None,
    echo: bool = True,
) -> RunSummary:
    """Run the (selected) cells of ``exp`` at ``preset`` and write the reports.

    ``run_cell(cell, config, ctx)`` returns ``{"metric": float, "curves": {...}, **extra}``
    (or just the metric as a float): ``metric`` is the number in the table (in the units of
    ``exp.metric``); ``curves`` maps names to ``(steps, values)`` and is merged with what
    ``ctx.log`` recorded; every other key is JSON data stored under ``metrics``.
    A cell whose JSON exists with the same params, config and seed is skipped unless
    ``fresh`` (a partial record does not count: the cell resumes). Reports always cover all
    cells of the preset (unrun ones marked missing, stopped ones partial).
    Before starting it logs how long the cells took when measured (``quick``).
    ``jobs`` and ``time_limit_min``: see the module docstring and :func:`run_cells`; failed
    worker cells raise :class:`CellsFailed` after the others finished.
    """
    outcome = run_cells(exp, preset, out=out, seed=seed, only=only, fresh=fresh,
                        checkpoint_interval_s=checkpoint_interval_s, jobs=jobs,
                        time_limit_min=time_limit_min, echo=echo)
    if outcome.errors:
        raise CellsFailed("; ".join(f"cell {c}: {m}" for c, m in outcome.errors))
    return outcome.summary


def run_cells(
    exp: Experiment,
    preset: str,
    *,
    out: str | os.PathLike = DEFAULT_OUT,
    seed: int = 0,
    only: Sequence[str] = (),
    fresh: bool = False,
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
    jobs: int = 1,
    time_limit_min: float | None = None,
    echo: bool = True,
) -> RunOutcome:
    """:func:`run_experiment`, returning the whole :class:`RunOutcome`: with ``jobs > 1``
    the cells run in that many worker processes at once and a failing cell is listed in
    ``errors`` instead of stopping the others; with ``time_limit_min`` the run stops
    cleanly in that many minutes (:class:`Deadlines`)."""
    cells = order_cells(select_cells(exp, preset, only), only)
    checkpoint_interval_s = check_interval(checkpoint_interval_s)
    jobs = check_jobs(jobs)
    limits = Deadlines.after(check_time_limit(time_limit_min))
    config = exp.presets[preset]
    out_root = check_out_dir(out)
    out_dir = run_dir(out_root, exp.name, preset, seed)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if echo else (lambda msg: None)
    times, plan = estimate(exp, preset, cells)
    if jobs > 1:
        plan += f", {min(jobs, len(cells))} at a time"
    if limits is not None:
        plan += f", time limit {format_duration(60 * time_limit_min)}"
    log(f"[{exp.name}/{preset}] {plan}")
    tally = _Tally()
    try:
        if jobs == 1:
            for i, cell in enumerate(cells, 1):
                if limits is not None and time.time() >= limits.soft:
                    tally.not_run += [c.id for c in cells[i - 1:]]
                    break
                tag = f"[{exp.name}/{preset} {i}/{len(cells)}] {cell.id}"
                status = _run_or_skip(exp, preset, cell, config, seed, out_dir, fresh,
                                      checkpoint_interval_s, log, tag, times.get(cell.id),
                                      limits)
                getattr(tally, status).append(cell.id)
        else:
            _run_workers(exp, preset, cells, out_root, out_dir, seed, fresh,
                         checkpoint_interval_s, jobs, limits, log, times, tally)
    except BaseException:
        with contextlib.suppress(Exception):  # keep table.md current, re-raise the real error
            write_reports(exp, preset, out_dir, ran=tally.ran, skipped=tally.skipped)
        raise
    finally:
        with contextlib.suppress(OSError):
            (out_dir / "checkpoints").rmdir()  # only if empty
    if tally.not_run:
        log(f"[{exp.name}/{preset}] time limit: {len(tally.not_run)} cells not run: "
            f"{', '.join(tally.not_run)}")
    summary = write_reports(exp, preset, out_dir, ran=tally.ran, skipped=tally.skipped)
    return RunOutcome(summary, tuple(tally.partial), tuple(tally.not_run), tuple(tally.errors))


def run_one_cell(exp: Experiment, preset: str, cell: Cell, *, out: str | os.PathLike,
                 seed: int = 0, fresh: bool = False,
                 checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
                 limits: Deadlines | None = None, echo: bool = True) -> str:
    """Run (or skip) one cell in this process and store its record; no reports. Returns
    ``"ran"``, ``"skipped"`` (finished earlier), ``"partial"`` (stopped at the time limit)
    or ``"not_run"`` (stopped before its first evaluation). What a worker process of
    :func:`run_cells` does."""
    out_dir = run_dir(check_out_dir(out), exp.name, preset, seed)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if echo else (lambda msg: None)
    return _run_or_skip(exp, preset, cell, exp.presets[preset], seed, out_dir, fresh,
                        check_interval(checkpoint_interval_s), log,
                        f"[{exp.name}/{preset}] {cell.id}", None, limits)


def _run_or_skip(exp, preset, cell, config, seed, out_dir, fresh, interval, log, tag,
                 measured_s, limits=None) -> str:
    identity = cell_identity(exp, preset, cell, seed)
    ckpt_dir = out_dir / "checkpoints" / cell.id
    if fresh:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    elif load_matching(out_dir, cell, identity) is not None:
        log(f"{tag}: done earlier, skipping (--fresh reruns it)")
        return "skipped"
    eta = "" if measured_s is None else f" (took {format_duration(measured_s)} when measured)"
    log(f"{tag}: running{eta}")
    try:
        record = _run_one(exp, preset, cell, config, seed, identity, out_dir, ckpt_dir,
                          interval, limits)
    except TimeLimitReached as e:
        record = load_record(out_dir / "cells" / f"{cell.id}.json")
        if not e.step or record is None or not is_partial(record):
            log(f"{tag}: stopped before its first evaluation at the time limit (not run)")
            return "not_run"
        log(f"{tag}: stopped at step {e.step} at the time limit (record partial; rerun to "
            "resume)")
        return "partial"
    atomic_write(out_dir / "cells" / f"{cell.id}.json",
                 lambda f: json.dump(record, f, indent=1))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    paper = "" if cell.paper is None else f" (paper {fmt(cell.paper)})"
    log(f"{tag}: {exp.metric} = {fmt(record['metric'])}{paper}, {record['wall_time_s']:.1f} s")
    return "ran"


def record_fields(exp: Experiment, preset: str, cell: Cell, seed: int,
                  identity: Mapping) -> dict[str, Any]:
    """The fields every record of ``cell`` has, partial or finished: what the cell is, its
    identity and where it ran (code version, machine, command)."""
    return {
        "experiment": exp.name,
        "paper_ref": exp.paper,
        "preset": preset,
        "cell": cell.id,
        "row": cell.row,
        "column": cell.column,
        "metric_name": exp.metric,
        "paper": cell.paper,
        **identity,
        "code_version": code_version(),
        **describe_machine(),
        "command": reproduce_command(exp.name, preset, seed=seed,
                                     overrides=exp.overrides.get(preset, ())),
    }


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) \
        or type(e).__name__


@contextlib.contextmanager
def _alarm(at: float | None, ctx: RunContext):
    """Interrupt the cell at ``at`` (:func:`time.time`) with :class:`TimeLimitReached`:
    the hard stop of a cell that neither checkpoints nor logs in time (main thread only)."""
    if at is None or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise TimeLimitReached(ctx.where, ctx.last_step)

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(at - time.time(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_one(exp, preset, cell, config, seed, identity, out_dir, ckpt_dir, interval,
             limits=None):
    ctx = RunContext(
        experiment=exp.name,
        preset=preset,
        cell=cell,
        seed=seed,
        out_dir=out_dir,
        checkpoint_dir=ckpt_dir,
        checkpoint_interval_s=interval,
        fingerprint=identity,
        record_path=out_dir / "cells" / f"{cell.id}.json",
        record_fields=record_fields(exp, preset, cell, seed, identity),
        deadline=None if limits is None else limits.soft,
    )
    start = time.monotonic()
    try:
        with _alarm(None if limits is None else limits.hard, ctx):
            out = exp.run_cell(cell, config, ctx)
    except (TimeLimitReached, KeyboardInterrupt):
        if ctx.curves:  # the curve so far, not an empty record for a cell stopped early
            ctx.write_partial(force=True)
        raise
    except Exception as e:
        if ctx.curves:
            ctx.write_partial(force=True, error=_one_line(e))
        if not isinstance(e, NonFiniteError):
            e.add_note(f"while running {ctx.where}")
        raise
    finally:
        ctx.close()
    wall = ctx.elapsed_before_s + time.monotonic() - start
    return make_record(exp, preset, cell, seed, identity, out, ctx, wall)


def make_record(exp: Experiment, preset: str, cell: Cell, seed: int, identity: Mapping,
                out: Mapping[str, Any] | float, ctx: RunContext, wall: float) -> dict:
    """The JSON stored for a finished cell: identity, metric, metrics, curves, provenance
    (no ``partial`` flag)."""
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
        "command": reproduce_command(exp.name, preset, seed=seed,
                                     overrides=exp.overrides.get(preset, ())),
    }


# --------------------------------------------------------------------------- worker processes


def experiment_module(exp: Experiment) -> str:
    """The imported module whose ``EXPERIMENT`` is ``exp`` (what a worker imports), or a
    :class:`UsageError`: workers can only rebuild an experiment that a module declares."""
    for name, module in list(sys.modules.items()):
        if getattr(module, "EXPERIMENT", None) is exp:
            return name
    if exp.overrides:  # a copy with --set overrides: its module declares the original
        for name, module in list(sys.modules.items()):
            declared = getattr(module, "EXPERIMENT", None)
            if isinstance(declared, Experiment) and declared.name == exp.name:
                return name
    raise UsageError(f"--jobs > 1: experiment {exp.name!r} is not the EXPERIMENT of an "
                     "imported module, so worker processes cannot load it; run it with "
                     "--jobs 1")


def worker_env(exp: Experiment, jobs: int) -> dict[str, str]:
    """The environment of a worker: this one, the experiment's module as the only one to
    import, this checkout (and the module's import root) first on ``PYTHONPATH``, and the
    accelerator shared ``jobs`` ways."""
    module = experiment_module(exp)
    roots = [str(REPO_ROOT)]
    file = getattr(sys.modules[module], "__file__", None)
    if file:
        depth = module.count(".") + (Path(file).stem == "__init__")
        roots.insert(0, str(Path(file).resolve().parents[depth]))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys([*roots, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    env["SGJAX_EXPERIMENTS"] = module
    env.pop("SGJAX_EXTRA_EXPERIMENTS", None)
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{WORKER_MEM_FRACTION / jobs:.4f}")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def worker_command(exp: Experiment, preset: str, cell: Cell, *, out: Path, seed: int,
                   fresh: bool, interval: float, limits: Deadlines | None) -> list[str]:
    """``python -m experiments cell NAME CELL ...``: one cell in its own process (with the
    experiment's ``--set`` overrides)."""
    cmd = [sys.executable, "-m", "experiments", "cell", exp.name, cell.id, "--preset", preset,
           "--out", str(out), "--seed", str(seed), "--checkpoint-interval", repr(interval)]
    for assignment in exp.overrides.get(preset, ()):
        cmd += ["--set", assignment]
    if limits is not None:
        cmd += ["--deadline", repr(limits.soft), "--hard-deadline", repr(limits.hard)]
    return cmd + (["--fresh"] if fresh else [])


def die_with_parent() -> None:
    """In a worker: be sent SIGTERM when the parent process dies (Linux), so that no
    orphaned worker goes on holding the accelerator after the parent was killed."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError, TypeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclasses.dataclass
class _Worker:
    cell: Cell
    tag: str
    proc: subprocess.Popen
    log_path: Path
    log_file: Any
    terminated_at: float | None = None


ERROR_LINE = re.compile(r"^error: (.*)$")
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b.*$")


def worker_error(log_path: Path, returncode: int) -> str:
    """The one-line reason a worker failed, from its log: its ``error:`` line, else the last
    line of its traceback, else its exit status."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        lines = []
    for pattern in (ERROR_LINE, EXCEPTION_LINE):
        for line in reversed(lines):
            if m := pattern.match(line.strip()):
                return m.group(1) if pattern is ERROR_LINE else m.group(0)
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
    return f"the worker process ended ({how}) without a record"


def _run_workers(exp, preset, cells, out_root, out_dir, seed, fresh, interval, jobs, limits,
                 log, times, tally: _Tally) -> None:
    tags = {c.id: f"[{exp.name}/{preset} {i}/{len(cells)}] {c.id}" for i, c in enumerate(cells, 1)}
    queue = []
    for cell in cells:
        if not fresh and load_matching(out_dir, cell,
                                       cell_identity(exp, preset, cell, seed)) is not None:
            log(f"{tags[cell.id]}: done earlier, skipping (--fresh reruns it)")
            tally.skipped.append(cell.id)
        else:
            queue.append(cell)
    if not queue:
        return
    env = worker_env(exp, min(jobs, len(queue)))
    (out_dir / "logs").mkdir(exist_ok=True)
    running: dict[str, _Worker] = {}
    try:
        while queue or running:
            now = time.time()
            if queue and limits is not None and now >= limits.soft:
                tally.not_run += [c.id for c in queue]
                queue = []
            while queue and len(running) < jobs:
                cell = queue.pop(0)
                running[cell.id] = _start_worker(exp, preset, cell, out_root, out_dir, seed,
                                                 fresh, interval, limits, env, tags[cell.id])
                eta = times.get(cell.id)
                log(f"{tags[cell.id]}: running in process {running[cell.id].proc.pid}"
                    + ("" if eta is None else f" (took {format_duration(eta)} when measured)"))
            for cid, w in list(running.items()):
                rc = w.proc.poll()
                if rc is None:
                    if limits is not None and now >= limits.end and w.terminated_at is None:
                        w.proc.terminate()
                        w.terminated_at = now
                    elif w.terminated_at is not None and now >= w.terminated_at + KILL_AFTER_S:
                        w.proc.kill()
                    continue
                del running[cid]
                w.log_file.close()
                _collect(exp, preset, w, rc, out_dir, seed, log, tally)
            time.sleep(POLL_S)
    except BaseException:
        _stop_all(running.values())
        for w in running.values():
            w.log_file.close()
            _collect(exp, preset, w, w.proc.returncode, out_dir, seed, log, tally)
        raise


def _start_worker(exp, preset, cell, out_root, out_dir, seed, fresh, interval, limits, env,
                  tag) -> _Worker:
    log_path = out_dir / "logs" / f"{cell.id}.log"
    log_file = open(log_path, "a", encoding="utf-8")  # closed when collected
    cmd = worker_command(exp, preset, cell, out=out_root, seed=seed, fresh=fresh,
                         interval=interval, limits=limits)
    stamp = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    log_file.write(f"=== {stamp} {' '.join(cmd[1:])}\n")
    log_file.flush()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file,
                            stderr=subprocess.STDOUT, env=env)
    return _Worker(cell, tag, proc, log_path, log_file)


def _stop_all(workers) -> None:
    workers = list(workers)
    for w in workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    until = time.monotonic() + KILL_AFTER_S
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()


def _collect(exp, preset, w: _Worker, rc, out_dir, seed, log, tally: _Tally) -> None:
    """Sort a worker that ended into ran / partial / not run / errors, from its exit status
    and the record it left."""
    cell = w.cell
    record = load_record(out_dir / "cells" / f"{cell.id}.json")
    identity = cell_identity(exp, preset, cell, seed)
    ours = record is not None and all(record.get(k) == v for k, v in identity.items())
    stopped = rc == TIME_LIMIT_EXIT or w.terminated_at is not None or rc in (130, -15, -9)
    if rc == 0 and ours and not is_partial(record):
        paper = "" if cell.paper is None else f" (paper {fmt(cell.paper)})"
        log(f"{w.tag}: {exp.metric} = {fmt(record['metric'])}{paper}, "
            f"{record['wall_time_s']:.1f} s")
        tally.ran.append(cell.id)
    elif stopped and ours and is_partial(record) and "error" not in record:
        log(f"{w.tag}: stopped at step {record.get('last_step')} at the time limit "
            "(record partial; rerun to resume)")
        tally.partial.append(cell.id)
    elif stopped and rc != 1:
        log(f"{w.tag}: stopped at the time limit before its first evaluation")
        tally.not_run.append(cell.id)
    else:
        message = worker_error(w.log_path, rc if rc is not None else -9)
        log(f"{w.tag}: failed (log: {w.log_path})")
        tally.errors.append((cell.id, f"{message} (log: {w.log_path})"))
