"""DNI Table 2 (recurrent DNI): data, curriculum, cells and a smoke run end to end."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sequences as S
from experiments.__main__ import main
from experiments.data import DatasetNotFoundError
from experiments.dni import table2 as T2
from experiments.framework import CellResult, Curve


def test_cells_and_paper_numbers():
    cells = T2.all_cells()
    assert len(cells) == 41
    by = {c.id: c for c in cells}
    assert by["repeatcopy-dniaux-T4"].paper == 67 and by["copy-bptt-T2"].paper == 7
    assert by["ptb-bptt-T40"].paper == 1.34 and by["ptb-dniaux-T8"].paper == 1.33
    assert "ptb-dni-T20" not in by and "copy-bptt-T8" not in by  # blank in the paper
    assert by["ptb-dniaux-T5"].column == "DNI + Aux T=5"
    with pytest.raises(ValueError, match="unknown method"):
        T2.make_feedback("sg", 8)


def test_readings_are_cells_and_trainer_options():
    assert T2.DEFAULT_READING == "consumed"
    assert T2.READINGS["paper"] == {"bootstrap": "unscaled", "aux_target": "model"}
    quick = {c.id: c for c in T2.cells("quick")}
    assert len(quick) == 41 + 8 + 4 + 2
    # the default reading is the one records made before readings existed used: no param
    assert quick["copy-dni-T2"].params == {"task": "copy", "method": "dni", "T": 2}
    assert "reading" not in quick["copy-bptt-T2"].params  # BPTT has no synthetic gradient
    other = quick["ptb-dniaux-T5-paper"]
    assert other.params["reading"] == "paper" and other.paper == 1.35
    assert other.column == "DNI + Aux T=5 (paper reading)"
    assert quick["copy-dniaux-T3-aux-model"].params["reading"] == "aux-model"
    assert "copy-dni-T3-aux-model" not in quick  # no Aux head: the same as consumed
    assert len(T2.cells("smoke")) == 41
    assert [c.id for c in T2.cells("long")] == ["copy-bptt-T2", "copy-dni-T2", "copy-dniaux-T2"]
    with pytest.raises(ValueError, match="unknown reading"):
        T2.make_cell("copy", "dni", 2, "scaled")


def test_budget_cells_carry_their_iterations():
    quick = {c.id: c for c in T2.cells("quick")}
    dni = quick["ptb-dni-T5-4k"]
    assert dni.params == {"task": "ptb", "method": "dni", "T": 5, "iterations": 4000}
    assert dni.paper is None and quick["ptb-dni-T5"].params == {"task": "ptb", "method": "dni",
                                                               "T": 5}
    assert "ptb-bptt-T5-4k" not in {c.id for c in T2.cells("smoke")}
    assert T2.ptb_iterations(T2.QUICK, 5, 4000) == (4000, T2.QUICK.eval_every)
    assert T2.ptb_iterations(T2.QUICK, 5) == (1000, 100)
    claim = {c.id: c for c in T2.claims("quick")}["ptb-dni-below-bptt-T5-4k"]
    assert claim.cells == ("ptb-dni-T5-4k", "ptb-bptt-T5-4k")
    with pytest.raises(ValueError, match="iterations"):
        T2.make_cell("copy", "dni", 2, iterations=4000)


def test_claims_numbers_orderings_and_tolerances():
    quick = {c.id: c for c in T2.claims("quick")}
    assert len([c for c in quick.values() if c.kind == "near"]) == 41  # one per Table 2 cell
    # tolerance: one curriculum level either side (Copy N ± 1; Repeat Copy 59 = N 8, R 7,
    # between 51 = N 8, R 6 and 67 = N 8, R 8) and 0.03 BPC
    assert quick["copy-dni-T2-t-task"].tolerance == 1.0
    assert quick["repeatcopy-dni-T5-t-task"].tolerance == 8.0
    assert quick["repeatcopy-bptt-T3-t-task"].paper == 5
    assert quick["ptb-bptt-T2-bpc"].tolerance == 0.03
    # T_task is higher-is-better: the better cell is the "higher" one of less()
    above = quick["copy-dni-above-bptt-T2"]
    assert above.cells == ("copy-bptt-T2", "copy-dni-T2") and above.tolerance == 1.0
    assert quick["ptb-dniaux-T5-reaches-bptt-T20"].cells == ("ptb-dniaux-T5", "ptb-bptt-T20")
    long = T2.claims("long")
    assert {cid for c in long for cid in c.cells} <= set(T2.LONG_CELLS)
    assert {c.id for c in long} >= {"copy-dni-above-bptt-T2", "copy-dniaux-above-bptt-T2"}
    assert T2.EXPERIMENT.claims_for("quick") == tuple(quick.values())


def test_curriculum_gives_table2_values():
    level, seen = S.Level(1, 1), []
    for _ in range(16):
        seen.append(S.t_task(level))
        level = S.next_level(level, repeat=True)
    # every Repeat Copy value in Table 2 is on this path (N first, then R, alternately)
    assert {5, 7, 19, 23, 33, 39, 59, 67} <= set(seen)
    assert seen[:5] == [4, 5, 7, 9, 12]
    assert S.next_level(S.Level(4, 1), repeat=False) == S.Level(5, 1)
    assert S.t_task(S.Level(4, 1)) == 7  # Copy BPTT T=2 in the paper: N = 4


def test_copy_episode_by_hand():
    task = S.CopyTask(repeat=True, alphabet=3, max_n=4)
    st = S.init_stream(task, jax.random.key(0), 1, S.Level(2, 2))
    st, (x, (y, m), reset, current) = S.copy_chunk(task, st, jnp.array([2, 2]), 9)
    a, b = (int(v) for v in st.symbols[0, :2])
    _, (_, _, next_reset, _) = S.copy_step(task, st, jnp.array([2, 2]))
    assert S.episode_length(2, 2) == 9  # N + 1 + 1 + NR + 1
    np.testing.assert_array_equal(x[0, 0, :3], np.eye(3)[a])
    np.testing.assert_array_equal(x[1, 0, :3], np.eye(3)[b])
    assert x[2, 0, 3] == 1.0 and x[3, 0, 4] == pytest.approx(2 / S.R_SCALE)
    assert float(jnp.abs(x[4:9]).sum()) == 0.0  # nothing to read while answering
    assert y[4:9, 0].tolist() == [a, b, a, b, 3] and m[:, 0].tolist() == [0] * 4 + [1] * 5
    assert reset[:, 0].tolist() == [True] + [False] * 8
    assert bool(next_reset[0])  # a new episode at step 10
    assert bool(current.all())
    with pytest.raises(ValueError, match="R=3"):
        S.init_stream(S.CopyTask(repeat=False), jax.random.key(0), 1, S.Level(1, 3))


def test_ptb_streams_and_missing_data(tmp_path):
    seq = np.arange(23)
    w = S.ptb_streams(seq, 2, 3)  # 2 streams of 11, 3 chunks of 3 (+1 overlap)
    assert w.shape == (3, 4, 2)
    assert w[:, :, 0].tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert w[0, :, 1].tolist() == [11, 12, 13, 14]
    with pytest.raises(ValueError, match="cannot fill"):
        S.ptb_streams(seq, 20, 3)
    with pytest.raises(DatasetNotFoundError, match="ptb.train.txt") as info:
        S.load_ptb(tmp_path, download=False)
    assert str(tmp_path / "ptb") in str(info.value) and "SGJAX_DATA_DIR" in str(info.value)
    (tmp_path / "ptb").mkdir()
    # the word files; the character stream spells each word, "_" between words, <eos>
    for split, text in ((" train", " a c \n b a\n"), ("valid", " a c \n"), ("test", " b \n")):
        (tmp_path / "ptb" / f"ptb.{split.strip()}.txt").write_text(text)
    ptb = S.read_ptb(tmp_path / "ptb")
    assert ptb.vocab == ("<eos>", "_", "a", "b", "c")
    assert ptb.train.tolist() == [2, 1, 4, 0, 3, 1, 2, 0] and ptb.test.tolist() == [3, 0]


def _result(cid, T, bpc, seconds):
    cell = next(c for c in T2.cells("quick") if c.id == cid)
    steps = np.array([10, 20, 30])
    return CellResult(cell, bpc[-1], {}, {"valid_bpc": Curve(steps, np.array(bpc)),
                                          "seconds": Curve(steps, np.array(seconds))},
                      0, 1.0, {"config": {"ptb_batch": 4}})


def test_headline_samples_and_seconds_to_target():
    a = _result("ptb-dniaux-T5", 5, [2.0, 1.5, 1.4], [1.0, 2.0, 3.0])
    b = _result("ptb-bptt-T20", 20, [2.5, 1.8, 1.5], [4.0, 8.0, 12.0])
    h = T2.headline([a, b])
    assert h["target_bpc"] == 1.5
    assert h["dniaux_T5"]["iterations"] == 20 and h["dniaux_T5"]["samples"] == 20 * 5 * 4
    assert h["bptt_T20"]["samples"] == 30 * 20 * 4
    assert h["data_ratio"] == pytest.approx(400 / 2400)
    assert h["speedup"] == pytest.approx(12.0 / 2.0)
    assert h["common"]["target_bpc"] == 1.5  # both reach 1.4 < 1.5: the same target
    assert "17 %" in T2.headline_markdown([a, b])
    slow = _result("ptb-dniaux-T5", 5, [2.0, 1.9, 1.8], [1.0, 2.0, 3.0])
    h = T2.headline([slow, b])
    assert h["dniaux_T5"] is None and "data_ratio" not in h
    assert h["common"]["target_bpc"] == 1.8 and h["common"]["bptt_T20"]["iterations"] == 20
    assert "not reached" in T2.headline_markdown([slow, b])
    assert T2.headline([a]) is None


def test_table2_figures_show_the_default_reading_and_readings_png_compares():
    pytest.importorskip("matplotlib")
    consumed = _result("ptb-dni-T3", 3, [3.0, 2.8, 2.6], [1.0, 2.0, 3.0])
    paper = _result("ptb-dni-T3-paper", 3, [4.0, 3.6, 3.4], [1.0, 2.0, 3.0])
    figs = T2.figures([consumed, paper], T2.QUICK)
    top = figs["fig14"].axes[0]
    assert [line.get_label() for line in top.lines] == ["DNI, T = 3 (2.600; paper 1.36)"]
    labels = [line.get_label() for line in figs["readings"].axes[2].lines]
    assert labels == ["DNI, T = 3, consumed reading (2.600)", "DNI, T = 3, paper reading (3.400)"]
    assert "readings" not in T2.figures([consumed], T2.QUICK)


@pytest.mark.reproduce
@pytest.mark.usefixtures("monkeypatch")
def test_smoke_cells_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    S.load_ptb()  # skips (conftest) with the loader's message when PTB is not available
    only = ["copy-dniaux-T2", "ptb-bptt-T20"]
    assert main(["run", "table2", "--preset", "smoke", "--out", str(tmp_path),
                 "--only", *only]) == 0
    out = tmp_path / "table2" / "smoke"
    copy = json.loads((out / "cells" / "copy-dniaux-T2.json").read_text())
    assert copy["metric"] >= 0 and copy["metrics"]["iterations"] == T2.SMOKE.copy_iterations
    assert "t_task" in copy["curves"]
    ptb = json.loads((out / "cells" / "ptb-bptt-T20.json").read_text())
    assert 0 < ptb["metric"] < 10 and "valid_bpc" in ptb["curves"]
    assert ptb["curves"]["valid_bpc"]["step"] == [3, 6]
    table = (out / "table.md").read_text()
    assert "| Penn Treebank | DNI + Aux T=5 | 1.35 |" in table
    assert "| Repeat Copy | DNI T=5 | 59 | missing (not run) | — |" in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 41 and sum(r["status"] == "done" for r in rows) == 2
    for name in ("fig7-right", "fig14", "fig15"):
        assert (out / f"{name}.png").stat().st_size > 1000, name
    assert not (out / "fig7-left.png").exists()  # Fig. 7 left is Repeat Copy: none ran
