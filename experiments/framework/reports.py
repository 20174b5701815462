"""Reports: ``table.md`` (paper | ours | diff | verdict per cell, then the claims),
``results.csv``, figures, the provenance of the numbers, and the committed reference
reports under ``reports/`` with their generated index ``reports/README.md`` (one row per
claim). ``python -m experiments.framework`` re-renders every committed report's
``table.md`` and the index from what is committed, without rerunning anything."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.framework import verdicts as V
from experiments.framework.checkpoints import atomic_write
from experiments.framework.declare import (
    Cell,
    CellResult,
    Experiment,
    reproduce_command,
)
from experiments.framework.store import (
    REPO_ROOT,
    SEEDS_DIR,
    load_results,
    seed_records,
    seed_repeats,
    to_result,
)

REPORTS_DIR = REPO_ROOT / "reports"
"""The committed reference reports: ``reports/<name>/`` holds the latest ``quick`` run's
``table.md``, ``results.csv``, figures, ``provenance.json`` and ``cells/``; another preset's
run (``paper``) lives in ``reports/<name>/<preset>/`` (``make reports``)."""

REPORT_PRESET = "quick"
FIGURE_DPI = 120
REPORT_DPI = 150  # legible legends; a 256-colour palette keeps each PNG well under 300 kB

SMOKE_BANNER = ("**Smoke preset: these numbers are not results. It checks the wiring in "
                "seconds; run `quick` (the default of `make reproduce-NAME`) or `paper` for "
                "numbers.**")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """What :func:`experiments.framework.run_experiment` did (or :func:`write_reports`
    found)."""

    experiment: Experiment
    preset: str
    out_dir: Path
    ran: tuple[str, ...]
    skipped: tuple[str, ...]
    results: tuple[CellResult, ...]  # every finished cell matching the current config
    table: str  # the Markdown of table.md
    figures: tuple[Path, ...]


def fmt(x: float | None, signed: bool = False) -> str:
    """A table number: ``12345``, ``1.234``, ``—`` for ``None``."""
    if x is None:
        return "—"
    spec = ".0f" if 1e4 <= abs(x) < 1e9 else ".4g"  # 12345, not 1.234e+04
    return format(x, ("+" if signed else "") + spec)


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def provenance(results: Sequence[CellResult]) -> dict[str, Any]:
    """Where the numbers come from, summarised over the cells' records: commits, dates,
    machines (CPU and cores, devices), commands and total wall time."""

    runs = [run for r in results for run in seed_records(r.record)]  # every seed's record

    def distinct(key):
        return sorted({str(run.get(key)) for run in runs if run.get(key) is not None})

    def commit(record):
        version = record.get("code_version") or {}
        sha = version.get("commit") or "unknown commit"
        return sha + (" with uncommitted changes" if version.get("dirty") else "")

    commits = sorted({commit(run) for run in runs})
    machines = sorted({
        f"{run.get('cpu', '?')}, {run.get('cpu_cores', '?')} cores "
        f"({run.get('device', '?')})" for run in runs
    })
    stamps = distinct("timestamp")
    return {
        "commits": commits,
        "dates": [stamps[0], stamps[-1]] if stamps else [],
        "machines": machines,
        "commands": distinct("command"),
        "seeds": sorted({int(run.get("seed", 0)) for run in runs}),
        "cells_done": len(results),
        "wall_time_s": sum(float(run.get("wall_time_s", 0.0) or 0.0) for run in runs),
    }


def _md(text: str) -> str:
    """One Markdown table cell: pipes escaped, newlines folded."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _cause(v: V.Verdict) -> str:
    """The claim's cause, shown where the verdict is not "holds"."""
    return "—" if v.status == V.HOLDS or not v.claim.cause else _md(v.claim.cause)


def _verdict_text(v: V.Verdict) -> str:
    """``**holds**``, or ``**holds**, margin +0.23 points from 1 seed: needs 3 seeds``."""
    return f"**{v.text}**" + (f", {v.note}" if v.note else "")


def _ours(r: CellResult, exp: Experiment) -> str:
    if V.is_partial(r) or V.n_seeds(r) > 1:
        return V.describe_value(r, None, exp.metric_curve)
    return fmt(r.metric)


def _diff(r: CellResult, cell: Cell, exp: Experiment) -> float | None:
    value = V.value_of(r, None, exp.metric_curve)
    return None if value is None or cell.paper is None else value - cell.paper


def _finished(found: Mapping[str, CellResult | str]) -> tuple[CellResult, ...]:
    return tuple(r for r in found.values() if isinstance(r, CellResult) and not V.is_partial(r))


def render_table(exp: Experiment, preset: str, found: Mapping[str, CellResult | str], *,
                 prov: Mapping[str, Any] | None = None) -> str:
    """table.md: a header (with the provenance), then one line per cell:
    row | column | paper | ours | diff, plus a verdict column (the claims that read the
    cell) and a "Claims" section when ``exp`` declares claims at ``preset``. A smoke table
    starts with a bold line saying its numbers are not results. ``prov`` replaces the
    provenance computed from the records (a report rebuilt from ``results.csv``)."""
    results = [r for r in found.values() if isinstance(r, CellResult)]
    prov = dict(provenance(results) if prov is None else prov)
    n_partial = sum(V.is_partial(r) for r in results)
    n_stale = sum(isinstance(r, str) and "stale" in r for r in found.values())
    cells = exp.cells_for(preset)
    verdicts = V.check_all(exp, preset, found)
    per_cell = V.cell_verdicts(verdicts)
    lines = [SMOKE_BANNER, ""] if preset == "smoke" else []
    how = {"name": exp.name, "preset": preset, "overrides": exp.overrides.get(preset, ())}
    lines += [
        f"# {exp.name}: {exp.title}",
        "",
        f"- Paper: {exp.paper}",
        f"- Preset: `{preset}`; reproduce with `{reproduce_command(**how)}` "
        f"or `{reproduce_command(**how, make=True)}`",
        f"- Metric: {exp.metric}; diff = ours − paper",
        f"- Cells: {len(_finished(found))}/{len(found)} done"
        f"{f', {n_partial} partial' if n_partial else ''}"
        f"{f', {n_stale} stale (config changed since they ran)' if n_stale else ''}; seeds: "
        f"{', '.join(map(str, prov.get('seeds', []))) or '—'}; wall time "
        f"{format_duration(prov.get('wall_time_s', 0.0))}",
    ]
    if results and prov.get("machines"):
        dates = " to ".join(dict.fromkeys(d[:10] for d in prov.get("dates", [])))
        lines.append(f"- Measured on: {'; '.join(prov['machines'])}; {dates}; code: "
                     f"{', '.join(prov.get('commits', []))}")
    if exp.notes:
        lines.append(f"- Notes: {exp.notes}")
    if exp.preset_notes.get(preset):
        lines.append(f"- Preset `{preset}`: {exp.preset_notes[preset]}")
    if exp.overrides.get(preset):
        lines.append(f"- Overrides: {', '.join(f'`{o}`' for o in exp.overrides[preset])} "
                     f"(`--set`): the cells ran with the `{preset}` config changed so, and "
                     "are not its results")
    if verdicts:
        counts = {s: sum(v.status == s for v in verdicts) for s in V.STATUSES}
        lines.append("- Verdicts: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                     + " (see [Claims](#claims))")
    head = "| row | column | paper | ours | diff |"
    rule = "| --- | --- | ---: | ---: | ---: |"
    if verdicts:
        head, rule = head + " verdict |", rule + " --- |"
    lines += ["", head, rule]
    for cell in cells:
        r = found[cell.id]
        if isinstance(r, CellResult):
            diff, ours = fmt(_diff(r, cell, exp), signed=True), _ours(r, exp)
        else:
            ours, diff = r, "—"
        line = f"| {cell.row} | {cell.column} | {fmt(cell.paper)} | {ours} | {diff} |"
        if verdicts:
            line += f" {per_cell.get(cell.id, '')} |"
        lines.append(line)
    if verdicts:
        lines += ["", "## Claims", "",
                  "Each claim is the paper's sentence, the number or comparison it makes, "
                  "and the verdict computed from the cells above (holds / differs / partial "
                  "/ not run).", "",
                  "A cause is shown where a claim does not hold: what was found to explain "
                  "it, and the evidence.", "",
                  "| claim | paper's words | paper | ours | verdict | cause |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for v in verdicts:
            c = v.claim
            ours = v.ours + (f" ({c.key})" if isinstance(c.key, str) else "")
            lines.append(f"| {c.id} | {_md(c.words)} | {_md(c.paper_text)} | "
                         f"{_md(ours)} | {_verdict_text(v)} | {_cause(v)} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, exp: Experiment, preset: str, found: Mapping) -> None:
    """results.csv: one row per cell of ``preset`` (unrun ones with their status; ``ours``
    is the mean over a cell's seeds, ``seed`` lists them)."""
    results = [r for r in found.values() if isinstance(r, CellResult)]
    extra = sorted({
        k for r in results for k, v in r.metrics.items()
        if isinstance(v, int | float | str | bool | None)
    })
    flags = ["partial", "last_step"] if any(V.is_partial(r) for r in results) else []
    header = ["experiment", "preset", "cell", "row", "column", "status", "paper", "ours",
              "diff", "seed", "wall_time_s", *flags, *extra]

    def write(f):
        w = csv.writer(f)
        w.writerow(header)
        for cell in exp.cells_for(preset):
            r = found[cell.id]
            base = [exp.name, preset, cell.id, cell.row, cell.column]
            if isinstance(r, CellResult):
                diff = _diff(r, cell, exp)
                w.writerow(base + ["partial" if V.is_partial(r) else "done", cell.paper,
                                   V.value_of(r, None, exp.metric_curve),
                                   "" if diff is None else diff,
                                   " ".join(str(run.get("seed", 0))
                                            for run in seed_records(r.record)),
                                   r.wall_time_s]
                           + [r.record.get(k, "") for k in flags]
                           + [r.metrics.get(k, "") for k in extra])
            else:
                w.writerow(base + [r, cell.paper] + [""] * (len(header) - 7))

    atomic_write(path, write)


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

    fig = Figure(figsize=(8.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r in results:
        if curve in r.curves:
            ax.plot(*r.curves[curve],
                    label=label(r) if label else f"{r.cell.row} / {r.cell.column}")
    ax.set_xlabel("step")
    ax.set_ylabel((ylabel or curve) + (" (log scale)" if logy else ""))
    if logy:
        log_axis(ax)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or curve)
    if ax.lines:  # beside the plot: it covers no curve
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


PAPER_MARKER = dict(marker="*", markersize=10, linestyle="none", markeredgecolor="k",
                    markeredgewidth=0.6, zorder=5)
"""How a figure marks a number the paper gives: a star in the curve's colour."""


def mark_paper(ax, x: float, value: float | None, color: Any, *, label: str | None = None
               ) -> None:
    """The paper's ``value`` as a :data:`PAPER_MARKER` star at ``x`` (usually the curve's
    last step) in ``color``; nothing when the paper gives no number (``value`` None)."""
    if value is not None:
        ax.plot([x], [value], color=color, label=label, **PAPER_MARKER)


def paper_legend_entry(ax, text: str = "paper (★)") -> None:
    """One grey star in ``ax``'s legend explaining the :func:`mark_paper` stars."""
    ax.plot([], [], color="0.6", label=text, **PAPER_MARKER)


def _compact(v: float) -> str:
    """A tick label: ``0.5``, ``20``, ``5000``, ``20k``, ``1.5M``."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e4, "k")):
        if abs(v) >= size:
            scale = 1e3 if suffix == "k" else size
            return f"{v / scale:g}{suffix}"
    return f"{v:g}"


def log_axis(ax, axis: str = "y") -> None:
    """A log scale whose ticks read as plain numbers (``2``, ``5``, ``10``, ``20k``, ``1M``,
    not ``2×10⁰``; 1-2-5 ticks, 1-3 over two or three decades, decades beyond): call it
    after plotting. For curves whose ranges differ by an order of magnitude (every curve stays
    on the plot)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator

    getattr(ax, f"set_{axis}scale")("log")
    target = getattr(ax, f"{axis}axis")

    def minor(v: float, _) -> str:
        """Within less than a decade the 1-2-5 ticks are too few: label 3, 4, 6 (and within
        a factor 3 every minor tick)."""
        lo, hi = sorted(target.get_view_interval())
        if v <= 0 or lo <= 0 or hi / lo >= 10:
            return ""
        coefficient = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return _compact(v) if hi / lo < 3 or coefficient in (3, 4, 6) else ""

    lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
    decades = math.log10(hi / lo) if lo > 0 else 0.0  # ticks thin out as the span grows
    subs = (1.0, 2.0, 5.0) if decades < 1.6 else (1.0, 3.0) if decades < 3.2 else (1.0,)
    target.set_major_locator(LogLocator(base=10, subs=subs))
    target.set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))
    target.set_minor_formatter(FuncFormatter(minor))


def compact_ticks(ax, axis: str = "x") -> None:
    """Tick labels ``20k``, ``100k``, ``1M`` on a linear axis (long step counts overlap)."""
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"{axis}axis").set_major_formatter(FuncFormatter(lambda v, _: _compact(v)))


def log_if_spread(ax, spread: float = 10.0, axis: str = "y") -> bool:
    """:func:`log_axis` when the positive data of ``ax``'s lines span more than ``spread``
    (largest / smallest), so that a curve near zero is not flattened by one far above it.
    Returns whether the axis became logarithmic."""
    import numpy as np

    values = [np.asarray(getattr(line, f"get_{axis}data")(), float) for line in ax.lines]
    values = np.concatenate([v.ravel() for v in values]) if values else np.zeros(0)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values) or values.max() / values.min() <= spread:
        return False
    log_axis(ax, axis)
    return True


def default_figures(results: Sequence[CellResult], config: Any) -> dict[str, Any]:
    """One figure per logged curve name (``curves-<name>``), all cells overlaid."""
    names = sorted({k for r in results for k in r.curves})
    return {f"curves-{n}": plot_curves(results, n) for n in names}


def _shrink_png(path: Path) -> None:
    """Re-encode ``path`` with a 256-colour palette (committed reports stay small)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def save_report_png(fig, path: str | os.PathLike, dpi: int = REPORT_DPI) -> Path:
    """Save a matplotlib Figure as a committed report's PNG: :data:`REPORT_DPI`, 256-colour
    palette (for a figure drawn outside an experiment's ``figures``)."""
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _shrink_png(path)
    return path


def _save_figures(exp: Experiment, preset: str, results, directory: Path, dpi: int,
                  shrink: bool = False, *, text_only: bool = False):
    """Save what ``exp.figures`` returns: a matplotlib Figure as ``<name>.png``, a string
    as Markdown ``<name>.md`` (a table the figure function renders, e.g. rows read from
    the code). ``text_only`` writes only the Markdown (re-rendering a committed report)."""
    paths = []
    make = exp.figures or default_figures
    for name, fig in dict(make(results, exp.presets[preset])).items():
        if isinstance(fig, str):
            path = directory / f"{name}.md"
            atomic_write(path, lambda f, text=fig: f.write(text))
            paths.append(path)
            continue
        if not text_only:
            path = directory / f"{name}.png"
            fig.savefig(path, dpi=dpi)
            if shrink:
                _shrink_png(path)
            paths.append(path)
        if getattr(fig.canvas, "manager", None) is not None:  # made with pyplot
            import matplotlib.pyplot as plt

            plt.close(fig)
    return paths


def write_reports(
    exp: Experiment,
    preset: str,
    out_dir: str | os.PathLike,
    *,
    ran: Iterable[str] = (),
    skipped: Iterable[str] = (),
) -> RunSummary:
    """(Re)write table.md, results.csv and the figures from the stored cell results (a
    partial record is shown as partial in the table and the CSV; figures and the summary's
    ``results`` hold the finished cells)."""
    out_dir = Path(out_dir)
    found = load_results(exp, preset, out_dir, partial=True)
    table = render_table(exp, preset, found)
    atomic_write(out_dir / "table.md", lambda f: f.write(table))
    write_csv(out_dir / "results.csv", exp, preset, found)
    results = _finished(found)
    paths = _save_figures(exp, preset, results, out_dir, FIGURE_DPI) if results else []
    return RunSummary(exp, preset, out_dir, tuple(ran), tuple(skipped), results, table,
                      tuple(paths))


def report_dir(name: str, preset: str = REPORT_PRESET,
               reports_root: str | os.PathLike | None = None) -> Path:
    """Where the committed report of ``name`` at ``preset`` lives: ``reports/<name>/`` for
    ``quick``, ``reports/<name>/<preset>/`` for any other preset (``paper``)."""
    root = Path(REPORTS_DIR if reports_root is None else reports_root) / name
    return root if preset == REPORT_PRESET else root / preset


def publish_report(
    exp: Experiment,
    results_root: str | os.PathLike,
    *,
    preset: str = REPORT_PRESET,
    reports_root: str | os.PathLike | None = None,
) -> Path | None:
    """Copy the finished ``preset`` run of ``exp`` from ``results_root/<name>/<preset>/`` into
    :func:`report_dir` (``reports_root/<name>/``, or ``reports_root/<name>/<preset>/`` for a
    preset other than ``quick``): table.md, results.csv, figures at :data:`REPORT_DPI`,
    ``provenance.json``, and each finished or partial cell's record under ``cells/``
    (a time-boxed run's partial records are shown as partial; the figures are drawn from
    the finished cells); nothing is rerun. Another preset's subfolder is left as it is.

    A report accumulates: a cell that ``results_root`` does not hold (say, a run of only some
    cells in a fresh checkout, whose ``results/`` is not committed) keeps the record the
    report already has, if that record still matches the cell's params and config; a cell
    that ``results_root`` holds replaces it. Copying ``reports/<name>/cells/`` to
    ``results/<name>/quick/cells/`` lets a run skip the committed cells. Repeats with other
    seeds under ``results_root/<name>/<preset>/seeds/`` join the cell they repeat, whether
    that cell's record is fresh or committed (same params and config).

    Returns the report folder, or ``None`` if ``results_root`` holds no finished cell of
    ``exp`` at ``preset`` (an existing report is then left as it is)."""
    if preset not in exp.presets:
        raise ValueError(f"experiment {exp.name!r} has no preset {preset!r}; presets: "
                         f"{', '.join(exp.presets)}")
    src = Path(results_root) / exp.name / preset
    found = load_results(exp, preset, src, partial=True)
    if not any(isinstance(r, CellResult) for r in found.values()) and not any(
            (src / SEEDS_DIR).glob("*/cells/*.json")):
        return None
    dest = report_dir(exp.name, preset, reports_root)
    committed = load_results(exp, preset, dest, partial=True)
    found = {cid: _newer(r, committed[cid]) for cid, r in found.items()}
    for cell in exp.cells_for(preset):  # a cell (committed or fresh) repeated here
        r = found[cell.id]
        if isinstance(r, CellResult) and not V.is_partial(r):
            had = list(r.record.get("other_seeds", ()))
            repeats = _join_seeds(had, seed_repeats(src, cell, r.record))
            if repeats != had:
                found[cell.id] = to_result(cell, {**r.record, "other_seeds": repeats})
    records = tuple(r for r in found.values() if isinstance(r, CellResult))
    _clear_report(dest, keep=set(exp.presets))
    (dest / "cells").mkdir(parents=True)
    for r in records:
        atomic_write(dest / "cells" / f"{r.cell.id}.json",
                     lambda f, rec=r.record: json.dump(rec, f, indent=None))
    table = render_table(exp, preset, found)
    atomic_write(dest / "table.md", lambda f: f.write(table))
    write_csv(dest / "results.csv", exp, preset, found)
    results = _finished(found)
    if results:
        _save_figures(exp, preset, results, dest, REPORT_DPI, shrink=True)
    prov = {"experiment": exp.name, "preset": preset, **provenance(records),
            "reproduce": reproduce_command(exp.name, preset),
            "regenerate": "make reports"}
    atomic_write(dest / "provenance.json", lambda f: json.dump(prov, f, indent=1))
    return dest


def _join_seeds(had: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]
                ) -> list[Mapping[str, Any]]:
    """The repeats a cell already carries and those found now, one per seed (a repeat
    found now replaces the one carried with its seed), in seed order."""
    by_seed = {r.get("seed"): r for r in had}
    by_seed.update({r.get("seed"): r for r in new})
    return sorted(by_seed.values(), key=lambda r: r.get("seed", 0))


def _newer(new: CellResult | str, old: CellResult | str) -> CellResult | str:
    """Which of a fresh and a committed result of one cell a report keeps: a finished one
    over a partial one over none; between equals, the fresh one."""
    def rank(r):
        return 0 if not isinstance(r, CellResult) else 1 if V.is_partial(r) else 2
    return old if rank(old) > rank(new) else new


def _clear_report(dest: Path, keep: set[str]) -> None:
    """Empty a report folder, except the subfolders of other presets."""
    if not dest.is_dir():
        return
    for path in dest.iterdir():
        if path.is_dir() and path.name in keep:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def _number(text: str) -> Any:
    """A ``results.csv`` field back as data: ``""`` → ``None``, numbers, booleans."""
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


CSV_BASE = ("experiment", "preset", "cell", "row", "column", "status", "paper", "ours",
            "diff", "seed", "wall_time_s", "partial", "last_step")


def load_report(exp: Experiment, preset: str, directory: str | os.PathLike
                ) -> dict[str, CellResult | str]:
    """Each cell's result as committed in the report folder ``directory``: from its record
    (``cells/<id>.json``, with the same identity check as a run) where the report has
    ``cells/``, otherwise rebuilt from ``results.csv`` (the ``ours`` and scalar metric
    columns; such a result has no curves). A cell with neither says why."""
    directory = Path(directory)
    if (directory / "cells").is_dir():
        found = load_results(exp, preset, directory, partial=True)
        for cid, r in found.items():
            if isinstance(r, str) and "stale" in r:
                found[cid] = _stale(directory / "cells" / f"{cid}.json", r)
        return found
    try:
        with (directory / "results.csv").open(newline="", encoding="utf-8") as f:
            rows = {row.get("cell"): row for row in csv.DictReader(f)
                    if row.get("preset") == preset}
    except OSError:
        rows = {}
    found: dict[str, CellResult | str] = {}
    for cell in exp.cells_for(preset):
        row = rows.get(cell.id)
        if row is None:
            found[cell.id] = "missing (not run)"
        elif row.get("status") not in ("done", "partial"):
            found[cell.id] = row.get("status") or "missing (not run)"
        else:
            metric = _number(row.get("ours", ""))
            seed = (row.get("seed") or "0").split()[0]  # "0 1 2": the cell's seeds
            record = {"metric": metric, "seed": _number(seed) or 0,
                      "wall_time_s": _number(row.get("wall_time_s", "")) or 0.0,
                      "metrics": {k: _number(v) for k, v in row.items()
                                  if k not in CSV_BASE and k is not None},
                      "source": "results.csv"}
            for flag in ("partial", "last_step"):
                if _number(row.get(flag) or "") is not None:
                    record[flag] = _number(row[flag])
            if row.get("status") == "partial":
                record["partial"] = True
            found[cell.id] = CellResult(cell, metric, record["metrics"], {}, record["seed"],
                                        record["wall_time_s"], record)
    return found


def _stale(path: Path, status: str) -> str:
    """A committed record whose config is no longer the code's: its number, marked stale
    (it is not a result of the current config, so no claim reads it)."""
    try:
        metric = json.loads(path.read_text("utf-8")).get("metric")
    except (OSError, ValueError):
        return status
    return f"{fmt(metric)} (stale: config changed, rerun)" if isinstance(
        metric, int | float) else status


def _read_provenance(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / "provenance.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None


def rerender_report(exp: Experiment, preset: str = REPORT_PRESET,
                    reports_root: str | os.PathLike | None = None, *,
                    figures: bool = False) -> Path | None:
    """Rewrite the committed report's ``table.md`` (and the Markdown its figure function
    renders, where the report has ``cells/``) from what is committed; nothing is rerun.
    ``figures``: redraw its PNGs too (at :data:`REPORT_DPI`, from the records under
    ``cells/``); otherwise they are left as they are, as are those of a report without
    ``cells/``. ``None`` if there is no such report."""
    dest = report_dir(exp.name, preset, reports_root)
    if not (dest / "results.csv").is_file() and not (dest / "cells").is_dir():
        return None
    found = load_report(exp, preset, dest)
    has_records = (dest / "cells").is_dir()
    table = render_table(exp, preset, found,
                         prov=None if has_records else _read_provenance(dest) or {})
    atomic_write(dest / "table.md", lambda f: f.write(table))
    results = _finished(found)
    if has_records and results:
        _save_figures(exp, preset, results, dest, REPORT_DPI, shrink=True,
                      text_only=not figures)
    return dest


def rerender_reports(reports_root: str | os.PathLike | None = None,
                     experiments: Sequence[Experiment] | None = None, *,
                     figures: bool = False) -> list[Path]:
    """Re-render every committed report (each experiment's ``quick`` report and any other
    preset's under it) and ``reports/README.md`` from what is committed, without rerunning;
    ``experiments`` defaults to the registered ones; ``figures``: redraw the PNGs of each
    report that has ``cells/`` (:func:`rerender_report`). Returns the files written."""
    if experiments is None:
        experiments = _registered()
    written = []
    for exp in experiments:
        for preset in exp.presets:
            dest = rerender_report(exp, preset, reports_root, figures=figures)
            if dest is not None:
                written.append(dest / "table.md")
    written.append(write_index(reports_root, experiments))
    return written


def _registered(strict: bool = True) -> list[Experiment]:
    """The registered experiments; ``strict``: an :class:`ImportError` naming every module
    that failed to import (a re-render must not silently drop an experiment's claims)."""
    from experiments import registry

    reg = registry.discover()
    if reg.failures and strict:
        raise ImportError("experiment modules failed to import: " + "; ".join(
            f"{m}: {e}" for m, e in reg.failures.items()))
    return list(reg.experiments.values())


def _source(exp: Experiment) -> str:
    """The short name of the paper an experiment reproduces."""
    paper = exp.paper
    for prefix, short in (("DNI", "DNI"), ("Understanding", "Understanding SG"),
                          ("Greydanus", "blog")):
        if paper.startswith(prefix):
            return short
    return paper.split(" (")[0]


def _short(text: str, limit: int = 140) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


CLAIMS_PRESETS = (REPORT_PRESET, "paper")


def _waiting(exp: Experiment, cid: str,
             declared: Mapping[str, Mapping[str, Any]]) -> str:
    """Why a claim has no verdict yet: the presets that declare it and the command that
    runs them."""
    presets = [p for p in CLAIMS_PRESETS if cid in declared[p]]
    runs = " or ".join(f"`python -m experiments run {exp.name} --preset {p}`"
                       for p in presets)
    only = "" if REPORT_PRESET in presets else f"declared at the `{presets[0]}` preset only; "
    return f"{only}waits for {runs}"


def claim_rows(exp: Experiment, reports_root: str | os.PathLike | None = None
               ) -> list[str]:
    """The index rows of ``exp``: one per claim, its verdict at ``quick`` and (where a
    ``paper`` report is committed) at ``paper``; the verdict column is the most faithful
    preset's that was run. An experiment without claims gets one row saying so."""
    name = exp.name
    checked: dict[str, dict[str, V.Verdict]] = {}
    present: dict[str, bool] = {}
    for preset in CLAIMS_PRESETS:
        dest = report_dir(name, preset, reports_root)
        present[preset] = (dest / "results.csv").is_file() or (dest / "cells").is_dir()
        found = load_report(exp, preset, dest) if present[preset] else {
            c.id: "missing (not run)" for c in exp.cells_for(preset)}
        checked[preset] = {v.claim.id: v for v in V.check_all(exp, preset, found)}
    declared = {p: {c.id: c for c in exp.claims_for(p)} for p in CLAIMS_PRESETS}
    claims: dict[str, Any] = {}
    for preset in CLAIMS_PRESETS:
        for cid, c in declared[preset].items():
            claims.setdefault(cid, c)
    link = f"[{name}]({name}/table.md#claims)"
    if present["paper"]:
        link += f", [paper]({name}/paper/table.md#claims)"
    if not claims:
        return [f"| {_source(exp)} | {name} | no claims declared | — | — | — | — | — | "
                f"[{name}]({name}/table.md) |"]
    rows = []
    for cid, claim in claims.items():
        def at(preset, cid=cid):
            v = checked[preset].get(cid)
            if v is None or not present[preset]:
                return None, V.NOT_RUN
            return v, (v.ours if v.status == V.NOT_RUN else f"{v.ours}: {v.text}")

        (vq, quick), (vp, paper) = at(REPORT_PRESET), at("paper")
        best = next(((v, p) for v, p in ((vp, "paper"), (vq, REPORT_PRESET))
                     if v is not None and v.status != V.NOT_RUN), None)
        verdict = f"{_verdict_text(best[0])} ({best[1]})" if best else V.NOT_RUN
        cause = _cause(best[0]) if best else _md(_waiting(exp, cid, declared))
        # the words and number of the version whose cells the verdict read (presets may
        # declare one claim id on different cells)
        claim = best[0].claim if best else claim
        rows.append(f"| {_source(exp)} | {name} | {cid}: {_md(_short(claim.words))} | "
                    f"{_md(claim.paper_text)} | {_md(quick)} | {_md(paper)} | "
                    f"{verdict} | {cause} | {link} |")
    return rows


def write_index(reports_root: str | os.PathLike | None = None,
                experiments: Sequence[Experiment] | None = None) -> Path:
    """``reports/README.md``, generated: the verdict table (one row per claim of every
    experiment, ``experiments`` defaulting to the registered ones) and below it one line per
    published report (experiment, preset, cells done, wall time, machine, date, commit),
    read from the reports' ``provenance.json``."""
    root = Path(REPORTS_DIR if reports_root is None else reports_root)
    if experiments is None:
        experiments = _registered(strict=False)
    lines = ["# Reference results", "",
             "Generated by `python -m experiments.framework` (and `make reports`) "
             "from the committed reports; do not edit by hand.", "",
             "## Verdicts", "",
             "One row per claim of the papers and the blog post: the paper's words, its "
             "number (± the tolerance the claim allows) or comparison, ours at the `quick` "
             "preset and at the `paper` protocol (from `reports/NAME/paper/` where it was "
             "run), and the verdict computed from the cell records (holds / differs / "
             "partial / not run; the preset it comes from in brackets). A partial value is "
             "a time-boxed run's last evaluation (with the step it reached) and never "
             "makes a claim hold.", "",
             "| source | experiment | claim (paper's words) | paper | `quick` | `paper` "
             "protocol | verdict | cause | evidence |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {"DNI": 0, "Understanding SG": 1, "blog": 2}
    for exp in sorted(experiments, key=lambda e: order.get(_source(e), 3)):
        lines += claim_rows(exp, root)
    lines += ["", "## Provenance", "",
              "The latest run of each experiment, copied from `results/` by `make reports` "
              "(nothing is rerun). Each folder holds `table.md`, `results.csv`, the figures "
              "and `provenance.json`; a `paper`-protocol run lives in `NAME/paper/`.", "",
              "| experiment | cells | wall time | measured on | date | commit |",
              "|---|---:|---:|---|---|---|"]
    provs = sorted([*root.glob("*/provenance.json"), *root.glob("*/*/provenance.json")])
    for prov_path in provs:
        prov = _read_provenance(prov_path.parent)
        if prov is None:
            continue
        where = prov_path.parent.relative_to(root).as_posix()
        dates = " to ".join(dict.fromkeys(d[:10] for d in prov.get("dates", [])))
        commits = ", ".join(c[:10] + c[40:] for c in prov.get("commits", []))
        lines.append(f"| [{where}]({where}/table.md) | {prov.get('cells_done', '?')} | "
                     f"{format_duration(prov.get('wall_time_s', 0.0))} | "
                     f"{'; '.join(prov.get('machines', []))} | {dates} | {commits} |")
    path = root / "README.md"
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"))
    return path


def measured_time_s(name: str, *, reports_root: str | os.PathLike | None = None
                    ) -> dict[str, float]:
    """``{cell id: wall time (s)}`` of the committed ``quick`` report of ``name`` (empty if
    there is none); ``reports_root`` defaults to :data:`REPORTS_DIR`."""
    path = Path(REPORTS_DIR if reports_root is None else reports_root) / name / "results.csv"
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    times = {}
    for row in rows:
        try:
            if row.get("status") == "done" and row.get("preset") == REPORT_PRESET:
                times[row["cell"]] = float(row["wall_time_s"])
        except (KeyError, ValueError):
            continue
    return times


def measured_machine(name: str, *, reports_root: str | os.PathLike | None = None) -> str:
    """The machine the committed report of ``name`` was measured on (``""`` if unknown)."""
    root = Path(REPORTS_DIR if reports_root is None else reports_root)
    try:
        prov = json.loads((root / name / "provenance.json").read_text("utf-8"))
    except (OSError, ValueError):
        return ""
    return "; ".join(prov.get("machines", []))

