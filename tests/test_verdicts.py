"""Claims and verdicts: declared claims, verdicts computed from cell records, the verdict
column of table.md and the generated reports/README.md."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from experiments.framework import Cell, CellResult, Claim, Experiment
from experiments.framework import reports as R
from experiments.framework import verdicts as V

CELLS = [Cell("a", "A", "x", paper=1.0), Cell("b", "B", "x", paper=2.0),
         Cell("c", "C", "x")]
WORDS = "\"the paper's sentence\""


def experiment(claims=(), cells=CELLS, name="vtoy") -> Experiment:
    return Experiment(name=name, paper="DNI (Jaderberg et al. 2016)", title="verdict toy",
                      metric="error (%)", cells=cells,
                      presets={"smoke": {}, "quick": {}, "paper": {}},
                      run_cell=lambda cell, config, ctx: 0.0, claims=claims)


def result(cell: Cell, metric: float, **record) -> CellResult:
    metrics = record.pop("metrics", {})
    rec = {"metric": metric, "metrics": metrics, "seed": 0, "wall_time_s": 1.0, **record}
    return CellResult(cell, metric, metrics, {}, 0, 1.0, rec)


def found(**values) -> dict:
    by = {c.id: c for c in CELLS}
    out = {c.id: "missing (not run)" for c in CELLS}
    for cid, v in values.items():
        out[cid] = v if isinstance(v, CellResult) else result(by[cid], v)
    return out


@pytest.mark.parametrize("claim, values, status", [
    (Claim.near("n", WORDS, "a", 1.0, 0.5), {"a": 1.4}, "holds"),
    (Claim.near("n", WORDS, "a", 1.0, 0.5), {"a": 1.6}, "differs"),
    (Claim.near("n", WORDS, "a", 1.0, 0.5), {"a": 0.4}, "differs"),
    (Claim.near("n", WORDS, "a", 1.0, 0.5), {"b": 1.0}, "not run"),
    (Claim.near("n", WORDS, "a", 1.0, 0.5), {"a": float("nan")}, "differs"),
    (Claim.at_most("m", WORDS, "a", 3.0), {"a": 3.0}, "holds"),
    (Claim.at_most("m", WORDS, "a", 3.0), {"a": 3.1}, "differs"),
    (Claim.less("l", WORDS, "a", "b"), {"a": 1.0, "b": 2.0}, "holds"),
    (Claim.less("l", WORDS, "a", "b"), {"a": 2.0, "b": 1.0}, "differs"),
    (Claim.less("l", WORDS, "a", "b", margin=1.5), {"a": 1.0, "b": 2.0}, "differs"),
    (Claim.less("l", WORDS, "a", "b", margin=-0.5), {"a": 2.4, "b": 2.0}, "holds"),
    (Claim.less("l", WORDS, "a", "b"), {"a": 1.0}, "not run"),
])
def test_verdict_from_records(claim, values, status):
    v = V.check(claim, found(**values))
    assert v.status == status
    assert v.values == tuple(values.get(c) for c in claim.cells)


def test_key_reads_a_metric_and_a_missing_key_is_not_run():
    a = CELLS[0]
    claim = Claim.at_most("k", WORDS, "a", 0.5, key="train_error")
    assert V.check(claim, found(a=result(a, 99.0, metrics={"train_error": 0.4}))).status \
        == "holds"
    assert V.check(claim, found(a=result(a, 0.0, metrics={"train_error": 0.6}))).status \
        == "differs"
    missing = V.check(claim, found(a=result(a, 0.0)))
    assert missing.status == "not run" and "train_error" in missing.ours


def test_partial_never_holds():
    a = CELLS[0]
    partial = result(a, 4.6, partial=True, last_step=80_000)
    v = V.check(Claim.near("p", WORDS, "a", 4.3, 0.5), found(a=partial))
    assert v.status == "partial" and v.would == "holds"
    assert v.ours == "4.6 (partial, 80k)" and v.text == "partial (holds so far)"
    v = V.check(Claim.at_most("p", WORDS, "a", 1.0), found(a=partial))
    assert v.status == "partial" and v.text == "partial (differs so far)"


@pytest.mark.parametrize("claims, message", [
    ([Claim.near("x", WORDS, "nope", 1, 0)], "unknown cell(s) ['nope']"),
    ([Claim.near("x", WORDS, "a", 1, 0), Claim.at_most("x", WORDS, "b", 1)],
     "duplicate claim ids ['x']"),
    (lambda preset: [Claim.less("y", WORDS, "a", "zz")], "unknown cell(s) ['zz']"),
])
def test_claim_validation_is_one_clear_value_error(claims, message):
    with pytest.raises(ValueError, match="vtoy") as info:
        experiment(claims)
    assert message in str(info.value)


def test_claims_may_read_cells_of_another_preset():
    def cells(preset):
        return CELLS if preset == "paper" else CELLS[:2]

    exp = experiment([Claim.near("c", WORDS, "c", 1, 0)], cells=cells)
    assert V.check_all(exp, "quick", {c.id: "missing (not run)" for c in CELLS[:2]})[0].status \
        == "not run"


@pytest.mark.parametrize("bad", [
    dict(kind="near", cells=("a",), paper=None),
    dict(kind="less", cells=("a",)),
    dict(kind="bigger", cells=("a",), paper=1.0),
    dict(kind="near", cells=("a",), paper=1.0, tolerance=-1.0),
])
def test_bad_claims_are_refused(bad):
    with pytest.raises(ValueError, match="claim 'z'"):
        Claim("z", WORDS, **bad)


def test_table_md_has_a_verdict_column_and_a_claims_section():
    exp = experiment([Claim.near("a-near", WORDS, "a", 1.0, 0.5, cause="budget: x"),
                      Claim.less("a-beats-b", WORDS, "a", "b")])
    table = R.render_table(exp, "quick", found(a=2.0, b=2.5))
    assert "| row | column | paper | ours | diff | verdict |" in table
    assert "| A | x | 1 | 2 | +1 | differs (a-near); holds (a-beats-b) |" in table
    assert "| C | x | — | missing (not run) | — |  |" in table
    assert "## Claims" in table
    # both verdicts are decided by under one point from one seed: said next to them
    assert (f"| a-near | {WORDS} | 1 ± 0.5 | 2 | **differs**, margin -0.50 points from 1 "
            "seed: needs 3 seeds | budget: x |") in table
    assert "| a-beats-b | " in table and ("| a < b | 2 vs 2.5 | **holds**, margin +0.50 "
                                          "points from 1 seed: needs 3 seeds | — |") in table
    far = R.render_table(exp, "quick", found(a=5.0, b=7.5))
    assert f"| a-near | {WORDS} | 1 ± 0.5 | 5 | **differs** | budget: x |" in far
    plain = R.render_table(experiment(), "quick", found(a=2.0))
    assert "| row | column | paper | ours | diff |\n" in plain and "Claims" not in plain


def _write_report(directory, exp, preset, values, partial=None):
    """A committed report as publish_report leaves one, without cells/ (results.csv)."""
    directory.mkdir(parents=True)
    with (directory / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["experiment", "preset", "cell", "row", "column", "status", "paper",
                    "ours", "diff", "seed", "wall_time_s", "partial", "last_step",
                    "train_error"])
        for cell in exp.cells_for(preset):
            if cell.id in values:
                flags = ["True", 80000] if cell.id == partial else ["", ""]
                w.writerow([exp.name, preset, cell.id, cell.row, cell.column, "done",
                            cell.paper, values[cell.id], "", 0, 2.0, *flags, 0.1])
            else:
                w.writerow([exp.name, preset, cell.id, cell.row, cell.column,
                            "missing (not run)", cell.paper, "", "", "", "", "", "", ""])
    prov = {"experiment": exp.name, "preset": preset, "commits": ["abc"], "dates": [],
            "machines": ["a CPU"], "seeds": [0], "cells_done": len(values),
            "wall_time_s": 2.0 * len(values)}
    (directory / "provenance.json").write_text(json.dumps(prov))


def test_reports_readme_is_generated_from_reports(tmp_path):
    exp = experiment([Claim.near("a-near", WORDS, "a", 1.0, 0.5, cause="budget: x"),
                      Claim.less("a-beats-b", WORDS, "a", "b"),
                      Claim.at_most("c-small", WORDS, "c", 1.0)])
    other = experiment(name="noclaims")
    _write_report(tmp_path / "vtoy", exp, "quick", {"a": 2.0, "b": 3.0})
    _write_report(tmp_path / "vtoy" / "paper", exp, "paper", {"a": 1.2, "b": 3.0},
                  partial="a")
    path = R.write_index(tmp_path, [exp, other])
    text = path.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| DNI |")]
    assert len(rows) == 4
    near, less, at_most, none = rows
    assert near.startswith(f"| DNI | vtoy | a-near: {WORDS} | 1 ± 0.5 | 2: differs | "
                           "1.2 (partial, 80k): partial (holds so far) | "
                           "**partial (holds so far)** (paper) | budget: x |")
    assert "[vtoy](vtoy/table.md#claims), [paper](vtoy/paper/table.md#claims)" in near
    assert "| 2 vs 3: holds | 1.2 (partial, 80k) vs 3: partial (holds so far) |" in less
    assert "| not run | not run | not run |" in at_most
    assert "| noclaims | no claims declared |" in none
    assert "| [vtoy](vtoy/table.md) | 2 |" in text and "| [vtoy/paper](vtoy/paper/table.md)" \
        in text
    # re-rendering table.md from what is committed (results.csv and provenance.json)
    written = R.rerender_reports(tmp_path, [exp, other])
    assert tmp_path / "vtoy" / "table.md" in written
    assert tmp_path / "vtoy" / "paper" / "table.md" in written
    table = (tmp_path / "vtoy" / "table.md").read_text()
    assert "| A | x | 1 | 2 | +1 | differs (a-near); holds (a-beats-b) |" in table
    assert "Measured on: a CPU" in table and "2/3 done" in table
    paper = (tmp_path / "vtoy" / "paper" / "table.md").read_text()
    assert "| A | x | 1 | 1.2 (partial, 80k) | +0.2 |" in paper


def test_reports_readme_shows_the_version_of_a_claim_its_verdict_read(tmp_path):
    """Presets may declare one claim id on different cells: the row gives the words and
    number of the version the verdict was computed from; a claim no run can judge yet says
    which preset declares it and the command that runs it."""
    def claims(preset):
        lower = "c" if preset == "paper" else "a"
        extra = [Claim.at_most("only-paper", WORDS, "c", 1.0)] if preset == "paper" else []
        return [Claim.less("closes", WORDS, lower, "b"), *extra]

    exp = experiment(claims)
    _write_report(tmp_path / "vtoy", exp, "quick", {"a": 2.0, "b": 3.0})
    rows = [line for line in R.write_index(tmp_path, [exp]).read_text().splitlines()
            if line.startswith("| DNI |")]
    closes, only_paper = rows
    assert f"| closes: {WORDS} | a < b | 2 vs 3: holds | not run | **holds** (quick) |" \
        in closes
    assert ("| not run | declared at the `paper` preset only; waits for "
            "`python -m experiments run vtoy --preset paper` |") in only_paper


def test_publish_report_for_the_paper_preset_keeps_the_quick_report(tmp_path, monkeypatch):
    from experiments.framework import store

    exp = experiment([Claim.near("a-near", WORDS, "a", 1.0, 0.5)])
    results = tmp_path / "results"
    for preset in ("quick", "paper"):
        cells_dir = results / exp.name / preset / "cells"
        cells_dir.mkdir(parents=True)
        for cell in exp.cells_for(preset)[:1]:
            identity = store.cell_identity(exp, preset, cell, 0)
            rec = {**identity, "metric": 1.1 if preset == "paper" else 3.0, "metrics": {},
                   "wall_time_s": 1.0, "curves": {}}
            (cells_dir / f"{cell.id}.json").write_text(json.dumps(rec))
    reports = tmp_path / "reports"
    monkeypatch.setattr(R, "_save_figures", lambda *a, **k: [])
    assert R.publish_report(exp, results, reports_root=reports) == reports / exp.name
    assert R.publish_report(exp, results, preset="paper", reports_root=reports) \
        == reports / exp.name / "paper"
    assert R.publish_report(exp, results, reports_root=reports) == reports / exp.name
    assert "**holds**" in (reports / exp.name / "paper" / "table.md").read_text()
    assert "**differs**" in (reports / exp.name / "table.md").read_text()
    with pytest.raises(ValueError, match="no preset 'long'"):
        R.publish_report(exp, results, preset="long", reports_root=reports)


def test_a_partial_record_is_published_and_shown_as_partial(tmp_path, monkeypatch):
    from experiments.framework import store

    exp = experiment([Claim.near("a-near", WORDS, "a", 4.3, 0.5),
                      Claim.at_most("b-small", WORDS, "b", 9.0)])
    cells_dir = tmp_path / "results" / exp.name / "paper" / "cells"
    cells_dir.mkdir(parents=True)
    identity = store.cell_identity(exp, "paper", CELLS[0], 0)
    partial = {**identity, "curves": {"test_error": {"step": [5000, 80000],
                                                     "value": [8.0, 4.6]}},
               "wall_time_s": 60.0, "partial": True, "last_step": 80000}
    (cells_dir / "a.json").write_text(json.dumps(partial))
    finished = {**store.cell_identity(exp, "paper", CELLS[1], 0), "metric": 10.0,
                "metrics": {}, "curves": {}, "wall_time_s": 1.0}
    (cells_dir / "b.json").write_text(json.dumps(finished))
    monkeypatch.setattr(R, "_save_figures", lambda *a, **k: [])
    dest = R.publish_report(exp, tmp_path / "results", preset="paper",
                            reports_root=tmp_path / "reports")
    assert sorted(p.name for p in (dest / "cells").iterdir()) == ["a.json", "b.json"]
    table = (dest / "table.md").read_text()
    assert "1/3 done, 1 partial" in table
    assert "| A | x | 1 | 4.6 (partial, 80k) | +3.6 | partial (holds so far) (a-near) |" \
        in table
    assert "| B | x | 2 | 10 | +8 | differs (b-small) |" in table
    rows = {row["cell"]: row for row in csv.DictReader((dest / "results.csv").open())}
    assert rows["a"]["status"] == "partial" and rows["a"]["ours"] == "4.6"
    assert rows["a"]["last_step"] == "80000"
    # a later finished run replaces it; a later partial one does not replace a finished one
    (cells_dir / "a.json").write_text(json.dumps(
        {**identity, "metric": 4.4, "metrics": {}, "curves": {}, "wall_time_s": 9.0}))
    R.publish_report(exp, tmp_path / "results", preset="paper",
                     reports_root=tmp_path / "reports")
    (cells_dir / "a.json").write_text(json.dumps(partial))
    R.publish_report(exp, tmp_path / "results", preset="paper",
                     reports_root=tmp_path / "reports")
    assert "| A | x | 1 | 4.4 | +3.4 | holds (a-near) |" in (dest / "table.md").read_text()


def test_keys_index_into_lists_and_less_compares_two_numbers_of_one_cell():
    a = CELLS[0]
    r = result(a, 0.0, metrics={"norms": [0.2, 0.5, 1.0],
                                "snapshots": [{"fidelity": [0.1]}, {"fidelity": [0.9, 0.3]}]})
    rising = Claim.less("r", WORDS, "a", "a", key=("norms[0]", "norms[-1]"))
    assert rising.paper_text == "a norms[0] < a norms[-1]"
    v = V.check(rising, found(a=r))
    assert (v.status, v.values) == ("holds", (0.2, 1.0))
    assert V.cell_verdicts((v,)) == {"a": "holds (r)"}
    falling = Claim.less("f", WORDS, "a", "a", key=("norms[-1]", "norms[0]"))
    assert V.check(falling, found(a=r)).status == "differs"
    deep = Claim.at_most("d", WORDS, "a", 0.5, key="snapshots[-1].fidelity[1]")
    assert V.check(deep, found(a=r)).values == (0.3,)
    assert V.check(Claim.at_most("x", WORDS, "a", 1, key="norms[7]"), found(a=r)).status \
        == "not run"


@pytest.mark.parametrize("kwargs, message", [
    (dict(lower="a", higher="a"), "compares 'a' with itself"),
    (dict(lower="a", higher="b", key=("x",)), "pair of them only for less"),
])
def test_bad_comparisons_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Claim.less("z", WORDS, **kwargs)


def test_other_seeds_are_repeats_averaged_into_one_verdict(tmp_path, monkeypatch):
    """``--seed N`` writes under ``seeds/N/`` (seed 0's record stays); tables, verdicts, the
    CSV and the published report give the mean over the seeds with their range, and a
    verdict decided by under one point stops asking for seeds once it has three."""
    from experiments import framework
    from experiments.framework import store

    def run_cell(cell, config, ctx):
        return {"metric": {"a": 1.7, "b": 5.0}[cell.id] + 0.2 * ctx.seed,
                "score": float(ctx.seed)}

    exp = Experiment(name="vseeds", paper="DNI (Jaderberg et al. 2016)", title="seeds toy",
                     metric="error (%)", cells=CELLS[:2],
                     presets={"smoke": {}, "quick": {}, "paper": {}},
                     run_cell=run_cell, claims=[Claim.near("a-near", WORDS, "a", 1.0, 0.5),
                                                Claim.near("b-near", WORDS, "b", 1.0, 0.5)])
    monkeypatch.setattr(R, "_save_figures", lambda *a, **k: [])
    out = tmp_path / "results"
    framework.run_experiment(exp, "quick", out=out, echo=False)
    one = V.check_all(exp, "quick", store.load_results(exp, "quick", out / "vseeds" / "quick"))
    assert one[0].needs_seeds and "margin -0.20 points from 1 seed" in one[0].note
    assert not one[1].needs_seeds  # 3.5 points off: one seed settles it
    for seed in (1, 2):
        framework.run_experiment(exp, "quick", out=out, seed=seed, echo=False)
    base = out / "vseeds" / "quick"
    assert json.loads((base / "cells" / "a.json").read_text())["seed"] == 0
    assert json.loads((base / "seeds" / "2" / "cells" / "a.json").read_text())["seed"] == 2
    found = store.load_results(exp, "quick", base)
    a = found["a"]
    assert a.metric == pytest.approx(1.9) and a.metrics["score"] == pytest.approx(1.0)
    assert V.describe_value(a, None) == "1.9 (3 seeds, 1.7–2.1)"
    v = V.check_all(exp, "quick", found)[0]
    assert v.status == "differs" and v.seeds == 3 and not v.needs_seeds and v.note == ""
    dest = R.publish_report(exp, out, reports_root=tmp_path / "reports")
    record = json.loads((dest / "cells" / "a.json").read_text())
    assert [r["seed"] for r in record["other_seeds"]] == [1, 2]
    table = (dest / "table.md").read_text()
    assert "| A | x | 1 | 1.9 (3 seeds, 1.7–2.1) | +0.9 | differs (a-near) |" in table
    assert "seeds: 0, 1, 2" in table
    again = R.load_report(exp, "quick", dest)["a"]
    assert again.metric == pytest.approx(1.9)
    rows = {row["cell"]: row for row in csv.DictReader((dest / "results.csv").open())}
    assert rows["a"]["seed"] == "0 1 2" and float(rows["a"]["ours"]) == pytest.approx(1.9)
    # a repeat that ran another config is not a repeat of seed 0's cell
    stale = json.loads((base / "seeds" / "1" / "cells" / "a.json").read_text())
    (base / "seeds" / "1" / "cells" / "a.json").write_text(
        json.dumps({**stale, "config": {"changed": 1}}))
    a = store.load_results(exp, "quick", base)["a"]
    assert [r["seed"] for r in a.record["other_seeds"]] == [2]
    assert V.describe_value(a, None) == "1.9 (2 seeds, 1.7–2.1)"


def test_curves_of_a_cell_with_seeds_are_their_pointwise_mean():
    """A figure draws a 3-seed cell's curve as the seeds' mean, so its line ends at the
    number its legend and table give; a curve the seeds logged at different steps stays
    the cell's own seed's."""
    from experiments.framework import store

    def run(seed, error, loss_steps):
        return {"seed": seed, "metric": error[-1], "metrics": {},
                "curves": {"test_error": {"step": [0, 10], "value": error},
                           "loss": {"step": loss_steps, "value": [1.0, 0.5]}}}

    record = {**run(0, [9.0, 3.0], [0, 10]),
              "other_seeds": [run(1, [7.0, 2.0], [0, 10]), run(2, [8.0, 7.0], [0, 20])]}
    r = store.to_result(CELLS[0], record)
    np.testing.assert_allclose(r.curves["test_error"].value, [8.0, 4.0])
    assert r.curves["test_error"].value[-1] == pytest.approx(r.metric)
    np.testing.assert_array_equal(r.curves["test_error"].step, [0, 10])
    np.testing.assert_array_equal(r.curves["loss"].value, [1.0, 0.5])
    assert store.to_result(CELLS[0], {**record, "other_seeds": []}).curves[
        "test_error"].value[-1] == 3.0


def test_judge_checks_each_claim_on_the_cells_a_figure_has():
    """What a figure prints: each claim id once, in the version (preset) whose cells are all
    among the results, computed by :func:`check`; ids without their cells are left out."""
    def claims(preset):
        cell = "c" if preset == "smoke" else "a"
        return [Claim.near("x", WORDS, cell, 1.0, 0.5), Claim.less("y", WORDS, "a", "b")]

    exp = experiment(claims)
    v, = V.judge(exp, [result(CELLS[0], 1.2)])
    assert v.claim.cells == ("a",) and v.text == "holds"
    both = V.judge(exp, [result(CELLS[0], 1.2), result(CELLS[1], 0.5)])
    assert [(w.claim.id, w.text) for w in both] == [("x", "holds"), ("y", "differs")]
    assert V.title_line(both, width=12) == "x: holds;\ny: differs"
    assert V.judge(exp, [result(CELLS[0], 1.2)], lambda c: c.id != "x") == ()


def test_a_cell_that_averages_its_own_networks_counts_them_as_seeds():
    """The blog's post arm trains 3 networks per cell and reports their mean
    (``metrics["seeds"] = 3``): a close verdict on it is already a 3-seed mean."""
    a = CELLS[0]
    claim = Claim.near("n", WORDS, "a", 1.0, 0.5)
    one = V.check(claim, found(a=result(a, 1.3)), points=True)
    three = V.check(claim, found(a=result(a, 1.3, metrics={"seeds": 3})), points=True)
    assert (one.seeds, one.needs_seeds) == (1, True)
    assert (three.seeds, three.needs_seeds, three.note) == (3, False, "")
    assert not V.check(claim, found(a=result(a, 1.3)), points=False).needs_seeds  # not %


def test_repeats_alone_join_the_committed_cells_they_repeat(tmp_path, monkeypatch):
    """A fresh checkout has the committed report but no results/: running only
    ``--seed 1`` and ``--seed 2`` and publishing adds them to the committed cells."""
    from experiments import framework

    def run_cell(cell, config, ctx):
        return 1.0 + ctx.seed

    exp = Experiment(name="vrepeat", paper="DNI (Jaderberg et al. 2016)", title="repeats",
                     metric="error (%)", cells=CELLS[:1],
                     presets={"smoke": {}, "quick": {}, "paper": {}}, run_cell=run_cell)
    monkeypatch.setattr(R, "_save_figures", lambda *a, **k: [])
    reports = tmp_path / "reports"
    framework.run_experiment(exp, "quick", out=tmp_path / "first", echo=False)
    R.publish_report(exp, tmp_path / "first", reports_root=reports)
    for seed in (1, 2):
        framework.run_experiment(exp, "quick", out=tmp_path / "later", seed=seed, echo=False)
    assert R.publish_report(exp, tmp_path / "later", reports_root=reports) is not None
    a = R.load_report(exp, "quick", reports / "vrepeat")["a"]
    assert a.metric == pytest.approx(2.0) and V.n_seeds(a) == 3
    # repeats published one at a time, from separate runs, add up; a seed run again replaces
    # the repeat it had
    framework.run_experiment(exp, "quick", out=tmp_path / "third", seed=3, echo=False)
    R.publish_report(exp, tmp_path / "third", reports_root=reports)
    framework.run_experiment(exp, "quick", out=tmp_path / "again", seed=1, echo=False)
    R.publish_report(exp, tmp_path / "again", reports_root=reports)
    a = R.load_report(exp, "quick", reports / "vrepeat")["a"]
    assert [r["seed"] for r in a.record["other_seeds"]] == [1, 2, 3]
    assert a.metric == pytest.approx(2.5) and V.n_seeds(a) == 4
