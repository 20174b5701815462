"""The wall-clock experiment (experiments/dni/wallclock.py): stage cuts, cells and claims,
the worker's environment and errors, and (slow) the smoke preset end to end."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from experiments.dni import wallclock as W


@pytest.mark.parametrize("depth,width,k,cuts", [
    (5, 512, 1, ()),
    (5, 512, 2, (1,)),     # 784×512 + the SG model vs 3 layers of 512×512
    (5, 512, 4, (1, 2, 3)),
    (3, 32, 2, (1,)),
    (7, 2048, 2, (3,)),    # wide: the first layer no longer dominates
])
def test_balanced_cuts(depth, width, k, cuts):
    assert W.balanced_cuts(depth, width, k) == cuts


@pytest.mark.parametrize("k", [0, 6])
def test_balanced_cuts_rejects_impossible_stage_counts(k):
    with pytest.raises(ValueError, match=f"stages={k}"):
        W.balanced_cuts(5, 512, k)


def test_cells_and_claims():
    ids = [c.id for c in W.EXPERIMENT.cells_for("quick")]
    assert ids == ["bprop-1dev", "cdni-k2-1dev", "cdni-k2-2dev", "cdni-k4-1dev",
                   "cdni-k4-4dev"]
    claims = W.EXPERIMENT.claims_for("quick")
    assert {c.cells for c in claims} == {
        ("cdni-k2-2dev", "bprop-1dev"), ("cdni-k2-2dev", "cdni-k2-1dev"),
        ("cdni-k4-4dev", "bprop-1dev"), ("cdni-k4-4dev", "cdni-k4-1dev")}
    assert not W.PRESETS["paper"].forced_cpu_devices
    assert all(W.PRESETS[p].forced_cpu_devices for p in ("smoke", "quick"))


def _result(cell_id, seconds):
    from experiments.framework import CellResult

    cell = next(c for c in W.EXPERIMENT.cells_for("quick") if c.id == cell_id)
    return CellResult(cell, seconds, {"time_to_target_s": seconds}, {}, 0, 0.0, {})


def test_speedups_are_backprop_time_over_each_cell():
    results = [_result("bprop-1dev", 10.0), _result("cdni-k2-1dev", 12.5),
               _result("cdni-k2-2dev", 4.0)]
    assert W.speedups(results) == {"cdni-k2-1dev": 0.8, "cdni-k2-2dev": 2.5}
    assert W.speedups(results[1:]) == {}  # no baseline, no ratio


@pytest.mark.parametrize("k2,holds", [(9.0, True), (10.0, False), (11.0, False)])
def test_claim_needs_a_strict_lead(k2, holds):
    from experiments.framework import verdicts as V

    found = {r.cell.id: r for r in (_result("bprop-1dev", 10.0), _result("cdni-k2-1dev",
                                                                         20.0),
                                    _result("cdni-k2-2dev", k2))}
    claim = next(c for c in W.claims("quick") if c.id == "k2-devices-beat-bprop")
    assert (V.check(claim, found).status == V.HOLDS) is holds


def test_worker_env_forces_the_largest_stage_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --foo")
    env = W.worker_env(W.PRESETS["quick"])
    assert env["XLA_FLAGS"].split() == ["--foo", "--xla_force_host_platform_device_count=4"]
    assert env["JAX_PLATFORMS"] == "cpu"
    env = W.worker_env(W.PRESETS["paper"])  # real devices: the environment is left alone
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 --foo"


def test_worker_failure_is_one_clear_error():
    """A cell that needs more devices than the worker has fails with the worker's own
    message, not a hang or a silent one-device run."""
    config = dataclasses.replace(W.PRESETS["smoke"], stages=(2,))
    with pytest.raises(RuntimeError, match=r"needs 3 devices and jax sees 2"):
        W.run_in_subprocess(config, "cdni", 3, 3, 0)


@pytest.mark.slow  # about a minute: five subprocesses that each start jax and train
def test_experiment_smoke(tmp_path):
    from experiments.__main__ import main

    assert main(["run", "wallclock", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "wallclock" / "smoke"
    records = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    assert set(records) == {"bprop-1dev", "cdni-k2-1dev", "cdni-k2-2dev"}
    for r in records.values():
        assert math.isfinite(r["metric"]) and r["metrics"]["steps_per_s"] > 0
    assert len(records["cdni-k2-2dev"]["metrics"]["devices"]) == 2
    # the same arithmetic on one or on two devices: the same test errors
    assert (records["cdni-k2-1dev"]["curves"]["test_error"]
            == records["cdni-k2-2dev"]["curves"]["test_error"])
    assert (out / "wallclock.png").stat().st_size > 0
    assert "k2-devices-beat-bprop" in (out / "table.md").read_text()
