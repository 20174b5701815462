"""The two-networks experiment (DNI §3.3, Fig. 8): labels, verdicts, a smoke run."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.__main__ import main
from experiments.dni import two_networks as tn
from experiments.framework import Cell, CellResult
from experiments.framework.declare import Curve


@pytest.mark.parametrize("T", [2, 4])
def test_labels_against_a_python_loop(T):
    W, B = 3, 5
    digits = jax.random.randint(jax.random.key(T), (W * T * T, B), 0, 10)
    la, lb = tn.stream_labels(digits, T)
    d = np.asarray(digits)
    for k in range(W * T):
        end = (k + 1) * T
        np.testing.assert_array_equal(la[k], np.sum(d[end - T:end] % 2 == 1, axis=0))
        np.testing.assert_array_equal(lb[k], np.sum(d[max(end - T * T, 0):end] == 3, axis=0))
    assert int(jnp.max(la)) <= T and int(jnp.max(lb)) <= T * T


def _result(system, a_curve, b_final, a_final=None):
    steps = np.arange(1, len(a_curve) + 1)
    a_final = a_curve[-1] if a_final is None else a_final
    return CellResult(Cell(system, "r", system, {"system": system}), b_final,
                      {"a_error": a_final, "b_error": b_final, "steps_per_window": 16},
                      {"a_error": Curve(steps, np.asarray(a_curve, float))}, 0, 1.0, {})


@pytest.mark.parametrize("dni_a,dni_b,none_b,expected", [
    ([50, 20, 10, 10], 30.0, 60.0, (False, "holds", "holds")),  # A at e2e + 2 only at 3/4
    ([50, 11, 10, 10], 34.0, 60.0, (True, "holds", "holds")),  # at 2/4: half the steps
    ([50, 40, 30, 11], 40.0, 34.0, (False, "differs", "differs")),
])
def test_speed_and_the_figure_title_verdicts(dni_a, dni_b, none_b, expected):
    e2e = _result("e2e", [60, 50, 30, 10], 30.0)  # reaches its final + 2 at window 4
    dni = _result("dni", dni_a, dni_b)
    none = _result("none", [50, 20, 10, 10], none_b)
    v = tn.a_speed([e2e, dni, none])
    first = next(i for i, e in enumerate(dni_a) if e <= 12) + 1
    assert v["a_steps_to_target"] == {"e2e": 64, "dni": 16 * first, "none": 48,
                                      "target": 12.0}
    assert v["speed"] == expected[0] == (first <= 2)
    assert tn.a_speed([e2e]) == {"speed": None}
    title = tn.figures([e2e, dni, none], tn.PRESETS["quick"])["fig8"]._suptitle.get_text()
    speed = "holds" if expected[0] else "differs"
    assert f"A faster decoupled: {speed}" in title
    assert f"b-with-dni-matches-end-to-end: {expected[1]}" in title  # the declared claims
    assert f"b-without-dni-poor: {expected[2]}" in title


@pytest.mark.reproduce
def test_smoke_run(tmp_path):
    assert main(["run", "two-networks", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    out = tmp_path / "two-networks" / "smoke"
    for cell in tn.SYSTEMS:
        record = json.loads((out / "cells" / f"{cell}.json").read_text())
        assert math.isfinite(record["metric"])
        m = record["metrics"]
        assert {"a_error", "b_error", "a_updates", "b_updates", "b_chance_error"} <= set(m)
        T, windows = tn.PRESETS["smoke"].T, tn.PRESETS["smoke"].windows
        assert m["a_steps"] == windows * T * T and m["b_updates"] == windows
        assert m["a_updates"] == windows * (1 if cell == "e2e" else T)
    assert (out / "fig8.png").stat().st_size > 0
    assert "| row | column | paper | ours | diff |" in (out / "table.md").read_text()
