"""sgjax.recurrent: truncated BPTT with a feedback at the truncation boundary (DNI §2.2)."""

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
from sgjax import predictors as P
from sgjax import recurrent as R

N, B, T, D_IN, C = 4, 3, 2, 5, 6


def xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def stream(K, key=1, reset_at=()):
    k1, k2 = jax.random.split(jax.random.key(key))
    xs = jax.random.normal(k1, (K * T, B, D_IN))
    ys = jax.random.randint(k2, (K * T, B), 0, C)
    resets = jnp.zeros((K * T, B), bool)
    for t in reset_at:
        resets = resets.at[t].set(True)
    return xs, ys, resets


def dni(width=N, alpha=0.1):
    return F.scaled(F.synthetic(R.sg_model(width)), alpha)


def reference_losses(net, params, carry, xs, ys, resets):
    """A hand-written unroll: a Python loop over steps, batch-mean loss per step
    (summed over steps)."""
    total = 0.0
    zero = net.core.initial_carry(B)
    for t in range(xs.shape[0]):
        carry = jax.tree.map(lambda z, s, r=resets[t]: jnp.where(r[:, None], z, s), zero, carry)
        carry = net.core.apply(params["core"], carry, xs[t])
        logits, _ = net.head.apply(params["head"], carry.h)
        total = total + jnp.mean(xent(logits, ys[t]))
    return total, carry


# 1 ------------------------------------------------------------------------------------------


def test_none_is_handwritten_truncated_bptt():
    K = 3
    xs, ys, resets = stream(K, reset_at=(3,))  # chunk 1 holds a new episode's start
    net = R.net(R.lstm(N), D_IN, C)
    opt = optax.sgd(0.5)
    tr = R.truncated_bptt(net, xent, F.none(), opt, T=T, batch_size=B)
    state = tr.init(jax.random.key(0))
    params, carry = state.params, state.carry
    step = jax.jit(tr.step)
    chunks = R.chunked(xs, ys, T, resets)
    ref = jax.jit(jax.value_and_grad(
        lambda p, carry, x, y, r: reference_losses(net, p, carry, x, y, r), has_aux=True))
    for k in range(K):
        sl = slice(k * T, (k + 1) * T)
        (loss, new_carry), g = ref(params, carry, xs[sl], ys[sl], resets[sl])
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, g)
        carry = new_carry
        state, info = step(state, jax.tree.map(lambda a, k=k: a[k], chunks))
        np.testing.assert_allclose(info["loss"], loss, atol=1e-6)
        chex.assert_trees_all_close(state.params, params, atol=1e-6, rtol=0)
        chex.assert_trees_all_close(state.carry, carry, atol=1e-6, rtol=0)


# 2 ------------------------------------------------------------------------------------------


def test_oracle_synthetic_gradient_gives_full_bptt():
    K = 3
    xs, ys, resets = stream(K)
    net = R.net(R.lstm(N), D_IN, C)
    params = net.init(jax.random.key(0))
    zero = net.core.initial_carry(B)

    def full_loss(params, eps):
        """Full BPTT over K·T steps; ``eps[k]`` is added to the carry after chunk k."""
        carry, total, carries = zero, 0.0, []
        for k in range(K):
            sl = slice(k * T, (k + 1) * T)
            loss, carry = reference_losses(net, params, carry, xs[sl], ys[sl], resets[sl])
            total = total + loss
            carry = R.unflatten_carry(R.flatten_carry(carry) + eps[k])
            carries.append(R.flatten_carry(carry))
        return total, jnp.stack(carries)

    eps = jnp.zeros((K, B, 2 * N))
    # ∂L/∂eps_k is the true gradient from the future at s_k, ∂L_{>k}/∂s_k
    (_, table), (full_grad, future) = jax.jit(jax.value_and_grad(
        full_loss, argnums=(0, 1), has_aux=True))(params, eps)

    def oracle(h, y):  # per-example units: the trainer's loss is a batch mean
        k = jnp.argmin(jnp.sum((table - h[None]) ** 2, axis=(1, 2)))
        return B * future[k]

    def summed_chunk_grads(fb):
        tr = R.truncated_bptt(net, xent, fb, optax.sgd(0.0), T=T, batch_size=B)
        state = tr.init(jax.random.key(0))._replace(params=params)
        chunks = R.chunked(xs, ys, T, resets)
        total, sgs = jax.tree.map(jnp.zeros_like, params), []
        backward = jax.jit(tr.backward)
        for k in range(K):
            bw = backward(state, jax.tree.map(lambda a, k=k: a[k], chunks))
            sgs.append(bw.sg)
            total = jax.tree.map(jnp.add, total, bw.grads)
            state = state._replace(carry=bw.carry, started=jnp.ones((), bool))
        return total, jnp.stack(sgs)

    total, sgs = summed_chunk_grads(F.synthetic(P.from_fn(oracle, description="oracle")))
    np.testing.assert_allclose(sgs, future, atol=1e-6)  # scale 1: the oracle is consumed as is
    chex.assert_trees_all_close(total, full_grad, atol=1e-6, rtol=0)
    # plain truncation (no gradient from the future) differs: the comparison can fail
    truncated, _ = summed_chunk_grads(F.none())
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), truncated, full_grad)
    assert max(jax.tree.leaves(diff)) > 1e-4


# 3 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bootstrap", ["consumed", "unscaled"])
def test_bootstrapped_target_is_vjp_through_next_chunk_plus_scaled_sg(bootstrap, alpha=0.1):
    """``consumed``: the target includes the synthetic gradient as consumed (×α);
    ``unscaled``: the model's own prediction (eq. 3's undiscounted δ_T), while the
    parameter gradient consumes ×α in both."""
    K = 4
    xs, ys, resets = stream(K)
    net = R.net(R.lstm(N), D_IN, C)
    tr = R.truncated_bptt(net, xent, dni(alpha=alpha), optax.adam(3e-2), T=T, batch_size=B,
                          bootstrap=bootstrap)
    state = tr.init(jax.random.key(0))
    chunks = R.chunked(xs, ys, T, resets)
    step = jax.jit(tr.step)
    for k in range(K - 1):  # the predictor moves away from zero
        state, _ = step(state, jax.tree.map(lambda a, k=k: a[k], chunks))
    sl = slice((K - 1) * T, K * T)
    bw = jax.jit(tr.backward)(state, jax.tree.map(lambda a: a[K - 1], chunks))

    s0 = R.flatten_carry(state.carry)
    _, sT = jax.jit(lambda c: reference_losses(net, state.params, c, xs[sl], ys[sl],
                                               resets[sl]))(state.carry)
    m, _ = R.sg_model(N).apply(state.fstate.variables, R.flatten_carry(sT))
    sg = alpha * m / B  # scaled when consumed; per-example model, batch-mean loss
    assert float(jnp.abs(sg).max()) > 1e-4  # a non-trivial synthetic gradient

    target_sg = sg if bootstrap == "consumed" else sg / alpha

    def f(params, s0, into_target):
        loss, sT = reference_losses(net, params, R.unflatten_carry(s0), xs[sl], ys[sl],
                                    resets[sl])
        return loss + jnp.vdot(into_target, R.flatten_carry(sT))

    expected = jax.jit(jax.grad(f, argnums=1))(state.params, s0, target_sg)
    np.testing.assert_allclose(bw.sg, sg, atol=1e-6)
    np.testing.assert_allclose(bw.sg_target, expected, atol=1e-6)
    # the parameters consume the scaled synthetic gradient either way
    chex.assert_trees_all_close(
        bw.grads, jax.jit(jax.grad(f))(state.params, s0, sg), atol=1e-6)
    # and that target is what the predictor is fitted to (per-example units)
    new, info = jax.jit(tr.update)(state, jax.tree.map(lambda a: a[K - 1], chunks), bw)
    m0, _ = R.sg_model(N).apply(state.fstate.variables, s0)
    np.testing.assert_allclose(info["sg_loss"], jnp.sum((m0 - B * expected) ** 2), rtol=1e-5)


# 4 ------------------------------------------------------------------------------------------


def test_aux_targets_are_T_steps_ahead_by_hand():
    future = jnp.array([10.0, 20.0, 30.0]).reshape(3, 1, 1)  # T = 3, B = 1, D = 1
    no = jnp.zeros((3, 1), bool)
    targets, valid = R.aux_targets(future, no, no)
    # step i of the previous chunk (time t) -> step i of this chunk (time t + 3)
    assert targets.ravel().tolist() == [10.0, 20.0, 30.0]
    assert valid.ravel().tolist() == [True, True, True]
    # a reset before step 1 of this chunk (time 4) lies in (t, t + 3] for t = 1, 2
    targets, valid = R.aux_targets(future, no, no.at[1].set(True))
    assert valid.ravel().tolist() == [True, False, False]
    assert targets.ravel().tolist() == [10.0, 0.0, 0.0]
    # a reset before step 2 of the previous chunk (time 2) lies in (t, t + 3] for t = 0, 1
    _, valid = R.aux_targets(future, no.at[2].set(True), no)
    assert valid.ravel().tolist() == [False, False, True]
    # a reset at step 0 of this chunk (time 3) cuts every pair
    _, valid = R.aux_targets(future, no, no.at[0].set(True))
    assert valid.ravel().tolist() == [False, False, False]


@pytest.mark.parametrize("aux_target", ["model", "consumed"])
def test_aux_loss_regresses_the_previous_chunk_onto_this_chunks_sg(aux_target, alpha=0.1):
    """``model``: the Aux head predicts the synthetic gradient model's output ``M`` (§3.2);
    ``consumed``: ``α M``, the synthetic gradient as the update consumes it."""
    K = 3
    xs, ys, resets = stream(K)
    net = R.net(R.lstm(N), D_IN, C, aux=True)
    tr = R.truncated_bptt(net, xent, dni(alpha=alpha), optax.adam(3e-2), T=T, batch_size=B,
                          aux_target=aux_target)
    state = tr.init(jax.random.key(0))
    chunks = R.chunked(xs, ys, T, resets)
    step, backward = jax.jit(tr.step), jax.jit(tr.backward)
    state, _ = step(state, jax.tree.map(lambda a: a[0], chunks))
    state, _ = step(state, jax.tree.map(lambda a: a[1], chunks))
    # a random aux head, so its predictions are not zero
    aux = jax.tree.map(lambda p: 0.3 * jax.random.normal(jax.random.key(5), p.shape),
                       state.params["aux"])
    state = state._replace(params={**state.params, "aux": aux})
    bw = backward(state, jax.tree.map(lambda a: a[2], chunks))
    # by hand: re-run chunk 1 from its start carry with the current parameters
    carry, preds = state.prev_carry, []
    for t in range(T, 2 * T):
        carry = net.core.apply(state.params["core"], carry, xs[t])
        preds.append(net.aux.apply(aux, carry.h)[0])
    m, _ = R.sg_model(N).apply(state.fstate.variables, bw.carries.reshape(T * B, -1))
    # the model's output at t + T, per example units (the model regresses B·δ)
    future = (m if aux_target == "model" else alpha * m).reshape(T, B, -1)
    expected = sum(jnp.sum((preds[i] - future[i]) ** 2) for i in range(T)) / B
    assert float(expected) > 1e-6
    np.testing.assert_allclose(bw.aux_loss, expected, rtol=1e-5)
    # on the first chunk there is no previous chunk to train: no Aux loss
    first = backward(tr.init(jax.random.key(0))._replace(params=state.params),
                     jax.tree.map(lambda a: a[0], chunks))
    assert float(first.aux_loss) == 0.0


def test_sg_regression_error_backpropagated_into_the_core():
    K = 3
    xs, ys, resets = stream(K)
    net = R.net(R.lstm(N), D_IN, C)
    chunks = R.chunked(xs, ys, T, resets)
    trainers = {flag: R.truncated_bptt(net, xent, dni(), optax.adam(3e-2), T=T, batch_size=B,
                                       sg_into_core=flag) for flag in (False, True)}
    state = trainers[True].init(jax.random.key(0))
    step = jax.jit(trainers[True].step)
    for k in range(K - 1):
        state, info = step(state, jax.tree.map(lambda a, k=k: a[k], chunks))
    last = jax.tree.map(lambda a: a[K - 1], chunks)
    with_sg = jax.jit(trainers[True].backward)(state, last)
    plain = jax.jit(trainers[False].backward)(
        state._replace(kept_chunk=None, kept_carry=None), last)
    np.testing.assert_allclose(with_sg.sg_target, plain.sg_target, atol=1e-6)

    def by_hand(params):  # the previous chunk's last core, re-run, then the SG model's L2
        t = (K - 1) * T - 1
        s = R.flatten_carry(net.core.apply(params["core"], state.kept_carry, xs[t]))
        m, _ = R.sg_model(N).apply(state.fstate.variables, s)
        return jnp.sum((m - B * with_sg.sg_target) ** 2) / B

    loss, g = jax.jit(jax.value_and_grad(by_hand))(state.params)
    assert float(loss) > 1e-8
    np.testing.assert_allclose(with_sg.core_sg_loss, loss, rtol=1e-5)
    extra = jax.tree.map(jnp.subtract, with_sg.grads, plain.grads)
    chex.assert_trees_all_close(extra, g, atol=1e-6, rtol=0)
    assert not np.any(extra["head"]["params"]["kernel"])  # only the core is affected


# 5 ------------------------------------------------------------------------------------------


def test_carry_crosses_chunks_unchanged_and_resets_at_new_episodes():
    K = 3
    xs, ys, _ = stream(K)
    net = R.net(R.lstm(N), D_IN, C)
    tr = R.truncated_bptt(net, xent, dni(), optax.sgd(0.0), T=T, batch_size=B)
    state0 = tr.init(jax.random.key(0))
    step, backward, core = jax.jit(tr.step), jax.jit(tr.backward), jax.jit(net.core.apply)
    for reset_at in [(), (3,), (2, 5)]:
        resets = jnp.zeros((K * T, B), bool)
        for t in reset_at:
            resets = resets.at[t].set(True)
        state, carries = state0, []
        for k in range(K):
            state, _ = step(state, R.Chunk(xs[k * T:(k + 1) * T], ys[k * T:(k + 1) * T],
                                           resets[k * T:(k + 1) * T]))
            carries.append(state.carry)
        # one uninterrupted unroll, resetting only where the task says so
        carry = net.core.initial_carry(B)
        for t in range(K * T):
            if t in reset_at:
                carry = net.core.initial_carry(B)
            carry = core(state0.params["core"], carry, xs[t])
            if (t + 1) % T == 0:
                chex.assert_trees_all_close(carries[t // T], carry, atol=1e-6, rtol=0)
    # a reset is per stream: only stream 1 restarts
    resets = jnp.zeros((T, B), bool).at[0, 1].set(True)
    warm = state0._replace(carry=R.LSTMState(jnp.ones((B, N)), jnp.ones((B, N))))
    bw = backward(warm, R.Chunk(xs[:T], ys[:T], resets))
    cold = backward(state0, R.Chunk(xs[:T], ys[:T], resets))
    np.testing.assert_allclose(bw.carry.h[1], cold.carry.h[1], atol=1e-6)
    assert not np.allclose(bw.carry.h[0], cold.carry.h[0])
    np.testing.assert_allclose(bw.sg_target[1], 0.0)  # no gradient crosses a reset


# 6 ------------------------------------------------------------------------------------------


def test_traced_once_fusable_and_deterministic():
    K = 4
    xs, ys, resets = stream(K)
    net = R.net(R.lstm(N), D_IN, C, aux=True)
    tr = R.truncated_bptt(net, xent, dni(), optax.adam(1e-2), T=T, batch_size=B)
    traces = []

    def counted(state, chunk):
        traces.append(1)
        return tr.step(state, chunk)

    step = jax.jit(counted)
    chunks = R.chunked(xs, ys, T, resets)
    state = tr.init(jax.random.key(0))
    for k in range(K):
        state, info = step(state, jax.tree.map(lambda a, k=k: a[k], chunks))
    assert len(traces) == 1
    run = sgjax.fused(counted)
    fused_state, infos = run(tr.init(jax.random.key(0)), chunks)
    chex.assert_trees_all_close(fused_state.params, state.params, atol=1e-6, rtol=0)
    again, infos2 = run(tr.init(jax.random.key(0)), chunks)
    assert len(traces) == 2  # once for the step, once inside the fused scan
    chex.assert_trees_all_equal(again.params, fused_state.params)
    np.testing.assert_array_equal(infos["loss"], infos2["loss"])
    chex.assert_shape(infos["losses"], (K, T, B))


def test_errors():
    net = R.net(R.lstm(N), D_IN, C)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="T="):
            R.truncated_bptt(net, xent, F.none(), optax.sgd(0.1), T=bad, batch_size=B)
        with pytest.raises(ValueError, match="T="):
            R.chunked(jnp.zeros((6, B, D_IN)), jnp.zeros((6, B)), bad)
    with pytest.raises(ValueError, match="does not divide"):
        R.chunked(jnp.zeros((7, B, D_IN)), jnp.zeros((7, B)), 3)
    with pytest.raises(ValueError, match="width"):
        R.lstm(0)
    # an SG model for a 2-unit LSTM on a 4-unit one: outputs 4 values for an 8-value carry
    tr = R.truncated_bptt(net, xent, dni(width=2), optax.sgd(0.1), T=T, batch_size=B)
    with pytest.raises(ValueError, match="shape"):
        tr.init(jax.random.key(0))
    wrong = F.synthetic(P.from_layer(L.dense(2 * N + 1)))  # wrong output size
    tr = R.truncated_bptt(net, xent, wrong, optax.sgd(0.1), T=T, batch_size=B)
    with pytest.raises(ValueError, match="shape"):
        tr.init(jax.random.key(0))
    tr = R.truncated_bptt(net, xent, F.none(), optax.sgd(0.1), T=T, batch_size=B)
    state = tr.init(jax.random.key(0))
    with pytest.raises(ValueError, match="input_size"):
        tr.step(state, R.Chunk(jnp.zeros((T, B, D_IN + 1)), jnp.zeros((T, B), int),
                               jnp.zeros((T, B), bool)))
    with pytest.raises(ValueError, match="update locked"):
        R.truncated_bptt(net, xent, F.backprop(), optax.sgd(0.1), T=T, batch_size=B)
    with pytest.raises(ValueError, match="bootstrap='future'"):
        R.truncated_bptt(net, xent, dni(), optax.sgd(0.1), T=T, batch_size=B,
                         bootstrap="future")
    with pytest.raises(ValueError, match="scale, which is 0"):
        R.truncated_bptt(net, xent, dni(alpha=0.0), optax.sgd(0.1), T=T, batch_size=B,
                         bootstrap="unscaled")
    with pytest.raises(ValueError, match="aux_target='M'"):
        R.truncated_bptt(net, xent, dni(), optax.sgd(0.1), T=T, batch_size=B, aux_target="M")
    aux_net = R.net(R.lstm(N), D_IN, C, aux=True)
    with pytest.raises(ValueError, match="aux_target='model' divides"):
        R.truncated_bptt(aux_net, xent, dni(alpha=0.0), optax.sgd(0.1), T=T, batch_size=B,
                         aux_target="model")


def test_defaults_are_the_consumed_reading():
    """The synthetic gradient as consumed (×α) in both targets: the paper's words read the
    other way, which did worse on Copy and PTB (experiments/dni/table2.py's -paper cells)."""
    import inspect

    params = inspect.signature(R.truncated_bptt).parameters
    assert params["bootstrap"].default == "consumed"
    assert params["aux_target"].default == "consumed"
