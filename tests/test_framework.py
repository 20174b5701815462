"""The experiments framework: CLI, result files, resume, errors, checkpoints (toy experiment)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy_experiment as toy

from experiments import framework, registry
from experiments.__main__ import main
from experiments.framework import Cell, Checkpointer, Experiment, check_finite

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _toy(monkeypatch):
    toy.isolate(monkeypatch)


def run(tmp_path, *args):
    return main(["run", "toy", "--preset", "smoke", "--out", str(tmp_path), *args])


def test_registry_environment_variables(monkeypatch):
    monkeypatch.delenv(registry.ENV_ONLY)
    monkeypatch.setattr(registry, "MODULES", ("experiments.a", "experiments.b"))
    assert registry.module_paths() == ("experiments.a", "experiments.b")
    monkeypatch.setenv(registry.ENV_EXTRA, "x.y, experiments.a")
    assert registry.module_paths() == ("experiments.a", "experiments.b", "x.y")
    monkeypatch.setenv(registry.ENV_ONLY, "toy_experiment")
    assert registry.module_paths() == ("toy_experiment", "x.y", "experiments.a")


def test_list_and_names(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "Toy (tests only)" in out and "smoke,quick,paper" in out
    assert "Toy table: halfway steps to a target" in out
    assert main(["names"]) == 0
    assert capsys.readouterr().out.split() == ["toy"]


def test_list_reports_broken_module_and_keeps_others(monkeypatch, capsys):
    monkeypatch.setenv(registry.ENV_EXTRA, "no_such_module_xyz")
    assert main(["list"]) == 1
    out = capsys.readouterr().out
    assert "toy" in out
    assert "FAILED  no_such_module_xyz: ModuleNotFoundError" in out


def test_run_writes_json_csv_table_and_png(tmp_path, capsys):
    assert run(tmp_path) == 0
    out_dir = tmp_path / "toy" / "smoke"
    record = json.loads((out_dir / "cells" / "a-x.json").read_text())
    assert record["metric"] == pytest.approx(0.875)
    assert record["config"] == {"steps": 3, "scale": 1.0}
    assert record["params"] == {"target": 1.0} and record["seed"] == 0
    assert record["metrics"] == {"final_loss": pytest.approx(0.25**2)}
    assert record["curves"]["loss"]["step"] == [1, 2, 3]
    assert record["jax_version"] == jax.__version__ and "cpu" in record["device"].lower()
    assert record["wall_time_s"] >= 0 and record["timestamp"]
    assert record["command"] == "python -m experiments run toy --preset smoke"
    assert not (out_dir / "checkpoints").exists()  # removed once the cells are done

    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    assert [r["cell"] for r in rows] == ["a-x", "a-y", "b-x", "b-y"]
    assert float(rows[2]["diff"]) == pytest.approx(3.5 - 3.5)
    assert rows[3]["paper"] == "" and rows[3]["diff"] == ""

    table = (out_dir / "table.md").read_text()
    assert "| row | column | paper | ours | diff |" in table
    assert "| A | x | 1 | 0.875 | -0.125 |" in table
    assert "| B | y | — | 7 | — |" in table
    assert "Toy (tests only)" in table and "final w" in table and "not a paper result" in table
    assert table in capsys.readouterr().out  # also printed at the end

    png = out_dir / "curves-loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_finished_cells_and_fresh_reruns(tmp_path):
    assert run(tmp_path) == 0
    assert len(toy.CALLS) == 4
    assert run(tmp_path) == 0
    assert len(toy.CALLS) == 4
    assert run(tmp_path, "--fresh") == 0
    assert len(toy.CALLS) == 8


def test_config_or_seed_change_reruns_cells(tmp_path, monkeypatch):
    assert run(tmp_path) == 0
    changed = dataclasses.replace(
        toy.EXPERIMENT, presets={**toy.EXPERIMENT.presets, "smoke": toy.Config(3, scale=2.0)}
    )
    monkeypatch.setattr(toy, "EXPERIMENT", changed)
    found = framework.load_results(changed, "smoke", tmp_path / "toy" / "smoke")
    assert found["a-x"] == "missing (stale: config changed, rerun)"
    assert run(tmp_path) == 0
    assert len(toy.CALLS) == 8
    record = json.loads((tmp_path / "toy" / "smoke" / "cells" / "a-x.json").read_text())
    assert record["metric"] == pytest.approx(1.75)
    assert run(tmp_path, "--seed", "3") == 0
    assert len(toy.CALLS) == 12


def test_only_runs_matching_cells_and_marks_the_rest_missing(tmp_path):
    assert run(tmp_path, "--only", "a-*", "b-y") == 0
    assert toy.CALLS == ["a-x", "a-y", "b-y"]
    table = (tmp_path / "toy" / "smoke" / "table.md").read_text()
    assert "| B | x | 3.5 | missing (not run) | — |" in table
    assert "3/4 done" in table


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "nope", "--preset", "smoke"], ["unknown experiment 'nope'", "toy"]),
        (["run", "toy", "--preset", "huge"], ["unknown preset 'huge'", "smoke, quick, paper"]),
        (["run", "toy", "--preset", "smoke", "--only", "zz*"], ["zz*", "a-x, a-y, b-x, b-y"]),
        (["run", "all", "--preset", "smoke", "--only", "zz"], ["zz", "no cell"]),
        (["show", "nope"], ["unknown experiment 'nope'"]),
    ],
)
def test_usage_errors_exit_2_and_list_valid_values(tmp_path, capsys, argv, expected):
    assert main([*argv, *(["--out", str(tmp_path)] if argv[0] == "run" else [])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err
    assert toy.CALLS == []


def test_nan_loss_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(toy, "DIVERGE", True)
    assert run(tmp_path) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "experiment 'toy' (smoke), cell 'a-x', step 1, loss is nan" in err
    assert "learning rate" in err and "--fresh" in err
    with pytest.raises(FloatingPointError, match=r"here \['b'\] is inf"):
        check_finite({"a": 1.0, "b": jnp.array([1.0, jnp.inf])}, where="here")
    assert check_finite(jnp.ones(3, jnp.bfloat16), where="x") is not None


@pytest.mark.parametrize("signal_name", ["sigint", "sigterm"])
def test_interrupted_cell_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch, signal_name):
    monkeypatch.setattr(toy, "INTERRUPT_WITH", signal_name)
    toy.INTERRUPT_AT = 2
    assert run(tmp_path) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert (tmp_path / "toy" / "smoke" / "checkpoints" / "a-x" / "state.npz").exists()
    assert "0/4 done" in (tmp_path / "toy" / "smoke" / "table.md").read_text()
    toy.INTERRUPT_AT = None
    assert run(tmp_path) == 0
    assert toy.STARTS["a-x"] == 2 and toy.STARTS["a-y"] == 0
    record = json.loads((tmp_path / "toy" / "smoke" / "cells" / "a-x.json").read_text())
    assert record["resumed_from_step"] == 2
    assert record["curves"]["loss"]["step"] == [1, 2, 3]
    assert record["metric"] == pytest.approx(0.875)


def test_checkpointer_round_trip(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
    opt_state = optax.adam(1e-3).init(params)
    state = {
        "params": params,
        "opt": opt_state,
        "key": jax.random.key(7),
        "raw_key": jax.random.PRNGKey(1),
        "n": 5,
        "np": np.arange(3, dtype=np.int16),
    }
    ckpt = Checkpointer(tmp_path / "c", fingerprint={"lr": 0.1})
    assert ckpt.restore(state) == (0, state, {})
    ckpt.save(42, state, extra={"note": "hi"})
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["state.npz"]  # no temp files left

    zeros = jax.tree.map(
        lambda x: jax.random.key(0) if framework.is_prng_key(x) else x * 0, state)
    step, restored, extra = ckpt.restore(zeros)
    assert step == 42 and extra == {"note": "hi"}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        if framework.is_prng_key(a):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    other = Checkpointer(tmp_path / "c", fingerprint={"lr": 0.2})
    assert other.restore(state)[0] == 0  # written under another config: ignored
    with pytest.raises(ValueError, match="--fresh"):
        ckpt.restore({"just": jnp.zeros(2)})


def test_declarations_are_validated():
    with pytest.raises(ValueError, match="must match"):
        Cell("bad id", "r", "c")
    with pytest.raises(ValueError, match="lacks presets"):
        dataclasses.replace(toy.EXPERIMENT, presets={"smoke": None})
    with pytest.raises(ValueError, match="duplicate cell ids"):
        dataclasses.replace(toy.EXPERIMENT, cells=[Cell("a", "r", "c"), Cell("a", "r", "d")])
    with pytest.raises(ValueError, match="not be 'all'"):
        dataclasses.replace(toy.EXPERIMENT, name="all")
    per_preset = dataclasses.replace(
        toy.EXPERIMENT, cells=lambda preset: toy.EXPERIMENT.cells[: 1 if preset == "smoke" else 4]
    )
    assert [c.id for c in framework.select_cells(per_preset, "smoke")] == ["a-x"]
    assert len(framework.select_cells(per_preset, "paper", ["*-y"])) == 2
    assert isinstance(toy.EXPERIMENT, Experiment)
    assert framework.reproduce_command("table1", "quick", make=True) == (
        "make reproduce-table1 PRESET=quick"
    )
    assert framework.reproduce_command("table1", "paper", seed=2, only=["mnist-*"]) == (
        "python -m experiments run table1 --preset paper --seed 2 --only mnist-*"
    )


def test_cli_entry_point_in_a_subprocess(tmp_path):
    env = {
        **os.environ,
        registry.ENV_ONLY: "toy_experiment",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "nope", "--preset", "x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: unknown experiment 'nope'; valid experiments: toy"


# --------------------------------------------------------------------------- the shared loop


def _ctx(tmp_path, seed=0, name="c"):
    cell = Cell(name, "r", "c")
    return framework.RunContext(
        experiment="toy", preset="smoke", cell=cell, seed=seed, out_dir=tmp_path,
        checkpoint_dir=tmp_path / "checkpoints" / name, checkpoint_interval_s=0.0,
        fingerprint={"cell": name})


def _toy_step(state, batch):
    """Counts steps and accumulates the batch ``(x,)``; reports both."""
    (x,) = batch
    new = {"n": state["n"] + 1, "s": state["s"] + x}
    return new, {"loss": x, "n": new["n"].astype(jnp.float32), "vector": jnp.zeros(2)}


def _toy_batch(data, key):
    return (data * jax.random.uniform(key),)


def _train(ctx, **kw):
    from experiments import training

    state = {"n": jnp.zeros((), jnp.int32), "s": jnp.zeros(())}
    if kw.get("seeds"):
        state = jax.tree.map(lambda v: jnp.stack([v] * kw["seeds"]), state)
    evaluate = lambda st, step: {"s": st["s"]}  # noqa: E731
    args = dict(steps=10, chunk=4, eval_every=5, batch_fn=_toy_batch, data=jnp.float32(2.0),
                evaluate=evaluate, metrics=None)
    return training.train_and_evaluate(ctx, _toy_step, state, **{**args, **kw})


def test_loop_stops_exactly_at_steps_and_evaluations(tmp_path):
    ctx = _ctx(tmp_path)
    state, final = _train(ctx, steps=11, chunk=4, eval_every=5, eval_at=(2,))
    assert int(state["n"]) == 11  # 11 % 4 != 0: never past steps
    assert [s for s, _ in ctx.curves["s"]] == [2, 5, 10, 11]
    assert [v for _, v in ctx.curves["n"]] == [1.5, 4.0, 8.0, 11.0]  # mean over each interval
    assert "vector" not in ctx.curves  # only scalars are logged
    assert final["s"] == pytest.approx(float(state["s"])) and final["n"] == 11.0
    with pytest.raises(ValueError, match="outside 1..11"):
        _train(_ctx(tmp_path, name="d"), steps=11, eval_at=(12,))
    with pytest.raises(ValueError, match=r"metrics \['acc'\] not in the step's info"):
        _train(_ctx(tmp_path, name="e"), metrics=("acc",))


def test_loop_resumes_with_the_same_batches(tmp_path):
    _, whole = _train(_ctx(tmp_path, name="whole"))
    first = _ctx(tmp_path, name="resumed")
    _train(first, steps=5)  # checkpoints at step 5 (interval 0)
    again = _ctx(tmp_path, name="resumed")
    state, resumed = _train(again)
    assert again.resumed_from_step == 5 and int(state["n"]) == 10
    assert resumed["s"] == pytest.approx(whole["s"], abs=1e-6)


def test_loop_vmaps_over_seeds(tmp_path):
    from experiments import training

    key = jax.random.key(3)
    state, final = _train(_ctx(tmp_path, name="s"), seeds=3, key=key)
    assert state["s"].shape == (3,) and len(final["s_per_seed"]) == 3
    keys = jax.random.split(key, 3)
    for i in range(3):  # seed i of the vmapped run == a single run with its key
        _, one = _train(_ctx(tmp_path, name=f"one{i}"), key=keys[i])
        assert final["s_per_seed"][i] == pytest.approx(one["s"], rel=1e-6)
    assert final["s"] == pytest.approx(np.mean(final["s_per_seed"]))
    assert training.stops(10, 4, (3,)) == [3, 4, 8, 10]


# --------------------------------------------------------------------------- bad CLI input


def _one_error_line(err: str) -> str:
    """The single ``error:`` line of ``err`` (and no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.count("error:") == 1, err
    return lines[0]


def _fake_mnist(root: Path) -> Path:
    import gzip

    (root / "mnist").mkdir(parents=True)
    for split, n in (("train", 8), ("t10k", 8)):
        for kind, shape in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            arr = np.zeros(shape, np.uint8)
            header = bytes([0, 0, 8, arr.ndim]) + np.array(shape, ">u4").tobytes()
            with gzip.open(root / "mnist" / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + arr.tobytes())
    return root


@pytest.mark.parametrize("case", ["missing", "empty", "a-file", "truncated", "corrupt"])
def test_bad_data_directory_is_one_error_line(tmp_path, monkeypatch, capsys, case):
    monkeypatch.setattr(toy, "LOAD_DATA", "mnist")
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
    elif case == "a-file":
        root.write_text("not a directory")
    elif case in ("truncated", "corrupt"):
        _fake_mnist(root)
        bad = root / "mnist" / "train-labels-idx1-ubyte.gz"
        raw = bad.read_bytes()
        bad.write_bytes(raw[: len(raw) // 2] if case == "truncated" else b"garbage" * 10)
    monkeypatch.setenv("SGJAX_DATA_DIR", str(root))
    assert run(tmp_path / "out") == 1
    line = _one_error_line(capsys.readouterr().err)
    if case in ("truncated", "corrupt"):
        assert "train-labels-idx1-ubyte.gz" in line and "corrupt or truncated" in line
    else:
        assert "Dataset 'mnist' not found" in line and str(root) in line
        assert "SGJAX_DATA_DIR" in line and "SGJAX_DATA_URL" in line
    assert "cell 'a-x'" in line


def test_good_data_directory_runs(tmp_path, monkeypatch):
    from experiments import data

    monkeypatch.setattr(toy, "LOAD_DATA", "mnist")
    root = _fake_mnist(tmp_path / "data")
    # the fake files are what the loader must accept: register their sizes and hashes
    monkeypatch.setitem(data.FILES, "mnist", tuple(
        data.RemoteFile(f"mnist/{p.name}", p.stat().st_size, data.sha256sum(p), ())
        for p in sorted((root / "mnist").iterdir())))
    monkeypatch.setenv("SGJAX_DATA_DIR", str(root))
    assert run(tmp_path / "out") == 0


@pytest.mark.parametrize("case", ["file", "under-a-file", "unwritable"])
def test_bad_out_directory_is_one_error_line(tmp_path, capsys, case):
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    if case == "unwritable" and not Path("/proc").is_dir():
        pytest.skip("needs /proc: a directory nobody can create entries in")
    out = {"file": a_file, "under-a-file": a_file / "sub",
           "unwritable": Path("/proc/sgjax-results")}[case]
    assert main(["run", "toy", "--preset", "smoke", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: --out {out}: ")
    assert ("cannot write there" if case == "unwritable" else "not a directory") in line
    assert toy.CALLS == []


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_checkpoint_interval_is_one_error_line(tmp_path, capsys, value):
    assert run(tmp_path, "--checkpoint-interval", value) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--checkpoint-interval" in line and ">= 0" in line
    assert toy.CALLS == []


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_corrupt_cell_checkpoint_is_one_error_line_and_fresh_recovers(tmp_path, capsys,
                                                                      damage):
    toy.INTERRUPT_AT = 2
    assert run(tmp_path) == 130
    ckpt = tmp_path / "toy" / "smoke" / "checkpoints" / "a-x" / "state.npz"
    raw = ckpt.read_bytes()
    ckpt.write_bytes({"garbage": b"PK\x03\x04 not a zip", "empty": b"",
                      "truncated": raw[: len(raw) // 2]}[damage])
    toy.INTERRUPT_AT = None
    capsys.readouterr()
    assert run(tmp_path) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"checkpoint {ckpt} is corrupt or truncated" in line
    assert "--fresh" in line and "delete it" in line
    assert run(tmp_path, "--fresh") == 0


# --------------------------------------------------------------------------- reports, ETA


def test_smoke_table_says_first_that_its_numbers_are_not_results(tmp_path):
    assert run(tmp_path) == 0
    first = (tmp_path / "toy" / "smoke" / "table.md").read_text().splitlines()[0]
    assert first.startswith("**Smoke preset: these numbers are not results") and first[-2:] == "**"
    assert main(["run", "toy", "--preset", "quick", "--out", str(tmp_path)]) == 0
    quick = (tmp_path / "toy" / "quick" / "table.md").read_text()
    assert quick.startswith("# toy: ") and "not results" not in quick


def test_identity_ignores_prose_and_records_the_code_version(tmp_path, monkeypatch):
    assert run(tmp_path) == 0
    record = json.loads((tmp_path / "toy" / "smoke" / "cells" / "a-x.json").read_text())
    version = record["code_version"]
    assert set(version) == {"commit", "dirty", "sgjax"}
    assert version["commit"] is None or len(version["commit"]) == 40
    assert record["cpu_cores"] >= 1 and record["cpu"]
    reworded = dataclasses.replace(toy.EXPERIMENT, notes="other words",
                                   preset_notes={"smoke": "a sentence"})
    monkeypatch.setattr(toy, "EXPERIMENT", reworded)
    assert run(tmp_path) == 0
    assert len(toy.CALLS) == 4  # nothing reran
    table = (tmp_path / "toy" / "smoke" / "table.md").read_text()
    assert "other words" in table and "- Preset `smoke`: a sentence" in table


def test_report_command_publishes_quick_runs_and_list_and_eta_use_them(
        tmp_path, monkeypatch, capsys):
    results, reports = tmp_path / "results", tmp_path / "reports"
    monkeypatch.setattr(framework.reports, "REPORTS_DIR", reports)
    assert main(["list"]) == 0
    assert "not measured" in capsys.readouterr().out
    assert main(["report", "--results", str(results)]) == 2  # nothing run yet
    assert "--results" in _one_error_line(capsys.readouterr().err)
    assert main(["run", "toy", "--preset", "quick", "--out", str(results)]) == 0
    assert "4 cells (no measured quick times in reports/toy/)" in capsys.readouterr().err
    assert main(["report", "--results", str(results)]) == 0
    dest = reports / "toy"
    index = (reports / "README.md").read_text()
    assert "| [toy](toy/table.md) | 4 |" in index
    assert sorted(p.name for p in dest.iterdir()) == [
        "cells", "curves-loss.png", "provenance.json", "results.csv", "table.md"]
    assert sorted(p.name for p in (dest / "cells").iterdir()) == [
        "a-x.json", "a-y.json", "b-x.json", "b-y.json"]
    assert (dest / "table.md").read_text() == (
        results / "toy" / "quick" / "table.md").read_text()
    prov = json.loads((dest / "provenance.json").read_text())
    assert prov["cells_done"] == 4 and prov["reproduce"].endswith("--preset quick")
    assert prov["machines"] and prov["commits"] and len(prov["dates"]) == 2
    times = framework.measured_time_s("toy")
    assert sorted(times) == ["a-x", "a-y", "b-x", "b-y"]
    assert main(["list"]) == 0
    assert "not measured" not in capsys.readouterr().out
    assert main(["run", "toy", "--preset", "quick", "--out", str(results), "--fresh"]) == 0
    err = capsys.readouterr().err
    assert "[toy/quick] 4 cells, about " in err and "as measured on " in err
    assert "a-x: running (took " in err


def test_report_keeps_committed_cells_that_a_partial_run_did_not_redo(
        tmp_path, monkeypatch, capsys):
    """A fresh checkout has no results/: rerunning some cells and publishing must not drop
    the others from the committed report; a config change does drop them (stale)."""
    reports = tmp_path / "reports"
    monkeypatch.setattr(framework.reports, "REPORTS_DIR", reports)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["run", "toy", "--preset", "quick", "--out", str(first)]) == 0
    assert main(["report", "--results", str(first)]) == 0
    before = {r["cell"]: r for r in csv.DictReader(
        (reports / "toy" / "results.csv").open())}
    assert main(["run", "toy", "--preset", "quick", "--out", str(second),
                 "--only", "a-x"]) == 0
    assert main(["report", "--results", str(second)]) == 0
    capsys.readouterr()
    after = {r["cell"]: r for r in csv.DictReader((reports / "toy" / "results.csv").open())}
    assert all(after[c]["status"] == "done" for c in after)
    assert {c: after[c]["ours"] for c in after} == {c: before[c]["ours"] for c in before}
    assert after["b-y"]["wall_time_s"] == before["b-y"]["wall_time_s"]  # kept, not rerun
    assert after["a-x"]["wall_time_s"] != before["a-x"]["wall_time_s"]  # the new run's
    prov = json.loads((reports / "toy" / "provenance.json").read_text())
    assert prov["cells_done"] == 4
    # the committed records let a run skip the cells they hold
    resumed = tmp_path / "resumed" / "toy" / "quick"
    resumed.mkdir(parents=True)
    import shutil
    shutil.copytree(reports / "toy" / "cells", resumed / "cells")
    toy.CALLS.clear()
    assert main(["run", "toy", "--preset", "quick", "--out", str(tmp_path / "resumed")]) == 0
    assert toy.CALLS == []
    # a changed config makes the committed records stale: only the rerun cell is published
    changed = dataclasses.replace(toy.EXPERIMENT, presets={
        **toy.EXPERIMENT.presets,
        "quick": dataclasses.replace(toy.EXPERIMENT.presets["quick"], steps=7)})
    monkeypatch.setattr(toy, "EXPERIMENT", changed)
    third = tmp_path / "third"
    assert main(["run", "toy", "--preset", "quick", "--out", str(third), "--only", "a-x"]) == 0
    assert main(["report", "--results", str(third)]) == 0
    prov = json.loads((reports / "toy" / "provenance.json").read_text())
    assert prov["cells_done"] == 1
    assert sorted(p.name for p in (reports / "toy" / "cells").iterdir()) == ["a-x.json"]
