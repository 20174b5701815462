"""sgjax.multirate: two networks at different rates joined by a feedback (DNI §3.3, A.4)."""

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
from sgjax import multirate as M
from sgjax import predictors as P
from sgjax import recurrent as R

B, D_IN, M_SIZE, C_A, C_B = 3, 7, 5, 3, 4


def nets(message_size=M_SIZE, b_input=M_SIZE):
    a = M.network(R.lstm(6), (D_IN,), C_A,
                  encoder=L.serial(L.dense(8), L.batch_norm(), L.relu),
                  message=L.serial(L.dense(message_size), L.batch_norm()))
    b = M.network(R.lstm(4), (b_input,), C_B)
    return a, b


def windows(T, W, key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return M.Window(jax.random.normal(k1, (W, T * T, B, D_IN)),
                    jax.random.randint(k2, (W, T, B), 0, C_A),
                    jax.random.randint(k3, (W, T, B), 0, C_B))


def record_grads(lr=0.1):
    """SGD whose state is the last gradient it received, so gradients compare exactly."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p),
        lambda g, s, p=None: (jax.tree.map(lambda x: -lr * x, g), g))


def dni(hidden=8, alpha=10.0):
    return F.scaled(F.synthetic(M.message_sg_model(hidden)), alpha)


FAST = {"xla_backend_optimization_level": 0}  # compiling dominates these tiny runs


def scan(system):
    """``lax.scan`` of ``system.step`` over windows, compiled cheaply (see
    :func:`test_traced_once_and_same_seed_same_numbers` for :func:`sgjax.fused`)."""
    return jax.jit(lambda s, ws: jax.lax.scan(system.step, s, ws), compiler_options=FAST)


def run(system, ws, key=1):
    return scan(system)(system.init(jax.random.key(key)), ws)


# 1 ------------------------------------------------------------------- B ticks once per T steps


@pytest.mark.parametrize("T,a_every,kind", [(1, 1, "none"), (4, 2, "dni")])
def test_b_steps_once_per_T_steps_of_a(T, a_every, kind):
    W = 2
    a, b = nets()
    opt = optax.adam(1e-2)
    if kind == "e2e":
        system = M.end_to_end(a, b, opt, T=T, batch_size=B)
    else:
        fb = {"dni": dni(), "none": F.none(), "oracle": F.backprop()}[kind]
        system = M.decoupled(a, b, fb, opt, T=T, batch_size=B, a_every=a_every)
    state, info = run(system, windows(T, W))
    # counted by the core scans themselves
    assert int(state.a_steps) == W * T * T
    assert int(state.b_steps) == W * T
    assert int(state.b_updates) == W
    assert int(state.a_updates) == W * (T // a_every if kind != "e2e" else 1)
    # the A step after which each of B's ticks read its message: every T-th step
    expected = np.arange(1, W * T + 1).reshape(W, T) * T
    np.testing.assert_array_equal(np.asarray(info["b_ticks_at"]), expected)


# 2 ------------------------------------------------------- oracle feedback == end to end


@pytest.mark.parametrize("T", [3])
def test_oracle_feedback_gives_end_to_end_gradients(T):
    """With B's true gradient as the feedback (update locked, so A updates once per
    window), A's and B's gradients equal end-to-end backprop's of L_A + L_B, window
    after window (same data, same update times)."""
    W = 2
    a, b = nets()
    e2e = M.end_to_end(a, b, record_grads(), T=T, batch_size=B)
    oracle = M.decoupled(a, b, F.backprop(), record_grads(), T=T, batch_size=B, a_every=T)
    ws = windows(T, W)
    s_e, i_e = run(e2e, ws)
    s_o, i_o = run(oracle, ws)
    # the optimiser state is the last window's gradient
    chex.assert_trees_all_close(s_o.a.opt_state, s_e.a.opt_state, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(s_o.b.opt_state, s_e.b.opt_state, atol=1e-6, rtol=0)
    chex.assert_trees_all_close((s_o.a.params, s_o.b.params, s_o.a.state),
                                (s_e.a.params, s_e.b.params, s_e.a.state), atol=1e-6, rtol=0)
    np.testing.assert_allclose(i_o["a_loss"], i_e["a_loss"], atol=1e-6)
    np.testing.assert_allclose(i_o["b_loss"], i_e["b_loss"], atol=1e-6)
    for s, i in ((s_e, i_e), (s_o, i_o)):  # B ticked once per T steps of A; one update
        assert (int(s.a_steps), int(s.b_steps), int(s.a_updates)) == (W * T * T, W * T, W)
        np.testing.assert_array_equal(np.asarray(i["b_ticks_at"]),
                                      np.arange(1, W * T + 1).reshape(W, T) * T)
    # and the message gradient is not trivially zero
    assert float(jnp.abs(s_e.a.opt_state["message"][0]["kernel"]).max()) > 1e-4


def test_end_to_end_is_jax_grad_of_the_joint_loss():
    """The end-to-end gradient against a hand-written one-graph loss (a Python loop)."""
    T = 2
    a, b = nets()
    e2e = M.end_to_end(a, b, record_grads(), T=T, batch_size=B)
    state = e2e.init(jax.random.key(1))
    w = jax.tree.map(lambda x: x[0], windows(T, 1))

    def joint(params):
        pa, pb = params
        va = {k: L.with_params(state.a.state[k], pa[k]) for k in pa}
        vb = {k: L.with_params(state.b.state[k], pb[k]) for k in pb}
        z, _ = a.encoder.apply(va["encoder"], w.inputs.reshape(-1, D_IN), train=True)
        z = z.reshape(T * T, B, -1)
        ca, cb, total = a.core.initial_carry(B), b.core.initial_carry(B), 0.0
        hs = []
        for t in range(T * T):
            ca = a.core.apply(va["core"], ca, z[t])
            if (t + 1) % T == 0:
                hs.append(ca.h)
        h = jnp.concatenate(hs)
        logits_a, _ = a.head.apply(va["head"], h)
        msg, _ = a.message.apply(va["message"], h, train=True)
        for k in range(T):
            total += jnp.mean(M.cross_entropy(logits_a[k * B:(k + 1) * B], w.a_targets[k]))
            cb = b.core.apply(vb["core"], cb, msg[k * B:(k + 1) * B])
            logits_b, _ = b.head.apply(vb["head"], cb.h)
            total += jnp.mean(M.cross_entropy(logits_b, w.b_targets[k]))
        return total

    want = jax.jit(jax.grad(joint), compiler_options=FAST)((state.a.params, state.b.params))
    new, _ = jax.jit(e2e.step, compiler_options=FAST)(state, w)
    chex.assert_trees_all_close((new.a.opt_state, new.b.opt_state), want, atol=1e-6, rtol=0)


# 3 ------------------------------------------------------------------------ the systems


def test_without_dni_a_message_layer_never_learns():
    """Decoupled without DNI: A gets no gradient from B, so its message layer stays at
    its initialisation, while the rest of A and all of B train."""
    T = 2
    a, b = nets()
    system = M.decoupled(a, b, F.none(), optax.adam(1e-2), T=T, batch_size=B)
    s0 = system.init(jax.random.key(1))
    s, _ = scan(system)(s0, windows(T, 2))
    chex.assert_trees_all_equal(s.a.params["message"], s0.a.params["message"])
    for part in ("encoder", "core", "head"):
        assert not np.allclose(jax.tree.leaves(s.a.params[part])[0],
                               jax.tree.leaves(s0.a.params[part])[0])
    assert not np.allclose(jax.tree.leaves(s.b.params)[0], jax.tree.leaves(s0.b.params)[0])


def test_dni_consumes_zero_then_fitted_synthetic_gradient():
    """The SG model is zero-initialised (first window: A's message layer gets nothing),
    is fitted at the end of every window, and is then used, scaled by alpha."""
    T = 2
    a, b = nets()
    system = M.decoupled(a, b, dni(alpha=10.0), optax.adam(1e-2), T=T, batch_size=B)
    s0 = system.init(jax.random.key(1))
    step = jax.jit(system.step, compiler_options=FAST)
    ws = windows(T, 2)
    s1, i1 = step(s0, jax.tree.map(lambda x: x[0], ws))
    assert float(i1["sg_norm"]) == 0.0 and float(i1["sg_loss"]) > 0.0
    chex.assert_trees_all_equal(s1.a.params["message"], s0.a.params["message"])
    s2, i2 = step(s1, jax.tree.map(lambda x: x[1], ws))
    assert float(i2["sg_norm"]) > 0.0
    assert not np.allclose(s2.a.params["message"][0]["kernel"],
                           s1.a.params["message"][0]["kernel"])


def test_apply_shapes_and_inference_mode():
    T, W = 2, 3
    a, b = nets()
    system = M.decoupled(a, b, dni(), optax.adam(1e-2), T=T, batch_size=B)
    state = system.init(jax.random.key(0))
    xs = jax.random.normal(jax.random.key(2), (W * T * T, 5, D_IN))  # any batch size
    la, lb = jax.jit(system.apply, compiler_options=FAST)(state, xs)
    chex.assert_shape(la, (W * T, 5, C_A))
    chex.assert_shape(lb, (W * T, 5, C_B))
    chex.assert_tree_all_finite((la, lb))
    # inference mode: an example's prediction does not depend on the rest of the batch
    la1, lb1 = system.apply(state, xs[:, :1])
    chex.assert_trees_all_close((la1, lb1), (la[:, :1], lb[:, :1]), atol=1e-5)


# 4 --------------------------------------------------------------- traced once, reproducible


def test_traced_once_and_same_seed_same_numbers():
    T = 2
    a, b = nets()
    traces = []

    def a_loss(logits, y):
        traces.append(1)
        return M.cross_entropy(logits, y)

    system = M.decoupled(a, b, dni(), optax.adam(1e-2), T=T, batch_size=B, a_loss=a_loss)
    run_ = sgjax.fused(system.step)
    ws = windows(T, 2)
    s1, i1 = run_(system.init(jax.random.key(3)), ws)
    n = len(traces)
    s2, i2 = run_(system.init(jax.random.key(3)), ws)
    s3, _ = run_(s2, ws)
    assert len(traces) == n  # no retrace on new states of the same structure
    chex.assert_trees_all_equal(s1, s2)
    chex.assert_trees_all_equal(i1, i2)
    s4, _ = run_(system.init(jax.random.key(4)), ws)
    assert not np.allclose(jax.tree.leaves(s4.a.params)[0], jax.tree.leaves(s1.a.params)[0])
    chex.assert_trees_all_equal_structs(s3, s1)


# 5 ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("T", [0, -1, 1.5, True])
def test_bad_T(T):
    a, b = nets()
    with pytest.raises(ValueError, match=r"T="):
        M.decoupled(a, b, dni(), optax.adam(1e-2), T=T, batch_size=B)
    with pytest.raises(ValueError, match=r"T="):
        M.end_to_end(a, b, optax.adam(1e-2), T=T, batch_size=B)


def test_mismatched_message_shape():
    a, b = nets(message_size=M_SIZE, b_input=M_SIZE + 1)
    with pytest.raises(ValueError, match=r"message has shape \(5,\).*\(6,\)"):
        M.decoupled(a, b, dni(), optax.adam(1e-2), T=2, batch_size=B)
    with pytest.raises(ValueError, match=r"message has shape"):
        M.end_to_end(a, b, optax.adam(1e-2), T=2, batch_size=B)


def test_a_without_message():
    a, b = nets()
    with pytest.raises(ValueError, match="sends no message"):
        M.end_to_end(a._replace(message=None), b, optax.adam(1e-2), T=2, batch_size=B)


def test_predictor_of_wrong_output_shape():
    a, b = nets()
    wrong = P.from_layer(L.dense(M_SIZE + 2), description="dense(7)")
    system = M.decoupled(a, b, F.synthetic(wrong), optax.adam(1e-2), T=2, batch_size=B)
    with pytest.raises(ValueError, match=r"dense\(7\) produces shape \(7,\).*\(5,\)"):
        system.init(jax.random.key(0))


@pytest.mark.parametrize("a_every", [0, 3, 5])
def test_bad_a_every(a_every):
    a, b = nets()
    with pytest.raises(ValueError, match=f"a_every={a_every}"):
        M.decoupled(a, b, dni(), optax.adam(1e-2), T=4, batch_size=B, a_every=a_every)


def test_update_locked_feedback_needs_a_every_T():
    a, b = nets()
    with pytest.raises(ValueError, match="update locked.*a_every must be 4"):
        M.decoupled(a, b, F.backprop(), optax.adam(1e-2), T=4, batch_size=B, a_every=1)


def test_bad_window_shape():
    a, b = nets()
    system = M.decoupled(a, b, dni(), optax.adam(1e-2), T=2, batch_size=B)
    state = system.init(jax.random.key(0))
    w = jax.tree.map(lambda x: x[0], windows(3, 1))  # a T=3 window
    with pytest.raises(ValueError, match=r"window inputs have shape \(9, 3, 7\)"):
        system.step(state, w)
