"""DNI Table 1 (experiments/dni/table1.py): the cell list, A.1's architectures, the
No Bprop semantics, and the smoke preset end to end through the framework."""

from __future__ import annotations

import csv
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sgjax
from experiments import framework, registry
from experiments.__main__ import main
from experiments.dni import table1 as T1


def test_registered():
    assert "experiments.dni.table1" in registry.MODULES
    assert registry.load_module("experiments.dni.table1") is T1.EXPERIMENT


def test_cells_and_paper_numbers():
    cells = T1.EXPERIMENT.cells_for("smoke")
    # 2 datasets x (FCN 3-6, CNN 3-4) x 4 methods: the paper's 6 rows x 8 columns, plus
    # §3.1's Stale column for the 4 MNIST FCNs.
    assert len(cells) == 48 + 4
    stale = [c for c in cells if c.params["method"] == "stale"]
    assert [(c.id, c.paper) for c in stale] == [
        (f"mnist-fcn{d}-stale", T1.STALE_PAPER[d]) for d in (3, 4, 5, 6)]
    for preset in framework.PRESETS:
        assert [c.id for c in T1.EXPERIMENT.cells_for(preset)] == [c.id for c in cells]
    by = {c.id: c for c in cells}
    assert len(by) == 52
    expected = {  # spot checks against Table 1 (left), one per block and column
        "mnist-fcn3-nobprop": 9.3, "mnist-fcn3-bprop": 2.0, "mnist-fcn3-dni": 1.9,
        "mnist-fcn3-cdni": 2.2, "mnist-fcn6-nobprop": 21.4, "mnist-fcn6-dni": 4.3,
        "mnist-fcn6-cdni": 1.6, "mnist-cnn4-nobprop": 2.8, "mnist-cnn4-bprop": 0.6,
        "cifar10-fcn5-bprop": 41.7, "cifar10-fcn5-dni": 46.9, "cifar10-fcn5-cdni": 43.5,
        "cifar10-cnn3-bprop": 17.9, "cifar10-cnn3-dni": 19.5, "cifar10-cnn3-cdni": 19.0,
        "cifar10-cnn4-nobprop": 38.1, "cifar10-cnn4-cdni": 16.4,
    }
    for cid, value in expected.items():
        assert by[cid].paper == pytest.approx(value), cid
    for (dataset, kind, depth), numbers in T1.PAPER.items():
        for method, value in zip(T1.METHODS, numbers):
            c = by[f"{dataset}-{kind}{depth}-{method}"]
            assert c.paper == value
            assert c.column == T1.COLUMNS[method]
            assert c.params == {"dataset": dataset, "kind": kind, "depth": depth,
                                "method": method}
            assert c.row.endswith(f"{kind.upper()} {depth}")
            assert c.row.startswith("MNIST" if dataset == "mnist" else "CIFAR-10")
    # No Bprop gets worse with depth for FCNs (the paper's random-feature signature).
    assert [by[f"mnist-fcn{d}-nobprop"].paper for d in (3, 4, 5, 6)] == [9.3, 12.6, 16.2, 21.4]


def test_cifar_rows_say_jpeg_substitute_when_local():
    label = T1.dataset_label("cifar10")
    assert label in ("CIFAR-10", "CIFAR-10 (JPEG substitute)")
    row = next(c.row for c in T1.all_cells() if c.id == "cifar10-fcn3-bprop")
    assert row == f"{label} FCN 3"


def test_presets_document_their_command_and_protocol():
    assert set(T1.PRESETS) == set(framework.PRESETS)
    assert T1.EXPERIMENT.preset_notes is T1.PRESET_NOTES
    for preset, config in T1.PRESETS.items():
        notes = T1.PRESET_NOTES[preset]
        assert "python -m experiments run table1 --preset " + preset in notes
        assert f"make reproduce-table1 PRESET={preset}" in notes
        assert config.eval_every % config.chunk == 0
        framework.to_jsonable(config)  # configs are plain data
        # prose is not part of a result's identity
        assert not any(isinstance(v, str) for v in framework.to_jsonable(config).values())
    paper = T1.PRESETS["paper"]
    assert (paper.steps, paper.lr, paper.lr_boundaries, paper.batch_size) == (
        500_000, 3e-5, (300_000, 400_000), 256)
    assert (paper.width_divisor, paper.sg_width_divisor, paper.lr_factor) == (1, 1, 0.1)
    assert paper.train_limit is None and paper.test_limit is None
    assert "divided by 8" in T1.PRESET_NOTES["smoke"]  # smoke says it shrinks widths


def _stage_shapes(split):
    return [s.out_shape for s in split.stages]


@pytest.mark.parametrize("dataset, kind, width, shapes", [
    ("mnist", "fcn", 256, None),
    ("cifar10", "fcn", 1000, None),
    ("mnist", "cnn", 64, [(10, 10, 64), (4, 4, 64), (2, 2, 64)]),
    ("cifar10", "cnn", 128, [(11, 11, 128), (4, 4, 128), (2, 2, 128)]),
])
def test_a1_architectures(dataset, kind, width, shapes):
    config = T1.PRESETS["paper"]
    input_shape = (28, 28, 1) if dataset == "mnist" else (32, 32, 3)
    for depth in T1.DEPTHS[kind]:
        layers = T1.make_layers(dataset, kind, depth, config)
        assert len(layers) == depth  # N layers = N - 1 hidden + 1 classification layer
        dni = T1.make_split(dataset, kind, depth, "dni", config, input_shape)
        assert len(dni.stages) == depth and dni.cuts == tuple(range(1, depth))
        hidden = _stage_shapes(dni)[:-1]
        if kind == "fcn":
            assert hidden == [(width,)] * (depth - 1)
        else:
            assert hidden == shapes[:depth - 1]
        assert _stage_shapes(dni)[-1] == (10,)
        bprop = T1.make_split(dataset, kind, depth, "bprop", config, input_shape)
        assert len(bprop.stages) == 1 and bprop.cuts == ()
        nob = T1.make_split(dataset, kind, depth, "nobprop", config, input_shape)
        assert len(nob.stages) == depth
        assert all(s.feedback.name == "No Bprop" for s in nob.stages[:-1])
        assert all(s.feedback.name == "DNI" for s in dni.stages[:-1])
        cdni = T1.make_split(dataset, kind, depth, "cdni", config, input_shape)
        assert all(s.feedback.name == "cDNI" for s in cdni.stages[:-1])


def test_a1_synthetic_gradient_models():
    paper = T1.PRESETS["paper"]

    def describe(dataset, kind, method, config=paper):
        p = T1.make_predictor(dataset, kind, method, config)
        return p.description, p.conditioned

    assert describe("mnist", "fcn", "dni") == ("mlp[1024, 1024]", False)
    assert describe("mnist", "fcn", "cdni") == ("clinear", True)
    assert describe("cifar10", "fcn", "dni") == ("mlp[4000]", False)
    assert describe("cifar10", "fcn", "cdni") == ("cmlp[4000]", True)
    assert describe("mnist", "cnn", "dni") == ("conv[64, 64]", False)
    assert describe("mnist", "cnn", "cdni") == ("cconv[64, 64]", True)
    assert describe("cifar10", "cnn", "dni") == ("conv[128, 128]", False)
    assert describe("cifar10", "cnn", "cdni") == ("cconv[128, 128]", True)
    smoke = T1.PRESETS["smoke"]
    assert describe("mnist", "fcn", "dni", smoke) == ("mlp[128, 128]", False)
    assert T1.arch("mnist", "fcn", smoke).width == 32
    with pytest.raises(ValueError):
        T1.make_predictor("mnist", "fcn", "bprop")


def test_cdni_conv_model_reads_label_channel_masks():
    pred = T1.make_predictor("mnist", "cnn", "cdni", T1.PRESETS["smoke"])
    variables = pred.init(jax.random.key(0), (4, 4, 8), 10)
    kernel = variables["params"][0]["kernel"]  # first conv: 8 activation + 10 label channels
    assert kernel.shape == (5, 5, 18, 8)
    h = jnp.ones((2, 4, 4, 8))
    s, _ = pred.apply(variables, h, jax.nn.one_hot(jnp.array([1, 2]), 10), train=True)
    assert s.shape == h.shape and float(jnp.abs(s).max()) == 0.0  # zero-initialised output


def test_no_bprop_trains_only_the_top_layer():
    config = T1.PRESETS["smoke"]
    split = T1.make_split("mnist", "fcn", 4, "nobprop", config, (28, 28, 1))
    schedule = sgjax.sync(split)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((32, 28, 28, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, 32, dtype=np.int32))
    ts0 = schedule.init(jax.random.key(0), (x, y))
    ts, step = ts0, jax.jit(schedule.step)
    for _ in range(3):
        ts, _ = step(ts, (x, y))
    for k in range(3):  # hidden layers: parameters frozen at their initial values
        chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                  ts.stages[k].params, ts0.stages[k].params)
        assert all(jax.tree.leaves(chex_equal)), k
    moved = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                         ts.stages[-1].params, ts0.stages[-1].params)
    assert not all(jax.tree.leaves(moved))  # the classification layer learns


def test_cells_train_on_the_ordinary_batch_mean_loss(monkeypatch):
    seen = {}
    split_at = sgjax.split_at

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return split_at(*args, **kwargs)

    monkeypatch.setattr(T1.sgjax, "split_at", spy)
    T1.make_split("mnist", "fcn", 3, "dni", T1.PRESETS["smoke"], (28, 28, 1))
    assert seen["loss"] is sgjax.losses.softmax_cross_entropy  # no summing by hand


SOME = ["mnist-fcn3-*", "mnist-cnn3-dni", "cifar10-fcn3-cdni", "cifar10-cnn3-nobprop"]


@pytest.mark.reproduce
def test_smoke_cells_end_to_end(tmp_path, capsys):
    start = time.monotonic()
    assert main(["run", "table1", "--preset", "smoke", "--out", str(tmp_path),
                 "--only", *SOME]) == 0
    elapsed = time.monotonic() - start
    out_dir = tmp_path / "table1" / "smoke"
    ran = sorted(p.stem for p in (out_dir / "cells").glob("*.json"))
    assert ran == sorted(["mnist-fcn3-nobprop", "mnist-fcn3-bprop", "mnist-fcn3-dni",
                          "mnist-fcn3-cdni", "mnist-fcn3-stale", "mnist-cnn3-dni",
                          "cifar10-fcn3-cdni", "cifar10-cnn3-nobprop"])
    record = json.loads((out_dir / "cells" / "mnist-fcn3-dni.json").read_text())
    assert 0.0 <= record["metric"] <= 100.0
    assert record["paper"] == 1.9 and record["column"] == "DNI"
    assert record["metrics"]["interfaces"] == 2 and record["metrics"]["dataset"] == "MNIST"
    assert record["metrics"]["sg_model"] == "mlp[128, 128]"
    assert record["curves"]["test_error"]["step"] == [2.0, 4.0]
    assert "sg_loss_0" in record["curves"] and "train_error" in record["curves"]
    cifar = json.loads((out_dir / "cells" / "cifar10-fcn3-cdni.json").read_text())
    assert cifar["metrics"]["dataset"] == T1.dataset_label("cifar10")
    assert cifar["row"].startswith(cifar["metrics"]["dataset"])

    table = (out_dir / "table.md").read_text()
    assert "| row | column | paper | ours | diff |" in table
    assert "| MNIST FCN 3 | DNI | 1.9 |" in table
    assert "| MNIST FCN 6 | cDNI | 1.6 | missing (not run) | — |" in table
    assert f"| {T1.dataset_label('cifar10')} CNN 4 | cDNI | 16.4 |" in table
    assert table.splitlines()[0].startswith("**Smoke preset: these numbers are not results")
    rows = list(csv.DictReader((out_dir / "results.csv").open()))
    assert len(rows) == 52 and sum(r["status"] == "done" for r in rows) == 8
    for name in ("table1-right", "fig11-mnist-fcn", "fig11-mnist-cnn", "fig11-cifar10-fcn",
                 "fig11-cifar10-cnn"):
        assert (out_dir / f"{name}.png").stat().st_size > 1000, name
    assert elapsed < 240, f"8 smoke cells took {elapsed:.0f} s"  # 2 cores shared by other jobs


@pytest.mark.slow
def test_smoke_preset_all_cells(tmp_path):
    """The whole table at the smoke preset (what ``make reproduce-table1 PRESET=smoke``
    runs in CI)."""
    assert main(["run", "table1", "--preset", "smoke", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "table1" / "smoke" / "results.csv").open()))
    assert len(rows) == 52 and all(r["status"] == "done" for r in rows)


@pytest.mark.reproduce
def test_paper_preset_cell_resumes_after_a_kill_with_identical_numbers(tmp_path, monkeypatch,
                                                                       capsys):
    """``--preset paper`` at a tiny scale: interrupt a DNI cell right after its step-4
    checkpoint (as Ctrl-C or ``kill`` would), rerun the same command, and get exactly the
    numbers of an uninterrupted run."""
    tiny = T1.Config(steps=8, lr=1e-3, lr_boundaries=(4,), eval_every=2, chunk=2,
                     batch_size=16, width_divisor=16, train_limit=256, test_limit=128)
    monkeypatch.setitem(T1.EXPERIMENT.presets, "paper", tiny)
    args = ["run", "table1", "--preset", "paper", "--only", "mnist-fcn3-dni",
            "--checkpoint-interval", "0"]

    save = framework.RunContext.save
    def save_then_kill(ctx, step, state, **kw):
        saved = save(ctx, step, state, **kw)
        if step == 4:
            raise KeyboardInterrupt
        return saved

    with monkeypatch.context() as m:
        m.setattr(framework.RunContext, "save", save_then_kill)
        assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    def record(root):
        cell = tmp_path / root / "table1" / "paper" / "cells" / "mnist-fcn3-dni.json"
        return json.loads(cell.read_text())

    resumed, whole = record("killed"), record("whole")
    assert resumed["resumed_from_step"] == 4 and not whole.get("resumed_from_step")
    assert resumed["metric"] == whole["metric"]
    assert resumed["curves"] == whole["curves"]
    assert resumed["metrics"]["train_error"] == whole["metrics"]["train_error"]


@pytest.mark.parametrize("paper, tol", [(1.6, 0.5), (4.3, 0.5), (9.3, 0.93), (43.5, 4.35)])
def test_claim_tolerance(paper, tol):
    assert T1.tolerance(paper) == tol


def test_every_cell_is_claimed_at_the_papers_number():
    claims = {c.id: c for c in T1.claims("quick")}
    assert set(claims) == {c.id for c in T1.all_cells()}
    for cell in T1.all_cells():
        claim = claims[cell.id]
        assert claim.kind == "near" and claim.cells == (cell.id,)
        assert claim.paper == cell.paper and claim.tolerance == T1.tolerance(cell.paper)
    assert claims["mnist-fcn6-dni"].cause and "reports/degradation" in claims[
        "mnist-fcn6-dni"].cause
    assert claims["mnist-fcn6-stale"].words == T1.STALE_WORDS
    assert not claims["mnist-fcn6-cdni"].cause  # holds at quick: no cause to give


def test_docstring_carries_no_result_numbers():
    import re
    # the paper's own numbers (No Bprop's 9.3 → 21.4 %) may be quoted; ours may not
    found = set(re.findall(r"\d+\.\d+ %", T1.__doc__)) - {"21.4 %"}
    assert not found, found
