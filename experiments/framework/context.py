"""What a running cell gets from the framework: its seed, a progress bar, curve logging
with finiteness checks, and throttled checkpoints it resumes from after a kill."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments.framework.checkpoints import Checkpointer, is_prng_key
from experiments.framework.declare import Cell

DEFAULT_CHECKPOINT_INTERVAL_S = 120.0


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite value."""


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

    def log(self, step: int, **values: Any) -> None:
        """Record scalar curve points at ``step`` (checked finite) and show them on the bar."""
        shown = {}
        for name, value in values.items():
            value = float(check_finite(value, where=f"{self.where}, step {step}, {name}"))
            self.curves.setdefault(name, []).append((int(step), value))
            shown[name] = f"{value:.4g}"
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)

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
            tqdm.write(f"  resuming {self.cell.id} from step {step}", file=sys.stderr)
        return step, state

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Checkpoint ``state`` at ``step`` (with the curves and memo so far) if
        ``checkpoint_interval_s`` passed since the last save, or if ``force``. Returns
        whether it saved."""
        now = time.monotonic()
        if not force and now - self._last_save < self.checkpoint_interval_s:
            return False
        elapsed = self.elapsed_before_s + (now - self._started)
        self.checkpointer.save(step, state, extra={"curves": self.curves, "memo": self.memo,
                                                   "elapsed_s": elapsed})
        self._last_save = now
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
