"""Paper-protocol runs that fit one accelerator lease, and bringing them home.

A lease (issue 18) gives about 15 minutes in all, one command of at most 10 minutes, and at
most 8 flat files (16 MiB each) back. :data:`PLAN` is the priority list; :func:`run_plan`
runs it within a time budget (9 minutes by default) and writes into the device's output
folder one ``NAME.tar.gz`` per experiment (its ``cells/`` records and worker ``logs/``,
repacked while each step runs, so a killed command still brings back the progressive
records), ``device.log`` (everything the steps printed) and ``device.json`` (the plan, each
step's time limit, exit status and wall time, the accelerator). Each step is one
``python -m experiments run NAME --preset paper --only ... --jobs N --time-limit M``, M its
share of the time left (unused time flows to the later steps); cells still running at a
step's limit keep a partial record with their curve so far.

Here, once: copy the datasets into the checkout (they travel with it, ignored by git)::

    make device-data            # .device-data/{mnist,ptb}, listed in .git/info/exclude

On the device (one call; ``carry`` the data)::

    run(command="make device-paper OUT=$OUT", carry=[".device-data"], timeout_s=600)

Back here, with the files the call brought back in DIR::

    make device-import FILES=DIR    # python -m experiments import-device DIR
    # unpacks into results/NAME/paper/ and publishes reports/NAME/paper/

Dry run on this CPU (the same list at the smoke preset, 2 processes at a time)::

    make device-paper OUT=/tmp/device-out PRESET=smoke   # or: python -m experiments device
                                                         #     /tmp/device-out --dry-run
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.data import DATA_DIR_ENV
from experiments.framework.checkpoints import atomic_write
from experiments.framework.declare import PRESETS, UsageError
from experiments.framework.running import check_jobs, check_out_dir, check_time_limit
from experiments.framework.store import REPO_ROOT, is_partial, load_record


@dataclasses.dataclass(frozen=True)
class Step:
    """One entry of the priority list: ``python -m experiments run <experiment> --only
    <only> --jobs <jobs>`` (``jobs=None``: all its cells at once), given ``weight`` shares
    of the time left when it starts."""

    name: str
    experiment: str
    only: tuple[str, ...] = ()
    jobs: int | None = None
    weight: float = 1.0
    why: str = ""


PLAN: tuple[Step, ...] = (
    Step("table1-mnist-fcn", "table1", ("mnist-fcn*-dni", "mnist-fcn*"), weight=5.0,
         why="Table 1's MNIST FCN block, its 20 cells at once; the A.1 DNI cells (the "
             "slowest, ~7 min alone on an H200) start first"),
    Step("unlock-fcn4", "unlock", ("fcn4-*",), weight=1.5,
         why="Fig. 5's own 4-layer network: DNI and cDNI, forward-locked and unlocked"),
    Step("sparse", "sparse", (), weight=1.0, why="Fig. 5 left: sparse updates"),
    Step("table2-ptb", "table2", ("ptb-*",), weight=1.5, why="Table 2's Penn Treebank cells"),
    Step("table2-copy-T2", "table2", ("copy-bptt-T2", "copy-dni-T2"), weight=0.5,
         why="Copy at T = 2, BPTT vs DNI, with what remains"),
)
"""The priority list, in order."""

BUDGET_MIN = 9.0  # the paper run: fits one 10-minute command with the start-up around it
DRY_RUN_BUDGET_MIN = 30.0
DRY_RUN_JOBS = 2  # this CPU
RESERVE_S = 15.0  # kept at the end for the last packing
STEP_OVERHEAD_S = 10.0  # a step's own start-up and report writing around its cells' limit
MIN_STEP_S = 30.0  # a paper step given less is not started
STEP_GRACE_S = 45.0  # a step still running this long after its limit is terminated
PACK_EVERY_S = 20.0
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
LOG_TAIL_BYTES = 256 * 1024  # of each worker log packed
CHECKPOINT_INTERVAL_S = 60.0  # checkpoints stay on the device: only for a rerun there
LOG_NAME, SUMMARY_NAME = "device.log", "device.json"
DEVICE_DATA = ".device-data"  # the datasets copied into the checkout by `make device-data`


def check_plan(plan: Sequence[Step]) -> None:
    """The files a plan writes fit the lease's limit (one archive per experiment, a log and
    a summary: at most :data:`MAX_FILES`), step names are unique and file-safe."""
    names = [s.name for s in plan]
    if len(set(names)) != len(names) or not all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", n)
                                                for n in names):
        raise ValueError(f"plan step names must be unique and file-safe: {names}")
    files = len({s.experiment for s in plan}) + 2
    if files > MAX_FILES:
        raise ValueError(f"the plan writes {files} files; a lease brings back {MAX_FILES}")


def select_steps(plan: Sequence[Step], names: Sequence[str] | None) -> tuple[Step, ...]:
    """The steps of ``plan`` named in ``names`` (all if ``None``), in plan order."""
    if not names:
        return tuple(plan)
    unknown = [n for n in names if n not in {s.name for s in plan}]
    if unknown:
        raise UsageError(f"--steps {' '.join(unknown)}: no such step; valid steps: "
                         + ", ".join(s.name for s in plan))
    return tuple(s for s in plan if s.name in names)


def step_limit(steps: Sequence[Step], i: int, left_s: float) -> float:
    """Seconds for step ``i``: its weight's share of ``left_s`` among the steps not run yet
    (so time a step does not use goes to the ones after it)."""
    total = sum(s.weight for s in steps[i:])
    return left_s * steps[i].weight / total if total > 0 else 0.0


def describe_accelerator() -> str:
    """``nvidia-smi -L``'s first line where there is one, else ``"none (CPU)"``."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "none (CPU)"


# --------------------------------------------------------------------------- packing


def pack(results: Path, experiment: str, preset: str, out: Path) -> Path | None:
    """``out/<experiment>.tar.gz``: the ``cells/*.json`` records and the tails of the worker
    ``logs/*.log`` under ``results/<experiment>/<preset>/`` (paths inside start at
    ``<experiment>/``), written atomically; the logs are left out if the archive would
    pass :data:`MAX_FILE_BYTES`. ``None`` if there is nothing to pack."""
    base = results / experiment / preset
    records = sorted((base / "cells").glob("*.json"))
    if not records:
        return None
    logs = sorted((base / "logs").glob("*.log"))
    dest = out / f"{experiment}.tar.gz"
    for with_logs in (True, False):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for path in records + (logs if with_logs else []):
                try:
                    data = path.read_bytes()
                except OSError:  # a record being replaced right now: the next pack has it
                    continue
                if path.suffix == ".log":
                    data = data[-LOG_TAIL_BYTES:]
                info = tarfile.TarInfo(f"{experiment}/{preset}/{path.parent.name}/{path.name}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
        if buf.tell() <= MAX_FILE_BYTES:
            break
    atomic_write(dest, lambda f: f.write(buf.getvalue()), binary=True)
    return dest


MEMBER = re.compile(r"^([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)/(cells|logs)/"
                    r"([A-Za-z0-9][\w.-]*\.(?:json|log))$")


def unpack(archive: Path, results: Path, known: Callable[[str, str], bool]
           ) -> dict[tuple[str, str], dict[str, int]]:
    """Unpack a :func:`pack` archive into ``results``; ``known(experiment, preset)`` says
    which runs may be unpacked. A local record of the same config is kept where it went
    further: a finished one over an incoming partial one, a partial one that reached a
    later step over an incoming partial one (another lease's shorter run). Returns
    ``{(experiment, preset): {"finished": n, "partial": n}}`` of the records taken."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    try:
        tar = tarfile.open(archive, mode="r:gz")
    except (OSError, tarfile.TarError) as e:
        raise UsageError(f"{archive}: not a tar.gz archive ({e}); pass the folder the "
                         "device's files came back to") from e
    with tar:
        for member in tar.getmembers():
            m = MEMBER.match(member.name)
            if not member.isfile() or m is None:
                raise UsageError(f"{archive}: unexpected member {member.name!r} (expected "
                                 "NAME/PRESET/cells/*.json or NAME/PRESET/logs/*.log)")
            experiment, preset, kind, filename = m.groups()
            if not known(experiment, preset):
                raise UsageError(f"{archive}: {experiment}/{preset} is not a registered "
                                 "experiment and preset")
            data = tar.extractfile(member).read()
            dest = results / experiment / preset / kind / filename
            counts = found.setdefault((experiment, preset), {"finished": 0, "partial": 0})
            if kind == "cells":
                try:
                    record = json.loads(data)
                except ValueError as e:
                    raise UsageError(f"{archive}: {member.name} is not JSON ({e})") from e
                if not _replaces(record, load_record(dest)):
                    continue
                counts["partial" if is_partial(record) else "finished"] += 1
            atomic_write(dest, lambda f, d=data: f.write(d), binary=True)
    return found


def _replaces(incoming: dict, local: dict | None) -> bool:
    """Whether an incoming record should replace the local one (see :func:`unpack`)."""
    if local is None or not is_partial(incoming) or local.get("config") != incoming.get(
            "config") or local.get("params") != incoming.get("params"):
        return True
    if not is_partial(local):
        return False
    return (incoming.get("last_step") or 0) >= (local.get("last_step") or 0)


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class _Log:
    """Lines to stdout and to ``OUT/device.log``."""

    path: Path
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _stream(proc: subprocess.Popen, log: _Log) -> threading.Thread:
    def pump():
        for line in proc.stdout:
            log("  " + line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def step_cells(step: Step, preset: str) -> tuple:
    """The cells ``step`` runs at ``preset`` (:class:`UsageError` if there are none)."""
    from experiments import registry
    from experiments.framework.running import select_cells

    return select_cells(registry.get(step.experiment), preset, step.only)


def step_command(step: Step, preset: str, results: Path, jobs: int, limit_s: float
                 ) -> list[str]:
    """The ``python -m experiments run`` command of ``step``."""
    cmd = [sys.executable, "-m", "experiments", "run", step.experiment, "--preset", preset,
           "--out", str(results), "--jobs", str(jobs), "--time-limit", f"{limit_s / 60:.4f}",
           "--checkpoint-interval", str(CHECKPOINT_INTERVAL_S)]
    return cmd + (["--only", *step.only] if step.only else [])


def run_plan(out: str | os.PathLike, *, preset: str = "paper", budget_min: float = BUDGET_MIN,
             max_jobs: int | None = None, plan: Sequence[Step] = PLAN,
             results: str | os.PathLike = "results", min_step_s: float = MIN_STEP_S,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``plan`` at ``preset`` within ``budget_min`` minutes, writing the results under
    ``results`` and the files to bring back into ``out`` (see the module docstring).
    Returns the summary also written to ``out/device.json``."""
    check_plan(plan)
    started = time.monotonic()
    end = started + 60 * budget_min
    out, results = check_out_dir(out), check_out_dir(results)
    log = _Log(out / LOG_NAME)
    log.path.write_text("", encoding="utf-8")
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
        [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if not env.get(DATA_DIR_ENV) and (REPO_ROOT / DEVICE_DATA / "mnist").is_dir():
        env[DATA_DIR_ENV] = str(REPO_ROOT / DEVICE_DATA)  # carried with the checkout
    summary: dict[str, Any] = {
        "preset": preset, "budget_s": 60 * budget_min, "started": _now(),
        "accelerator": describe_accelerator(), "python": sys.executable,
        "data_dir": env.get(DATA_DIR_ENV), "steps": [], "files": [],
    }

    def write_summary():
        summary["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
        summary["wall_s"] = round(time.monotonic() - started, 1)
        atomic_write(out / SUMMARY_NAME, lambda f: json.dump(summary, f, indent=1))

    log(f"[device] {_now()} preset {preset}, budget {budget_min:g} min, "
        f"accelerator: {summary['accelerator']}")
    for i, step in enumerate(plan):
        left = end - time.monotonic() - RESERVE_S
        limit = step_limit(plan, i, left)
        entry = {"step": step.name, "experiment": step.experiment, "only": list(step.only),
                 "time_limit_s": round(limit, 1)}
        summary["steps"].append(entry)
        try:
            cells = len(step_cells(step, preset))
        except (UsageError, ImportError) as e:
            entry.update(status=f"not run ({e})", error=str(e))
            log(f"[device] {step.name}: not run: {e}")
            write_summary()
            continue
        jobs = min(step.jobs or cells, max_jobs or cells, cells)
        entry["cells"], entry["jobs"] = cells, jobs
        run_s = limit - STEP_OVERHEAD_S
        if run_s < max(min_step_s, 1.0):
            entry["status"] = "not run (no time left)"
            log(f"[device] {step.name}: not run, {max(left, 0):.0f} s left")
            write_summary()
            continue
        cmd = step_command(step, preset, results, jobs, run_s)
        log(f"[device] {_now()} {step.name} ({step.why}): {limit:.0f} s, {jobs} at a time\n"
            f"[device] $ {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env, stdin=subprocess.DEVNULL)
        pump = _stream(proc, log)
        last_pack = t0
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now > t0 + limit + STEP_GRACE_S:
                    log(f"[device] {step.name}: past its limit, terminating")
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                    break
                if now - last_pack >= PACK_EVERY_S:
                    pack(results, step.experiment, preset, out)
                    last_pack = now
                time.sleep(0.5)
        except BaseException:
            proc.terminate()
            raise
        finally:
            proc.wait()
            pump.join(timeout=5)
            pack(results, step.experiment, preset, out)
        entry.update(returncode=proc.returncode, wall_s=round(time.monotonic() - t0, 1),
                     status="ran" if proc.returncode == 0 else f"exit {proc.returncode}")
        log(f"[device] {step.name}: exit {proc.returncode} after {entry['wall_s']:.0f} s")
        write_summary()
    summary["finished"] = _now()
    write_summary()
    files = [p for p in out.iterdir() if p.is_file()]
    big = [p.name for p in files if p.stat().st_size > MAX_FILE_BYTES]
    log(f"[device] wrote {len(files)} files to {out}: "
        + ", ".join(f"{p.name} ({p.stat().st_size / 1024:.0f} KiB)" for p in sorted(files))
        + (f"; over {MAX_FILE_BYTES >> 20} MiB: {big}" if big else ""))
    return summary


# --------------------------------------------------------------------------- the CLI


def _option(check: Callable[[Any], Any], value: Any, checked: str, name: str) -> Any:
    """``check(value)``, its error naming the option ``name`` instead of ``checked``."""
    try:
        return check(value)
    except UsageError as e:
        raise UsageError(str(e).replace(checked, name, 1)) from None


def main_run(args) -> int:
    """``python -m experiments device OUT``: :func:`run_plan` with the CLI's options."""
    preset = args.preset or ("smoke" if args.dry_run else "paper")
    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r}: valid presets: {', '.join(PRESETS)}")
    dry = args.dry_run or preset == "smoke"
    budget = _option(check_time_limit, args.budget, "--time-limit", "--budget") or (
        DRY_RUN_BUDGET_MIN if dry else BUDGET_MIN)
    max_jobs = _option(check_jobs, args.max_jobs, "--jobs", "--max-jobs") \
        if args.max_jobs is not None else (DRY_RUN_JOBS if dry else None)
    steps = select_steps(PLAN, args.steps)
    summary = run_plan(args.out, preset=preset, budget_min=budget, max_jobs=max_jobs,
                       plan=steps, results=args.results or "results",
                       min_step_s=0.0 if dry else MIN_STEP_S)
    failed = [s["step"] for s in summary["steps"]
              if s.get("returncode") not in (None, 0) or "error" in s]
    return 1 if failed else 0


def main_import(reg, args) -> int:
    """``python -m experiments import-device DIR``: unpack every ``NAME.tar.gz`` of DIR into
    ``--results`` and publish each paper run with
    :func:`experiments.framework.publish_report` (``reports/NAME/paper/``). Smoke runs (a
    dry run) are only published with ``--to``."""
    from experiments import framework

    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"{args.dir}: no such directory; pass the folder the device's files "
                         "came back to")
    archives = sorted(folder.glob("*.tar.gz"))
    if not archives:
        raise UsageError(f"{args.dir}: no NAME.tar.gz files (what `make device-paper` "
                         "writes) in it")
    results = check_out_dir(args.results)

    def known(name, preset):
        return name in reg.experiments and preset in reg.experiments[name].presets

    imported: dict[tuple[str, str], dict[str, int]] = {}
    for archive in archives:
        for key, counts in unpack(archive, results, known).items():
            total = imported.setdefault(key, {"finished": 0, "partial": 0})
            for k, v in counts.items():
                total[k] += v
    for name in (SUMMARY_NAME, LOG_NAME):
        if (folder / name).is_file():
            (results / "device").mkdir(exist_ok=True)
            shutil.copy2(folder / name, results / "device" / name)
    for (name, preset), counts in sorted(imported.items()):
        exp = reg.get(name)
        where = f"{results}/{name}/{preset}/"
        devices = sorted({str(r.get("device")) for p in (results / name / preset / "cells")
                          .glob("*.json") if (r := load_record(p)) is not None})
        print(f"{name}: unpacked {counts['finished']} finished and {counts['partial']} "
              f"partial records into {where} (measured on {'; '.join(devices) or '?'})",
              file=sys.stderr)
        if preset == "smoke" and args.to is None:
            print(f"{name}: smoke records are not results; not published (pass --to to "
                  "publish them elsewhere)", file=sys.stderr)
            continue
        dest = framework.publish_report(exp, results, preset=preset, reports_root=args.to)
        print(f"{name}: wrote {dest}/" if dest is not None else
              f"{name}: no finished {preset} cells to publish; report left as it was",
              file=sys.stderr)
    return 0
