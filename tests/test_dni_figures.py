"""DNI feed-forward figure experiments: smoke runs end to end, the
claim verdicts, the gradient comparison of Fig. 10 (exact against jax.grad) and the
Fig. 5 population (vmapped members equal members run one by one)."""

from __future__ import annotations

import json
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from experiments import framework, training
from experiments.__main__ import main
from experiments.dni import fcn, linear, single, sparse, stale, table1, underfit
from experiments.framework import Cell, CellResult
from experiments.framework import verdicts as V

# ----------------------------------------------------------------- smoke, end to end

SLOW = pytest.mark.slow  # a CIFAR-10 CNN, a vmapped stochastic population, a decay sweep
SMOKE = [
    # (experiment, one or two cells, the figures it must draw, metrics a cell must have)
    pytest.param("stale", ["mnist-fcn3-stale"], ["stale-sweep"], {"best_decay", "errors"},
                 marks=SLOW, id="stale"),
    pytest.param("sparse", ["cdni"], ["fig5-left"],
                 {"snapshots", "final_errors", "error_p0.05", "error_p1",
                  "p1_minus_claim_p_at_first_snapshot"}, marks=SLOW, id="sparse"),
    pytest.param("single", ["dni-after2"], ["fig9a", "fig10"],
                 {"mean_cosine", "final_sign_error"}, id="single"),
    pytest.param("linear", ["mnist-fcn3-dni-linear"], ["fig12"], {"train_error", "sg_model"},
                 id="linear"),
    pytest.param("underfit", ["cifar10-cnn3-bprop"], ["fig13"], {"train_error", "gap"},
                 marks=SLOW, id="underfit"),
]


@pytest.mark.reproduce
@pytest.mark.parametrize("name,only,figs,keys", SMOKE)
def test_smoke_run(tmp_path, name, only, figs, keys):
    assert main(["run", name, "--preset", "smoke", "--out", str(tmp_path),
                 "--only", *only]) == 0
    out = tmp_path / name / "smoke"
    for cell in only:
        record = json.loads((out / "cells" / f"{cell}.json").read_text())
        assert math.isfinite(record["metric"])
        assert keys <= set(record["metrics"]), sorted(record["metrics"])
    for fig in figs:
        assert (out / f"{fig}.png").stat().st_size > 0
    assert "| row | column | paper | ours | diff |" in (out / "table.md").read_text()


# ----------------------------------------------------------------- verdicts


def _result(cell_id, params, metric, **metrics):
    return CellResult(Cell(cell_id, row="r", column="c", params=params), metric, metrics,
                      {}, 0, 0.0, {})


def test_stale_probes_leave_the_main_cells_alone():
    """Probes are listed outside Config: the main cells' params and the preset config
    (their identity) are those of the committed records."""
    cells = stale.cells("quick")
    main_cells = [c for c in cells if not stale.is_probe(c)]
    assert [set(c.params) for c in main_cells] == [{"depth", "method"}] * 12
    assert "sgd" not in repr(stale.PRESETS["quick"])
    probes = [c for c in cells if stale.is_probe(c)]
    assert {(c.params["optimizer"], c.params["lr"]) for c in probes} == {
        ("adam", 3e-5), ("sgd", 0.1)}


def test_stale_probe_claims_compare_stale_with_no_bprop_under_one_optimizer():
    claims = {c.id: c for c in stale.claims("quick")}
    sgd = claims["stale-marginal-fcn6-sgd1e-01"]
    assert sgd.cells == ("mnist-fcn6-stale-sgd1e-01", "mnist-fcn6-nobprop-sgd1e-01")
    assert "stale-marginal-fcn3-adam3e-05" in claims
    assert not [c for c in claims if c.startswith("stale-marginal-fcn4-")
                and c != "stale-marginal-fcn4"]


@pytest.mark.parametrize("opt,method,cuts", [("sgd", "stale", 2), ("adam", "nobprop", 2),
                                            ("sgd", "bprop", 0)])
def test_stale_probe_split(opt, method, cuts):
    split = stale.probe_split({"depth": 3, "method": method, "optimizer": opt, "lr": 0.1},
                              table1.SMOKE, (28, 28, 1))
    assert len(split.stages) == cuts + 1


SHOWN = re.compile(r"([\w.-]+): (holds|differs|partial \([a-z]+ so far\)|not run)")


def _shown(fig) -> dict[str, str]:
    """Claim id → verdict, as a figure's titles print them (a stale-sweep panel names its
    claims without their ``-fcnN`` suffix: its title starts with "N layers")."""
    out = {}
    titles = [fig._suptitle.get_text() if fig._suptitle else "",
              *(ax.get_title() for ax in fig.axes)]
    for title in titles:
        depth = re.match(r"(\d+) layers", title)
        for cid, verdict in SHOWN.findall(title):
            out[f"{cid}-fcn{depth.group(1)}" if depth else cid] = verdict
    return out


@pytest.mark.parametrize("module, figure", [
    (single, "fig9a"), (single, "fig10"), (linear, "fig12"), (underfit, "fig13"),
    (stale, "stale-sweep"),
])
def test_figure_titles_show_the_declared_claims_verdicts(module, figure):
    """A figure's verdicts are the framework's, computed from the committed records as in
    table.md (no module judges claims by its own code)."""
    exp = module.EXPERIMENT
    found = framework.load_report(exp, "quick", framework.REPORTS_DIR / exp.name)
    results = [r for r in found.values() if isinstance(r, CellResult)
               and not V.is_partial(r)]
    if not results:
        pytest.skip(f"no committed quick report for {exp.name}")
    judged = {v.claim.id: v.text for v in V.judge(exp, results)}
    shown = _shown(module.figures(results, exp.presets["quick"])[figure])
    assert shown, f"no verdict in {exp.name}'s {figure} titles"
    assert {cid: judged.get(cid) for cid in shown} == shown


# ----------------------------------------------------------------- Fig. 10 gradients

TINY = table1.Config(steps=1, lr=1e-3, lr_boundaries=(), eval_every=1, chunk=1,
                     batch_size=8, width_divisor=32)


@pytest.mark.parametrize("k", [0, 1])
def test_gradient_pair_true_gradient_is_backprop_and_synthetic_is_the_model(k):
    """The true gradient equals jax.grad of the whole network's summed loss w.r.t. the
    cut's activations; the synthetic one is the predictor's output on them."""
    predictor = sgjax.predictors.linear(conditioned=True)
    split = fcn.fcn_split(4, (1, 2), sgjax.feedback.synthetic(predictor), TINY, (28, 28, 1))
    x = jax.random.uniform(jax.random.key(0), (8, 28, 28, 1))
    y = jnp.arange(8) % 10
    states = list(split.init(jax.random.key(1)))
    # give the predictor non-zero weights so the comparison is not 0 == 0
    fb = states[k].feedback
    params = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), fb.variables["params"])
    states[k] = states[k]._replace(feedback=fb._replace(
        variables={**fb.variables, "params": params}))
    s, t = jax.jit(lambda st: fcn.gradient_pair(split, st, k, predictor, x, y))(states)

    def h_of(x):
        for st, stage in zip(states[:k + 1], split.stages[:k + 1]):
            x = stage.forward(st, x)
        return x

    def summed(h):
        for st, stage in zip(states[k + 1:], split.stages[k + 1:]):
            h = stage.forward(st, h)
        return jnp.sum(jax.vmap(lambda o, yy: sgjax.losses.softmax_cross_entropy(
            o[None], yy[None]))(h, y))

    h = jax.jit(h_of)(x)
    chex.assert_trees_all_close(t, jax.jit(jax.grad(summed))(h), atol=1e-6, rtol=1e-6)
    expected, _ = predictor.apply(states[k].feedback.variables, h, jax.nn.one_hot(y, 10),
                                  train=True)
    chex.assert_trees_all_close(s, expected, atol=1e-6)
    assert float(jnp.max(jnp.abs(s))) > 0
    with pytest.raises(ValueError, match="no interface"):
        fcn.gradient_pair(split, states, 2, predictor, x, y)


# ----------------------------------------------------------------- Fig. 5 population


@pytest.mark.slow
@pytest.mark.parametrize("sequential", [False, True])
def test_population_members_equal_single_runs(sequential):
    """One program over (state, p_update), vmapped or with its members in sequence, gives
    each member what running that member alone gives (SGD: Adam would amplify the float
    rounding differences between the batched and unbatched programs on its near-zero
    first gradients)."""
    cfg = table1.Config(steps=3, lr=1e-3, lr_boundaries=(), eval_every=3, chunk=3,
                        batch_size=8, width_divisor=32)
    predictor = table1.make_predictor("mnist", "fcn", "cdni", cfg)
    split = fcn.fcn_split(sparse.DEPTH, "every", sgjax.feedback.synthetic(predictor), cfg,
                          (28, 28, 1), optimizer=optax.sgd(0.1))
    schedule = sgjax.stochastic(split, None)
    step = sparse.member_step(schedule)
    population_step = sparse.member_step(schedule, sequential=sequential)
    xs = jax.random.uniform(jax.random.key(0), (64, 28, 28, 1))
    ys = jnp.arange(64) % 10
    p = np.array([0.3, 1.0, 0.6], np.float32)
    state = sparse.init_population(schedule, jax.random.key(1), p, np.array([0, 0, 1]),
                                   xs[:8], ys[:8])
    batch_fn = training.uniform_batches(8, keyed=True)
    keys = jax.random.split(jax.random.key(2), 3)
    steps = jnp.arange(3)
    pop, _ = sparse.chunk_runner(population_step, batch_fn, True)(state, steps,
                                                                   data=((xs, ys), keys))
    one = sparse.chunk_runner(step, batch_fn, False)
    for i in range(3):
        member = jax.tree.map(lambda a, i=i: a[i], state)
        alone, _ = one(member, steps, data=((xs, ys), keys[i]))
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], pop), alone,
                                    atol=1e-5, rtol=1e-5)
    p_members, seeds = sparse.population(sparse.PRESETS["quick"])
    assert len(p_members) == 4 and set(seeds) == {0}
    p_members, seeds = sparse.population(sparse.Config(sparse.PRESETS["quick"].train,
                                                       (0.1, 0.5), 2, (), 0))
    np.testing.assert_allclose(p_members, [0.1, 0.5, 0.1, 0.5])
    assert seeds.tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("dni,cdni,cdni_p02,lead,expected", [
    (2.5, 2.9, 2.0, 1.0, ("holds", "holds", "holds", "holds")),
    (13.5, 18.6, 3.1, 0.0, ("differs", "differs", "differs", "differs")),
    (3.0, 3.01, 3.0, 0.01, ("holds", "differs", "holds", "holds")),
])
def test_sparse_claims(dni, cdni, cdni_p02, lead, expected):
    """§3.1's sparse-update claims, computed from records: p = 0.2 DNI and p = 0.05 cDNI
    at most 3 %, the caption's p = 0.2 cDNI at most 3 %, and "slower": the p = 1 members
    at least one test image (0.01 points) ahead at the first snapshot (a tie differs)."""
    from experiments.framework import verdicts as V

    found = {"dni": _result("dni", {"method": "dni"}, dni),
             "cdni": _result("cdni", {"method": "cdni"}, cdni, **{
                 "error_p0.2": cdni_p02, "p1_minus_claim_p_at_first_snapshot": -lead})}
    judged = {v.claim.id: v.status for v in V.check_all(sparse.EXPERIMENT, "quick", found)}
    assert (judged["dni-p0.2-trains-to-2"], judged["cdni-p0.05-trains-perfectly"],
            judged["cdni-p0.2-trains-effectively"], judged["cdni-p0.05-slower"]) == expected


def test_paper_population_has_the_claims_p_values():
    p = sparse.PRESETS["paper"].p_values
    assert {0.05, 0.2} <= set(p) and all(0 < v <= 1 for v in p) and len(p) >= 99
