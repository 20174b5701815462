"""Verdicts: each :class:`~experiments.framework.Claim` of an experiment checked against
the cell results of one preset — holds, differs, partial or not run — with the numbers it
compared. Nothing here is typed by hand: a verdict is a function of the records.

A cell's result is a :class:`~experiments.framework.CellResult` (from ``cells/<id>.json``,
or rebuilt from ``results.csv`` for reports committed without records, see
:func:`experiments.framework.reports.load_report`). A record flagged ``"partial": true``
(a time-boxed run, ``"last_step"`` the step it reached) has no final metric: its value is
the last point of the curve the claim reads (``key``, or the experiment's
``metric_curve`` for the main metric); it is shown as partial and can never make a claim
hold: its verdict is ``partial``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from experiments.framework.declare import CellResult, Claim, Experiment
from experiments.framework.store import seed_records

HOLDS, DIFFERS, PARTIAL, NOT_RUN = "holds", "differs", "partial", "not run"
STATUSES = (HOLDS, DIFFERS, PARTIAL, NOT_RUN)
CLOSE_MARGIN = 1.0
"""A verdict on a number in percentage points decided by less than this many points…"""
SEEDS_WHEN_CLOSE = 3
"""…needs this many seeds per cell (mean and spread) before it counts as settled."""


def is_partial(result: CellResult) -> bool:
    """Whether ``result`` is a time-boxed run's last record rather than a finished cell."""
    return bool(result.record.get("partial"))


def last_step(result: CellResult) -> int | None:
    step = result.record.get("last_step")
    return int(step) if isinstance(step, int | float) and not isinstance(step, bool) else None


def format_step(step: int) -> str:
    """``80000`` → ``80k``, ``1500`` → ``1.5k``, ``500`` → ``500``."""
    return f"{step / 1000:g}k" if step >= 1000 else str(step)


def format_number(x: float | None) -> str:
    """A compared number: ``12345``, ``1.234``, ``nan``, ``—`` for ``None``."""
    if x is None:
        return "—"
    spec = ".0f" if 1e4 <= abs(x) < 1e9 else ".4g"
    return format(x, spec)


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        try:
            return float(raw)
        except ValueError:
            return None
    return None


PATH_PART = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def lookup(metrics: Mapping[str, Any], key: str) -> Any:
    """``metrics[key]``, or the item a path names: ``"probe_accuracy[0]"``,
    ``"snapshots[-1].fidelity[0]"`` (``None`` where there is no such item)."""
    if key in metrics:
        return metrics[key]
    item: Any = metrics
    for name, index in PATH_PART.findall(key):
        try:
            item = item[int(index)] if index else item[name]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return item


def value_of(result: CellResult, key: str | None,
             metric_curve: str = "test_error") -> float | None:
    """The number a claim reads: the main metric (``key=None``) or ``metrics[key]`` (see
    :func:`lookup`); for a partial record without it, the last point of curve ``key`` (or
    ``metric_curve``); ``None`` when the record has no such number."""
    value = _number(result.metric if key is None else lookup(result.metrics, key))
    if value is None and is_partial(result):
        curve = result.curves.get(key or metric_curve)
        if curve is not None and len(curve.value):
            value = _number(curve.value[-1].item() if hasattr(curve.value[-1], "item")
                            else curve.value[-1])
    return value


def seed_values(result: CellResult, key: str | None) -> list[float | None]:
    """The number a claim reads (``key``, or the main metric) in each of the result's seeds
    (one entry for a single-seed result)."""
    return [_number(r.get("metric") if key is None else lookup(r.get("metrics", {}), key))
            for r in seed_records(result.record)]


def n_seeds(result: CellResult) -> int:
    """How many seeds the result's number averages: its records (:func:`seed_records`),
    each counting ``metrics["seeds"]`` when its cell already trains that many networks and
    reports their mean (the blog's post arm)."""
    count = 0
    for run in seed_records(result.record):
        inner = run.get("metrics", {}).get("seeds", 1)
        count += inner if isinstance(inner, int) and not isinstance(inner, bool) and inner > 0 \
            else 1
    return count


def describe_value(result: CellResult | None, key: str | None,
                   metric_curve: str = "test_error") -> str:
    """``4.6``, ``4.6 (3 seeds, 4.2–5.1)`` (the mean and the range over the seeds),
    ``4.6 (partial, 80k)``, or why there is no number."""
    if result is None:
        return NOT_RUN
    value = value_of(result, key, metric_curve)
    if value is None:
        if is_partial(result):
            return f"partial, {format_step(last_step(result) or 0)}, no {key or metric_curve}"
        return f"no {key!r} in record" if key else NOT_RUN
    text = format_number(value)
    per_seed = seed_values(result, key)
    if len(per_seed) > 1 and all(v is not None for v in per_seed):
        text += (f" ({len(per_seed)} seeds, {format_number(min(per_seed))}–"
                 f"{format_number(max(per_seed))})")
    if is_partial(result):
        step = last_step(result)
        text += f" (partial, {format_step(step)})" if step is not None else " (partial)"
    return text


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A claim checked at one preset: ``status`` is one of :data:`STATUSES`; ``values``
    are the numbers read (one per ``claim.cells``, ``None`` where missing); ``ours`` says
    them in words; ``would`` is what the comparison gives on partial values. ``margin`` is
    how far the comparison is from flipping (positive where it holds, in the values'
    units), ``seeds`` the fewest seeds among the cells read, ``points`` whether the values
    are percentages (then a margin under :data:`CLOSE_MARGIN` needs
    :data:`SEEDS_WHEN_CLOSE` seeds: :attr:`needs_seeds`)."""

    claim: Claim
    status: str
    values: tuple[float | None, ...]
    ours: str
    would: str | None = None
    margin: float | None = None
    seeds: int = 1
    points: bool = False

    @property
    def needs_seeds(self) -> bool:
        """A verdict on percentages decided by under one point from fewer than 3 seeds."""
        return (self.points and self.margin is not None and not math.isnan(self.margin)
                and abs(self.margin) < CLOSE_MARGIN and self.seeds < SEEDS_WHEN_CLOSE)

    @property
    def note(self) -> str:
        """``""``, or what keeps the verdict unsettled: ``margin +0.23 points from 1 seed:
        needs 3 seeds``."""
        if not self.needs_seeds:
            return ""
        return (f"margin {self.margin:+.2f} points from {self.seeds} "
                f"seed{'s' if self.seeds > 1 else ''}: needs {SEEDS_WHEN_CLOSE} seeds")

    @property
    def text(self) -> str:
        """The verdict in words: ``holds``, ``partial (differs so far)``, …"""
        if self.status == PARTIAL and self.would:
            return f"{PARTIAL} ({self.would} so far)"
        return self.status


def margin(claim: Claim, values: tuple[float, ...]) -> float:
    """How far ``values`` are from flipping ``claim``'s comparison: ≥ 0 where it holds."""
    if claim.kind == "near":
        return claim.tolerance - abs(values[0] - claim.paper)
    if claim.kind == "at_most":
        return claim.paper - values[0]
    lower, higher = values
    return higher - lower - claim.tolerance


def _compare(claim: Claim, values: tuple[float, ...]) -> bool:
    return margin(claim, values) >= 0


def check(claim: Claim, found: Mapping[str, CellResult | str],
          metric_curve: str = "test_error", *, points: bool = False) -> Verdict:
    """The verdict of ``claim`` from ``found`` (cell id → result, or why there is none):
    ``not run`` when a cell it reads has no result (or no such number), ``partial`` when
    any of them is a partial record, otherwise ``holds``/``differs`` (NaN differs).
    ``metric_curve``: see :func:`value_of`; ``points``: the values are percentages (see
    :attr:`Verdict.needs_seeds`)."""
    results = [found.get(c) for c in claim.cells]
    results = [r if isinstance(r, CellResult) else None for r in results]
    values = tuple(None if r is None else value_of(r, key, metric_curve)
                   for r, key in zip(results, claim.keys))
    words = [describe_value(r, key, metric_curve) for r, key in zip(results, claim.keys)]
    ours = words[0] if len(words) == 1 else " vs ".join(words)
    if any(v is None for v in values):
        return Verdict(claim, NOT_RUN, values, ours)
    nan = any(math.isnan(v) for v in values)
    holds = not nan and _compare(claim, values)
    status = HOLDS if holds else DIFFERS
    if any(is_partial(r) for r in results):
        return Verdict(claim, PARTIAL, values, ours, would=status)
    return Verdict(claim, status, values, ours, margin=None if nan else margin(claim, values),
                   seeds=min(n_seeds(r) for r in results), points=points)


def in_points(exp: Experiment, claim: Claim) -> bool:
    """Whether ``claim`` compares percentages: it reads the main metric of an experiment
    whose metric is in % (an error rate or an accuracy)."""
    return "%" in exp.metric and all(k is None for k in claim.keys)


def check_all(exp: Experiment, preset: str,
              found: Mapping[str, CellResult | str]) -> tuple[Verdict, ...]:
    """Every claim of ``exp`` at ``preset``, in declaration order."""
    return tuple(check(c, found, exp.metric_curve, points=in_points(exp, c))
                 for c in exp.claims_for(preset))


def cell_verdicts(verdicts: tuple[Verdict, ...],
                  label: Callable[[Verdict], str] = lambda v: v.claim.id
                  ) -> dict[str, str]:
    """Cell id → the verdicts of the claims that read it, in words (``holds (id)``)."""
    out: dict[str, list[str]] = {}
    for v in verdicts:
        for cell in dict.fromkeys(v.claim.cells):
            out.setdefault(cell, []).append(f"{v.text} ({label(v)})")
    return {cell: "; ".join(texts) for cell, texts in out.items()}


def judge(exp: Experiment, results, select: Callable[[Claim], bool] = lambda claim: True
          ) -> tuple[Verdict, ...]:
    """The verdicts of ``exp``'s claims (those of any preset, once each) that ``select``
    keeps and whose cells are all among ``results`` (finished :class:`CellResult` s): what a
    figure function may print, computed exactly as ``table.md`` computes it."""
    found = {r.cell.id: r for r in results}
    declared = [c for preset in exp.presets for c in exp.claims_for(preset)]
    claims: dict[str, Claim] = {}
    for claim in declared:  # a claim id may read other cells at another preset
        if claim.id not in claims and all(cid in found for cid in claim.cells):
            claims[claim.id] = claim
    order = dict.fromkeys(c.id for c in declared)  # the declaration order
    return tuple(check(claims[i], found, exp.metric_curve, points=in_points(exp, claims[i]))
                 for i in order if i in claims and select(claims[i]))


def title_line(verdicts: tuple[Verdict, ...], width: int = 120) -> str:
    """``"claim-id: holds; other-id: differs"``, broken into lines of at most ``width``
    characters between claims, never inside one (a figure title's verdict line; the claims
    themselves are in ``table.md``)."""
    lines: list[str] = []
    for item in (f"{v.claim.id}: {v.text}" for v in verdicts):
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += f"; {item}"
        else:
            if lines:
                lines[-1] += ";"
            lines.append(item)
    return "\n".join(lines)
