"""The command line: ``python -m experiments list | names | show NAME | run NAME|all |
report [NAME ...]``.

Every expected failure prints one ``error:`` line (no traceback; ``SGJAX_DEBUG=1`` shows
it). Exit codes: 0 success; 1 a run failed (training diverged, a dataset is missing or
corrupt, a checkpoint is corrupt) or a module failed to import; 2 a usage error (unknown
experiment, preset or cell, an ``--out`` that cannot hold results, a bad option value; the
message lists the valid values).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from experiments import data, framework, registry
from experiments.framework import CheckpointError, UsageError

RUN_FAILURES = (data.DatasetNotFoundError, data.CorruptDatasetError, CheckpointError,
                FloatingPointError)
"""Errors a run reports as one ``error:`` line and exit status 1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Reproduce the tables and figures of the synthetic-gradient papers.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="experiments: name, paper, what it reproduces, presets")
    sub.add_parser("names", help="experiment names, one per line")
    show = sub.add_parser("show", help="an experiment's cells, presets, configs and commands")
    show.add_argument("name")
    run = sub.add_parser("run", help="run an experiment (or 'all') at a preset")
    run.add_argument("name", help="experiment name, or 'all'")
    run.add_argument("--preset", required=True, help="smoke, quick or paper")
    run.add_argument(
        "--out",
        default=framework.DEFAULT_OUT,
        help="results root (default: ./results); writes OUT/NAME/PRESET/",
    )
    run.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    run.add_argument(
        "--only",
        nargs="+",
        action="extend",
        default=[],
        metavar="CELL",
        help="run only cells whose id matches one of these globs",
    )
    run.add_argument(
        "--fresh", action="store_true", help="rerun cells even if finished, ignoring checkpoints"
    )
    run.add_argument(
        "--checkpoint-interval",
        type=float,
        metavar="SECONDS",
        default=framework.DEFAULT_CHECKPOINT_INTERVAL_S,
        help="least time between in-cell checkpoints (default %(default)s)",
    )
    report = sub.add_parser(
        "report", help="copy finished quick runs from --results into reports/ (no rerun)")
    report.add_argument("names", nargs="*", metavar="NAME",
                        help="experiments (default: every one with results)")
    report.add_argument("--results", default=framework.DEFAULT_OUT,
                        help="results root the runs wrote (default: ./results)")
    report.add_argument("--to", default=None,
                        help="reports root (default: the repository's reports/)")
    return p


def _report_failures(reg: registry.Registry) -> int:
    for module, err in reg.failures.items():
        print(f"error: experiment module {module} failed to import: {err}", file=sys.stderr)
    return 1 if reg.failures else 0


def _quick_time(exp: framework.Experiment) -> str:
    """The measured wall time of the committed ``quick`` report, e.g. ``35 min``."""
    times = framework.measured_time_s(exp.name)
    if not times:
        return "not measured"
    cells = len(exp.cells_for("quick"))
    total = framework.format_duration(sum(times.values()))
    return total if len(times) == cells else f"{total} ({len(times)}/{cells} cells)"


def _list(reg: registry.Registry) -> int:
    rows = [("NAME", "PAPER", "PRESETS", "QUICK (MEASURED)", "REPRODUCES")]
    rows += [(e.name, e.paper, ",".join(e.presets), _quick_time(e), e.title)
             for e in reg.experiments.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    for module, err in reg.failures.items():
        print(f"FAILED  {module}: {err}")
    return 1 if reg.failures else 0


def _show(exp: framework.Experiment) -> int:
    print(f"{exp.name}: {exp.title}\npaper: {exp.paper}\nmetric: {exp.metric}")
    if exp.notes:
        print(f"notes: {exp.notes}")
    for preset, config in exp.presets.items():
        cells = exp.cells_for(preset)
        print(f"\npreset {preset}: {len(cells)} cells")
        if exp.preset_notes.get(preset):
            print(f"  {exp.preset_notes[preset]}")
        print(f"  {framework.reproduce_command(exp.name, preset)}")
        print(f"  {framework.reproduce_command(exp.name, preset, make=True)}")
        print("  config: " + json.dumps(framework.to_jsonable(config)))
        for c in cells:
            paper = "—" if c.paper is None else f"{c.paper:g}"
            print(f"  {c.id:32s} {c.row} / {c.column}  (paper {paper})")
    return 0


def _plan(reg: registry.Registry, name: str, preset: str, only: Sequence[str]):
    """[(experiment, only-patterns)] to run; raises UsageError before anything runs."""
    if name != "all":
        exp = reg.get(name)
        framework.select_cells(exp, preset, only)
        return [(exp, only)]
    lacking = [e.name for e in reg.experiments.values() if preset not in e.presets]
    if lacking:
        raise UsageError(
            f"unknown preset {preset!r} for {', '.join(lacking)}; valid presets: "
            + ", ".join(framework.PRESETS)
        )
    plan, used = [], set()
    for exp in reg.experiments.values():
        ids = [c.id for c in exp.cells_for(preset)]
        mine = [p for p in only if any(fnmatch.fnmatchcase(i, p) for i in ids)]
        used.update(mine)
        if mine or not only:
            plan.append((exp, mine))
    if unused := [p for p in only if p not in used]:
        raise UsageError(f"--only {' '.join(unused)} matches no cell of any experiment")
    return plan


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, timeout, schedulers) stops like Ctrl-C


def _run(reg: registry.Registry, args: argparse.Namespace) -> int:
    framework.check_interval(args.checkpoint_interval)
    plan = _plan(reg, args.name, args.preset, args.only)
    framework.check_out_dir(args.out)
    if threading.current_thread() is not threading.main_thread():
        return _run_plan(reg, args, plan)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run_plan(reg, args, plan)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_plan(reg: registry.Registry, args: argparse.Namespace, plan) -> int:
    status = _report_failures(reg) if args.name == "all" else 0
    for exp, only in plan:
        summary = framework.run_experiment(
            exp,
            args.preset,
            out=args.out,
            seed=args.seed,
            only=only,
            fresh=args.fresh,
            checkpoint_interval_s=args.checkpoint_interval,
        )
        print(summary.table)
        print(
            f"wrote {summary.out_dir}/ (cells/, table.md, results.csv, "
            f"{len(summary.figures)} figures); ran {len(summary.ran)}, "
            f"skipped {len(summary.skipped)} finished earlier",
            file=sys.stderr,
        )
    return status


def _report(reg: registry.Registry, args: argparse.Namespace) -> int:
    names = args.names or reg.names()
    exps = [reg.get(n) for n in names]
    if not os.path.isdir(args.results):
        raise UsageError(f"--results {args.results}: no such directory (run an experiment "
                         "with --preset quick first)")
    for exp in exps:
        dest = framework.publish_report(exp, args.results, reports_root=args.to)
        if dest is None:
            print(f"{exp.name}: no finished quick cells under {args.results}/{exp.name}/quick/;"
                  " report left as it was", file=sys.stderr)
        else:
            print(f"{exp.name}: wrote {dest}/", file=sys.stderr)
    print(f"wrote {framework.write_index(args.to)}", file=sys.stderr)
    return 0


def _error(e: BaseException) -> str:
    """One line: the message (newlines folded) and the notes (which cell was running)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    notes = "; ".join(getattr(e, "__notes__", ()))
    return f"error: {text}" + (f" ({notes})" if notes else "")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's own usage errors (already printed)
        return int(e.code or 0)
    try:
        reg = registry.discover()
        if args.command == "list":
            return _list(reg)
        if args.command == "names":
            print("\n".join(reg.names()))
            return _report_failures(reg)
        if args.command == "show":
            return _show(reg.get(args.name))
        if args.command == "report":
            return _report(reg, args)
        return _run(reg, args)
    except UsageError as e:
        if os.environ.get("SGJAX_DEBUG"):
            traceback.print_exception(e)
        print(_error(e), file=sys.stderr)
        return 2
    except RUN_FAILURES as e:
        if os.environ.get("SGJAX_DEBUG"):
            traceback.print_exception(e)
        print(_error(e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
