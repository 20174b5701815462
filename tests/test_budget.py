"""experiments/dni/budget.py: Table 1's DNI cells against budget (issue: does DNI's gap
to the paper close with training?)."""

from __future__ import annotations

import pytest

from experiments import registry
from experiments.dni import budget as B
from experiments.dni import table1
from experiments.framework import CellResult


def test_registered_with_every_preset():
    assert registry.load_module("experiments.dni.budget") is B.EXPERIMENT
    ids = [c.id for c in B.cells("quick")]
    assert ids == ["mnist-fcn3-dni-5000-lr3e-04", "mnist-fcn3-dni-20000-lr3e-04",
                   "mnist-fcn6-dni-5000-lr3e-04", "mnist-fcn6-dni-10000-lr3e-04",
                   "mnist-fcn3-dni-5000-lr1e-04", "mnist-fcn3-dni-5000-lr1e-03",
                   "mnist-fcn6-dni-5000-lr1e-04", "mnist-fcn6-dni-10000-lr1e-04",
                   "mnist-fcn3-nobprop-5000-lr3e-04", "mnist-fcn3-nobprop-20000-lr3e-04",
                   "mnist-fcn6-nobprop-5000-lr3e-04", "mnist-fcn6-nobprop-20000-lr3e-04",
                   "mnist-fcn4-nobprop-5000-lr3e-04", "mnist-fcn4-nobprop-20000-lr3e-04",
                   "mnist-fcn5-nobprop-5000-lr3e-04", "mnist-fcn5-nobprop-20000-lr3e-04"]
    # Table 1's DNI at 3 and 6 layers, and its No Bprop at 3 to 6
    assert {(B.method_of(c), c.paper) for c in B.cells("quick")} == {
        ("dni", 1.9), ("dni", 4.3), ("nobprop", 9.3), ("nobprop", 12.6), ("nobprop", 16.2),
        ("nobprop", 21.4)}
    assert len(B.cells("paper")) == 2 * 3 * 2 + 4 * 3


def test_nobprop_cells_leave_the_dni_cells_identity_alone():
    """The No Bprop cells are listed outside Config, and DNI cells carry no ``method``
    param, so the committed DNI records still match their cells."""
    assert "nobprop" not in repr(B.PRESETS["quick"])
    for c in B.cells("quick"):
        expected = {"depth", "steps", "lr"} | ({"method"} if B.method_of(c) == "nobprop"
                                                else set())
        assert set(c.params) == expected


@pytest.mark.parametrize("steps", [5_000, 20_000, 50_000])
def test_each_budget_has_the_papers_schedule_shape(steps):
    cfg = B.PRESETS["quick"].train(steps, 3e-4)
    assert cfg.lr_boundaries == (steps * 3 // 5, steps * 4 // 5)  # 300k/400k of 500k
    assert cfg.steps == steps and cfg.lr == 3e-4 and cfg.lr_factor == 0.1
    assert cfg.eval_every == steps // 20 and steps % cfg.chunk == 0
    # the quick 5k cell is exactly Table 1's quick MNIST FCN DNI cell
    if steps == 5_000:
        assert dataclasses_equal(cfg, table1.QUICK, ignore=("eval_every", "chunk", "blocks"))


def dataclasses_equal(a, b, ignore):
    import dataclasses
    return all(getattr(a, f.name) == getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name not in ignore)


def test_bad_grid_is_a_clear_error():
    with pytest.raises(ValueError, match=r"bad \(depth, steps\) \(7, 5000\)"):
        B.Config(base=table1.QUICK, grid=((7, 5_000),))
    with pytest.raises(ValueError, match=r"bad \(depth, steps\) \(3, 5\)"):
        B.Config(base=table1.QUICK, grid=((3, 5_000),), lr_sweep=((3, 5, 1e-4),))


def test_lr_sweep_adds_single_cells_without_duplicating_the_grid():
    cfg = B.Config(base=table1.QUICK, grid=((3, 5_000),), lrs=(3e-4, 1e-4),
                   lr_sweep=((3, 5_000, 1e-4), (6, 5_000, 1e-3)))
    assert cfg.cells() == ((3, 5_000, 3e-4), (3, 5_000, 1e-4), (6, 5_000, 1e-3))


def _result(depth, steps, metric, lr=3e-4):
    cell = next(c for c in B.cells("paper")
                if c.params == {"depth": depth, "steps": steps, "lr": lr})
    return CellResult(cell=cell, metric=metric, metrics={}, curves={}, seed=0,
                      wall_time_s=1.0, record={})


def test_effects_say_how_much_of_the_gap_closes():
    closing = B.effects([_result(3, 5_000, 3.9), _result(3, 50_000, 2.9)])
    (claim, effect), = closing.items()
    assert claim == "3 layers, Adam 0.0003: 5k→50k steps"
    assert effect == "3.90 → 2.90 %, paper 1.9; 50 % of the gap closed"
    assert B.effects([_result(6, 5_000, 10.0)]) == {}  # one budget: nothing to say


def test_effects_name_the_best_learning_rate_at_one_budget():
    v = B.effects([_result(3, 5_000, 3.0), _result(3, 5_000, 2.5, lr=1e-4)])
    assert v == {"3 layers, 5k steps: learning rate":
                 "best Adam 0.0001 (0.0001: 2.50 %, 0.0003: 3.00 %; paper 1.9 after 500k)"}


def test_claims_read_every_cell_and_each_budget_pair():
    claims = {c.id: c for c in B.claims("quick")}
    for cell in B.cells("quick"):
        assert claims[cell.id].kind == "near" and claims[cell.id].paper == cell.paper
    closes = claims["fcn6-lr3e-04-closes-with-budget"]
    assert closes.kind == "less"
    assert closes.cells == ("mnist-fcn6-dni-10000-lr3e-04", "mnist-fcn6-dni-5000-lr3e-04")
    assert "reports/degradation" in closes.cause
    assert "fcn3-lr1e-03-closes-with-budget" not in claims  # one budget: nothing to compare
    nobprop = claims["fcn3-nobprop-lr3e-04-closes-with-budget"]
    assert nobprop.cells == ("mnist-fcn3-nobprop-20000-lr3e-04",
                             "mnist-fcn3-nobprop-5000-lr3e-04")
    assert claims["mnist-fcn6-nobprop-5000-lr3e-04"].cause.startswith("budget")
    assert len([c for c in B.claims("paper") if c.kind == "less"]) == 4 + 4


def test_effects_keep_no_bprop_apart_from_dni():
    nob = [CellResult(cell=c, metric=m, metrics={}, curves={}, seed=0, wall_time_s=1.0,
                      record={})
           for c, m in zip([c for c in B.cells("quick") if B.method_of(c) == "nobprop"
                            and c.params["depth"] == 3], (11.0, 10.0))]
    v = B.effects([_result(3, 5_000, 3.9), _result(3, 20_000, 2.9), *nob])
    assert v["3 layers, Adam 0.0003: 5k→20k steps"].startswith("3.90 → 2.90")
    assert v["No Bprop, 3 layers, Adam 0.0003: 5k→20k steps"].startswith(
        "11.00 → 10.00 %, paper 9.3")
