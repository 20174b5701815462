"""Declaring an experiment: a paper's table or figure as data (cells, presets, a runner).

An experiment module (one per paper table or figure, e.g. ``experiments/dni/table1.py``)
exposes one :class:`Experiment` named ``EXPERIMENT``; see :mod:`experiments.framework`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

if TYPE_CHECKING:
    from experiments.framework.context import RunContext

PRESETS = ("smoke", "quick", "paper")
"""Presets every experiment defines: ``smoke`` (seconds, wiring only, CI), ``quick``
(minutes to an hour on a laptop CPU; the default of ``make reproduce-NAME``), ``paper``
(the paper's exact protocol)."""

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UsageError(ValueError):
    """A bad command-line input (experiment name, preset, cell pattern, output directory,
    option value); the CLI prints it as one ``error:`` line and exits with 2."""


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
        if not SAFE_ID.match(self.id):
            raise ValueError(f"cell id {self.id!r} must match {SAFE_ID.pattern}")


CLAIM_KINDS = ("near", "at_most", "less")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One sentence of a paper, as something the cell results can confirm or not.

    Build one with :meth:`near`, :meth:`at_most` or :meth:`less`; the verdict (holds /
    differs / not run) is computed by :mod:`experiments.framework.verdicts`, never typed.

    ``words`` is the paper's own sentence (quoted) the claim rests on. ``cells`` are the
    cell ids it reads (one for ``near``/``at_most``; ``(lower, higher)`` for ``less``).
    ``paper`` is the published number (``near``) or the bound (``at_most``); ``None`` for
    ``less``. ``tolerance`` is ``near``'s allowed ``|ours - paper|`` or ``less``'s margin.
    ``key=None`` reads each cell's main metric, otherwise ``record["metrics"][key]``; a key
    may index into a metric that is a list or mapping (``"probe_accuracy[0]"``,
    ``"snapshots[-1].fidelity[0]"``), and ``less`` takes a pair of keys (one per side,
    so a claim may compare two numbers of one cell).
    ``cause`` is one sentence naming the cause found for a "differs" (budget / method /
    defect) and its evidence (a report path).
    """

    id: str
    words: str
    kind: str
    cells: tuple[str, ...]
    paper: float | None = None
    tolerance: float = 0.0
    key: str | tuple[str | None, str | None] | None = None
    cause: str = ""

    def __post_init__(self):
        if not SAFE_ID.match(self.id):
            raise ValueError(f"claim id {self.id!r} must match {SAFE_ID.pattern}")
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"claim {self.id!r}: kind {self.kind!r} is not one of "
                             f"{CLAIM_KINDS}; build claims with Claim.near/at_most/less")
        if not self.words.strip():
            raise ValueError(f"claim {self.id!r}: words must quote the paper's sentence")
        want = 2 if self.kind == "less" else 1
        if len(self.cells) != want or not all(isinstance(c, str) for c in self.cells):
            raise ValueError(f"claim {self.id!r} ({self.kind}) reads {want} cell id(s), "
                             f"got {self.cells!r}")
        if self.kind != "less" and self.paper is None:
            raise ValueError(f"claim {self.id!r} ({self.kind}) needs the paper's number")
        if isinstance(self.key, list | tuple) and (
                self.kind != "less" or len(self.key) != 2
                or not all(k is None or isinstance(k, str) for k in self.key)):
            raise ValueError(f"claim {self.id!r}: key {self.key!r} must be None or a metric "
                             "name (a pair of them only for less: one per side)")
        if isinstance(self.key, list):
            object.__setattr__(self, "key", tuple(self.key))
        if len(set(zip(self.cells, self.keys))) < len(self.cells):
            raise ValueError(f"claim {self.id!r} compares {self.cells[0]!r} with itself; "
                             "give a pair of keys to compare two of its numbers")
        if not (self.tolerance >= 0 or (self.kind == "less" and self.tolerance < 0)):
            raise ValueError(f"claim {self.id!r}: tolerance {self.tolerance!r} must be a "
                             "number >= 0 (a negative margin is allowed only for less)")

    @property
    def keys(self) -> tuple[str | None, ...]:
        """The metric each of :attr:`cells` is read at (``None``: the main metric)."""
        if isinstance(self.key, tuple):
            return self.key
        return (self.key,) * len(self.cells)

    @classmethod
    def near(cls, id: str, words: str, cell: str, paper: float, tol: float, *,
             key: str | None = None, cause: str = "") -> Claim:
        """Holds if ``|ours[cell] - paper| <= tol``."""
        return cls(id, words, "near", (cell,), float(paper), float(tol), key, cause)

    @classmethod
    def at_most(cls, id: str, words: str, cell: str, bound: float, *,
                key: str | None = None, cause: str = "") -> Claim:
        """Holds if ``ours[cell] <= bound``."""
        return cls(id, words, "at_most", (cell,), float(bound), 0.0, key, cause)

    @classmethod
    def less(cls, id: str, words: str, lower: str, higher: str, *, margin: float = 0.0,
             key: str | tuple[str | None, str | None] | None = None,
             cause: str = "") -> Claim:
        """Holds if ``ours[lower] + margin <= ours[higher]`` (for lower-is-better metrics:
        ``lower`` is the cell the paper says does better; a negative margin reads "lower is
        no worse than higher by more than ``-margin``")."""
        return cls(id, words, "less", (lower, higher), None, float(margin), key, cause)

    @property
    def paper_text(self) -> str:
        """The paper's side, in words: ``1.6 ± 0.5``, ``= 1`` (tolerance 0), ``≤ 5``,
        ``a < b``; a single ``key`` is named first (``train_error: a < b``)."""
        num = (lambda x: format(x, ".4g"))
        if self.kind == "near":
            text = (f"= {num(self.paper)}" if self.tolerance == 0
                    else f"{num(self.paper)} ± {num(self.tolerance)}")
        elif self.kind == "at_most":
            text = f"≤ {num(self.paper)}"
        else:
            lower, higher = (c if k is None or not isinstance(self.key, tuple) else f"{c} {k}"
                             for c, k in zip(self.cells, self.keys))
            if self.tolerance > 0:
                text = f"{lower} ≤ {higher} − {num(self.tolerance)}"
            elif self.tolerance < 0:
                text = f"{lower} ≤ {higher} + {num(-self.tolerance)}"
            else:
                text = f"{lower} < {higher}"
        if isinstance(self.key, str):
            sep = " " if self.kind in ("near", "at_most") else ": "
            text = f"{self.key}{sep}{text}"
        return text


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A paper table or figure, declared as data.

    ``cells`` is a sequence of :class:`Cell` or a function ``preset -> cells``.
    ``presets`` maps each of :data:`PRESETS` (more are allowed) to a config: plain data,
    preferably a frozen dataclass; it is part of every result's identity, so a cell is
    re-run when its config changes. Keep prose out of configs: ``notes`` (the whole
    experiment) and ``preset_notes`` (per preset: how it departs from the paper) are shown
    in ``table.md`` and ``show`` but never make a cell rerun.
    ``run_cell(cell, config, ctx)`` trains one cell and returns ``{"metric": float, ...}``
    (see :func:`experiments.framework.run_experiment`).
    ``claims`` is a sequence of :class:`Claim` or a function ``preset -> claims``: what the
    paper says, checked against the cells (ids unique; every cell a claim reads exists in
    at least one preset). ``metric_curve`` names the logged curve whose last point is a
    partial record's value of the main metric (a time-boxed run has no final metric).
    ``figures(results, config)`` returns ``{name: matplotlib Figure}``, saved as
    ``<name>.png``; ``None`` plots every logged curve
    (:func:`experiments.framework.default_figures`).
    ``overrides`` maps a preset to the ``--set KEY=VALUE`` texts already applied to its
    config (:func:`experiments.framework.with_overrides` fills it; leave it empty): they
    are repeated in each record's command and in ``table.md``.
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
    preset_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)
    claims: Sequence[Claim] | Callable[[str], Sequence[Claim]] = ()
    metric_curve: str = "test_error"
    overrides: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not SAFE_ID.match(self.name) or self.name == "all":
            raise ValueError(
                f"experiment name {self.name!r} must match {SAFE_ID.pattern} and not be 'all'"
            )
        missing = [p for p in PRESETS if p not in self.presets]
        if missing:
            raise ValueError(f"experiment {self.name!r} lacks presets {missing}")
        unknown = [p for p in self.preset_notes if p not in self.presets]
        if unknown:
            raise ValueError(f"experiment {self.name!r}: preset_notes for unknown presets "
                             f"{unknown}")
        for preset in self.presets:
            self.cells_for(preset)  # validates cell ids at import time
        self._check_claims()

    def claims_for(self, preset: str) -> tuple[Claim, ...]:
        """The claims checked at ``preset``."""
        claims = tuple(self.claims(preset) if callable(self.claims) else self.claims)
        bad = [c for c in claims if not isinstance(c, Claim)]
        if bad:
            raise ValueError(f"experiment {self.name!r}: claims must be Claim objects "
                             f"(Claim.near/at_most/less), got {bad[0]!r}")
        return claims

    def _check_claims(self) -> None:
        known = {c.id for p in self.presets for c in self.cells_for(p)}
        problems = []
        for preset in self.presets if callable(self.claims) else list(self.presets)[:1]:
            claims = self.claims_for(preset)
            ids = [c.id for c in claims]
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            if dupes:
                where = f" at preset {preset!r}" if callable(self.claims) else ""
                problems.append(f"duplicate claim ids {dupes}{where}")
            for claim in claims:
                unknown = [c for c in claim.cells if c not in known]
                if unknown:
                    problems.append(f"claim {claim.id!r} reads unknown cell(s) {unknown}")
        if problems:
            problems = list(dict.fromkeys(problems))
            raise ValueError(f"experiment {self.name!r}: " + "; ".join(problems)
                             + "; claims must read cells declared in some preset")

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


def reproduce_command(
    name: str, preset: str, *, seed: int = 0, only: Sequence[str] = (), make: bool = False,
    overrides: Sequence[str] = (),
) -> str:
    """The exact command that reproduces ``name`` at ``preset`` (with the ``--set``
    ``overrides``, ``KEY=VALUE`` texts)."""
    if make:
        cmd = f"make reproduce-{name} PRESET={preset}"
        return cmd + (f" SET={shlex.quote(' '.join(overrides))}" if overrides else "")
    cmd = f"python -m experiments run {name} --preset {preset}"
    if seed:
        cmd += f" --seed {seed}"
    if only:
        cmd += " --only " + " ".join(only)
    return cmd + "".join(f" --set {shlex.quote(o)}" for o in overrides)


def to_jsonable(obj: Any) -> Any:
    """Convert a config (dataclass, mapping, sequence, numbers, enums, paths...) to JSON data.

    Functions and classes become ``"module.qualname"``. Anything else is a ``TypeError``:
    configs must be data, so that a changed config is detected and recorded.
    """
    if obj is None or isinstance(obj, bool | int | str | float):
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


def canonical(obj: Any) -> Any:
    """:func:`to_jsonable` then a JSON round trip, so that tuples/lists and int keys compare
    as they are stored."""
    return json.loads(json.dumps(to_jsonable(obj), sort_keys=True))
