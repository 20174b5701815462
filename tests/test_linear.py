"""The ``linear`` experiment (DNI Fig. 12): budget cells leave the preset cells' identity
alone, their schedule keeps the preset's shape, their claims name existing cells, and the
Fig. 12 verdicts read the preset cells only."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from experiments.__main__ import main
from experiments.dni import linear
from experiments.framework import Cell, CellResult


@pytest.mark.parametrize("preset", list(linear.PRESETS))
def test_preset_cells_keep_identity(preset):
    cfg = linear.PRESETS[preset]
    cells = linear.cells(preset)
    base = [c for c in cells if "steps" not in c.params]
    assert [c.id for c in base] == [f"mnist-fcn{d}-{m}" for d in cfg.depths for m in cfg.models]
    assert all(set(c.params) == {"depth", "model"} for c in base)
    budget = [c for c in cells if "steps" in c.params]
    assert [(c.params["depth"], c.params["model"], c.params["steps"]) for c in budget] == list(
        linear.BUDGET_CELLS[preset])
    assert len({c.id for c in cells}) == len(cells)


@pytest.mark.parametrize("preset", list(linear.PRESETS))
def test_claims_name_existing_cells(preset):
    ids = {c.id for c in linear.cells(preset)}
    claims = linear.claims(preset)
    assert len({c.id for c in claims}) == len(claims)
    for claim in claims:
        assert set(claim.cells) <= ids, claim.id


@pytest.mark.parametrize("steps", [60, 6_000, 12_000])
def test_budget_config_keeps_schedule_shape(steps):
    quick = linear.PRESETS["quick"].train
    cfg = linear.budget_config(quick, steps)
    assert cfg.steps == steps
    assert cfg.lr_boundaries == (steps * 6 // 10, steps * 8 // 10)
    assert cfg.steps // cfg.eval_every == quick.steps // quick.eval_every
    assert cfg.eval_every % cfg.chunk == 0
    same = ("steps", "lr_boundaries", "eval_every", "chunk")
    assert dataclasses.replace(cfg, **{k: getattr(quick, k) for k in same}) == quick


def _result(depth, model, metric, steps=None):
    params = {"depth": depth, "model": model} | ({} if steps is None else {"steps": steps})
    return CellResult(Cell(linear.cell_id(depth, model, steps), row="r", column="c",
                           params=params), metric, {}, {}, 0, 0.0, {})


def test_fig12_title_leaves_the_budget_claims_to_the_table():
    rs = [_result(3, m, v) for m, v in (("dni-linear", 3.0), ("cdni-linear", 2.0),
                                         ("dni-mlp", 2.5))]
    budget = _result(3, "dni-linear", 9.0, steps=6_000)
    title = linear.figures(rs + [budget], linear.PRESETS["quick"])["fig12"]._suptitle
    text = title.get_text().replace("\n", " ")
    for claim in ("linear-dni-trains-fcn3", "cdni-beats-dni-linear-fcn3",
                  "dni-mlp-no-worse-fcn3"):
        assert f"{claim}: holds" in text
    assert "6000" not in text  # budget claims (a worse budget cell) are table.md's


@pytest.mark.slow  # a training run end to end (the preset cell's smoke run is in test_dni_figures)
def test_smoke_budget_cell(tmp_path):
    (d, m, s), = linear.BUDGET_CELLS["smoke"]
    cell = linear.cell_id(d, m, s)
    assert main(["run", "linear", "--preset", "smoke", "--out", str(tmp_path),
                 "--only", cell]) == 0
    record = json.loads((tmp_path / "linear" / "smoke" / "cells" / f"{cell}.json").read_text())
    assert math.isfinite(record["metric"])
    assert record["metrics"]["sg_model"] == "linear"
