"""sgjax.optim.stale_gradients: exact against a hand-written reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgjax import optim


def _params():
    return {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.float32)}


def _grads(t):
    # a different gradient at every step, so reuse is visible
    return {"w": jnp.full((2, 3), float(t + 1)), "b": jnp.full((3,), -0.5 * t)}


@pytest.mark.parametrize("every", [1, 2, 3, 10])
def test_outputs_the_gradient_of_the_last_refresh(every):
    tx = optim.stale_gradients(every)
    params = _params()
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(12):
        out, state = update(_grads(t), state, params)
        chex.assert_trees_all_equal(out, _grads(every * (t // every)))


@pytest.mark.parametrize("every", [2, 5])
def test_chain_with_sgd_matches_hand_written_updates(every):
    lr, steps = 0.1, 11
    tx = optax.chain(optim.stale_gradients(every), optax.sgd(lr))
    params = _params()
    state = tx.init(params)
    ref = jax.tree.map(np.asarray, params)
    for t in range(steps):
        updates, state = tx.update(_grads(t), state, params)
        params = optax.apply_updates(params, updates)
        g = _grads(every * (t // every))
        ref = jax.tree.map(lambda p, gg: p - lr * np.asarray(gg), ref, g)
    chex.assert_trees_all_close(params, ref, atol=1e-6, rtol=0)


def test_every_one_is_the_identity_inside_adam():
    params = _params()
    plain, stale = optax.adam(1e-2), optax.chain(optim.stale_gradients(1), optax.adam(1e-2))
    s_plain, s_stale = plain.init(params), stale.init(params)
    p_plain = p_stale = params
    for t in range(5):
        u, s_plain = plain.update(_grads(t), s_plain, p_plain)
        p_plain = optax.apply_updates(p_plain, u)
        u, s_stale = stale.update(_grads(t), s_stale, p_stale)
        p_stale = optax.apply_updates(p_stale, u)
    chex.assert_trees_all_close(p_plain, p_stale, atol=1e-6, rtol=0)


@pytest.mark.parametrize("every", [1, 3, 4])
def test_needs_fresh_gradient_lets_the_caller_skip_backprop(every):
    """Passing zeros on the steps flagged stale gives the same updates."""
    tx = optax.chain(optim.stale_gradients(every), optax.sgd(1.0))
    params = _params()
    full, skip = tx.init(params), tx.init(params)
    flags = []
    for t in range(9):
        need = bool(optim.needs_fresh_gradient(skip))
        flags.append(need)
        given = _grads(t) if need else jax.tree.map(jnp.zeros_like, _grads(t))
        u_full, full = tx.update(_grads(t), full, params)
        u_skip, skip = tx.update(given, skip, params)
        chex.assert_trees_all_equal(u_full, u_skip)
    assert flags == [t % every == 0 for t in range(9)]


def test_needs_fresh_gradient_without_stale_state_is_true():
    assert bool(optim.needs_fresh_gradient(optax.sgd(0.1).init(_params())))


def test_state_shapes_and_scan():
    tx = optim.stale_gradients(3)
    params = _params()
    state = tx.init(params)
    chex.assert_trees_all_equal_shapes(state.grads, params)

    def body(state, t):
        out, state = tx.update(jax.tree.map(lambda g: g * 0 + t, params), state)
        return state, out["b"][0]

    _, outs = jax.lax.scan(body, state, jnp.arange(7.0))
    np.testing.assert_array_equal(np.asarray(outs), [0, 0, 0, 3, 3, 3, 6])


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "10"])
def test_bad_every_raises(bad):
    with pytest.raises(ValueError, match="every"):
        optim.stale_gradients(bad)


# ------------------------------------------------------------- advance_schedules --


def test_advance_schedules_moves_only_schedule_counts():
    """A skipped step moves the step a schedule is evaluated at, not Adam's moments or its
    bias-correction count (the module took no update)."""
    params = {"w": jnp.ones((3,))}
    opt = optax.chain(
        optax.adam(optax.piecewise_constant_schedule(1.0, {2: 0.1})),
        optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 4)),
    )
    state = opt.init(params)
    _, state = opt.update({"w": jnp.full((3,), 0.5)}, state, params)
    moved = jax.jit(optim.advance_schedules)(state, jnp.int32(3))
    (adam, sched), injected = moved
    (adam0, sched0), injected0 = state
    chex.assert_trees_all_equal(adam, adam0)  # moments and Adam's count untouched
    assert int(sched.count) == int(sched0.count) + 3 == 4
    assert int(injected.count) == int(injected0.count) + 3 == 4
    chex.assert_trees_all_equal_structs(moved, state)
    chex.assert_trees_all_equal(optim.advance_schedules(state, 0), state)


def test_advance_schedules_then_update_uses_the_global_step():
    """After 2 skipped steps the next update is evaluated at schedule step 2, where
    ``piecewise_constant_schedule(1, {2: 0})`` is 0: no change at all."""
    params = {"w": jnp.ones((2,))}
    opt = optax.sgd(optax.piecewise_constant_schedule(1.0, {2: 0.0}))
    state = opt.init(params)
    grads = {"w": jnp.ones((2,))}
    fresh, _ = opt.update(grads, state, params)
    late, _ = opt.update(grads, optim.advance_schedules(state, 2), params)
    chex.assert_trees_all_equal(fresh["w"], -jnp.ones((2,)))
    chex.assert_trees_all_equal(late["w"], jnp.zeros((2,)))
