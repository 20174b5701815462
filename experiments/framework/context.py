"""What a running cell gets from the framework: its seed, a progress bar, curve logging
with finiteness checks, throttled checkpoints it resumes from after a kill, a progressive
record and a time limit.

Progressive record: every :meth:`RunContext.log` (re)writes the cell's
``cells/<id>.json`` with the curves so far, ``"partial": true`` and ``"last_step"``, so a
run killed hard (SIGKILL, an accelerator lease ending) still leaves a usable curve. The
finished record replaces it (without the flag); :func:`~experiments.framework.store.
load_results` and the skip logic never count a partial record as finished.

Time limit (``--time-limit``): once ``deadline`` passes, the next :meth:`RunContext.save`
checkpoints the state, writes the partial record and raises :class:`TimeLimitReached`;
a cell that never checkpoints stops at its second :meth:`RunContext.log` past the deadline.
A later run resumes the cell from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto warns in a kernel without ipywidgets

from experiments.framework.checkpoints import Checkpointer, atomic_write, is_prng_key
from experiments.framework.declare import Cell, to_jsonable

DEFAULT_CHECKPOINT_INTERVAL_S = 120.0

RECORD_COST_RATIO = 10.0
"""The progressive record is rewritten at a log call only if at least this many times the
last rewrite's duration has passed since it: rewriting costs at most ~1/10 of the run even
for cells that log thousands of points in a tight loop, and an evaluation a few
milliseconds after the previous rewrite is still written."""


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite value."""


class TimeLimitReached(Exception):
    """The run's ``--time-limit`` passed: the cell stopped at ``step`` with its state
    checkpointed (if it checkpoints) and its record flagged ``partial``."""

    def __init__(self, where: str, step: int | None):
        self.step = step
        at = "before its first evaluation" if not step else f"at step {step}"
        super().__init__(f"{where}: stopped {at} at the time limit; its record is partial "
                         "and a rerun resumes it")


def curves_to_json(curves: Mapping[str, list[tuple[int, float]]]) -> dict[str, Any]:
    """``{name: [(step, value), ...]}`` as stored in a record: ``{name: {"step": [...],
    "value": [...]}}``."""
    return {k: {"step": [p[0] for p in v], "value": [p[1] for p in v]}
            for k, v in curves.items()}


def check_finite(value: Any, *, where: str) -> Any:
    """Return ``value`` (a number, array or pytree) or raise :class:`NonFiniteError`.

    ``where`` names the place, e.g. ``"table1 (quick), cell mnist-fcn3-dni, step 1200, loss"``.
    Converting to host memory synchronises with the device: call it at logging intervals.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(value):
        if is_prng_key(leaf):
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


@dataclasses.dataclass
class RunContext:
    """What the framework gives ``run_cell``: seed, progress, logging, checks, checkpoints.

    ``memo`` is JSON data the cell wants kept with its checkpoints (e.g. snapshots taken so
    far): it is saved by :meth:`save` and restored by :meth:`restore`.

    ``record_path`` (``cells/<id>.json``; ``None``: none) is rewritten with
    ``record_fields`` (identity and provenance), the curves so far, ``"partial": true`` and
    ``"last_step"`` as the cell logs; ``deadline`` (a :func:`time.time`) stops the cell
    cleanly (see the module docstring).
    """

    experiment: str
    preset: str
    cell: Cell
    seed: int
    out_dir: Path  # <out>/<name>/<preset>
    checkpoint_dir: Path  # <out_dir>/checkpoints/<cell id>; removed once the cell is done
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S
    fingerprint: Any = None
    curves: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)
    resumed_from_step: int | None = None
    elapsed_before_s: float = 0.0  # wall time spent before the restored checkpoint
    record_path: Path | None = None
    record_fields: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    deadline: float | None = None
    last_step: int = 0  # the latest step logged or checkpointed
    _bar: Any = dataclasses.field(default=None, init=False, repr=False)
    _started: float = dataclasses.field(default_factory=time.monotonic, init=False, repr=False)
    _last_save: float = dataclasses.field(default_factory=time.monotonic, init=False, repr=False)
    _checkpoints: bool = dataclasses.field(default=False, init=False, repr=False)
    _past_deadline_logs: int = dataclasses.field(default=0, init=False, repr=False)
    _record_at: float = dataclasses.field(default=-math.inf, init=False, repr=False)
    _record_cost: float = dataclasses.field(default=0.0, init=False, repr=False)

    @property
    def where(self) -> str:
        return f"experiment {self.experiment!r} ({self.preset}), cell {self.cell.id!r}"

    def key(self) -> jax.Array:
        """``jax.random.key(seed)``."""
        return jax.random.key(self.seed)

    def progress(self, total: int, *, start: int = 0, desc: str | None = None) -> tqdm:
        """A tqdm bar over ``range(start, total)``; iterate it, or call ``.update(n)``."""
        self.close()
        # periodic lines in logs, not a flood
        interval = {} if sys.stderr.isatty() else {"mininterval": 30.0}
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

    @property
    def elapsed_s(self) -> float:
        """Wall time of this cell so far, including the runs before a resume."""
        return self.elapsed_before_s + time.monotonic() - self._started

    def time_is_up(self) -> bool:
        """Whether the run's deadline (``--time-limit``) has passed."""
        return self.deadline is not None and time.time() >= self.deadline

    def log(self, step: int, **values: Any) -> None:
        """Record scalar curve points at ``step`` (checked finite), show them on the bar and
        rewrite the partial record. Past the deadline a cell stops at its next
        :meth:`save`, or here (:class:`TimeLimitReached`) if it logs twice past the deadline
        without a save in between and has never saved (a cell that does not checkpoint).
        """
        shown = {}
        for name, value in values.items():
            value = float(check_finite(value, where=f"{self.where}, step {step}, {name}"))
            self.curves.setdefault(name, []).append((int(step), value))
            shown[name] = f"{value:.4g}"
        self.last_step = max(self.last_step, int(step))
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        if self.time_is_up() and not self._checkpoints:
            if self._past_deadline_logs:  # no save came after the last log: none will
                self.write_partial(force=True)
                raise TimeLimitReached(self.where, self.last_step)
            self._past_deadline_logs += 1
        self.write_partial()

    def partial_record(self, **extra: Any) -> dict[str, Any]:
        """The record of this cell so far: ``record_fields``, the curves, ``"partial": true``,
        ``"last_step"`` and ``metric: None`` (there is no final metric yet)."""
        return {
            **self.record_fields,
            "metric": None,
            "metrics": {},
            "curves": curves_to_json(self.curves),
            "wall_time_s": self.elapsed_s,
            "resumed_from_step": self.resumed_from_step,
            "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "partial": True,
            "last_step": self.last_step,
            **to_jsonable(extra),
        }

    def write_partial(self, *, force: bool = False, **extra: Any) -> bool:
        """(Re)write the partial record at ``record_path`` (unless ``None``); unless
        ``force``, only if :data:`RECORD_COST_RATIO` times the last rewrite's duration has
        passed. ``extra`` goes into the record (e.g. ``error``). Returns whether it wrote."""
        now = time.monotonic()
        if self.record_path is None or (
                not force and now - self._record_at < RECORD_COST_RATIO * self._record_cost):
            return False
        record = self.partial_record(**extra)
        atomic_write(self.record_path, lambda f: json.dump(record, f, indent=1), sync=False)
        self._record_at = time.monotonic()
        self._record_cost = self._record_at - now
        return True

    @property
    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.checkpoint_dir, fingerprint=self.fingerprint)

    def restore(self, like: Any) -> tuple[int, Any]:
        """``(step, state)`` from this cell's checkpoint (curves and memo too), or
        ``(0, like)``."""
        step, state, extra = self.checkpointer.restore(like)
        if step:
            self.curves = {
                k: [(int(s), v) for s, v in points] for k, points in extra.get("curves", {}).items()
            }
            self.memo = dict(extra.get("memo", {}))
            self.elapsed_before_s = float(extra.get("elapsed_s", 0.0))
            self.resumed_from_step = step
            self.last_step = step
            tqdm.write(f"  resuming {self.cell.id} from step {step}", file=sys.stderr)
        return step, state

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Checkpoint ``state`` at ``step`` (with the curves and memo so far) if
        ``checkpoint_interval_s`` passed since the last save, or if ``force``, and rewrite
        the partial record. Returns whether it saved. Past the deadline it always saves,
        then stops the cell (:class:`TimeLimitReached`)."""
        self._checkpoints = True
        stop = self.time_is_up()
        now = time.monotonic()
        if not (force or stop) and now - self._last_save < self.checkpoint_interval_s:
            return False
        elapsed = self.elapsed_before_s + (now - self._started)
        self.checkpointer.save(step, state, extra={"curves": self.curves, "memo": self.memo,
                                                   "elapsed_s": elapsed})
        self._last_save = now
        self.last_step = max(self.last_step, int(step))
        self.write_partial(force=True)
        if stop:
            raise TimeLimitReached(self.where, int(step))
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
