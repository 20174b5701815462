"""sgjax.feedback: the ∂L/∂h substitutes of Czarnecki et al. 2017, Table 1, checked
against the formulas computed by hand, the §6 claim that ∂L_SG/∂h is the substitute,
and Table 1's lock/error columns."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from sgjax import feedback as F
from sgjax import layers as L
from sgjax import losses
from sgjax import predictors as P
from sgjax.feedback import InterfaceSpec

B, D, H, G, C = 8, 6, 12, 10, 4
ALPHA = 0.5
# Cut after layer 2 (h: H units) and after layer 4; the first layer above the first cut is
# dense(G) (g: G units), the network output p has C units.
NET = (L.dense(H), L.tanh, L.dense(G), L.tanh, L.dense(C))
CUTS = (2, 4)


def loss(p, y):
    # Not softmax cross-entropy: its ∂L/∂p sums to zero over classes, which would make
    # Kickback's (∂L/∂p) 1ᵀ vanish identically.
    return losses.sigmoid_log_loss(p, y)


def data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, D), dtype=np.float32),
            rng.integers(0, C, (B,), dtype=np.int32))


def perturb(tree, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + scale * rng.standard_normal(x.shape, dtype=np.float32), tree)


def setup(fb):
    """A split with ``fb`` at the first cut (backprop at the second), its states (with a
    non-zero predictor for SG methods), the activations at the cut and the Target that
    the stages above send down for this batch."""
    split = sgjax.split_at(NET, CUTS, feedback=[fb, F.backprop()], loss=loss,
                           optimizer=optax.sgd(1.0), predictor_optimizer=optax.sgd(1e-3),
                           input_shape=(D,), batch_size=B, num_classes=C,
                           example_scale=1.0)  # Table 1's formulas, in the loss's own units
    states = list(split.init(jax.random.key(0)))
    if fb.sg_trains:
        fs = states[0].feedback
        variables = {**fs.variables, "params": perturb(fs.variables["params"], 7)}
        states[0] = states[0]._replace(feedback=fs._replace(variables=variables))
    x, y = data()
    h = split.stages[0].forward(states[0], x)
    a = split.stages[1].forward(states[1], h)
    _, _, target2, _ = split.stages[2].update(states[2], a, y, None)
    _, _, target1, _ = split.stages[1].update(states[1], h, y, target2)
    spec = InterfaceSpec(h_shape=(H,), label_shape=(C,), out_shape=(C,), next_shape=(G,),
                         batch_size=B, optimizer=optax.sgd(1e-3))
    return split, tuple(states), x, y, h, target1, fb.build(spec)


def true_grads(states, h, y):
    """∂L/∂h, ∂L/∂g, ∂L/∂p, computed independently of the library's stages."""
    (p1,), (p2,) = states[1].params[:1], states[2].params

    def from_g(g):
        return L.dense(C).apply({"params": p2}, jnp.tanh(g))[0]

    def to_g(h):
        return L.dense(G).apply({"params": p1}, h)[0]

    g = to_g(h)
    p = from_g(g)
    dp = jax.grad(lambda p: loss(p, y))(p)
    dg = jax.grad(lambda g: loss(from_g(g), y))(g)
    dh = jax.grad(lambda h: loss(from_g(to_g(h)), y))(h)
    return dh, dg, dp


def sg_of(fstate, h, labels):
    return P.linear(conditioned=True).apply(fstate.variables, h, labels, train=True)[0]


def expected_substitute(name, fstate, h, labels, dh, dg, dp):
    """Understanding-SG Table 1, first row, written out."""
    if name == "Bprop":
        return dh
    if name == "DFA":
        chex.assert_shape(fstate, (H, C))
        return dp @ fstate.T
    if name == "FA":
        chex.assert_shape(fstate, (H, G))
        return dg @ fstate.T
    if name == "Kickback":
        return dp @ jnp.ones((H, C)).T
    if name == "SG + prop":
        l_sg = lambda h: jnp.sum((sg_of(fstate, h, labels) - dh) ** 2)  # noqa: E731
        return sg_of(fstate, h, labels) + ALPHA * jax.grad(l_sg)(h)
    if name == "No Bprop":
        return jnp.zeros_like(h)
    raise AssertionError(name)


LOCKED = {
    "Bprop": F.backprop(),
    "DFA": F.dfa(),
    "FA": F.feedback_alignment(),
    "Kickback": F.kickback(),
    "SG + prop": F.synthetic_prop(P.linear(conditioned=True), alpha=ALPHA),
}


@pytest.mark.parametrize("name", sorted(LOCKED))
def test_substitute_matches_table1_and_is_what_the_stage_uses(name):
    fb = LOCKED[name]
    assert fb.name == name
    split, states, x, y, h, target, iface = setup(fb)
    labels = jax.nn.one_hot(y, C)
    dh, dg, dp = true_grads(states, h, y)
    # The message carries this batch's true signals, exactly the ones the feedback reads.
    true = {"grad": dh, "pre_grad": dg, "error": dp, "inputs": h, "labels": labels}
    for field, value in true.items():
        if field in fb.needs:
            np.testing.assert_allclose(getattr(target, field), value, rtol=1e-5, atol=1e-7)
        else:
            assert getattr(target, field) is None, field

    fstate = states[0].feedback
    sub, _, _ = iface.step(fstate, h, labels, target)
    chex.assert_shape(sub, (B, H))
    expected = expected_substitute(name, fstate, h, labels, dh, dg, dp)
    np.testing.assert_allclose(sub, expected, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(sub).max()) > 1e-4

    # The stage below the cut really trains on it: with SGD(1), Δparams = -vjp(substitute).
    sched = sgjax.sync(split)
    ts = sched.init(jax.random.key(0), (x, y))._replace(stages=states)
    ts, _ = sched.step(ts, (x, y))
    _, vjp = jax.vjp(lambda p: split.stages[0].forward(states[0]._replace(params=p), x),
                     states[0].params)
    (g,) = vjp(expected)
    chex.assert_trees_all_close(ts.stages[0].params,
                                jax.tree.map(lambda p, g: p - g, states[0].params, g),
                                rtol=1e-5, atol=1e-6)
    if not fb.sg_trains:  # fixed matrices stay fixed
        chex.assert_trees_all_equal(ts.stages[0].feedback, fstate)


@pytest.mark.parametrize("name", ["Bprop", "DFA", "FA", "Kickback"])
def test_sg_loss_gradient_is_the_substitute(name):
    """§6: treating the target as a constant, ∂L_SG/∂h is the method's update rule."""
    _, states, _, y, h, target, iface = setup(LOCKED[name])
    labels = jax.nn.one_hot(y, C)
    fstate = states[0].feedback
    sub, _, _ = iface.step(fstate, h, labels, target)
    grad = jax.grad(lambda h: iface.sg_loss(fstate, h, labels, target))(h)
    np.testing.assert_allclose(grad, sub, rtol=1e-5, atol=1e-7)


def test_kickback_is_dfa_with_a_matrix_of_ones():
    _, states, _, y, h, target, kick = setup(F.kickback())
    labels = jax.nn.one_hot(y, C)
    np.testing.assert_array_equal(states[0].feedback, jnp.ones((H, C)))
    _, _, _, _, _, _, dfa = setup(F.dfa())
    sub_kick, _, _ = kick.step(states[0].feedback, h, labels, target)
    sub_dfa, _, _ = dfa.step(jnp.ones((H, C)), h, labels, target)
    np.testing.assert_allclose(sub_kick, sub_dfa, rtol=1e-6)
    # Every unit of h receives the summed output error.
    np.testing.assert_allclose(sub_kick, jnp.broadcast_to(target.error.sum(-1, keepdims=True),
                                                          (B, H)), rtol=1e-6)


def test_dfa_matrix_scale_and_seed():
    _, states, *_ = setup(F.dfa(scale=2.0))
    a = states[0].feedback
    assert 1.0 < float(jnp.std(a)) < 3.0
    _, states_default, *_ = setup(F.dfa())
    # default std 1/sqrt(|p|) = 0.5
    assert 0.25 < float(jnp.std(states_default[0].feedback)) < 0.8


def test_synthetic_substitute_is_the_freshly_fitted_predictor():
    fb = F.synthetic(P.linear(conditioned=True))
    _, states, _, y, h, target, iface = setup(fb)
    labels = jax.nn.one_hot(y, C)
    fstate = states[0].feedback
    sub, new_fstate, info = iface.step(fstate, h, labels, target)
    assert float(info["sg_loss"]) > 0
    # fit (on the message) first, then predict for h with the fitted model
    np.testing.assert_allclose(sub, sg_of(new_fstate, h, labels), rtol=1e-6, atol=1e-7)
    assert not np.allclose(sub, sg_of(fstate, h, labels))
    # ... and fitting lowered the predictor's loss on that target
    before = jnp.sum((sg_of(fstate, target.inputs, target.labels) - target.grad) ** 2)
    after = jnp.sum((sg_of(new_fstate, target.inputs, target.labels) - target.grad) ** 2)
    np.testing.assert_allclose(info["sg_loss"], before, rtol=1e-5)
    assert float(after) < float(before)


def test_none_and_stale():
    _, states, _, y, h, target, iface = setup(F.none())
    labels = jax.nn.one_hot(y, C)
    sub, _, _ = iface.step(states[0].feedback, h, labels, target)
    np.testing.assert_array_equal(sub, jnp.zeros((B, H)))

    _, states, _, _, h, target, iface = setup(F.stale(0.75))
    m0 = states[0].feedback
    np.testing.assert_array_equal(m0, jnp.zeros((B, H)))
    sub, m1, _ = iface.step(m0, h, labels, target)
    np.testing.assert_allclose(sub, 0.25 * target.grad, rtol=1e-6)
    sub2, _, _ = iface.step(m1, h, labels, target)
    np.testing.assert_allclose(sub2, 0.75 * 0.25 * target.grad + 0.25 * target.grad,
                               rtol=1e-6)
    invalid = target._replace(valid=jnp.zeros((), bool))
    sub3, m3, _ = iface.step(m1, h, labels, invalid)
    np.testing.assert_array_equal(m3, m1)
    with pytest.raises(ValueError, match=r"decay=1\.5"):
        F.stale(1.5)


# Understanding-SG Table 1: (SG trains, update locked, backwards locked, direct error).
TABLE1 = {
    "synthetic": (F.synthetic(P.linear()), (True, False, False, False), "SG(h, y)"),
    "synthetic_prop": (F.synthetic_prop(P.linear()), (True, True, True, False),
                       "SG(h, y) + α ∂L_SG/∂h"),
    "backprop": (F.backprop(), (False, True, True, False), "∂L/∂h"),
    "dfa": (F.dfa(), (False, True, False, True), "(∂L/∂p) Aᵀ"),
    "feedback_alignment": (F.feedback_alignment(), (False, True, True, False),
                           "(∂L/∂g) Aᵀ"),
    "kickback": (F.kickback(), (False, True, False, True), "(∂L/∂p) 1ᵀ"),
}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_feedback_attributes_match_table1(name):
    fb, columns, substitute = TABLE1[name]
    assert (fb.sg_trains, fb.update_locked, fb.backwards_locked, fb.direct_error) == columns
    assert fb.table["substitute"] == substitute
    assert name in F.ALL


def test_baselines_outside_table1_are_not_locked():
    for fb in (F.none(), F.stale()):
        assert (fb.sg_trains, fb.update_locked, fb.backwards_locked) == (False, False, False)
    assert F.synthetic(P.linear(conditioned=True)).name == "cDNI"
    assert F.synthetic(P.linear()).name == "DNI"


def test_synthetic_needs_a_predictor():
    with pytest.raises(TypeError, match="got 'linear'"):
        F.synthetic("linear")


def test_fit_diagnostics_exact():
    s = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    t = jnp.array([[6.0, 8.0], [1.0, 0.0]])
    d = F.fit_diagnostics(s, t)
    assert set(d) == {"sg_norm", "target_norm", "sg_cosine"}  # no batch norm in the state
    np.testing.assert_allclose(d["sg_norm"], 2.5)  # (5 + 0) / 2
    np.testing.assert_allclose(d["target_norm"], 5.5)  # (10 + 1) / 2
    np.testing.assert_allclose(d["sg_cosine"], 0.5)  # (1 + 0, where SG is zero) / 2
    d = F.fit_diagnostics(-s, t)
    np.testing.assert_allclose(d["sg_cosine"], -0.5)


def test_fit_diagnostics_read_the_models_batch_norm_statistics():
    state = {"state": ({}, {"batch_stats": {"mean": jnp.array([-1.0, 3.0]),
                                            "var": jnp.array([2.0, 4.0])}},
                       {"batch_stats": {"mean": jnp.array([0.0, 0.0]),
                                        "var": jnp.array([1.0, 1.0])}})}
    d = F.fit_diagnostics(jnp.ones((2, 3)), jnp.ones((2, 3)), state)
    np.testing.assert_allclose(d["sg_bn_mean"], 1.0)  # |−1|, 3, 0, 0
    np.testing.assert_allclose(d["sg_bn_var"], 2.0)  # 2, 4, 1, 1
    np.testing.assert_allclose(d["sg_cosine"], 1.0)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_synthetic_fit_reports_the_used_prediction_against_its_target(batch_norm):
    """sg_norm/target_norm/sg_cosine compare the prediction used for the batch (before the
    fit) with the per-example target (example_scale · δ) it is fitted to."""
    pred = P.mlp((8,), batch_norm=batch_norm)
    spec = InterfaceSpec(h_shape=(5,), label_shape=(3,), out_shape=(3,), next_shape=(4,),
                         batch_size=6, optimizer=optax.sgd(0.1), example_scale=6.0)
    iface = F.synthetic(pred).build(spec)
    fstate = iface.init(jax.random.key(0))
    h = jax.random.normal(jax.random.key(1), (6, 5))
    grad = jax.random.normal(jax.random.key(2), (6, 5))
    target = F.Target(grad=grad, inputs=h)
    fstate, info = iface.fit(fstate, target)  # zero-initialised output: SG = 0 first
    assert float(info["sg_norm"]) == 0.0 and float(info["sg_cosine"]) == 0.0
    np.testing.assert_allclose(info["target_norm"],
                               jnp.mean(jnp.linalg.norm(6.0 * grad, axis=-1)), rtol=1e-6)
    used, _ = pred.apply(fstate.variables, h, None, train=True)
    _, info = iface.fit(fstate, target)
    expected = F.fit_diagnostics(used, 6.0 * grad)
    for name in ("sg_norm", "target_norm", "sg_cosine"):
        np.testing.assert_allclose(info[name], expected[name], rtol=1e-5)
    assert float(info["sg_norm"]) > 0
    assert ("sg_bn_var" in info) == batch_norm
    _, skipped = iface.fit(fstate, target._replace(valid=jnp.asarray(False)))
    assert set(skipped) == set(info) and float(skipped["sg_norm"]) == 0.0
