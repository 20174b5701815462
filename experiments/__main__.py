"""The command line: ``python -m experiments list | names | show NAME | run NAME|all |
report [NAME ...] | device OUT | import-device DIR``.

``run NAME`` runs the ``quick`` preset unless ``--preset`` names another;
``--set KEY=VALUE`` (repeatable) changes one field of that preset's config
(:mod:`experiments.framework.overrides`): the changed config is part of every cell's
identity, and ``table.md`` and each record's command name the overrides.

``run NAME --preset paper --jobs N --time-limit MINUTES`` runs N cells at once (a process
each, sharing the accelerator) and stops cleanly in MINUTES: running cells keep a partial
record (curve so far, ``partial``, ``last_step``) and a checkpoint; rerunning resumes them.
``device OUT`` runs the accelerator-lease priority list and packs what it made into OUT;
``import-device DIR`` unpacks and publishes it (:mod:`experiments.device`).

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
import time
import traceback
from collections.abc import Sequence

from experiments import data, device, framework, registry
from experiments.framework import CheckpointError, UsageError, running

DEFAULT_PRESET = "quick"
"""The preset ``run`` uses without ``--preset`` (as ``make reproduce-NAME`` does)."""

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
    run.add_argument("--preset", default=DEFAULT_PRESET,
                     help="smoke, quick or paper (default %(default)s)")
    run.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE",
                     help="change one field of the preset's config (repeatable; dotted keys "
                          "for nested configs, e.g. --set steps=200 --set train.lr=1e-3); "
                          "the changed config is part of each cell's identity")
    run.add_argument(
        "--out",
        default=framework.DEFAULT_OUT,
        help="results root (default: ./results); writes OUT/NAME/PRESET/",
    )
    run.add_argument("--seed", type=int, default=0,
                     help="random seed (default 0); another seed N writes a repeat under "
                          "OUT/NAME/PRESET/seeds/N/, and tables, verdicts and reports then "
                          "give each cell's mean over its seeds")
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
    run.add_argument("--jobs", default="1", metavar="N",
                     help="run N cells at once, one process each, sharing the accelerator "
                          "(default 1: in this process)")
    run.add_argument("--time-limit", default=None, metavar="MINUTES",
                     help="stop cleanly within MINUTES: running cells checkpoint and keep a "
                          "partial record, unstarted ones are listed; rerun to resume")
    cell = sub.add_parser("cell")  # one cell in this process: a worker of run --jobs N
    cell.add_argument("name")
    cell.add_argument("cell")
    cell.add_argument("--preset", required=True)
    cell.add_argument("--set", dest="overrides", action="append", default=[])
    cell.add_argument("--out", default=framework.DEFAULT_OUT)
    cell.add_argument("--seed", type=int, default=0)
    cell.add_argument("--fresh", action="store_true")
    cell.add_argument("--checkpoint-interval", type=float,
                      default=framework.DEFAULT_CHECKPOINT_INTERVAL_S)
    cell.add_argument("--deadline", type=float, default=None)
    cell.add_argument("--hard-deadline", type=float, default=None)
    report = sub.add_parser(
        "report", help="copy finished runs from --results into reports/ (no rerun)")
    report.add_argument("names", nargs="*", metavar="NAME",
                        help="experiments (default: every one with results)")
    report.add_argument("--results", default=framework.DEFAULT_OUT,
                        help="results root the runs wrote (default: ./results)")
    report.add_argument("--preset", default="quick",
                        help="which preset's runs to publish (default quick; paper goes to "
                             "reports/NAME/paper/)")
    report.add_argument("--to", default=None,
                        help="reports root (default: the repository's reports/)")
    dev = sub.add_parser(
        "device", help="run the accelerator-lease priority list, pack the results into OUT")
    dev.add_argument("out", metavar="OUT", help="folder for the (at most 8) files to bring back")
    dev.add_argument("--preset", default=None,
                     help="paper (default), or smoke for a dry run on this machine")
    dev.add_argument("--dry-run", action="store_true",
                     help="the same list at the smoke preset, at most 2 processes at once")
    dev.add_argument("--budget", default=None, metavar="MINUTES",
                     help="total time for the list (default 9; 30 for a dry run)")
    dev.add_argument("--max-jobs", default=None, metavar="N",
                     help="at most N cells at once (default: each step's own; 2 in a dry run)")
    dev.add_argument("--steps", nargs="+", default=None, metavar="STEP",
                     help="run only these steps of the list (default: all, in order)")
    dev.add_argument("--results", default=None,
                     help="results root the runs write (default: ./results)")
    imp = sub.add_parser(
        "import-device", help="unpack what `device` packed into results/ and publish it")
    imp.add_argument("dir", metavar="DIR", help="the folder the device's files came back to")
    imp.add_argument("--results", default=framework.DEFAULT_OUT,
                     help="results root to unpack into (default: ./results)")
    imp.add_argument("--to", default=None,
                     help="reports root (default: the repository's reports/; smoke runs are "
                          "only published with --to)")
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


def _plan(reg: registry.Registry, name: str, preset: str, only: Sequence[str],
          overrides: Sequence[str] = ()):
    """[(experiment, only-patterns)] to run, each experiment with the ``--set`` overrides
    applied to its ``preset`` config; raises UsageError before anything runs."""
    if name != "all":
        exp = reg.get(name)
        framework.select_cells(exp, preset, only)
        return [(framework.with_overrides(exp, preset, overrides), only)]
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
            plan.append((framework.with_overrides(exp, preset, overrides), mine))
    if unused := [p for p in only if p not in used]:
        raise UsageError(f"--only {' '.join(unused)} matches no cell of any experiment")
    return plan


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, timeout, schedulers) stops like Ctrl-C


def _sigterm_as_interrupt(fn, *args):
    """``fn(*args)`` with SIGTERM raising KeyboardInterrupt (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return fn(*args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(reg: registry.Registry, args: argparse.Namespace) -> int:
    framework.check_interval(args.checkpoint_interval)
    args.jobs = running.check_jobs(args.jobs)
    args.time_limit = running.check_time_limit(args.time_limit)
    plan = _plan(reg, args.name, args.preset, args.only, args.overrides)
    framework.check_out_dir(args.out)
    return _sigterm_as_interrupt(_run_plan, reg, args, plan)


def _run_plan(reg: registry.Registry, args: argparse.Namespace, plan) -> int:
    status = _report_failures(reg) if args.name == "all" else 0
    end = None if args.time_limit is None else time.time() + 60 * args.time_limit
    for exp, only in plan:
        left = None if end is None else (end - time.time()) / 60
        if left is not None and left <= 0:
            print(f"{exp.name}: not run (time limit reached)", file=sys.stderr)
            continue
        outcome = running.run_cells(
            exp,
            args.preset,
            out=args.out,
            seed=args.seed,
            only=only,
            fresh=args.fresh,
            checkpoint_interval_s=args.checkpoint_interval,
            jobs=args.jobs,
            time_limit_min=left,
        )
        summary = outcome.summary
        print(summary.table)
        extra = "".join(
            f", {what} {len(ids)}" for what, ids in
            (("partial (time limit; rerun to resume)", outcome.partial),
             ("not run (time limit)", outcome.not_run), ("failed", outcome.errors)) if ids)
        print(
            f"wrote {summary.out_dir}/ (cells/, table.md, results.csv, "
            f"{len(summary.figures)} figures); ran {len(summary.ran)}, "
            f"skipped {len(summary.skipped)} finished earlier{extra}",
            file=sys.stderr,
        )
        for cell_id, message in outcome.errors:
            print(f"error: {exp.name} ({args.preset}), cell {cell_id}: {message}",
                  file=sys.stderr)
        if outcome.errors:
            status = 1
    return status


def _cell(reg: registry.Registry, args: argparse.Namespace) -> int:
    """A worker of ``run --jobs N``: one cell in this process, its record, no reports.
    Exit status 0 (finished), :data:`running.TIME_LIMIT_EXIT` (partial) or as ``run``."""
    running.die_with_parent()
    exp = framework.with_overrides(reg.get(args.name), args.preset, args.overrides)
    cell = next((c for c in framework.select_cells(exp, args.preset, [args.cell])
                 if c.id == args.cell), None)
    if cell is None:
        raise UsageError(f"no cell {args.cell!r} in {exp.name!r} ({args.preset})")
    limits = None
    if args.deadline is not None:
        hard = args.hard_deadline if args.hard_deadline is not None else args.deadline
        limits = running.Deadlines(soft=args.deadline, hard=hard, end=hard)
    status = _sigterm_as_interrupt(
        lambda: running.run_one_cell(exp, args.preset, cell, out=args.out, seed=args.seed,
                                     fresh=args.fresh,
                                     checkpoint_interval_s=args.checkpoint_interval,
                                     limits=limits))
    return running.TIME_LIMIT_EXIT if status in ("partial", "not_run") else 0


def _report(reg: registry.Registry, args: argparse.Namespace) -> int:
    names = args.names or reg.names()
    exps = [reg.get(n) for n in names]
    lacking = [e for e in exps if args.preset not in e.presets]
    if args.names and lacking:  # an experiment's own preset (table2's long) is fine
        raise UsageError(f"--preset {args.preset!r}: {lacking[0].name} has no such preset; "
                         f"its presets: {', '.join(lacking[0].presets)}")
    exps = [e for e in exps if args.preset in e.presets]
    if not exps:
        raise UsageError(f"--preset {args.preset!r}: no experiment has it; valid presets: "
                         + ", ".join(framework.PRESETS))
    if not os.path.isdir(args.results):
        raise UsageError(f"--results {args.results}: no such directory (run an experiment "
                         f"with --preset {args.preset} first)")
    for exp in exps:
        dest = framework.publish_report(exp, args.results, preset=args.preset,
                                        reports_root=args.to)
        if dest is None:
            print(f"{exp.name}: no finished {args.preset} cells under "
                  f"{args.results}/{exp.name}/{args.preset}/; report left as it was",
                  file=sys.stderr)
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
    if args.command in ("device", "import-device") or (
            args.command == "run" and str(args.jobs).strip() != "1"):
        # A parent of worker processes must not take the accelerator's memory: importing
        # the experiments may already start JAX's backend (a module-level array).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
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
        if args.command == "cell":
            return _cell(reg, args)
        if args.command == "device":
            return device.main_run(args)
        if args.command == "import-device":
            return device.main_import(reg, args)
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
