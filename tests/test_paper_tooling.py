"""Paper-protocol runs that fit an accelerator lease (issue 18 §1): ``run --jobs N``,
``--time-limit``, progressive (partial) records, the device script and its import.

Uses ``tests/toy_paper_experiment.py``; tests that start worker processes keep to 2 at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import toy_paper_experiment as toy

from experiments import device, registry
from experiments.__main__ import main
from experiments.framework import load_results, running
from experiments.framework.store import is_partial

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"wall_time_s", "timestamp"}  # differ between any two runs


@pytest.fixture(autouse=True)
def _toy(monkeypatch):
    monkeypatch.setenv(registry.ENV_ONLY, "toy_paper_experiment")
    monkeypatch.delenv(registry.ENV_EXTRA, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    monkeypatch.delenv(toy.SLEEP, raising=False)
    monkeypatch.delenv(toy.CRASH, raising=False)


def run(out, *args, preset="paper"):
    return main(["run", "toypaper", "--preset", preset, "--out", str(out), *args])


def record(out, cell, preset="paper"):
    return json.loads((Path(out) / "toypaper" / preset / "cells" / f"{cell}.json").read_text())


def stable(rec):
    return {k: v for k, v in rec.items() if k not in VOLATILE}


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- --jobs


def test_jobs_2_gives_the_same_records_as_jobs_1(tmp_path, capsys):
    assert run(tmp_path / "one", "--only", "a-*", preset="smoke") == 0
    assert run(tmp_path / "two", "--only", "a-*", "--jobs", "2", preset="smoke") == 0
    err = capsys.readouterr().err
    assert "2 at a time" in err and "running in process" in err
    for cell in ("a-x", "a-y"):
        one, two = record(tmp_path / "one", cell, "smoke"), record(tmp_path / "two", cell, "smoke")
        # code_version: a commit landing between the two runs must not fail the test
        diff = {k: (one.get(k), two.get(k)) for k in set(one) | set(two)
                if k not in VOLATILE | {"code_version"} and one.get(k) != two.get(k)}
        assert not diff, diff
        assert one["curves"]["loss"]["step"] == [2, 4] and "partial" not in two
        assert (tmp_path / "two" / "toypaper" / "smoke" / "logs" / f"{cell}.log").exists()
    table = (tmp_path / "two" / "toypaper" / "smoke" / "table.md").read_text()
    assert "2/3 done" in table  # the parent wrote the report from the workers' records


def test_a_failing_worker_cell_is_one_error_line_and_the_others_finish(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(toy.CRASH, "a-x")
    assert run(tmp_path, "--only", "a-*", "--jobs", "2", preset="smoke") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "cell a-x" in line and "boom in a-x" in line and "a-x.log" in line
    assert "partial" not in record(tmp_path, "a-y", "smoke")
    assert not (tmp_path / "toypaper" / "smoke" / "cells" / "a-x.json").exists()


def test_worker_environment_shares_the_accelerator(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    env = running.worker_env(toy.EXPERIMENT, 4)
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.9 / 4, abs=1e-4)
    assert env["SGJAX_EXPERIMENTS"] == "toy_paper_experiment"
    assert env["PYTHONPATH"].split(os.pathsep)[:2] == [str(ROOT / "tests"), str(ROOT)]


def test_cells_start_in_the_order_of_the_only_patterns():
    cells = toy.EXPERIMENT.cells_for("paper")
    assert [c.id for c in running.order_cells(cells, ["b-*", "*"])] == ["b-x", "a-x", "a-y"]
    assert [c.id for c in running.order_cells(cells)] == ["a-x", "a-y", "b-x"]


# --------------------------------------------------------------------------- --time-limit


def test_time_limit_leaves_partial_records_and_a_rerun_resumes_them(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(toy.SLEEP, "0.05")  # 100 steps: 5 s a cell; the limit is 3 s
    assert run(tmp_path, "--time-limit", "0.05", "--checkpoint-interval", "100") == 0
    err = capsys.readouterr().err
    assert "a-x: stopped at step" in err and "not run (time limit) 2" in err
    rec = record(tmp_path, "a-x")
    step = rec["last_step"]
    assert rec["partial"] is True and rec["metric"] is None and 0 < step < 100
    assert rec["curves"]["loss"]["step"] == list(range(2, step + 1, 2))
    assert rec["config"] == {"steps": 100, "eval_every": 2}  # a record with its identity
    out_dir = tmp_path / "toypaper" / "paper"
    # checkpointed at the limit despite the 100 s interval
    assert (out_dir / "checkpoints" / "a-x" / "state.npz").exists()
    found = load_results(toy.EXPERIMENT, "paper", out_dir)
    assert found["a-x"] == f"partial (stopped at step {step})"  # not finished
    assert found["a-y"] == "missing (not run)"
    assert is_partial(load_results(toy.EXPERIMENT, "paper", out_dir, partial=True)["a-x"])
    row = next(line for line in (out_dir / "table.md").read_text().splitlines()
               if line.startswith("| A | x |"))
    assert "partial" in row  # the reports show it as partial (their format is theirs)

    monkeypatch.delenv(toy.SLEEP)
    assert run(tmp_path) == 0
    done = record(tmp_path, "a-x")
    assert "partial" not in done and "last_step" not in done
    assert done["resumed_from_step"] == step > 0
    assert done["curves"]["loss"]["step"] == list(range(2, 101, 2))
    assert not (out_dir / "checkpoints").exists()
    assert run(tmp_path / "straight", "--only", "a-x") == 0
    straight = record(tmp_path / "straight", "a-x")
    assert done["metric"] == straight["metric"] and done["curves"] == straight["curves"]


def test_time_limit_before_a_cell_checkpoints_stops_it_at_its_next_log(tmp_path, monkeypatch):
    """A cell that never checkpoints (whose trainings run under a SubContext) stops at the
    next log after the deadline, with its curve so far."""
    monkeypatch.setenv(toy.SLEEP, "0.05")
    monkeypatch.setattr(running.RunContext, "save", lambda self, step, state, force=False: False)
    assert run(tmp_path, "--time-limit", "0.03", "--only", "b-x") == 0
    rec = record(tmp_path, "b-x")
    assert rec["partial"] is True and rec["last_step"] >= 2


def test_sigkilled_cell_leaves_a_partial_record_that_a_rerun_resumes(tmp_path, monkeypatch):
    env = {**os.environ, toy.SLEEP: "0.1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments", "run", "toypaper", "--preset", "paper", "--only",
         "a-x", "--out", str(tmp_path), "--checkpoint-interval", "0"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / "toypaper" / "paper" / "cells" / "a-x.json"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(path.read_text()).get("last_step", 0) >= 6:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rec = json.loads(path.read_text())
    assert rec["partial"] is True and rec["last_step"] >= 6
    assert rec["curves"]["loss"]["step"][-1] == rec["last_step"]
    assert run(tmp_path, "--only", "a-x") == 0
    done = record(tmp_path, "a-x")
    # from the last checkpoint: the kill may have come between a log and its checkpoint
    assert "partial" not in done and 0 < done["resumed_from_step"] <= rec["last_step"]
    assert done["curves"]["loss"]["step"] == list(range(2, 101, 2))


@pytest.mark.slow  # 30 s: a worker's start-up (seconds on a busy CPU) must fit the limit
def test_time_limit_with_jobs_2_leaves_partial_records_from_the_workers(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(toy.SLEEP, "0.5")  # 50 s a cell; the limit is 30 s
    assert run(tmp_path, "--only", "a-*", "--jobs", "2", "--time-limit", "0.5",
               "--checkpoint-interval", "100") == 0
    assert "partial (time limit; rerun to resume) 2" in capsys.readouterr().err
    for cell in ("a-x", "a-y"):
        rec = record(tmp_path, cell)
        assert rec["partial"] is True and rec["last_step"] >= 2, rec
        ckpt = tmp_path / "toypaper" / "paper" / "checkpoints" / cell / "state.npz"
        assert ckpt.exists()


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("argv, what", [
    (["--jobs", "0"], "--jobs 0"), (["--jobs", "-2"], "--jobs -2"),
    (["--jobs", "two"], "--jobs two"), (["--jobs", "1.5"], "--jobs 1.5"),
    (["--time-limit", "0"], "--time-limit 0"), (["--time-limit", "-1"], "--time-limit -1"),
    (["--time-limit", "soon"], "--time-limit soon"), (["--time-limit", "inf"], "--time-limit"),
    (["--time-limit", "nan"], "--time-limit nan"),
])
def test_bad_jobs_or_time_limit_is_one_error_line(tmp_path, capsys, argv, what):
    assert run(tmp_path, *argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {what}") and ("whole number" in line or "minutes" in line)
    assert not (tmp_path / "toypaper").exists()


@pytest.mark.parametrize("argv, what", [
    (["--steps", "nope"], "--steps nope"), (["--budget", "0"], "--budget 0"),
    (["--max-jobs", "0"], "--max-jobs 0"), (["--preset", "huge"], "--preset 'huge'"),
])
def test_bad_device_options_are_one_error_line(tmp_path, capsys, argv, what):
    assert main(["device", str(tmp_path / "out"), *argv]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {what}")


# --------------------------------------------------------------------------- device script


PLAN = (device.Step("toy-a", "toypaper", ("a-*",), jobs=2, weight=2.0, why="two at once"),
        device.Step("toy-b", "toypaper", ("b-x",), jobs=1, weight=1.0, why="in process"))


def test_device_script_writes_few_flat_files_and_the_import_publishes_them(
        tmp_path, monkeypatch, capsys):
    out, results = tmp_path / "OUT", tmp_path / "device-results"
    summary = device.run_plan(out, preset="smoke", budget_min=3, max_jobs=2, plan=PLAN[:1],
                              results=results, min_step_s=0)
    files = sorted(out.iterdir())
    assert [p.name for p in files] == ["device.json", "device.log", "toypaper.tar.gz"]
    assert all(p.is_file() and p.stat().st_size < device.MAX_FILE_BYTES for p in files)
    assert len(files) <= device.MAX_FILES
    assert [s["status"] for s in summary["steps"]] == ["ran"]
    assert json.loads((out / "device.json").read_text())["steps"][0]["jobs"] == 2
    assert "--jobs 2" in (out / "device.log").read_text()
    with tarfile.open(out / "toypaper.tar.gz") as tar:
        names = sorted(tar.getnames())
    assert [n for n in names if "/cells/" in n] == [
        f"toypaper/smoke/cells/{c}.json" for c in ("a-x", "a-y")]
    assert "toypaper/smoke/logs/a-x.log" in names  # the workers' logs come back too

    home, reports = tmp_path / "results", tmp_path / "reports"
    capsys.readouterr()
    assert main(["import-device", str(out), "--results", str(home)]) == 0
    err = capsys.readouterr().err
    assert "unpacked 2 finished and 0 partial" in err and "not published" in err
    assert main(["import-device", str(out), "--results", str(home), "--to", str(reports)]) == 0
    for cell in ("a-x", "a-y"):
        assert stable(record(home, cell, "smoke")) == stable(record(results, cell, "smoke"))
    table = next(reports.glob("toypaper/**/table.md")).read_text()
    assert "2/3 done" in table
    assert (home / "device" / "device.json").exists()


def test_device_step_limits_share_the_time_left_and_unused_time_flows_on(tmp_path):
    steps = (device.Step("a", "x", weight=2.0), device.Step("b", "x"), device.Step("c", "x"))
    assert device.step_limit(steps, 0, 400.0) == pytest.approx(200.0)
    assert device.step_limit(steps, 1, 300.0) == pytest.approx(150.0)  # a used only 100 s
    assert device.step_limit(steps, 2, 10.0) == pytest.approx(10.0)
    device.check_plan(device.PLAN)
    assert len({s.experiment for s in device.PLAN}) + 2 <= device.MAX_FILES
    with pytest.raises(ValueError, match="brings back 8"):
        device.check_plan([device.Step(f"s{i}", f"e{i}") for i in range(7)])
    # no time left: nothing starts, the log and the summary still come back
    summary = device.run_plan(tmp_path / "out", preset="smoke", budget_min=0.1, plan=PLAN,
                              results=tmp_path / "r", min_step_s=0)
    assert [s["status"] for s in summary["steps"]] == ["not run (no time left)"] * 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["device.json", "device.log"]


def test_import_refuses_archives_with_unexpected_members(tmp_path, capsys):
    bad = tmp_path / "in"
    bad.mkdir()
    with tarfile.open(bad / "toypaper.tar.gz", "w:gz") as tar:
        tar.add(__file__, arcname="toypaper/smoke/cells/../../../evil.json")
    assert main(["import-device", str(bad), "--results", str(tmp_path / "r")]) == 2
    assert "unexpected member" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "evil.json").exists()


def test_import_keeps_the_local_record_that_went_further(tmp_path):
    base = {"config": {"steps": 100}, "params": {"target": 1.0}, "seed": 0}
    cells = tmp_path / "run" / "toypaper" / "paper" / "cells"
    cells.mkdir(parents=True)
    home = tmp_path / "home" / "toypaper" / "paper" / "cells"
    home.mkdir(parents=True)
    for cell, local, incoming in [
            ("a-x", {"partial": True, "last_step": 80}, {"partial": True, "last_step": 40}),
            ("a-y", {"metric": 1.0}, {"partial": True, "last_step": 90}),
            ("b-x", {"partial": True, "last_step": 10}, {"partial": True, "last_step": 20})]:
        (home / f"{cell}.json").write_text(json.dumps({**base, **local}))
        (cells / f"{cell}.json").write_text(json.dumps({**base, **incoming}))
    archive = device.pack(tmp_path / "run", "toypaper", "paper", tmp_path)
    found = device.unpack(archive, tmp_path / "home", lambda name, preset: True)
    assert found == {("toypaper", "paper"): {"finished": 0, "partial": 1}}
    kept = {c: json.loads((home / f"{c}.json").read_text()) for c in ("a-x", "a-y", "b-x")}
    assert kept["a-x"]["last_step"] == 80 and kept["a-y"]["metric"] == 1.0
    assert kept["b-x"]["last_step"] == 20
