"""sgjax 0.2 semantics: the loss's batch reduction does not matter, mixed feedbacks keep
their own protocols, feedback wrappers compose, and bad input is one clear error."""

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
from sgjax import losses, metrics
from sgjax import predictors as P
from sgjax.feedback import InterfaceSpec, Target

B, D, W, C = 16, 8, 16, 4
NET = (
    L.serial(L.dense(W), L.batch_norm(), L.relu),
    L.serial(L.dense(W), L.relu),
    L.dense(C),
)


def batches(n, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, B, D), dtype=np.float32),
            rng.integers(0, C, (n, B), dtype=np.int32))


def make(feedback, *, cuts="every", loss=losses.softmax_cross_entropy, layers=NET,
         optimizer=None, **kw):
    return sgjax.split_at(layers, cuts, feedback=feedback, loss=loss,
                          optimizer=optimizer or optax.adam(1e-2), input_shape=(D,),
                          batch_size=B, num_classes=C, **kw)


def summed_cross_entropy(logits, y):
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def train(split, steps=6):
    xs, ys = batches(steps)
    sched = sgjax.sync(split)
    ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
    ts, infos = sgjax.fused(sched.step)(ts, (xs, ys))
    return ts, infos


# ------------------------------------------------------------ 1. loss reduction --


@pytest.mark.parametrize("conditioned", [False, True], ids=["DNI", "cDNI"])
def test_mean_and_sum_losses_train_dni_the_same_under_adam(conditioned):
    fb = F.synthetic(P.linear(conditioned=conditioned))
    # No batch norm here: a bias before it has a zero gradient up to rounding, which
    # Adam would normalise into noise of either sign.
    net = (L.serial(L.dense(W), L.relu), L.serial(L.dense(W), L.tanh), L.dense(C))
    mean_split = make(fb, loss=losses.softmax_cross_entropy, layers=net)
    sum_split = make(fb, loss=summed_cross_entropy, layers=net)
    assert mean_split.stages[0].feedback is fb
    ts_mean, info_mean = train(mean_split)
    ts_sum, info_sum = train(sum_split)
    np.testing.assert_allclose(info_sum["loss"], B * info_mean["loss"], rtol=1e-5)
    # Adam is invariant to the gradient's scale (up to its epsilon), and the predictors
    # regress the same per-example gradients: the same training, step for step.
    # (The layers' Adam moments differ by the factor B, by construction.)
    for a, b in zip(ts_mean.stages, ts_sum.stages):
        chex.assert_trees_all_close((a.params, a.layer_state), (b.params, b.layer_state),
                                    rtol=2e-3, atol=2e-5)
        if a.feedback != ():
            chex.assert_trees_all_close(a.feedback, b.feedback, rtol=2e-3, atol=2e-5)
    kernel = ts_mean.stages[0].feedback.variables["params"][1]["kernel"]
    assert float(jnp.abs(kernel).max()) > 1e-3  # the predictors really trained


def test_example_scale_is_measured_from_the_loss():
    mean = sgjax.split.measure_example_scale(
        losses.softmax_cross_entropy, (C,), B, lambda k: jax.random.randint(k, (B,), 0, C))
    total = sgjax.split.measure_example_scale(
        summed_cross_entropy, (C,), B, lambda k: jax.random.randint(k, (B,), 0, C))
    assert (mean, total) == (float(B), 1.0)
    with pytest.raises(ValueError, match="neither|could not tell"):
        make(F.none(), loss=lambda o, y: jnp.sum(o ** 3) / jnp.sum(o ** 2))
    with pytest.raises(ValueError, match="loss must return a scalar"):
        make(F.none(), loss=lambda o, y: jnp.sum(o, axis=-1))
    explicit = make(F.synthetic(P.linear()), loss=lambda o, y: jnp.sum(o ** 3) /
                    jnp.sum(o ** 2), example_scale=1.0)
    assert len(explicit.stages) == 3


# ------------------------------------------------------------ 2. mixed feedbacks --


def test_mixed_feedbacks_keep_their_own_protocols():
    """DNI at the first cut, Bprop at the second. Step 1: stage 0 uses its zero SG (its
    parameters stay), stages 1–2 are exactly backprop on stage 0's output, and stage 0's
    predictor is then fitted to this batch's true gradient (per example)."""
    predictor = P.linear()
    split = make([F.synthetic(predictor), F.backprop()])
    assert [s.waits for s in split.stages] == [False, True, False]
    xs, ys = batches(1)
    x, y = xs[0], ys[0]
    sched = sgjax.sync(split)
    ts0 = sched.init(jax.random.key(0), (x, y))
    ts1, info = jax.jit(sched.step)(ts0, (x, y))
    chex.assert_trees_all_equal(ts1.stages[0].params, ts0.stages[0].params)

    s0, s1, s2 = ts0.stages
    h0 = split.stages[0].forward(s0, x)

    def upper_loss(params, h):
        a = split.stages[1].forward(s1._replace(params=params[0]), h)
        return losses.softmax_cross_entropy(split.stages[2].forward(s2._replace(
            params=params[1]), a), y)

    grads, dh0 = jax.grad(upper_loss, argnums=(0, 1))((s1.params, s2.params), h0)
    opt = optax.adam(1e-2)
    for k, g in ((1, grads[0]), (2, grads[1])):
        updates, _ = opt.update(g, opt.init(ts0.stages[k].params), ts0.stages[k].params)
        chex.assert_trees_all_close(ts1.stages[k].params,
                                    optax.apply_updates(ts0.stages[k].params, updates),
                                    rtol=1e-5, atol=1e-6)

    variables = s0.feedback.variables

    def l2(params):
        sg, _ = predictor.apply({**variables, "params": params}, h0, None, train=True)
        return jnp.sum((sg - B * dh0) ** 2)

    params = variables["params"]
    updates, _ = opt.update(jax.grad(l2)(params), opt.init(params), params)
    chex.assert_trees_all_close(ts1.stages[0].feedback.variables["params"],
                                optax.apply_updates(params, updates), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info["sg_loss/0"], l2(params), rtol=1e-5)


def test_direct_error_below_an_unlocked_interface_is_rejected():
    with pytest.raises(ValueError, match="DFA at cut 1 needs this batch's output error"):
        make([F.dfa(), F.synthetic(P.linear())])
    make([F.dfa(), F.backprop()])  # fine: Bprop waits and passes the error down


# ----------------------------------------------------------------- 3. wrappers --


def spec(example_scale=1.0):
    return InterfaceSpec(h_shape=(W,), label_shape=(C,), out_shape=(C,), next_shape=(W,),
                         batch_size=B, optimizer=optax.sgd(0.1), example_scale=example_scale)


def message(seed):
    k = jax.random.split(jax.random.key(seed), 2)
    return Target(grad=jax.random.normal(k[0], (B, W)), inputs=jax.random.normal(k[1], (B, W)))


def perturbed(iface, seed=3):
    fs = iface.init(jax.random.key(0))
    inner = fs.inner if hasattr(fs, "inner") else fs
    params = jax.tree.map(lambda p: p + 0.1, inner.variables["params"])
    inner = inner._replace(variables={**inner.variables, "params": params})
    return fs._replace(inner=inner) if hasattr(fs, "inner") else inner


def test_scaled_multiplies_the_substitute_not_the_fit():
    base, scaled = F.synthetic(P.linear()).build(spec()), F.scaled(
        F.synthetic(P.linear()), 0.1).build(spec())
    fs = perturbed(base)
    h = message(1).inputs
    s_base, _, _ = base.grad(fs, h, None, None)
    s_scaled, _, _ = scaled.grad(fs, h, None, None)
    np.testing.assert_allclose(s_scaled, 0.1 * s_base, rtol=1e-6)
    chex.assert_trees_all_close(scaled.fit(fs, message(2))[0], base.fit(fs, message(2))[0])
    assert F.scaled(F.backprop(), 10.0).update_locked
    assert F.synthetic(P.linear()).scale == 1.0
    assert F.scaled(F.warmup(F.scaled(F.none(), 0.5), 2), 0.1).scale == pytest.approx(0.05)
    with pytest.raises(ValueError, match="alpha"):
        F.scaled(F.none(), float("nan"))


def test_refit_every_fits_only_every_nth_message():
    base = F.synthetic(P.linear()).build(spec())
    every = F.refit_every(F.synthetic(P.linear()), 3).build(spec())
    fs = every.init(jax.random.key(0))
    ref = fs.inner
    for t in range(7):
        fs, _ = jax.jit(every.fit)(fs, message(t))
        if t % 3 == 0:
            ref, _ = base.fit(ref, message(t))
        chex.assert_trees_all_close(fs.inner, ref, rtol=1e-5, atol=1e-6)
    assert int(fs.count) == 7
    invalid = message(9)._replace(valid=jnp.zeros((), bool))
    fs2, _ = every.fit(fs, invalid)
    assert int(fs2.count) == 7
    with pytest.raises(ValueError, match="n=0"):
        F.refit_every(F.none(), 0)


def test_warmup_fits_without_using_then_acts_unchanged():
    base = F.synthetic(P.linear()).build(spec())
    warm = F.warmup(F.synthetic(P.linear()), 2).build(spec())
    fs = warm.init(jax.random.key(0))
    fs = fs._replace(inner=perturbed(base))
    h = message(0).inputs
    for t in range(4):
        sub, fs, _ = warm.grad(fs, h, None, None)
        expected, _, _ = base.grad(fs.inner, h, None, None)
        if t < 2:
            np.testing.assert_array_equal(sub, jnp.zeros_like(h))
        else:
            np.testing.assert_allclose(sub, expected, rtol=1e-6)
        fs, _ = warm.fit(fs, message(t))
    assert float(jnp.abs(expected).max()) > 0


def test_wrappers_compose_and_train_in_a_split():
    fb = F.scaled(F.refit_every(F.warmup(F.synthetic(P.linear(conditioned=True)), 2), 2), 0.5)
    assert not fb.update_locked and fb.needs == {"grad", "inputs", "labels"}
    ts, infos = train(make(fb))
    assert np.all(np.isfinite(infos["loss"]))
    assert int(ts.stages[0].feedback.inner.count) == 6


# ---------------------------------------------------------------- 4. bad input --


def test_bad_labels_are_one_clear_error():
    split = make(F.synthetic(P.linear()))
    sched = sgjax.sync(split)
    xs, ys = batches(1)
    x, y = xs[0], ys[0]
    ts = sched.init(jax.random.key(0), (x, y))
    cases = [
        (y.astype(np.float32), "class ids stored as floats"),
        (np.where(y == 0, C, y), f"label {C} is not a class id"),
        (np.where(y == 0, -1, y), "label -1 is not a class id"),
        (y[:, None], r"shape \(batch,\)"),
        (y[:-1], "batch size"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            sched.step(ts, (x, bad))
        with pytest.raises(ValueError, match=match):
            sched.init(jax.random.key(0), (x, bad))


def test_bad_construction_is_one_clear_error():
    with pytest.raises(ValueError, match="num_classes=3 but the network outputs shape"):
        sgjax.split_at(NET, "every", feedback=F.none(), loss=losses.softmax_cross_entropy,
                       optimizer=optax.adam(1e-3), input_shape=(D,), batch_size=B,
                       num_classes=3)
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            sgjax.split_at(NET, "every", feedback=F.none(), loss=losses.softmax_cross_entropy,
                           optimizer=optax.adam(1e-3), input_shape=(D,), batch_size=bad,
                           num_classes=C)
    with pytest.raises(TypeError, match="not an optax.GradientTransformation"):
        make(F.none(), optimizer=lambda g: g)
    with pytest.raises(TypeError, match="loss=3 is not callable"):
        make(F.none(), loss=3)


def test_fused_rejects_inputs_of_different_lengths():
    split = make(F.synthetic(P.linear()))
    sched = sgjax.sync(split)
    xs, ys = batches(3)
    ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
    with pytest.raises(ValueError, match="same leading"):
        sgjax.fused(sched.step)(ts, (xs, ys[:2]))


@pytest.mark.parametrize("fn", [metrics.l2_error, metrics.cosine_similarity,
                                metrics.sign_error, metrics.all_metrics])
def test_metrics_reject_mismatched_shapes(fn):
    with pytest.raises(ValueError, match="same shape"):
        fn(jnp.ones((B, W)), jnp.ones((B, 1)))


def test_check_finite_names_the_bad_value():
    info = {"loss": jnp.array(1.0), "sg_loss/0": jnp.array(jnp.nan)}
    with pytest.raises(sgjax.NonFiniteError, match="sg_loss/0"):
        sgjax.check_finite(info, where="step 7")
    assert sgjax.check_finite({"loss": jnp.array(1.0)}) == {"loss": jnp.array(1.0)}
