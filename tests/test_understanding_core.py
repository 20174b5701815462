"""Tests of the Understanding-SG Table 1, Table 2, Fig. 6 and Theorem 1 experiments.

Table 1's claims are tested through the experiment's own rows
(:func:`experiments.understanding.table1.rows`), i.e. through the feedbacks the experiment
trains with and prints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from experiments.understanding import fig6, table1, table2, theorem1
from sgjax.feedback import InterfaceSpec, Target

# ----------------------------------------------------------------------------- Table 1

B, H, G, C = 5, 6, 4, 3  # batch, |h|, |g| (first layer above the cut), |p| (outputs)


def _spec():
    return InterfaceSpec(h_shape=(H,), label_shape=(C,), out_shape=(C,), next_shape=(G,),
                         batch_size=B, optimizer=optax.sgd(0.1))


def _target(key):
    k = jax.random.split(key, 5)
    return Target(inputs=jax.random.normal(k[0], (B, H)),
                  labels=jax.nn.one_hot(jax.random.randint(k[1], (B,), 0, C), C),
                  grad=jax.random.normal(k[2], (B, H)),
                  pre_grad=jax.random.normal(k[3], (B, G)),
                  error=jax.random.normal(k[4], (B, C)), valid=jnp.ones((), bool))


def _row(key):
    return next(r for r in table1.rows() if r.key == key)


def test_table1_rows_are_the_papers_columns_with_the_papers_flags():
    rows = table1.rows()
    assert [r.method for r in rows] == ["SG", "SG + prop", "Bprop", "DFA", "FA", "Kickback"]
    for r in rows:
        assert all(r.matches_paper().values()), (r.method, r.matches_paper())
        for f in table1.FORMULAS:
            assert r.values[f] and r.values[f] != "—", (r.method, f)
    md = table1.render_rows(test_errors={"bprop": 1.5})
    assert md.count("\n") == 2 + 8 + 1  # header, separator, 8 Table 1 rows, test error
    assert "(paper:" not in md and "1.50" in md


@pytest.mark.parametrize("key", ["bprop", "dfa", "fa", "kickback"])
def test_table1_sg_loss_gradient_is_the_substitute(key):
    """§6: backpropagating the SG-module loss L_SG(t, SG(h)) into h gives ∂L/∂h^."""
    row = _row(key)
    iface = row.feedback.build(_spec())
    k_init, k_h, k_t = jax.random.split(jax.random.key(0), 3)
    fstate = iface.init(k_init)
    h = jax.random.normal(k_h, (B, H))
    target = _target(k_t)

    @jax.jit
    def both(fstate, h, target):
        substitute, _, _ = iface.step(fstate, h, target.labels, target)
        grad = jax.grad(lambda h: iface.sg_loss(fstate, h, target.labels, target))(h)
        return substitute, grad

    substitute, grad = both(fstate, h, target)
    np.testing.assert_allclose(grad, substitute, rtol=1e-5, atol=1e-6)
    # and the substitute is the row's formula
    source = {"bprop": target.grad, "dfa": target.error, "fa": target.pre_grad,
              "kickback": target.error}[key]
    matrix = {"bprop": None, "dfa": fstate, "fa": fstate, "kickback": jnp.ones((H, C))}[key]
    expected = source if matrix is None else source @ matrix.T
    np.testing.assert_allclose(substitute, expected, rtol=1e-5, atol=1e-6)


def test_table1_kickback_is_dfa_with_a_matrix_of_ones():
    dfa, kick = _row("dfa"), _row("kickback")
    assert {f: dfa.values[f] for f in table1.FLAGS} == {f: kick.values[f] for f in table1.FLAGS}
    i_dfa, i_kick = dfa.feedback.build(_spec()), kick.feedback.build(_spec())
    k_state = i_kick.init(jax.random.key(1))
    np.testing.assert_array_equal(k_state, jnp.ones((H, C)))
    h = jax.random.normal(jax.random.key(2), (B, H))
    target = _target(jax.random.key(3))
    s_dfa, _, _ = i_dfa.step(jnp.ones((H, C)), h, target.labels, target)
    s_kick, _, _ = i_kick.step(k_state, h, target.labels, target)
    np.testing.assert_allclose(s_dfa, s_kick, rtol=1e-6)
    # with a softmax output the summed error vanishes: Kickback's signal is ~0 there
    logits = jax.random.normal(jax.random.key(4), (B, C))
    err = jax.grad(sgjax.losses.softmax_cross_entropy)(logits, target.labels)
    s_soft, _, _ = i_kick.step(k_state, h, target.labels, target._replace(error=err))
    assert float(jnp.abs(s_soft).max()) < 1e-6 * float(jnp.abs(err).max()) + 1e-8


def test_table1_network_puts_a_dense_layer_above_every_cut():
    layers, cuts = table1.network(depth=3, width=8)
    assert cuts == (2, 4, 6) and len(layers) == 7
    split = table1.make_split("fa", table1.Config(depth=3, width=8, batch_size=4),
                              input_shape=(5,), num_classes=3)
    assert [s.out_shape for s in split.stages] == [(8,), (8,), (8,), (3,)]
    # each stage above a cut starts with a plain dense layer: its output g is (8,)
    for stage in split.stages[1:]:
        out_shape, _ = stage.layers[0].init(jax.random.key(0), stage.in_shape)
        assert out_shape == ((8,) if stage is not split.stages[-1] else (3,))


# ----------------------------------------------------------------------------- Table 2


def test_table2_datasets_follow_supp_c():
    key = jax.random.key(0)
    make = jax.jit(table2.make_dataset, static_argnums=(1, 2))
    x_lin, y_lin = make(key, "linear", 2)
    x_noisy, y_noisy = make(key, "noisy", 2)
    x_rand, y_rand = make(key, "random", 2)
    assert x_lin.shape == (100, 2) and y_lin.shape == (100, 2)
    big = jax.eval_shape(lambda k: table2.make_dataset(k, "linear", 100), key)
    assert big[0].shape == (1000, 100)
    np.testing.assert_array_equal(x_lin, x_noisy)
    np.testing.assert_array_equal(y_lin.sum(1), 1.0)  # one-hot
    assert int(jnp.sum(jnp.argmax(y_lin, 1) != jnp.argmax(y_noisy, 1))) == 10  # exactly 10 %
    # linear: separable by an origin-crossing hyperplane (logistic regression fits it)
    w = jax.random.normal(jax.random.split(key, 4)[1], (2,))
    np.testing.assert_array_equal(jnp.argmax(y_lin, 1), (x_lin @ w > 0).astype(int))
    assert 20 < int(jnp.argmax(y_rand, 1).sum()) < 80
    assert len(table2.cells("quick")) == 20
    assert sum(c.params["loss"] == "log" and (c.params["dataset"], c.params["model"], "log")
               in table2.PAPER_BOLD for c in table2.cells("quick")) == 5


def test_table2_tau_marks_the_papers_own_numbers_as_the_paper_bolds_them():
    """The cause of a Table 2 "differs" rests on this: the paper's bold entries are
    exactly its entries above ``Config.tau``, which lies inside :data:`table2.BOLD_BAND`."""
    low, high = table2.BOLD_BAND
    entries = {(d, m, loss): v for (d, m), pair in table2.PAPER.items()
               for loss, v in zip(("mse", "log"), pair)}
    assert max(v for k, v in entries.items() if k not in table2.PAPER_BOLD) == low
    assert min(v for k, v in entries.items() if k in table2.PAPER_BOLD) == high
    for name in ("quick", "paper"):
        tau = table2.PRESETS[name].tau
        assert low < tau < high
        assert {k for k, v in entries.items() if v > tau} == table2.PAPER_BOLD
    claims = {c.id: c for c in table2.claims("quick")}
    assert "5.8e-5" in claims["noisy2-shallow-log-bold"].cause
    assert "4.9e-4" in claims["random100-deep-mse-bold"].cause
    assert claims["linear2-shallow-log-bold"].cause == table2.TABLE2_CAUSE


def test_table2_shallow_sg_sits_between_output_and_loss():
    splits = table2.make_splits("shallow", "mse", 2, table2.PRESETS["quick"])
    bottom, top = splits["sg"].stages
    assert bottom.out_shape == (2,) and top.layers == (sgjax.layers.identity,)
    assert bottom.feedback.sg_trains and splits["bp"].stages[0].feedback.name == "Bprop"
    deep = table2.make_splits("deep", "log", 2, table2.PRESETS["quick"])["sg"]
    assert deep.cuts == (5,) and len(deep.stages[0].layers) == 5


def test_table2_linear_sg_matches_backprop_for_mse_but_not_for_separable_log_loss():
    config = dataclasses.replace(table2.PRESETS["quick"], n_datasets=2, lr=1e-2, lr_end=None,
                                 chunk=600, min_worse=2)
    out = {}
    for loss in ("mse", "log"):
        init, step, final = table2.build_runner("shallow", loss, "linear2", config)
        keys = jax.random.split(jax.random.key(0), 2)
        run = sgjax.fused(jax.vmap(step), batch_fn=lambda data, t: ())  # full batch
        state, infos = run(jax.vmap(init)(keys, keys), jnp.arange(config.chunk))
        assert infos["diff"].shape == (config.chunk, 2)
        final_losses = jax.vmap(final)(state)
        out[loss] = table2.summarize(*(np.asarray(v) for v in final_losses), config)
    assert abs(out["mse"]["metric"]) < 1e-4 and not out["mse"]["different"]
    assert out["log"]["metric"] > 5e-3 and out["log"]["different"]


@pytest.mark.parametrize("k, same", [(2, True), (100, False)])
def test_table2_fitted_linear_sg_gives_the_true_weight_gradient_when_logits_span_inputs(
        k, same):
    """Why noisy2's shallow log-loss SG reaches backprop's solution (the cause shown for
    ``noisy2-shallow-log-bold``): the full-batch least-squares fit of ``SG(p, y) = pA + yB
    + C`` to ``dL/dp`` leaves a residual orthogonal to ``p`` and to 1; with ``k = 2``
    inputs and 2 logits ``x`` is an affine function of ``p = xW + b``, so the residual is
    orthogonal to ``x`` too and the weights receive exactly ``jax.grad``'s gradient. With
    ``k = 100`` the logits do not span the inputs and the two differ."""
    x, y = table2.make_dataset(jax.random.key(3), "noisy", k)
    w = jax.random.normal(jax.random.key(4), (k, 2))
    b = jnp.array([0.1, -0.2])

    def loss(w, b, p=None):
        logits = x @ w + b if p is None else p
        return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))

    p = x @ w + b
    dl_dp = jax.grad(lambda p: loss(w, b, p))(p)
    features = jnp.concatenate([p, y, jnp.ones((len(x), 1))], axis=1)
    coef, *_ = jnp.linalg.lstsq(features, dl_dp)
    synthetic = features @ coef  # the fitted linear SG's prediction of dL/dp
    via_sg = x.T @ synthetic  # what the weights receive from the SG
    true = jax.grad(loss)(w, b)
    scale = float(jnp.max(jnp.abs(dl_dp)))
    assert float(jnp.max(jnp.abs(synthetic - dl_dp))) > 0.1 * scale  # the fit is not exact
    np.testing.assert_allclose(jnp.sum(synthetic, 0), jnp.sum(dl_dp, 0), rtol=1e-5,
                               atol=1e-4 * scale)
    gap = float(jnp.max(jnp.abs(via_sg - true)) / jnp.max(jnp.abs(true)))
    assert (gap < 1e-4) if same else (gap > 1e-2), gap


# ----------------------------------------------------------------------------- Fig. 6


def test_fig6_backprop_reaches_zero_and_sg_stops_with_a_nonzero():
    config = fig6.Config(steps=1000, n_starts=1)
    start = jnp.array(fig6.SHOWCASE)
    bp = np.asarray(fig6.run_backprop(start, config))
    assert np.abs(bp[-1]).max() < 0.05
    sg = np.asarray(fig6.run_sg(start, config))
    a, b, c = sg[-1]
    assert a == pytest.approx(fig6.SHOWCASE[0])  # Σ x_i = 0: a never moves
    assert abs(c) < 1e-6 and abs(b) < abs(a)  # a critical point of the SG system ...
    assert float(fig6.true_loss(sg[-1, :2])) > 5.0  # ... that is not one of L
    # at that point the SG loss and the model's update vanish
    dl_dp = jax.grad(fig6.loss_of_p)(fig6.predict(sg[-1, :2]))
    assert float(jax.grad(fig6.sg_loss)(jnp.zeros(()), dl_dp)) == 0.0


def test_fig6_sgjax_split_with_a_constant_predictor_matches_plain_jax():
    config = fig6.Config(steps=200, n_starts=1)
    start = jnp.array([-0.7, 1.9])
    plain = np.asarray(fig6.run_sg(start, config))
    ab, c = fig6.run_sg_sgjax(start, config)
    np.testing.assert_allclose(np.asarray(ab), plain[1:, :2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(c), plain[1:, 2], atol=1e-6)


# ----------------------------------------------------------------------------- Theorem 1


def test_theorem1_line_search_is_exact_for_the_sg_error():
    @jax.jit
    def errors():
        xbar, y = theorem1.make_problem(jax.random.key(0), 3, 30, 0.5)
        W = 0.1 * jnp.ones(4)
        omega = jnp.array([-0.3, 0.2, 0.1])
        _, _, _, nu = theorem1.theorem_step(W, omega, xbar, y, 1.0, 10.0, 0.5)
        A = theorem1.sg_matrix(W @ xbar, y)

        def err(v):  # ‖ξ‖² after a step of size v with A held fixed
            return jnp.sum((A @ (omega - v * A.T @ A @ omega)) ** 2)

        return err(nu), err(0.9 * nu), err(1.1 * nu)

    best, smaller, larger = (float(e) for e in errors())
    assert best < smaller and best < larger


def test_theorem1_converges_to_global_optimum_and_zero_sg_parameters():
    """Small random problems, the model's rate as the paper prints its bound."""
    config = theorem1.Config(steps=1000, n_problems=3)
    with jax.enable_x64(True):
        at = jnp.asarray(theorem1.record_steps(config.steps, 5))
        keys = jax.random.split(jax.random.key(0), config.n_problems)
        run = jax.vmap(lambda k: theorem1.run_problem(k, 2, 20, config, at, "paper"))
        _, final, _ = jax.jit(run)(keys)
    final = {k: np.asarray(v) for k, v in final.items()}  # float64, read outside x64
    assert final["w_err"].max() < 1e-6
    assert final["loss_gap"].max() < 1e-8
    for name in ("alpha", "beta", "gamma"):
        assert np.abs(final[name]).max() < 1e-6
