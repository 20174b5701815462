"""sgjax.split_at: exactness against jax.grad, oracle predictors, DNI Fig. 2 targets, and
clear errors for bad input."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sgjax
import sgjax.split as split_module
from sgjax import feedback as F
from sgjax import layers as L
from sgjax import losses
from sgjax import predictors as P

needs_nnx_view = pytest.mark.skipif(
    not hasattr(nnx, "view"), reason="flax.nnx modules need flax >= 0.12.4 (nnx.view)")

B, D, C, W = 16, 8, 4, 16
STEPS = 5
LR = 1e-2

# Dense layers feeding batch norm have no bias, as a precaution: that bias's gradient is
# zero in exact arithmetic, so it is pure round-off, which Adam would scale up to steps
# of size O(lr) that could differ between two correct implementations.
NET = (
    L.dense(W, use_bias=False), L.batch_norm(), L.relu,
    L.dense(W), L.tanh,
    L.dense(W, use_bias=False), L.batch_norm(), L.relu,
    L.dense(C),
)


def batches(n=STEPS, seed=1, d=D, c=C):
    """Random batches, made with numpy (no per-shape XLA compilations)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, B, d), dtype=np.float32),
            rng.integers(0, c, (n, B), dtype=np.int32))


def flat(states, field):
    """One tuple with ``field`` of every layer, across stages (layer order)."""
    return tuple(x for s in states for x in getattr(s, field))


def run_layers(layers, params, lstate, x, train=True):
    new = []
    for layer, p, s in zip(layers, params, lstate):
        x, s = layer.apply(L.with_params(s, p), x, train=train)
        new.append(s)
    return x, tuple(new)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def reference_step(layers, loss, optimizer, params, lstate, opt_state, x, y):
    """Hand-written backprop: jax.value_and_grad over the whole params tuple + optax."""

    def loss_fn(params, lstate):
        out, lstate = run_layers(layers, params, lstate, x)
        return loss(out, y), lstate

    (_, lstate), g = jax.value_and_grad(loss_fn, has_aux=True)(params, lstate)
    updates, opt_state = optimizer.update(g, opt_state, params)
    return optax.apply_updates(params, updates), lstate, opt_state


ADAM = optax.adam(LR)  # one object, so the jitted reference compiles once


def reference_training(layers, params, lstate, xs, ys, loss=losses.softmax_cross_entropy):
    opt_state = ADAM.init(params)
    for x, y in zip(xs, ys):
        params, lstate, opt_state = reference_step(layers, loss, ADAM, params, lstate,
                                                   opt_state, x, y)
    return params, lstate


def train_split(split, xs, ys, seed=0):
    sched = sgjax.sync(split)
    ts = sched.init(jax.random.key(seed), (xs[0], ys[0]))
    init = ts.stages
    ts, infos = sgjax.fused(sched)(ts, (xs, ys))
    return init, ts, infos


def make(layers, cuts, feedback, *, loss=losses.softmax_cross_entropy, lr=LR, **kw):
    kw.setdefault("num_classes", C)
    return sgjax.split_at(layers, cuts, feedback=feedback, loss=loss,
                          optimizer=optax.adam(lr), input_shape=(D,), batch_size=B, **kw)


# ---------------------------------------------------------------- 1. exactness --


@pytest.mark.parametrize(
    "cuts, feedback",
    [
        ((), None),
        ((3,), F.backprop()),
        ((1, 2, 5, 8), [F.backprop()] * 4),
        ("every", F.backprop()),
    ],
    ids=["no-cut", "one", "four-list", "every"],
)
def test_backprop_split_trains_like_jax_grad(cuts, feedback):
    xs, ys = batches()
    split = make(NET, cuts, feedback)
    assert len(split.stages) == 1 + len(split.cuts)
    init, ts, infos = train_split(split, xs, ys)
    chex.assert_shape(infos["loss"], (STEPS,))

    params, lstate = reference_training(NET, flat(init, "params"), flat(init, "layer_state"),
                                        xs, ys)
    chex.assert_trees_all_close(flat(ts.stages, "params"), params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(flat(ts.stages, "layer_state"), lstate, rtol=1e-6, atol=1e-6)
    # Something did train, and batch statistics moved.
    assert not np.allclose(params[0]["kernel"], flat(init, "params")[0]["kernel"])
    assert not np.allclose(lstate[1]["batch_stats"]["mean"], 0.0)
    for s in ts.stages:
        assert int(s.step) == STEPS


def test_backprop_split_is_structurally_a_backprop_split():
    split = make(NET, (2, 5), F.backprop())
    assert split.update_locked
    assert [len(s.layers) for s in split.stages] == [2, 3, 4]
    assert [s.in_shape for s in split.stages] == [(D,), (W,), (W,)]
    assert [s.out_shape for s in split.stages] == [(W,), (W,), (C,)]
    assert split.stages[-1].feedback is None
    assert split.cuts == (2, 5)
    assert make(NET, "every", F.backprop()).cuts == tuple(range(1, len(NET)))


# ----------------------------------------------- 2. oracle predictor and none --

TOP_FREE = {  # parameter-free top layer and d(mse(f(h), y))/dh written out by hand
    "tanh": (L.tanh, lambda h, y: (jnp.tanh(h) - y) * (1.0 - jnp.tanh(h) ** 2) / B),
}
LOWER = (L.dense(W, use_bias=False), L.batch_norm(), L.relu, L.dense(C))


def one_hot_batches(n=STEPS):
    xs, ys = batches(n)
    return xs, jax.nn.one_hot(ys, C)


@pytest.mark.parametrize("top", sorted(TOP_FREE))
def test_true_gradient_predictor_trains_like_backprop(top):
    top_layer, true_grad = TOP_FREE[top]
    layers = (*LOWER, top_layer)
    xs, ys = one_hot_batches()
    # Predictors work in per-example units: the oracle returns B × the gradient of
    # the batch-mean loss, and the interface divides it by example_scale = B again.
    oracle = P.from_fn(lambda h, y: B * true_grad(h, y), conditioned=True,
                       description="oracle")
    kw = dict(loss=losses.mse, num_classes=None, label_shape=(C,))
    split = make(layers, (len(LOWER),), F.synthetic(oracle), **kw)
    assert not split.update_locked  # the oracle is used as an unlocked DNI predictor
    init, ts, _ = train_split(split, xs, ys)

    params, lstate = reference_training(layers, flat(init, "params"),
                                        flat(init, "layer_state"), xs, ys, losses.mse)
    chex.assert_trees_all_close(flat(ts.stages, "params"), params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(flat(ts.stages, "layer_state"), lstate, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ts.stages[0].params[0]["kernel"], init[0].params[0]["kernel"])


def test_none_feedback_freezes_everything_below_the_cut():
    xs, ys = batches()
    split = make(NET, (3, 6), F.none())
    init, ts, infos = train_split(split, xs, ys)
    for k in (0, 1):  # below a cut: parameters exactly as initialised
        chex.assert_trees_all_equal(ts.stages[k].params, init[k].params)
    top_before, top_after = init[2].params, ts.stages[2].params
    assert not np.allclose(top_after[-1]["kernel"], top_before[-1]["kernel"])
    assert np.all(np.isfinite(infos["loss"]))


# ------------------------------------------------ 3. DNI Fig. 2: the targets --

NET4 = (
    L.dense(W),
    L.serial(L.dense(W, use_bias=False), L.batch_norm(), L.tanh),
    L.serial(L.dense(W), L.relu, L.dense(W)),
    L.dense(C),
)


def perturb(tree, seed, scale=0.1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: x + scale * rng.standard_normal(x.shape, dtype=np.float32), tree)


CONDITIONED = True  # cDNI: the predictors read the label too


@functools.cache
def perturbed_dni_state():
    """A cuts='every' (c)DNI split trained for a few steps from non-zero predictors."""
    split = make(NET4, "every", F.synthetic(P.linear(conditioned=CONDITIONED)))
    xs, ys = batches(4)
    sched = sgjax.sync(split)
    ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
    stages = tuple(
        s if k == len(split.stages) - 1 else s._replace(feedback=s.feedback._replace(
            variables={**s.feedback.variables,
                       "params": perturb(s.feedback.variables["params"],
                                         10 + k)}))
        for k, s in enumerate(ts.stages))
    ts = ts._replace(stages=stages)
    step = jax.jit(sched.step)
    for t in range(2):
        ts, _ = step(ts, (xs[t], ys[t]))

    @jax.jit
    def predict_only(stages, x, y):
        """Batch 2 without the fitting phase: every stage updates, and the targets sent
        down are left pending (what a pipelined stage holds between ticks)."""
        new, sent, h = [], [], x
        for stage, state in zip(split.stages, stages):
            st, h, below, _ = stage.update(state, h, y, None)
            new.append(st)
            sent.append(below)
        return tuple(new), (*sent[1:], None)

    stages, pending = predict_only(ts.stages, xs[2], ys[2])
    ts = ts._replace(stages=stages, pending=pending)
    x, y = xs[3], ys[3]
    inputs = [x]
    for stage, state in zip(split.stages[:-1], ts.stages[:-1]):
        inputs.append(run_layers(stage.layers, state.params, state.layer_state, inputs[-1])[0])

    @jax.jit
    def updates(ts, inputs, y):
        """Every stage's update on this batch with its pending target; and stage 1's
        update with an invalid (placeholder) target."""
        out = [stage.update(state, x, y, pending)
               for stage, state, x, pending in zip(split.stages, ts.stages, inputs, ts.pending)]
        placeholder = jax.tree.map(jnp.zeros_like, ts.pending[1])  # valid=False
        return out, split.stages[1].update(ts.stages[1], inputs[1], y, placeholder)

    out, with_placeholder = updates(ts, inputs, y)
    return split, ts, inputs, y, out, with_placeholder


def dni_fig2_reference(split, stages, inputs, y, fitted, conditioned):
    """Independently, for each stage k ≥ 1: its output h, the gradient δ for h (true loss
    gradient at the top, else the fitted predictor's SG(h, y)), and δ backpropagated
    through the stage to its input and to the output of its first layer."""
    labels = jax.nn.one_hot(y, C)
    predictor = P.linear(conditioned=conditioned)
    refs = []
    for k in range(1, len(split.stages)):
        stage, state = split.stages[k], stages[k]

        def first(x, stage=stage, state=state):
            return run_layers(stage.layers[:1], state.params[:1], state.layer_state[:1], x)[0]

        def rest(g, stage=stage, state=state):
            return run_layers(stage.layers[1:], state.params[1:], state.layer_state[1:], g)[0]

        h, vjp = jax.vjp(lambda x: rest(first(x)), inputs[k])
        if stage.feedback is None:
            delta = jax.grad(lambda p: losses.softmax_cross_entropy(p, y))(h)
        else:  # the predictor regresses per-example gradients: B × those of the mean loss
            sg, _ = predictor.apply(fitted[k], h, labels if conditioned else None, train=True)
            delta = sg / B
        _, vjp_rest = jax.vjp(rest, first(inputs[k]))
        refs.append(dict(h=h, delta=delta, grad=vjp(delta)[0], pre_grad=vjp_rest(delta)[0]))
    return refs


def test_target_is_synthetic_gradient_backpropagated_through_the_stage():
    conditioned = CONDITIONED
    split, ts, inputs, y, out, _ = perturbed_dni_state()
    # Stage k's predictor as fitted (on this update) to its pending target, then used on h.
    fitted = [None] + [o[0].feedback.variables if o[0].feedback else None for o in out[1:]]
    refs = jax.jit(functools.partial(dni_fig2_reference, split, conditioned=conditioned))(
        ts.stages, inputs, y, fitted)
    labels = jax.nn.one_hot(y, C)
    assert out[0][2] is None  # the bottom stage has nobody to send a target to

    for k, ref in zip(range(1, len(split.stages)), refs):  # every stage sending a target
        stage, state, pending = split.stages[k], ts.stages[k], ts.pending[k]
        new_state, h, below, _ = out[k]
        np.testing.assert_allclose(h, ref["h"], rtol=1e-6, atol=1e-6)
        if stage.feedback is not None:
            assert bool(pending.valid)
            assert int(new_state.step) == int(state.step) + 1
            assert float(jnp.abs(ref["delta"]).max()) > 1e-3  # a non-trivial SG
        assert isinstance(below, sgjax.Target)
        np.testing.assert_array_equal(below.inputs, inputs[k])
        np.testing.assert_array_equal(below.labels, labels)
        np.testing.assert_allclose(below.grad, ref["grad"], rtol=1e-5, atol=1e-7)
        # DNI reads neither pre_grad nor the output error: the message leaves them out.
        assert below.pre_grad is None and below.error is None
        assert bool(below.valid)
        chex.assert_shape(below.grad, (B, *stage.in_shape))


@jax.jit
def fit_reference(variables, opt_state, pending):
    predictor, opt = P.linear(conditioned=True), optax.adam(LR)

    def l2(params):  # per-example targets: B × the gradient of the batch-mean loss
        s, _ = predictor.apply({**variables, "params": params}, pending.inputs, pending.labels)
        return jnp.sum((s - B * pending.grad) ** 2)

    loss, g = jax.value_and_grad(l2)(variables["params"])
    updates, _ = opt.update(g, opt_state, variables["params"])
    return optax.apply_updates(variables["params"], updates), loss


def test_predictor_is_fitted_to_the_pending_target():
    """Fit-then-use: one Adam step on Σ‖SG(h, y) − Bδ‖² with the target from the stage above."""
    split, ts, inputs, y, out, _ = perturbed_dni_state()
    state, pending = ts.stages[1], ts.pending[1]
    new_state, _, _, info = out[1]
    assert bool(pending.valid)
    expected, loss = fit_reference(state.feedback.variables, state.feedback.opt_state, pending)
    chex.assert_trees_all_close(new_state.feedback.variables["params"], expected,
                                rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(info["sg_loss"], loss, rtol=1e-5)


def test_invalid_target_does_not_fit_the_predictor():
    split, ts, inputs, y, out, with_placeholder = perturbed_dni_state()
    new_state, h, below, info = with_placeholder
    chex.assert_trees_all_equal(new_state.feedback, ts.stages[1].feedback)
    assert float(info["sg_loss"]) == 0.0
    # The stage itself still updates (with the unfitted predictor's gradient).
    assert int(new_state.step) == int(ts.stages[1].step) + 1
    np.testing.assert_array_equal(h, out[1][1])


def test_split_apply_is_inference_through_all_stages():
    split = make(NET, (3, 6), F.backprop())
    states = split.init(jax.random.key(0))
    x = batches(1)[0][0]
    out = split.apply(states, x)
    ref, _ = run_layers(NET, flat(states, "params"), flat(states, "layer_state"), x,
                        train=False)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------ 8. bad input --


SMALL = (L.dense(W), L.relu, L.dense(W), L.dense(C))


def small(cuts=(1,), feedback=None, **kw):
    feedback = F.backprop() if feedback is None else feedback
    return make(SMALL, cuts, feedback, **kw)


@pytest.mark.parametrize("cut", [0, 4, 7, -1])
def test_cut_out_of_range(cut):
    with pytest.raises(ValueError, match=rf"cut {cut} is out of range"):
        small((cut,))


@pytest.mark.parametrize("cuts", [(2, 1), (1, 1), (1, 3, 2)])
def test_unsorted_or_duplicate_cuts(cuts):
    with pytest.raises(ValueError, match=rf"cuts \({', '.join(map(str, cuts))}\) must be"):
        small(cuts)


def test_bad_cut_values():
    with pytest.raises(ValueError, match="cuts='all'"):
        small("all")
    with pytest.raises(TypeError, match=r"cut 1\.5 is not an integer"):
        small((1.5,))


def test_unknown_feedback_in_list():
    with pytest.raises(TypeError, match=r"after stage 1 is 'dni'"):
        small((1, 2), [F.backprop(), "dni"])


def test_unknown_feedback_string():
    with pytest.raises(TypeError, match=r"feedback='dni'"):
        small((1, 2), "dni")


def test_feedback_count_mismatch_and_missing():
    with pytest.raises(ValueError, match="got 3 feedbacks for 2 cuts"):
        small((1, 2), [F.none()] * 3)
    with pytest.raises(ValueError, match="no feedback"):
        make(SMALL, (1,), None)


def test_layers_must_be_layers():
    with pytest.raises(TypeError, match=r"layers\[1\] is 'relu'"):
        make((L.dense(W), "relu"), (), None)
    with pytest.raises(ValueError, match="at least one layer"):
        make((), (), None)


@pytest.mark.parametrize("wrong", [3, 2 * W])
def test_predictor_output_shape_mismatch(wrong):
    predictor = P.from_layer(L.dense(wrong))
    split = small((2,), F.synthetic(predictor))
    with pytest.raises(ValueError, match=rf"produces shape \({wrong},\).*shape \({W},\)"):
        jax.eval_shape(split.init, jax.random.key(0))  # abstractly: nothing to compile


def test_missing_label_for_conditioned_predictor():
    split = small((2,), F.synthetic(P.linear(conditioned=True)))
    xs, ys = batches(1)
    ts = jax.eval_shape(sgjax.sync(split).init, jax.random.key(0), (xs[0], ys[0]))
    with pytest.raises(ValueError, match="conditioned on the label.*no label was given"):
        jax.eval_shape(split.stages[0].update, ts.stages[0], xs[0], None, ts.pending[0])


@pytest.mark.parametrize("shape", [(B, D + 1), (B, D, 1), (B,)])
def test_wrong_input_shape_to_a_stage(shape):
    split = small((2,))
    states = split.init(jax.random.key(0))
    x = jnp.zeros(shape)
    with pytest.raises(ValueError, match=rf"stage 0 expects .*got {re_tuple(shape)}"):
        split.stages[0].forward(states[0], x)
    with pytest.raises(ValueError, match=rf"got {re_tuple(shape)}"):
        split.stages[0].update(states[0], x, jnp.zeros((B,), jnp.int32), None)


def test_stage_with_feedback_needs_a_target():
    split = small((2,), F.backprop())
    states = split.init(jax.random.key(0))
    with pytest.raises(ValueError, match="stage 0 has the update-locked feedback Bprop"):
        split.stages[0].update(states[0], jnp.zeros((B, D)), jnp.zeros((B,), jnp.int32))
    # an unlocked feedback without a target only predicts (nothing to fit)
    split = small((2,), F.none())
    states = split.init(jax.random.key(0))
    new, *_ = split.stages[0].update(states[0], jnp.zeros((B, D)), jnp.zeros((B,), jnp.int32))
    assert int(new.step) == 1


def test_integer_labels_need_num_classes():
    split = make(SMALL, (), None, num_classes=None)
    states = split.init(jax.random.key(0))
    with pytest.raises(ValueError, match="num_classes"):
        split.stages[0].update(states[0], jnp.zeros((B, D)), jnp.zeros((B,), jnp.int32))


def re_tuple(shape):
    return "\\(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + "\\)"


# ------------------------------------------------------------- bad input (§4) --


@pytest.mark.parametrize("scale, error", [("16", TypeError), (None, None), (True, TypeError),
                                          (0, ValueError), (-2.0, ValueError),
                                          (float("nan"), ValueError), (float("inf"), ValueError),
                                          ([16], TypeError)])
def test_example_scale_must_be_a_positive_number(scale, error):
    if error is None:
        assert small(example_scale=scale).stages  # None: measured from the loss
        return
    with pytest.raises(error, match=r"example_scale=.*(number|positive)"):
        small(example_scale=scale)


@pytest.mark.parametrize("feedback", [F.synthetic, F.backprop, [F.backprop(), F.none]],
                         ids=["synthetic", "backprop", "in-list"])
def test_feedback_constructor_not_called(feedback):
    with pytest.raises(TypeError, match=r"is the function (synthetic|backprop|none), not a "
                                        r"Feedback: call it"):
        small((1, 2), feedback)


@pytest.mark.parametrize("feedback", [P.linear(), [F.backprop(), P.mlp((4,))]],
                         ids=["alone", "in-list"])
def test_predictor_where_a_feedback_is_expected(feedback):
    with pytest.raises(TypeError, match=r"Predictor .*not a Feedback: wrap it.*synthetic"):
        small((1, 2), feedback)


@pytest.mark.parametrize("cuts", [(), "every"])
def test_feedback_without_a_cut_is_rejected(cuts):
    with pytest.raises(ValueError, match=r"feedback=.*no cut to put it on.*at least one cut"):
        make((L.dense(C),), cuts, F.synthetic(P.linear()))
    assert len(make((L.dense(C),), cuts, None).stages) == 1  # without feedback: backprop


def test_dni_step_on_another_batch_size_is_rejected_at_trace_time():
    split = small((2,), F.synthetic(P.linear()))  # batch-mean loss: example_scale = B
    states = split.init(jax.random.key(0))
    x, y = jnp.zeros((B // 2, D)), jnp.zeros((B // 2,), jnp.int32)
    for run in (lambda: jax.eval_shape(split.stages[0].update, states[0], x, y, None),
                lambda: split.stages[0].forward_pass(states[0], x)):
        with pytest.raises(ValueError, match=rf"batch_size={B} but is trained on a batch of "
                                             rf"{B // 2}.*batch_size={B // 2}"):
            run()
    chex.assert_shape(split.apply(states, x), (B // 2, C))  # inference: any batch size
    # the batch size does not matter where nothing is scaled by it
    for ok in (small((2,), F.backprop()), small((2,), F.synthetic(P.linear()), example_scale=1)):
        jax.eval_shape(ok.stages[0].forward_pass, ok.init(jax.random.key(0))[0], x)


# -------------------------------------------------- per-position labels (§3) --

T = 3
SEQ = (L.dense(W), L.relu, L.dense(C))  # applied to every position of (B, T, D)


def sequence_split(feedback, num_classes=C):
    return sgjax.split_at(SEQ, (2,), feedback=feedback, loss=losses.softmax_cross_entropy,
                          optimizer=optax.adam(LR), input_shape=(T, D), batch_size=B,
                          num_classes=num_classes)


def test_integer_labels_per_position_reach_a_per_position_cdni_predictor():
    split = sequence_split(F.synthetic(P.mlp((5,), conditioned=True, per_position=True)))
    x = jax.random.normal(jax.random.key(1), (B, T, D))
    y = jax.random.randint(jax.random.key(2), (B, T), 0, C)
    split.check_batch(x, y)
    chex.assert_shape(split.label_fn(y), (B, T, C))
    states = split.init(jax.random.key(0))
    new1, h, _, _ = split.stages[0].update(states[0], x, y, None)
    new2, _, target, info = split.stages[1].update(states[1], h, y, None)
    chex.assert_shape([target.grad, target.labels], [(B, T, W), (B, T, C)])
    fitted, fit_info = split.stages[0].fit(new1, target)
    assert np.isfinite(float(info["loss"])) and np.isfinite(float(fit_info["sg_loss"]))
    kernel = L.params_of(fitted.feedback.variables)[0]["kernel"]
    chex.assert_shape(kernel, (W + C, 5))  # one model for every position: no T in it


def test_bad_per_position_labels_are_named():
    split = sequence_split(F.backprop())
    with pytest.raises(ValueError, match=rf"must have shape \(batch, {T}\), got \({B},\)"):
        split.check_batch(jnp.zeros((B, T, D)), jnp.zeros((B,), jnp.int32))
    with pytest.raises(ValueError, match=rf"num_classes={C + 1} but the network outputs "
                                         rf"shape \({T}, {C}\).*{C + 1} on its last axis"):
        sequence_split(F.backprop(), num_classes=C + 1)
    # per-position labels cannot condition activations whose positions are gone
    pooled = (L.dense(W), L.elementwise(lambda h: h.mean(1)), L.dense(T * C),
              L.elementwise(lambda h: h.reshape(h.shape[0], T, C)))
    with pytest.raises(ValueError, match=rf"conditioned on labels of shape \({T}, {C}\).*"
                                         rf"activations there have shape \({W},\)"):
        sgjax.split_at(pooled, (2,), feedback=F.synthetic(P.linear(conditioned=True)),
                       loss=losses.softmax_cross_entropy, optimizer=optax.adam(LR),
                       input_shape=(T, D), batch_size=B, num_classes=C)


# ---------------------------------------------------- stochastic layers (§3) --


@needs_nnx_view
def test_stochastic_layers_get_a_stage_rng_and_parameters_stay_as_before():
    dropout = L.from_flax(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    net = (L.dense(W), dropout, L.dense(W), L.dense(C))
    same = (L.dense(W), L.identity, L.dense(W), L.dense(C))
    split, ref = make(net, (2,), F.synthetic(P.linear())), make(same, (2,), F.synthetic(
        P.linear()))
    states, ref_states = split.init(jax.random.key(3)), ref.init(jax.random.key(3))
    chex.assert_trees_all_equal(flat(states, "params"), flat(ref_states, "params"))
    chex.assert_trees_all_equal(states[0].feedback, ref_states[0].feedback)
    assert states[1].rng == () and ref_states[0].rng == ()  # only where a layer draws
    np.testing.assert_array_equal(jax.random.key_data(states[0].rng), jax.random.key_data(
        jax.random.fold_in(jax.random.split(jax.random.key(3), 2)[0], split_module.RNG_STREAM)))

    x = jnp.ones((B, D))
    stage = split.stages[0]
    h0 = stage.forward(states[0], x)
    np.testing.assert_array_equal(h0, stage.forward_pass(states[0], x)[0])  # same masks
    keys = split_module.stage_rngs(states[0], 2)
    a = L.dense(W).apply({"params": states[0].params[0]}, x)[0]
    np.testing.assert_array_equal(h0, dropout.apply({}, a, train=True, rng=keys[1])[0])
    new, h_update, _, _ = stage.update(states[0], x, jnp.zeros((B,), jnp.int32))
    np.testing.assert_array_equal(h_update, h0)
    assert int(new.step) == 1 and new.rng is states[0].rng
    assert not np.array_equal(stage.forward(new, x) == 0, h0 == 0)  # next step: new masks
    np.testing.assert_array_equal(stage.apply(states[0], x), a)  # inference: no dropout


@needs_nnx_view
def test_stochastic_stages_under_vmap_eval_shape_and_cond():
    """What the trainers do with a stage state (vmap over seeds, abstract evaluation for
    placeholders, ``lax.cond`` for a stage that skips) works with its rng."""
    dropout = L.from_flax(nnx.Dropout(0.5, rngs=nnx.Rngs(0)))
    split = make((L.dense(W), dropout, L.dense(C)), (2,), F.synthetic(P.linear()))
    stage = split.stages[0]
    x, y = jnp.ones((B, D)), jnp.zeros((B,), jnp.int32)
    states = jax.vmap(split.init)(jax.random.split(jax.random.key(0), 2))
    h = jax.vmap(stage.forward, (0, None))(states[0], x)
    assert not np.array_equal(h[0] == 0, h[1] == 0)  # each seed its own masks
    state = split.init(jax.random.key(0))[0]
    shapes = jax.eval_shape(stage.update, state, x, y, None)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes[0], state)

    def skip_or_run(active):
        return jax.lax.cond(active, lambda s: stage.update(s, x, y, None)[0],
                            lambda s: s, state)

    assert int(jax.jit(skip_or_run)(True).step) == 1
