"""Complete unlock (DNI §3.1, Fig. 5 right, Fig. 6): synthetic inputs with synthetic
gradients at every cut (:mod:`sgjax.unlock`), and the ``unlock`` experiment at ``smoke``.

An oracle input model (the true activation of the batch) makes the completely unlocked
network train exactly like every-layer DNI without synthetic inputs (``sync``, and
``stochastic`` with the same busy draws); each input model is fitted to the activation its
stage sends up for the same batch; test-time inference ignores input models."""

from __future__ import annotations

import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from sgjax import layers as L
from sgjax.unlock import InputModel, InputState, complete_unlock, input_loss

B, D, C, W = 8, 6, 3, 5
FAST = {"xla_backend_optimization_level": 0}  # compiling dominates these tiny runs


def fused(step):
    return jax.jit(sgjax.fused(step), compiler_options=FAST)


def _layers(depth=3):
    hidden = [L.serial(L.dense(W), L.batch_norm(), L.relu) for _ in range(depth - 1)]
    return hidden + [L.dense(C)]


def _split(conditioned=False, depth=3, feedback=None, cuts="every"):
    fb = feedback or sgjax.feedback.synthetic(
        sgjax.predictors.mlp((7,), conditioned=conditioned))
    return sgjax.split_at(_layers(depth), cuts, feedback=fb,
                          loss=sgjax.losses.softmax_cross_entropy, optimizer=optax.adam(1e-2),
                          input_shape=(D,), batch_size=B, num_classes=C)


def _batches(n, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (n, B, D)),
            jax.random.randint(ky, (n, B), 0, C))


def oracle(split, i) -> InputModel:
    """``I_i(x)`` = the true ``h_i``: stages ``0..i`` connected, in training mode, with the
    stage states held in the model's (untrained) variables; :func:`with_oracle` refreshes
    them from the network being trained before every step."""

    def init(key, x_shape, h_shape):
        return {"below": split.init(key)[:i + 1]}

    def apply(variables, x, h_shape, *, train=False):
        h = x
        for stage, state in zip(split.stages[:i + 1], variables["below"]):
            h = stage.forward(state, h)
        return h, variables

    return InputModel(init, apply, f"oracle h_{i}")


def with_oracle(schedule, counter=None):
    def step(ts, batch):
        if counter is not None:
            counter.append(1)
        inputs = tuple(InputState({"below": ts.stages[:i + 1]}, s.opt_state)
                       for i, s in enumerate(ts.inputs))
        return schedule.step(ts._replace(inputs=inputs), batch)

    return step


def _params(states):
    return [s.params for s in states], [s.feedback for s in states]


@pytest.mark.parametrize("conditioned", [False, True], ids=["dni", "cdni"])
def test_oracle_inputs_train_exactly_like_sync(conditioned):
    split = _split(conditioned)
    models = [oracle(split, i) for i in range(len(split.stages) - 1)]
    unlocked = complete_unlock(split, models, optimizer=optax.adam(1e-2))
    sync = sgjax.sync(split)
    xs, ys = _batches(4)
    key = jax.random.key(3)
    traces = []
    init = unlocked.init(key, (xs[0], ys[0]))
    run = fused(with_oracle(unlocked, traces))
    s_u, info_u = run(init, (xs, ys))
    s_s, info_s = fused(sync.step)(sync.init(key, (xs[0], ys[0])), (xs, ys))
    chex.assert_trees_all_close(_params(s_u.stages), _params(s_s.stages), atol=1e-6, rtol=0)
    chex.assert_trees_all_close(info_u["loss"], info_s["loss"], atol=1e-6, rtol=0)
    # the parameters really moved, so equality is not the initial state's
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         _params(s_u.stages), _params(init.stages))
    assert min(jax.tree.leaves(moved[0])) > 1e-4
    run(s_u, (xs[::-1], ys[::-1]))  # a second chunk reuses the compiled program
    assert len(traces) == 1


def test_oracle_inputs_with_busy_stages_train_like_stochastic():
    """p_update < 1: with the true inputs, a busy stage (no forward, no backward) changes
    the network exactly as a stage of :func:`sgjax.stochastic` that skips its update."""
    split = _split(True)
    models = [oracle(split, i) for i in range(len(split.stages) - 1)]
    unlocked = complete_unlock(split, models, optimizer=optax.adam(1e-2), p_update=0.5)
    stoch = sgjax.stochastic(split, 0.5)
    xs, ys = _batches(6, seed=1)
    keys = jax.random.split(jax.random.key(5), 6)
    key = jax.random.key(4)
    s_u, info_u = fused(with_oracle(unlocked))(unlocked.init(key, (xs[0], ys[0])),
                                                (xs, ys, keys))
    s_s, info_s = fused(stoch.step)(stoch.init(key, (xs[0], ys[0])), (xs, ys, keys))
    active = np.stack([np.asarray(info_u[f"active/{k}"]) for k in range(3)])
    assert 0 < active.sum() < active.size  # some stages were busy, some worked
    np.testing.assert_array_equal(active, np.stack(
        [np.asarray(info_s[f"active/{k}"]) for k in range(3)]))
    chex.assert_trees_all_close(_params(s_u.stages), _params(s_s.stages), atol=1e-6, rtol=0)


def test_input_model_target_is_the_activation_sent_up():
    """Each ``I_i`` regresses onto the output stage ``i`` computed for the same batch on
    the input it had (``x`` for stage 0, ``ĥ_{i-1}`` above), with one optimiser step."""
    split = _split(depth=3)
    model = sgjax.unlock.mlp((4,))
    opt = optax.sgd(0.1)
    sched = complete_unlock(split, model, optimizer=opt)
    xs, ys = _batches(1)
    x, y = xs[0], ys[0]
    state = sched.init(jax.random.key(0), (x, y))
    new, info = jax.jit(sched.step, compiler_options=FAST)(state, (x, y))

    # independent forward: stage 0 on x; stage 1 on its synthetic input ĥ_0 = I_0(x)
    s0, s1 = state.stages[0], state.stages[1]
    h_hat0, _ = model.apply(state.inputs[0].variables, x, (W,), train=True)
    targets = [split.stages[0].forward(s0, x), split.stages[1].forward(s1, h_hat0)]
    # it is not the connected network's h_1: stage 1 never waits for stage 0
    assert not np.allclose(targets[1], split.stages[1].forward(s1, targets[0]))
    for i, target in enumerate(targets):
        variables = state.inputs[i].variables
        loss, new_state = input_loss(model, variables, x, target)
        np.testing.assert_allclose(info[f"input_loss/{i + 1}"], loss, rtol=1e-6)
        g = jax.grad(lambda p, v=variables, t=target: input_loss(
            model, L.with_params(v, p), x, t)[0])(variables["params"])
        expected = jax.tree.map(lambda p, gp: p - 0.1 * gp, variables["params"], g)
        chex.assert_trees_all_close(new.inputs[i].variables["params"], expected, atol=1e-6)
        chex.assert_trees_all_close(L.state_of(new.inputs[i].variables),
                                    L.state_of(new_state), atol=1e-6)
        chex.assert_shape(model.apply(variables, x, (W,), train=True)[0], (B, W))
    chex.assert_trees_all_equal_shapes_and_dtypes(state, new)


def test_inference_ignores_input_models_and_populations_vmap():
    """A population over ``p_update`` (traced) trains as one vmapped program; test-time
    inference is the connected split, whatever the input models hold."""
    split = _split(True)
    sched = complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-2),
                            p_update=None)
    xs, ys = _batches(2)
    init_keys = jax.random.split(jax.random.key(1), 2)
    states = jax.jit(jax.vmap(lambda k: sched.init(k, (xs[0], ys[0]))),
                     compiler_options=FAST)(init_keys)
    keys = jax.random.split(jax.random.key(2), (2, 2))
    p = jnp.broadcast_to(jnp.asarray([0.3, 1.0]), (2, 2))
    new, info = fused(jax.vmap(sched.step, in_axes=(0, sgjax.Batch(None, None, 0, 0))))(
        states, sgjax.Batch(xs, ys, keys, p))
    chex.assert_trees_all_equal_shapes_and_dtypes(states, new)
    chex.assert_shape(info["loss"], (2, 2))
    assert bool(np.all(np.asarray(info["active/2"])[:, 1]))  # p = 1 is never busy
    state = jax.tree.map(lambda a: a[0], new)
    out = sched.apply(state, xs[0])
    chex.assert_shape(out, (B, C))
    np.testing.assert_array_equal(out, split.apply(state.stages, xs[0]))
    garbage = state._replace(inputs=jax.tree.map(lambda a: jnp.full_like(a, jnp.nan)
                                                 if jnp.issubdtype(a.dtype, jnp.inexact)
                                                 else a, state.inputs))
    np.testing.assert_array_equal(sched.apply(garbage, xs[0]), out)


def test_busy_stage_sends_nothing_but_its_models_consume_what_arrives():
    """Per-stage ``p_update``: stage 1 of 3 is always busy (no forward, no backward). Its
    layers do not change, it sends no activation up (``I_1`` unchanged) and no target
    down (``M_0`` unchanged); the models it owns still consume what arrives: ``I_0`` the
    activation of stage 0, ``M_1`` the target of stage 2."""
    split = _split()
    sched = complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-2),
                            p_update=[1.0, 1e-9, 1.0])
    xs, ys = _batches(1)
    state = sched.init(jax.random.key(0), (xs[0], ys[0]))
    new, info = jax.jit(sched.step, compiler_options=FAST)(
        state, (xs[0], ys[0], jax.random.key(1)))
    assert [bool(info[f"active/{k}"]) for k in range(3)] == [True, False, True]

    def changed(a, b):
        return any(jax.tree.leaves(jax.tree.map(lambda u, v: bool(jnp.any(u != v)), a, b)))

    def sg_params(stage_state):
        return L.params_of(stage_state.feedback.variables)

    assert not changed(new.stages[1].params, state.stages[1].params)
    assert not changed(new.inputs[1], state.inputs[1])  # I_1: no activation from stage 1
    assert not changed(new.stages[0].feedback, state.stages[0].feedback)  # M_0: no target
    # stage 0 and 2 updated (stage 0 from M_0's first, zero, synthetic gradient)
    assert [int(s.step) for s in new.stages] == [1, 0, 1]
    assert changed(new.inputs[0].variables["params"], state.inputs[0].variables["params"])
    assert changed(sg_params(new.stages[1]), sg_params(state.stages[1]))  # target from 2
    assert float(info["input_loss/1"]) > 0.0 and float(info["input_loss/2"]) == 0.0
    assert float(info["sg_loss/0"]) == 0.0 and float(info["sg_loss/1"]) > 0.0


def test_learning_rate_schedules_count_global_steps():
    """Busy stages, models whose message did not arrive and input models whose activation
    did not arrive all move their learning-rate schedules on: the schedules count global
    steps (the paper's protocol), Adam's bias correction the module's own updates."""
    drop = 4
    opt = optax.adam(optax.piecewise_constant_schedule(1e-2, {drop: 0.0}))
    split = sgjax.split_at(_layers(3), "every",
                           feedback=sgjax.feedback.synthetic(sgjax.predictors.mlp((7,))),
                           loss=sgjax.losses.softmax_cross_entropy, optimizer=opt,
                           input_shape=(D,), batch_size=B, num_classes=C)
    sched = complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=opt, p_update=0.5)
    xs, ys = _batches(drop + 2)
    state = sched.init(jax.random.key(0), (xs[0], ys[0]))
    step = jax.jit(sched.step, compiler_options=FAST)
    for t in range(drop):
        state, _ = step(state, (xs[t], ys[t], jax.random.key(300 + t)))
    counts = [int(s.opt_state[1].count) for s in state.stages]
    counts += [int(s.feedback.opt_state[1].count) for s in state.stages[:-1]]
    counts += [int(s.opt_state[1].count) for s in state.inputs]
    assert counts == [drop] * len(counts)
    assert [int(s.opt_state[0].count) for s in state.stages] == [int(s.step)
                                                                 for s in state.stages]
    assert min(int(s.step) for s in state.stages) < drop
    frozen = state
    for t in range(drop, drop + 2):
        state, _ = step(state, (xs[t], ys[t], jax.random.key(300 + t)))
    chex.assert_trees_all_equal([s.params for s in state.stages],
                                [s.params for s in frozen.stages])
    chex.assert_trees_all_equal([L.params_of(s.variables) for s in state.inputs],
                                [L.params_of(s.variables) for s in frozen.inputs])


# ------------------------------------------------------------------- bad input


def test_wrong_input_model_shape():
    split = _split()
    with pytest.raises(ValueError, match=r"shape \(4,\).*stage 0 outputs activations of "
                                         r"shape \(5,\)"):
        complete_unlock(split, sgjax.unlock.from_layer(L.dense(4)), optimizer=optax.adam(1e-3))
    with pytest.raises(ValueError, match="input model"):
        complete_unlock(split, [sgjax.unlock.mlp((4,)), sgjax.unlock.from_layer(L.dense(3))],
                        optimizer=optax.adam(1e-3))


@pytest.mark.parametrize("feedback,match", [
    (sgjax.feedback.none(), "No Bprop, not a synthetic gradient"),
    (sgjax.feedback.backprop(), "Bprop, not a synthetic gradient"),
    (sgjax.feedback.synthetic_prop(sgjax.predictors.linear()), "SG \\+ prop"),
])
def test_split_without_synthetic_gradients(feedback, match):
    with pytest.raises(ValueError, match=match):
        complete_unlock(_split(feedback=feedback), sgjax.unlock.mlp((4,)),
                        optimizer=optax.adam(1e-3))


def test_mixed_feedbacks_name_the_cut():
    split = _split(feedback=[sgjax.feedback.synthetic(sgjax.predictors.linear()),
                             sgjax.feedback.none()])
    with pytest.raises(ValueError, match="cut after stage 1 uses feedback No Bprop"):
        complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-3))


def test_no_cut():
    with pytest.raises(ValueError, match="at least one cut"):
        complete_unlock(_split(cuts=()), sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-3))


@pytest.mark.parametrize("p", [0.0, 1.5, -0.2, True, "half", (0.5, 0.5)])
def test_bad_p_update(p):
    with pytest.raises(ValueError, match="p_update"):
        complete_unlock(_split(), sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-3),
                        p_update=p)


def test_bad_arguments():
    split = _split()
    with pytest.raises(TypeError, match="InputModel"):
        complete_unlock(split, sgjax.predictors.linear(), optimizer=optax.adam(1e-3))
    with pytest.raises(ValueError, match="2 cuts"):
        complete_unlock(split, [sgjax.unlock.mlp((4,))], optimizer=optax.adam(1e-3))
    with pytest.raises(TypeError, match="optax"):
        complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer="adam")
    xs, ys = _batches(1)
    sched = complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-3),
                            p_update=0.5)
    state = sched.init(jax.random.key(0), (xs[0], ys[0]))
    with pytest.raises(ValueError, match="key in the batch"):
        sched.step(state, (xs[0], ys[0]))
    free = complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-3),
                           p_update=None)
    with pytest.raises(ValueError, match="needs p_update in the batch"):
        free.step(state, (xs[0], ys[0], jax.random.key(0)))
    with pytest.raises(ValueError, match="inputs x have shape"):
        sched.step(state, (xs[0][:, :4], ys[0], jax.random.key(0)))


# ------------------------------------------------------------------- the experiment


@pytest.mark.slow  # about a minute; CI runs `make reproduce-unlock PRESET=smoke` (.ci/run)
def test_experiment_smoke(tmp_path):
    from experiments.__main__ import main

    cell = "fcn4-cdni-unlock"
    assert main(["run", "unlock", "--preset", "smoke", "--out", str(tmp_path),
                 "--only", cell]) == 0
    out = tmp_path / "unlock" / "smoke"
    record = json.loads((out / "cells" / f"{cell}.json").read_text())
    assert math.isfinite(record["metric"])
    assert {"final_errors", "p_update", "curve", "input_r2", "input_r2_curve",
            "input_r2_cut0", "input_r2_cut2"} <= set(record["metrics"])
    assert np.asarray(record["metrics"]["input_r2"]).shape == (2, 3)  # members × cuts
    for fig in ("unlock-curves", "unlock-input-fit", "unlock-budget"):
        assert (out / f"{fig}.png").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "| row | column | paper | ours | diff | verdict |" in table
    assert "co-learns-fcn4-cdni" in table


def _unlock_result(cell_id, metric):
    from experiments.dni import unlock
    from experiments.framework import CellResult

    cell = next(c for c in unlock.EXPERIMENT.cells_for("quick") if c.id == cell_id)
    return CellResult(cell, metric, {"error_at_p1": metric}, {}, 0, 0.0, {})


@pytest.mark.parametrize("unlocked,locked,co_learns,slower", [
    (2.5, 2.0, "holds", "holds"), (3.5, 3.0, "differs", "holds"),
    (2.9, 1.5, "holds", "differs"), (13.6, 3.9, "differs", "differs"),
    (3.0, 2.0, "holds", "holds")])
def test_experiment_verdicts(unlocked, locked, co_learns, slower):
    """The quick claims, computed from records: "co-learn to reach 2%" is at most 3 %,
    "only slightly slower" at most one point above the same network without synthetic
    inputs; a cell not run leaves its claims "not run"."""
    from experiments.dni import unlock
    from experiments.framework import verdicts as V

    found = {"fcn4-cdni-unlock": _unlock_result("fcn4-cdni-unlock", unlocked),
             "fcn4-cdni-fwdlocked": _unlock_result("fcn4-cdni-fwdlocked", locked)}
    judged = {v.claim.id: v.status for v in V.check_all(unlock.EXPERIMENT, "quick", found)}
    assert judged["co-learns-fcn4-cdni"] == co_learns
    assert judged["slightly-slower-fcn4-cdni"] == slower
    assert judged["co-learns-fcn4-dni"] == judged["co-learns-fcn4-cdni-6k"] == V.NOT_RUN


def test_quick_is_fig5_network_with_a_budget_cell():
    """quick trains Fig. 5's four-layer FCN (the other depths: preset ``depths``), and the
    6k budget cell drops its learning rate at the same fractions of its own steps."""
    from experiments.dni import unlock

    ids = [c.id for c in unlock.EXPERIMENT.cells_for("quick")]
    assert ids == ["fcn4-dni-unlock", "fcn4-dni-fwdlocked", "fcn4-cdni-unlock",
                   "fcn4-cdni-fwdlocked", "fcn4-cdni-unlock-6k"]
    assert {c.params["depth"] for c in unlock.EXPERIMENT.cells_for("depths")} == {3, 4, 5, 6}
    quick = unlock.PRESETS["quick"].train
    budget = unlock.cell_config(quick, {"steps": 6_000})
    assert (budget.steps, budget.lr_boundaries) == (6_000, (3_600, 4_800))
    assert budget.eval_every == 500 and set(unlock.BUDGET_POINTS) < set(
        range(budget.eval_every, 6_001, budget.eval_every))
    assert unlock.cell_config(quick, {"depth": 4}) is quick


def test_r_squared_exact():
    """1 − SSE/SST on a constructed batch: targets (0, 0), (2, 4) have batch means (1, 2)
    and SST = 1 + 4 + 1 + 4 = 10; a prediction off by (1, 0) and (0, −1) has SSE = 2."""
    from experiments.dni.unlock import r_squared

    h = jnp.array([[0.0, 0.0], [2.0, 4.0]])
    assert float(r_squared(h + jnp.array([[1.0, 0.0], [0.0, -1.0]]), h)) == pytest.approx(
        0.8, abs=1e-7)
    assert float(r_squared(h, h)) == 1.0
    assert float(r_squared(jnp.broadcast_to(h.mean(0), h.shape), h)) == 0.0
    # shapes beyond (B, n) are flattened per example
    assert float(r_squared(h.reshape(2, 1, 2) + 1.0, h.reshape(2, 1, 2))) == pytest.approx(
        1.0 - 4.0 / 10.0, abs=1e-7)


def test_input_fit_reads_the_connected_network_in_inference_mode():
    """``input_fit`` compares I_i(x) with the connected network's h_i computed with batch
    norm's running statistics: an input model returning exactly that h_i gives R² = 1 at
    every cut, one returning its batch mean gives 0."""
    from experiments.dni.unlock import input_fit

    split = _split()
    xs, ys = _batches(2)

    def exact(i, mean):
        """I(x) = the connected h_i of ``trained`` (or its batch mean), at every cut."""

        def init(key, x_shape, h_shape):
            return {}

        def apply(variables, x, h_shape, *, train=False):
            assert not train
            h = x
            for stage, st in zip(split.stages[:i + 1], trained.stages[:i + 1]):
                h = stage.apply(st, h)
            return (jnp.broadcast_to(h.mean(0), h.shape) if mean else h), {}

        return InputModel(init, apply)

    sched = complete_unlock(split, sgjax.unlock.mlp((4,)), optimizer=optax.adam(1e-2))
    trained = sched.init(jax.random.key(0), (xs[0], ys[0]))
    for t in range(2):  # move batch norm's running statistics off their initial values
        trained, _ = sched.step(trained, (xs[t], ys[t]))
    for mean, want in ((False, 1.0), (True, 0.0)):
        r2 = [float(input_fit(split, exact(i, mean))(trained, xs[1])[i])
              for i in range(len(split.stages) - 1)]
        np.testing.assert_allclose(r2, want, atol=1e-6)
    # and the experiment's own models give one R² per cut, at most 1
    r2 = input_fit(split, sgjax.unlock.mlp((4,)))(trained, xs[1])
    chex.assert_shape(r2, (len(split.stages) - 1,))
    assert bool(jnp.all(r2 <= 1.0))
