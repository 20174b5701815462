"""The experiment framework: declare a paper's table as data, run it, resume it, report it.

An experiment module (one per paper table or figure, e.g. ``experiments/dni/table1.py``)
exposes one :class:`Experiment` named ``EXPERIMENT``::

    EXPERIMENT = Experiment(
        name="table1",
        paper="DNI (Jaderberg et al. 2016)",
        title="Table 1: every-layer DNI on MNIST and CIFAR-10",
        metric="test error (%)",
        cells=[Cell("mnist-fcn3-dni", row="MNIST FCN 3", column="DNI",
                    params={"dataset": "mnist", "depth": 3, "method": "dni"}, paper=2.32), ...],
        presets={"smoke": Config(steps=20), "quick": Config(...), "paper": Config(...)},
        run_cell=run_cell,
    )

    def run_cell(cell, config, ctx):
        state = init(ctx.key(), cell.params, config)
        start, state = ctx.restore(state)              # resume mid-cell after a kill
        for step in ctx.progress(config.steps, start=start):
            state, loss = train_step(state, next_batch())
            if (step + 1) % config.log_every == 0:
                ctx.log(step + 1, loss=loss, test_error=evaluate(state))   # checks finiteness
                ctx.save(step + 1, state)               # throttled to every few minutes
        return {"metric": evaluate(state)}

:func:`run_experiment` runs the cells, skips the ones already finished with the same
config and seed, and writes ``<out>/<name>/<preset>/``: ``cells/<cell>.json``, ``results.csv``,
``table.md`` (paper | ours | diff per cell) and the figures as PNG.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as _dt
import enum
import fnmatch
import functools
import io
import json
import os
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

PRESETS = ("smoke", "quick", "paper")
"""Presets every experiment defines: ``smoke`` (seconds, wiring only, CI), ``quick``
(minutes to an hour on a laptop CPU), ``paper`` (the paper's exact protocol)."""

DEFAULT_OUT = "results"
DEFAULT_CHECKPOINT_INTERVAL_S = 120.0
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UsageError(ValueError):
    """A bad experiment name, preset or cell pattern; the CLI prints it and exits with 2."""


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite value."""


# --------------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class Cell:
    """One table cell, i.e. one training run.

    ``id`` is stable and filesystem-safe (it names the result file and is what ``--only``
    matches); ``row``/``column`` are the labels in the paper's table; ``params`` is whatever
    ``run_cell`` needs; ``paper`` is the published number (``None`` if the paper gives none).
    """

    id: str
    row: str
    column: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    paper: float | None = None

    def __post_init__(self):
        if not _SAFE_ID.match(self.id):
            raise ValueError(f"cell id {self.id!r} must match {_SAFE_ID.pattern}")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A paper table or figure, declared as data.

    ``cells`` is a sequence of :class:`Cell` or a function ``preset -> cells``.
    ``presets`` maps each of :data:`PRESETS` (more are allowed) to a config: any JSON-like
    value, preferably a frozen dataclass; it is recorded with every result and a cell is
    re-run when its config changes.
    ``run_cell(cell, config, ctx)`` trains one cell and returns ``{"metric": float, ...}``
    (see :func:`run_experiment`).
    ``figures(results, config)`` returns ``{name: matplotlib Figure}``, saved as
    ``<name>.png``; ``None`` plots every logged curve (:func:`default_figures`).
    """

    name: str
    paper: str
    title: str
    metric: str
    cells: Sequence[Cell] | Callable[[str], Sequence[Cell]]
    presets: Mapping[str, Any]
    run_cell: Callable[[Cell, Any, RunContext], Mapping[str, Any] | float]
    figures: Callable[[Sequence[CellResult], Any], Mapping[str, Any]] | None = None
    notes: str = ""

    def __post_init__(self):
        if not _SAFE_ID.match(self.name) or self.name == "all":
            raise ValueError(
                f"experiment name {self.name!r} must match {_SAFE_ID.pattern} and not be 'all'"
            )
        missing = [p for p in PRESETS if p not in self.presets]
        if missing:
            raise ValueError(f"experiment {self.name!r} lacks presets {missing}")
        for preset in self.presets:
            self.cells_for(preset)  # validates cell ids at import time

    def cells_for(self, preset: str) -> tuple[Cell, ...]:
        """The cells of ``preset``; ids are checked for uniqueness."""
        cells = tuple(self.cells(preset) if callable(self.cells) else self.cells)
        ids = [c.id for c in cells]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"experiment {self.name!r} has duplicate cell ids {dupes}")
        return cells


class Curve(NamedTuple):
    """A logged training curve; ``ax.plot(*curve)`` plots it."""

    step: np.ndarray
    value: np.ndarray


@dataclasses.dataclass(frozen=True)
class CellResult:
    """A finished cell as read back from ``cells/<id>.json`` (``record`` is the whole file)."""

    cell: Cell
    metric: float
    metrics: Mapping[str, Any]
    curves: Mapping[str, Curve]
    seed: int
    wall_time_s: float
    record: Mapping[str, Any]

    @property
    def paper(self) -> float | None:
        return self.cell.paper


# --------------------------------------------------------------------------- helpers


def reproduce_command(
    name: str, preset: str, *, seed: int = 0, only: Sequence[str] = (), make: bool = False
) -> str:
    """The exact command that reproduces ``name`` at ``preset``."""
    if make:
        return f"make reproduce-{name} PRESET={preset}"
    cmd = f"python -m experiments run {name} --preset {preset}"
    if seed:
        cmd += f" --seed {seed}"
    if only:
        cmd += " --only " + " ".join(only)
    return cmd


def check_finite(value: Any, *, where: str) -> Any:
    """Return ``value`` (a number, array or pytree) or raise :class:`NonFiniteError`.

    ``where`` names the place, e.g. ``"table1 (quick), cell mnist-fcn3-dni, step 1200, loss"``.
    Converting to host memory synchronises with the device: call it at logging intervals.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(value):
        if _is_key(leaf):
            continue
        arr = np.asarray(jax.device_get(leaf))
        if arr.dtype.kind in "fc" or arr.dtype.name == "bfloat16":
            arr = arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)
            if not np.all(np.isfinite(arr)):
                bad = arr[~np.isfinite(arr)].ravel()[0]
                what = jax.tree_util.keystr(path)
                raise NonFiniteError(
                    f"{where}{' ' + what if what else ''} is {bad} (not finite): training "
                    "diverged. Lower the learning rate in the preset's config (or clip "
                    "gradients, or try another --seed), then rerun with --fresh so the last "
                    "checkpoint is not reused."
                )
    return value


def to_jsonable(obj: Any) -> Any:
    """Convert a config (dataclass, mapping, sequence, numbers, enums, paths...) to JSON data.

    Functions and classes become ``"module.qualname"``. Anything else is a ``TypeError``:
    configs must be data, so that a changed config is detected and recorded.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray | jax.Array):
        return np.asarray(obj).tolist()
    if isinstance(obj, np.dtype):
        return str(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, set | frozenset):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, functools.partial):
        return {
            "partial": to_jsonable(obj.func),
            "args": to_jsonable(obj.args),
            "kwargs": to_jsonable(obj.keywords),
        }
    if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")):
        return f"{obj.__module__}.{obj.__qualname__}"
    raise TypeError(f"cannot record {type(obj).__name__} {obj!r} in a config; use plain data")


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int keys compare as they are stored."""
    return json.loads(json.dumps(to_jsonable(obj), sort_keys=True))


def describe_devices() -> dict[str, Any]:
    """What ran the cell: the devices ``jax.devices()`` sees, and versions."""
    devices = jax.devices()
    kinds = sorted({f"{d.device_kind} ({d.platform})" for d in devices})
    return {
        "device": f"{len(devices)}x " + ", ".join(kinds),
        "devices": [str(d) for d in devices],
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def _atomic_write(path: Path, write: Callable[[io.IOBase], None], binary: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- checkpoints


class Checkpointer:
    """Saves one pytree plus a step in ``directory/state.npz``, atomically.

    Leaves are stored as numpy arrays; the tree structure comes from the template passed to
    :meth:`restore` (so no pickling of classes), and restored leaves take the template's
    dtype, type and device placement (sharding). PRNG key arrays are supported. Only the
    latest checkpoint is kept. ``fingerprint`` (any JSON data) guards against resuming under
    a different config: a checkpoint written with another fingerprint is ignored.
    """

    FILENAME = "state.npz"

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Any = None):
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME
        self.fingerprint = _canonical(fingerprint)

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, step: int, state: Any, *, extra: Mapping[str, Any] | None = None) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(state)
        arrays = {f"leaf_{i}": _leaf_to_numpy(leaf) for i, leaf in enumerate(leaves)}
        meta = {
            "step": int(step),
            "treedef": str(treedef),
            "num_leaves": len(leaves),
            "fingerprint": self.fingerprint,
            "extra": to_jsonable(dict(extra or {})),
        }
        arrays["__meta__"] = np.array(json.dumps(meta))
        _atomic_write(self.path, lambda f: np.savez(f, **arrays), binary=True)

    def restore(self, like: Any) -> tuple[int, Any, dict[str, Any]]:
        """``(step, state, extra)`` from the checkpoint, or ``(0, like, {})`` if none applies.

        Raises ``ValueError`` if the stored tree does not fit ``like`` (the code changed).
        """
        if not self.path.exists():
            return 0, like, {}
        with np.load(self.path, allow_pickle=False) as data:
            meta = json.loads(str(data["__meta__"]))
            if meta["fingerprint"] != self.fingerprint:
                return 0, like, {}
            stored = [data[f"leaf_{i}"] for i in range(meta["num_leaves"])]
        leaves, treedef = jax.tree_util.tree_flatten(like)
        if str(treedef) != meta["treedef"] or len(leaves) != len(stored):
            raise ValueError(
                f"checkpoint {self.path} holds a differently structured state than this code "
                "builds; delete it or rerun with --fresh"
            )
        restored = [_leaf_from_numpy(a, t, self.path) for a, t in zip(stored, leaves, strict=True)]
        return meta["step"], jax.tree_util.tree_unflatten(treedef, restored), meta["extra"]

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_to_numpy(leaf: Any) -> np.ndarray:
    if _is_key(leaf):
        leaf = jax.random.key_data(leaf)
    arr = np.asarray(jax.device_get(leaf))
    if arr.dtype.kind == "V" or type(arr.dtype).__module__.startswith("ml_dtypes"):
        arr = arr.view(f"u{arr.dtype.itemsize}")  # bfloat16 etc.: store the raw bits
    return arr


def _leaf_from_numpy(arr: np.ndarray, like: Any, path: Path) -> Any:
    if _is_key(like):
        data = jax.random.key_data(like)
        if arr.shape != data.shape:
            raise ValueError(f"checkpoint {path}: PRNG key shape {arr.shape} != {data.shape}")
        out = jax.random.wrap_key_data(arr.astype(data.dtype), impl=jax.random.key_impl(like))
        return jax.device_put(out, like.sharding)
    if isinstance(like, bool | int | float | complex):
        return type(like)(arr.item())
    like_arr = np.asarray(like) if not isinstance(like, jax.Array) else like
    if arr.shape != like_arr.shape:
        raise ValueError(f"checkpoint {path}: leaf shape {arr.shape} != {like_arr.shape}")
    dtype = np.dtype(like_arr.dtype)
    arr = arr.view(dtype) if arr.dtype != dtype and arr.dtype.itemsize == dtype.itemsize else arr
    arr = arr.astype(dtype, copy=False)
    if isinstance(like, jax.Array):
        return jax.device_put(arr, like.sharding)
    return arr if isinstance(like, np.ndarray) else type(like)(arr)


# --------------------------------------------------------------------------- run context


@dataclasses.dataclass
class RunContext:
    """What the framework gives ``run_cell``: seed, progress, logging, checks, checkpoints."""

    experiment: str
    preset: str
    cell: Cell
    seed: int
    out_dir: Path  # <out>/<name>/<preset>
    checkpoint_dir: Path  # <out_dir>/checkpoints/<cell id>; removed once the cell is done
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S
    fingerprint: Any = None
    curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    resumed_from_step: int | None = None
    elapsed_before_s: float = 0.0  # wall time spent before the restored checkpoint
    _bar: Any = dataclasses.field(default=None, init=False, repr=False)
    _started: float = dataclasses.field(default_factory=time.monotonic, init=False, repr=False)
    _last_save: float = dataclasses.field(default_factory=time.monotonic, init=False, repr=False)

    @property
    def where(self) -> str:
        return f"experiment {self.experiment!r} ({self.preset}), cell {self.cell.id!r}"

    def key(self) -> jax.Array:
        """``jax.random.key(seed)``."""
        return jax.random.key(self.seed)

    def progress(self, total: int, *, start: int = 0, desc: str | None = None) -> tqdm:
        """A tqdm bar over ``range(start, total)``; iterate it, or call ``.update(n)``."""
        self.close()
        if not sys.stderr.isatty():
            interval = {"mininterval": 30.0}  # periodic lines in logs, not a flood
        else:
            interval = {}
        self._bar = tqdm(
            range(start, total),
            total=total,
            initial=start,
            desc=desc or self.cell.id,
            leave=False,
            dynamic_ncols=True,
            **interval,
        )
        return self._bar

    def log(self, step: int, **values: Any) -> None:
        """Record scalar curve points at ``step`` (checked finite) and show them on the bar."""
        shown = {}
        for name, value in values.items():
            value = float(check_finite(value, where=f"{self.where}, step {step}, {name}"))
            self.curves.setdefault(name, []).append((int(step), value))
            shown[name] = f"{value:.4g}"
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)

    def check_finite(self, value: Any, *, step: int, what: str = "loss") -> Any:
        """:func:`check_finite` with the experiment, cell and step filled in."""
        return check_finite(value, where=f"{self.where}, step {step}, {what}")

    @property
    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.checkpoint_dir, fingerprint=self.fingerprint)

    def restore(self, like: Any) -> tuple[int, Any]:
        """``(step, state)`` from this cell's checkpoint (curves too), or ``(0, like)``."""
        step, state, extra = self.checkpointer.restore(like)
        if step:
            self.curves = {
                k: [(int(s), v) for s, v in points] for k, points in extra.get("curves", {}).items()
            }
            self.elapsed_before_s = float(extra.get("elapsed_s", 0.0))
            self.resumed_from_step = step
            tqdm.write(f"  resuming {self.cell.id} from step {step}", file=sys.stderr)
        return step, state

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Checkpoint ``state`` at ``step`` (with the curves so far) if ``checkpoint_interval_s``
        passed since the last save, or if ``force``. Returns whether it saved."""
        now = time.monotonic()
        if not force and now - self._last_save < self.checkpoint_interval_s:
            return False
        elapsed = self.elapsed_before_s + (now - self._started)
        self.checkpointer.save(step, state, extra={"curves": self.curves, "elapsed_s": elapsed})
        self._last_save = now
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- running


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What :func:`run_experiment` did."""

    experiment: Experiment
    preset: str
    out_dir: Path
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    results: tuple[CellResult, ...]  # every finished cell matching the current config
    table: str  # the Markdown of table.md
    figures: tuple[Path, ...]


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


def cell_identity(exp: Experiment, preset: str, cell: Cell, seed: int) -> dict[str, Any]:
    """What must match for a stored result to count as this cell's: params, config, seed."""
    return _canonical({"params": cell.params, "config": exp.presets[preset], "seed": seed})


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
    """
    cells = select_cells(exp, preset, only)
    config = exp.presets[preset]
    out_dir = Path(out) / exp.name / preset
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if echo else (lambda msg: None)
    ran, skipped = [], []
    try:
        _run_cells(
            exp,
            preset,
            cells,
            config,
            seed,
            out_dir,
            fresh,
            checkpoint_interval_s,
            log,
            ran,
            skipped,
        )
    except BaseException:
        with contextlib.suppress(Exception):  # keep table.md current, re-raise the real error
            write_reports(exp, preset, out_dir, seed=seed, ran=ran, skipped=skipped)
        raise
    finally:
        with contextlib.suppress(OSError):
            (out_dir / "checkpoints").rmdir()  # only if empty
    return write_reports(exp, preset, out_dir, seed=seed, ran=ran, skipped=skipped)


def _run_cells(exp, preset, cells, config, seed, out_dir, fresh, interval, log, ran, skipped):
    for i, cell in enumerate(cells, 1):
        tag = f"[{exp.name}/{preset} {i}/{len(cells)}] {cell.id}"
        identity = cell_identity(exp, preset, cell, seed)
        ckpt_dir = out_dir / "checkpoints" / cell.id
        if fresh:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        elif _load_matching(out_dir, cell, identity) is not None:
            skipped.append(cell.id)
            log(f"{tag}: done earlier, skipping (--fresh reruns it)")
            continue
        log(f"{tag}: running")
        record = _run_one(exp, preset, cell, config, seed, identity, out_dir, ckpt_dir, interval)
        _atomic_write(
            out_dir / "cells" / f"{cell.id}.json", lambda f, r=record: json.dump(r, f, indent=1)
        )
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ran.append(cell.id)
        paper = "" if cell.paper is None else f" (paper {_fmt(cell.paper)})"
        log(f"{tag}: {exp.metric} = {_fmt(record['metric'])}{paper}, {record['wall_time_s']:.1f} s")


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
        if hasattr(e, "add_note") and not isinstance(e, NonFiniteError):
            e.add_note(f"while running {ctx.where}")
        raise
    finally:
        ctx.close()
    wall = ctx.elapsed_before_s + time.monotonic() - start
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
        **describe_devices(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": reproduce_command(exp.name, preset, seed=seed),
    }


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _load_matching(out_dir: Path, cell: Cell, identity: Mapping) -> CellResult | None:
    """The stored result of ``cell`` if its params/config/seed equal ``identity``."""
    record = _load_record(out_dir / "cells" / f"{cell.id}.json")
    if record is None or any(record.get(k) != v for k, v in identity.items()):
        return None
    return _result(cell, record)


def _result(cell: Cell, record: Mapping[str, Any]) -> CellResult:
    curves = {
        k: Curve(np.asarray(v["step"]), np.asarray(v["value"]))
        for k, v in record.get("curves", {}).items()
    }
    return CellResult(
        cell=cell,
        metric=record["metric"],
        metrics=record.get("metrics", {}),
        curves=curves,
        seed=record["seed"],
        wall_time_s=record["wall_time_s"],
        record=record,
    )


def load_results(exp: Experiment, preset: str, out_dir: Path) -> dict[str, CellResult | str]:
    """Each cell's result, or why it has none: ``"missing (not run)"`` or stale config."""
    config = _canonical(exp.presets[preset])
    found: dict[str, CellResult | str] = {}
    for cell in exp.cells_for(preset):
        record = _load_record(out_dir / "cells" / f"{cell.id}.json")
        if record is None:
            found[cell.id] = "missing (not run)"
        elif record.get("config") != config or record.get("params") != _canonical(cell.params):
            found[cell.id] = "missing (stale: config changed, rerun)"
        else:
            found[cell.id] = _result(cell, record)
    return found


# --------------------------------------------------------------------------- reports


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    spec = ".0f" if 1e4 <= abs(x) < 1e9 else ".4g"  # 12345, not 1.234e+04
    return format(x, ("+" if signed else "") + spec)


def render_table(exp: Experiment, preset: str, found: Mapping[str, CellResult | str]) -> str:
    """table.md: a header, then one line per cell: row | column | paper | ours | diff."""
    results = [r for r in found.values() if isinstance(r, CellResult)]
    seeds = sorted({r.seed for r in results})
    devices = sorted({r.record.get("device", "?") for r in results})
    lines = [
        f"# {exp.name}: {exp.title}",
        "",
        f"- Paper: {exp.paper}",
        f"- Preset: `{preset}`; reproduce with `{reproduce_command(exp.name, preset)}` "
        f"or `{reproduce_command(exp.name, preset, make=True)}`",
        f"- Metric: {exp.metric}; diff = ours − paper",
        f"- Cells: {len(results)}/{len(found)} done; seeds: {', '.join(map(str, seeds)) or '—'}; "
        f"device: {'; '.join(devices) or '—'}",
    ]
    if exp.notes:
        lines.append(f"- Notes: {exp.notes}")
    if preset == "smoke":
        lines.append("- The smoke preset checks wiring only: its numbers mean nothing.")
    lines += ["", "| row | column | paper | ours | diff |", "| --- | --- | ---: | ---: | ---: |"]
    for cell in exp.cells_for(preset):
        r = found[cell.id]
        if isinstance(r, CellResult):
            diff = _fmt(r.metric - cell.paper, signed=True) if cell.paper is not None else "—"
            ours = _fmt(r.metric)
        else:
            ours, diff = r, "—"
        lines.append(f"| {cell.row} | {cell.column} | {_fmt(cell.paper)} | {ours} | {diff} |")
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, exp: Experiment, preset: str, found: Mapping) -> None:
    results = [r for r in found.values() if isinstance(r, CellResult)]
    extra = sorted(
        {
            k
            for r in results
            for k, v in r.metrics.items()
            if isinstance(v, int | float | str | bool | None)
        }
    )
    header = [
        "experiment",
        "preset",
        "cell",
        "row",
        "column",
        "status",
        "paper",
        "ours",
        "diff",
        "seed",
        "wall_time_s",
        *extra,
    ]

    def write(f):
        w = csv.writer(f)
        w.writerow(header)
        for cell in exp.cells_for(preset):
            r = found[cell.id]
            base = [exp.name, preset, cell.id, cell.row, cell.column]
            if isinstance(r, CellResult):
                diff = "" if cell.paper is None else r.metric - cell.paper
                w.writerow(
                    base
                    + ["done", cell.paper, r.metric, diff, r.seed, r.wall_time_s]
                    + [r.metrics.get(k, "") for k in extra]
                )
            else:
                w.writerow(base + [r, cell.paper] + [""] * (len(header) - 7))

    _atomic_write(path, write)


def plot_curves(
    results: Sequence[CellResult],
    curve: str,
    *,
    title: str | None = None,
    ylabel: str | None = None,
    logy: bool = False,
    label=None,
):
    """A matplotlib Figure with ``curve`` of every result that logged it, one line each."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r in results:
        if curve in r.curves:
            ax.plot(
                *r.curves[curve], label=label(r) if label else f"{r.cell.row} / {r.cell.column}"
            )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or curve)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title or curve)
    if ax.lines:
        ax.legend(fontsize="small")
    return fig


def default_figures(results: Sequence[CellResult], config: Any) -> dict[str, Any]:
    """One figure per logged curve name (``curves-<name>``), all cells overlaid."""
    names = sorted({k for r in results for k in r.curves})
    return {f"curves-{n}": plot_curves(results, n) for n in names}


def write_reports(
    exp: Experiment,
    preset: str,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    ran: Iterable[str] = (),
    skipped: Iterable[str] = (),
) -> RunSummary:
    """(Re)write table.md, results.csv and the figures from the stored cell results."""
    out_dir = Path(out_dir)
    found = load_results(exp, preset, out_dir)
    table = render_table(exp, preset, found)
    _atomic_write(out_dir / "table.md", lambda f: f.write(table))
    _write_csv(out_dir / "results.csv", exp, preset, found)
    results = tuple(r for r in found.values() if isinstance(r, CellResult))
    paths = []
    if results:
        make = exp.figures or default_figures
        for name, fig in dict(make(results, exp.presets[preset])).items():
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=120)
            paths.append(path)
            if getattr(fig.canvas, "manager", None) is not None:  # made with pyplot
                import matplotlib.pyplot as plt

                plt.close(fig)
    return RunSummary(
        exp, preset, out_dir, tuple(ran), tuple(skipped), results, table, tuple(paths)
    )
