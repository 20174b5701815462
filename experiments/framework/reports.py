"""Reports: ``table.md`` (paper | ours | diff per cell), ``results.csv``, figures, the
provenance of the numbers, and the committed reference reports under ``reports/``."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.framework.checkpoints import atomic_write
from experiments.framework.declare import CellResult, Experiment, reproduce_command
from experiments.framework.store import REPO_ROOT, load_results

REPORTS_DIR = REPO_ROOT / "reports"
"""The committed reference reports: ``reports/<name>/`` holds the latest ``quick`` run's
``table.md``, ``results.csv``, figures and ``provenance.json`` (``make reports``)."""

REPORT_PRESET = "quick"
FIGURE_DPI = 120
REPORT_DPI = 72  # committed PNGs stay small (and get a 256-colour palette)

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

    def distinct(key):
        return sorted({str(r.record.get(key)) for r in results if r.record.get(key) is not None})

    def commit(record):
        version = record.get("code_version") or {}
        sha = version.get("commit") or "unknown commit"
        return sha + (" with uncommitted changes" if version.get("dirty") else "")

    commits = sorted({commit(r.record) for r in results})
    machines = sorted({
        f"{r.record.get('cpu', '?')}, {r.record.get('cpu_cores', '?')} cores "
        f"({r.record.get('device', '?')})" for r in results
    })
    stamps = distinct("timestamp")
    return {
        "commits": commits,
        "dates": [stamps[0], stamps[-1]] if stamps else [],
        "machines": machines,
        "commands": distinct("command"),
        "seeds": sorted({r.seed for r in results}),
        "cells_done": len(results),
        "wall_time_s": sum(r.wall_time_s for r in results),
    }


def render_table(exp: Experiment, preset: str, found: Mapping[str, CellResult | str]) -> str:
    """table.md: a header (with the provenance), then one line per cell:
    row | column | paper | ours | diff. A smoke table starts with a bold line saying its
    numbers are not results."""
    results = [r for r in found.values() if isinstance(r, CellResult)]
    prov = provenance(results)
    lines = [SMOKE_BANNER, ""] if preset == "smoke" else []
    lines += [
        f"# {exp.name}: {exp.title}",
        "",
        f"- Paper: {exp.paper}",
        f"- Preset: `{preset}`; reproduce with `{reproduce_command(exp.name, preset)}` "
        f"or `{reproduce_command(exp.name, preset, make=True)}`",
        f"- Metric: {exp.metric}; diff = ours − paper",
        f"- Cells: {len(results)}/{len(found)} done; seeds: "
        f"{', '.join(map(str, prov['seeds'])) or '—'}; wall time "
        f"{format_duration(prov['wall_time_s'])}",
    ]
    if results:
        dates = " to ".join(dict.fromkeys(d[:10] for d in prov["dates"]))
        lines.append(f"- Measured on: {'; '.join(prov['machines'])}; {dates}; code: "
                     f"{', '.join(prov['commits'])}")
    if exp.notes:
        lines.append(f"- Notes: {exp.notes}")
    if exp.preset_notes.get(preset):
        lines.append(f"- Preset `{preset}`: {exp.preset_notes[preset]}")
    lines += ["", "| row | column | paper | ours | diff |", "| --- | --- | ---: | ---: | ---: |"]
    for cell in exp.cells_for(preset):
        r = found[cell.id]
        if isinstance(r, CellResult):
            diff = fmt(r.metric - cell.paper, signed=True) if cell.paper is not None else "—"
            ours = fmt(r.metric)
        else:
            ours, diff = r, "—"
        lines.append(f"| {cell.row} | {cell.column} | {fmt(cell.paper)} | {ours} | {diff} |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, exp: Experiment, preset: str, found: Mapping) -> None:
    """results.csv: one row per cell of ``preset`` (unrun ones with their status)."""
    results = [r for r in found.values() if isinstance(r, CellResult)]
    extra = sorted({
        k for r in results for k, v in r.metrics.items()
        if isinstance(v, int | float | str | bool | None)
    })
    header = ["experiment", "preset", "cell", "row", "column", "status", "paper", "ours",
              "diff", "seed", "wall_time_s", *extra]

    def write(f):
        w = csv.writer(f)
        w.writerow(header)
        for cell in exp.cells_for(preset):
            r = found[cell.id]
            base = [exp.name, preset, cell.id, cell.row, cell.column]
            if isinstance(r, CellResult):
                diff = "" if cell.paper is None else r.metric - cell.paper
                w.writerow(base + ["done", cell.paper, r.metric, diff, r.seed, r.wall_time_s]
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

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    for r in results:
        if curve in r.curves:
            ax.plot(*r.curves[curve],
                    label=label(r) if label else f"{r.cell.row} / {r.cell.column}")
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


def _shrink_png(path: Path) -> None:
    """Re-encode ``path`` with a 256-colour palette (committed reports stay small)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def _save_figures(exp: Experiment, preset: str, results, directory: Path, dpi: int,
                  shrink: bool = False):
    paths = []
    make = exp.figures or default_figures
    for name, fig in dict(make(results, exp.presets[preset])).items():
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
    """(Re)write table.md, results.csv and the figures from the stored cell results."""
    out_dir = Path(out_dir)
    found = load_results(exp, preset, out_dir)
    table = render_table(exp, preset, found)
    atomic_write(out_dir / "table.md", lambda f: f.write(table))
    write_csv(out_dir / "results.csv", exp, preset, found)
    results = tuple(r for r in found.values() if isinstance(r, CellResult))
    paths = _save_figures(exp, preset, results, out_dir, FIGURE_DPI) if results else []
    return RunSummary(exp, preset, out_dir, tuple(ran), tuple(skipped), results, table,
                      tuple(paths))


def publish_report(
    exp: Experiment,
    results_root: str | os.PathLike,
    *,
    preset: str = REPORT_PRESET,
    reports_root: str | os.PathLike | None = None,
) -> Path | None:
    """Copy the finished ``preset`` run of ``exp`` from ``results_root/<name>/<preset>/`` into
    ``reports_root/<name>/``: table.md, results.csv, figures at :data:`REPORT_DPI` and
    ``provenance.json``, and each finished cell's record under ``cells/``; nothing is rerun.

    A report accumulates: a cell that ``results_root`` does not hold (say, a run of only some
    cells in a fresh checkout, whose ``results/`` is not committed) keeps the record the
    report already has, if that record still matches the cell's params and config; a cell
    that ``results_root`` holds replaces it. Copying ``reports/<name>/cells/`` to
    ``results/<name>/quick/cells/`` lets a run skip the committed cells.

    Returns the report folder, or ``None`` if ``results_root`` holds no finished cell of
    ``exp`` at ``preset`` (an existing report is then left as it is)."""
    src = Path(results_root) / exp.name / preset
    found = load_results(exp, preset, src)
    if not any(isinstance(r, CellResult) for r in found.values()):
        return None
    dest = Path(REPORTS_DIR if reports_root is None else reports_root) / exp.name
    committed = load_results(exp, preset, dest)
    found = {cid: r if isinstance(r, CellResult) or not isinstance(committed[cid], CellResult)
             else committed[cid] for cid, r in found.items()}
    results = tuple(r for r in found.values() if isinstance(r, CellResult))
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "cells").mkdir(parents=True)
    for r in results:
        atomic_write(dest / "cells" / f"{r.cell.id}.json",
                     lambda f, rec=r.record: json.dump(rec, f, indent=None))
    table = render_table(exp, preset, found)
    atomic_write(dest / "table.md", lambda f: f.write(table))
    write_csv(dest / "results.csv", exp, preset, found)
    _save_figures(exp, preset, results, dest, REPORT_DPI, shrink=True)
    prov = {"experiment": exp.name, "preset": preset, **provenance(results),
            "reproduce": reproduce_command(exp.name, preset),
            "regenerate": "make reports"}
    atomic_write(dest / "provenance.json", lambda f: json.dump(prov, f, indent=1))
    return dest


def write_index(reports_root: str | os.PathLike | None = None) -> Path:
    """``reports/README.md``: one line per published report (experiment, cells done, wall
    time, date, commit), read from the reports' ``provenance.json``."""
    root = Path(REPORTS_DIR if reports_root is None else reports_root)
    lines = ["# Reference results", "",
             "The latest `quick` run of each experiment, copied from `results/` by "
             "`make reports` (nothing is rerun). Each folder holds `table.md`, "
             "`results.csv`, the figures and `provenance.json`.", "",
             "| experiment | cells | wall time | measured on | date | commit |",
             "|---|---:|---:|---|---|---|"]
    for prov_path in sorted(root.glob("*/provenance.json")):
        try:
            prov = json.loads(prov_path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        name = prov_path.parent.name
        dates = " to ".join(dict.fromkeys(d[:10] for d in prov.get("dates", [])))
        commits = ", ".join(c[:10] + c[40:] for c in prov.get("commits", []))
        lines.append(f"| [{name}]({name}/table.md) | {prov.get('cells_done', '?')} | "
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
