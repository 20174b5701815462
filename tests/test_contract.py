"""The one trainer contract (sgjax.trainer, issue 19 §2) and the feedback wrappers inside
every trainer (§1), with the bad input of §4.

Every trainer of sgjax is built here on a tiny network and driven only through
``init(key, batch)``, ``step(state, batch)`` and ``apply(state, x)``: it is a
:class:`sgjax.Trainer`, reports a finite scalar ``info["loss"]``, fuses (one scan equals a
Python loop of steps) and vmaps over seeds (each copy equals the trainer run alone).

Wrappers (``warmup``, ``refit_every``, ``scaled`` and a user-written one built from
``feedback.transform`` + ``feedback.counted``) are checked inside every trainer that takes
a feedback, through what the trainer consumed: the update of the parameters below the cut
(a split's stage 0, trained by SGD, so that update is linear in the substitute) or the
``sg_norm`` a recurrent or multi-rate trainer reports for the substitute it consumed.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

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
from sgjax import multirate as M
from sgjax import predictors as P
from sgjax import recurrent as R
from sgjax.feedback import InterfaceSpec, Target

FAST = {"xla_backend_optimization_level": 0}  # compiling dominates these tiny runs
B, D, W, C = 4, 5, 6, 3  # splits: batch, input, hidden width, classes
T, N, C_R = 2, 3, 4  # recurrent: chunk length, LSTM width, outputs
M_SIZE, C_A, C_B = 3, 3, 2  # multirate: message size, A's and B's classes


def jit(fn):
    return jax.jit(fn, compiler_options=FAST)


# ------------------------------------------------------------------------- the trainers


class Case(NamedTuple):
    """A trainer with how to feed it and where to look inside its state.

    ``batch(t)``: the batch of step ``t``; ``x``/``out``: an inference input and the
    expected output shape(s); ``fstate(state)``: the feedback state at the cut (``None``
    without feedback); ``below(state)``: the parameters below the cut (splits), or
    ``None`` where the consumed substitute is reported as ``info["sg_norm"]``; ``fill``:
    steps before every part of the trainer runs (a pipeline filling)."""

    trainer: Any
    batch: Any
    x: Any
    out: Any
    fstate: Any = None
    below: Any = None
    fill: int = 0


def _split(feedback, optimizer):
    layers = [L.serial(L.dense(W), L.relu), L.dense(C)]
    return sgjax.split_at(layers, (1,), feedback=feedback, loss=losses.softmax_cross_entropy,
                          optimizer=optimizer, input_shape=(D,), batch_size=B, num_classes=C)


def _split_data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, B, D), dtype=np.float32),
            rng.integers(0, C, (n, B), dtype=np.int32),
            jax.random.split(jax.random.key(seed + 100), n))


def _split_case(kind, feedback, optimizer):
    split = _split(feedback, optimizer)
    xs, ys, keys = _split_data()
    plain = lambda t: sgjax.Batch(xs[t], ys[t])  # noqa: E731
    stages = lambda s: s.stages  # noqa: E731
    fill = 0
    if kind == "sync":
        trainer = sgjax.sync(split)
    elif kind == "stochastic":
        trainer = sgjax.stochastic(split, 1.0)
        plain = lambda t: sgjax.Batch(xs[t], ys[t], keys[t])  # noqa: E731
    elif kind == "runner-sync":
        trainer = sgjax.Runner(split)
    elif kind == "runner-pipelined":
        trainer = sgjax.Runner(split, schedule="pipelined")
        stages = lambda s: s.train.stages  # noqa: E731
        fill = len(split.stages) - 1
    elif kind == "complete-unlock":
        trainer = sgjax.unlock.complete_unlock(split, sgjax.unlock.mlp((4,)),
                                               optimizer=optax.sgd(0.1))
    else:
        raise AssertionError(kind)
    return Case(trainer, plain, xs[0], (B, C), lambda s: stages(s)[0].feedback,
                lambda s: stages(s)[0].params, fill)


def xent(logits, y):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]


def _recurrent_case(feedback, optimizer):
    net = R.net(R.lstm(N), D, C_R)
    trainer = R.truncated_bptt(net, xent, feedback, optimizer, T=T, batch_size=B)
    k1, k2 = jax.random.split(jax.random.key(1))
    xs = jax.random.normal(k1, (12 * T, B, D))
    ys = jax.random.randint(k2, (12 * T, B), 0, C_R)
    chunks = R.chunked(xs, ys, T)
    return Case(trainer, lambda t: jax.tree.map(lambda a: a[t], chunks), xs[:T], (T, B, C_R),
                lambda s: s.fstate)


def _nets():
    a = M.network(R.lstm(4), (D,), C_A, encoder=L.serial(L.dense(4), L.relu),
                  message=L.dense(M_SIZE))
    b = M.network(R.lstm(3), (M_SIZE,), C_B)
    return a, b


def _windows(n=12):
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    return M.Window(jax.random.normal(k1, (n, T * T, B, D)),
                    jax.random.randint(k2, (n, T, B), 0, C_A),
                    jax.random.randint(k3, (n, T, B), 0, C_B))


def _multirate_case(kind, feedback, optimizer):
    a, b = _nets()
    if kind == "end-to-end":
        trainer = M.end_to_end(a, b, optimizer, T=T, batch_size=B)
        fstate = None
    else:  # A updates once per window: one consumed substitute per step
        trainer = M.decoupled(a, b, feedback, optimizer, T=T, batch_size=B, a_every=T)
        fstate = lambda s: s.fstate  # noqa: E731
    ws = _windows()
    return Case(trainer, lambda t: jax.tree.map(lambda v: v[t], ws), ws.inputs[0],
                ((T, B, C_A), (T, B, C_B)), fstate)


SPLITS = ("sync", "stochastic", "runner-sync", "runner-pipelined", "complete-unlock")
WITH_FEEDBACK = (*SPLITS, "truncated-bptt", "decoupled")
ALL = (*WITH_FEEDBACK, "end-to-end")
# the recurrent trainers compile LSTMs: ~10 s per test on 2 shared cores, so the checks that
# compile them twice more (fused, vmapped) run with the slow tests
SLOW = {"truncated-bptt", "decoupled", "end-to-end"}


def slow_recurrent(kinds):
    return [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in kinds]


def build(kind, feedback=None, optimizer=None):
    """The trainer ``kind`` with ``feedback`` at its cut (default: DNI)."""
    optimizer = optimizer or optax.adam(1e-2)
    if kind in SPLITS:
        return _split_case(kind, feedback or F.synthetic(P.linear()), optimizer)
    if kind == "truncated-bptt":
        return _recurrent_case(feedback or F.scaled(F.synthetic(R.sg_model(N)), 0.1), optimizer)
    return _multirate_case(kind, feedback or F.synthetic(M.message_sg_model(4)), optimizer)


def jitted_step(case):
    """The step compiled once (the Runner's step dispatches to its jitted stages)."""
    if isinstance(case.trainer, sgjax.Runner):
        return case.trainer.step
    return jit(case.trainer.step)


def run(case, steps, key=0):
    """``steps`` steps in a Python loop: the states before each step and after the last,
    and the infos."""
    step = jitted_step(case)
    state = case.trainer.init(jax.random.key(key), case.batch(0))
    states, infos = [state], []
    for t in range(steps):
        state, info = step(state, case.batch(t))
        states.append(state)
        infos.append(info)
    return states, infos


def stacked(case, start, n):
    return jax.tree.map(lambda *b: jnp.stack(b), *[case.batch(t) for t in range(start, start + n)])


# ------------------------------------------------------------------------ 2. the contract


@pytest.mark.parametrize("kind", ALL)
def test_every_trainer_implements_the_contract(kind):
    case = build(kind)
    assert isinstance(case.trainer, sgjax.Trainer)
    states, infos = run(case, case.fill + 2)
    for t, info in enumerate(infos[case.fill:]):
        loss = info["loss"]
        assert jnp.shape(loss) == (), (t, jnp.shape(loss))
        assert np.isfinite(float(loss)), t
    chex.assert_trees_all_equal_structs(states[-2], states[-1])
    out = case.trainer.apply(states[-1], case.x)
    if isinstance(case.out[0], tuple):
        assert len(out) == len(case.out)
        for o, shape in zip(out, case.out):
            chex.assert_shape(o, shape)
    else:
        chex.assert_shape(out, case.out)
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in jax.tree.leaves(out))


def test_pipelined_runner_reports_a_nan_loss_while_filling():
    """The contract's ``info["loss"]`` on every tick: NaN until a batch reaches the top
    stage (the first ``K - 1`` ticks), the top stage's loss from then on."""
    case = build("runner-pipelined")
    _, infos = run(case, case.fill + 1)
    assert case.fill >= 1
    assert all(bool(jnp.isnan(i["loss"])) for i in infos[:case.fill])
    assert bool(jnp.isfinite(infos[case.fill]["loss"]))


@pytest.mark.parametrize("kind", slow_recurrent(ALL))
def test_fused_equals_a_loop_of_steps(kind):
    """``sgjax.fused(trainer)`` over 3 stacked batches = 3 Python-loop steps (after a
    pipelined Runner has filled, so that its state keeps one structure)."""
    case = build(kind)
    steps = 3
    states, infos = run(case, case.fill + steps)
    fused_state, fused_infos = jit(sgjax.fused(case.trainer))(
        states[case.fill], stacked(case, case.fill, steps))
    chex.assert_trees_all_close(fused_state, states[-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused_infos["loss"],
                               [float(i["loss"]) for i in infos[case.fill:]], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind", slow_recurrent(k for k in ALL if k != "runner-pipelined"))
def test_vmap_seeds_runs_independent_copies(kind):
    """Two seeds at once: different keys give different parameters, and each copy is the
    trainer run alone from its own key on its own batches."""
    case = build(kind)
    seeded = sgjax.vmap_seeds(case.trainer, 2)
    assert isinstance(seeded, sgjax.Trainer)
    key = jax.random.key(7)
    state = seeded.init(key, case.batch(0))
    steps = 2
    for t in range(steps):  # copy i reads batch 2t + i
        batches = jax.tree.map(lambda a, b: jnp.stack([a, b]), case.batch(2 * t),
                               case.batch(2 * t + 1))
        state, info = jit(seeded.step)(state, batches)
        chex.assert_shape(info["loss"], (2,))
    keys = jax.random.split(key, 2)
    step = jitted_step(case)
    for i in range(2):
        alone = case.trainer.init(keys[i], case.batch(0))
        for t in range(steps):
            alone, _ = step(alone, case.batch(2 * t + i))
        chex.assert_trees_all_close(jax.tree.map(lambda a, i=i: a[i], state), alone,
                                    rtol=1e-5, atol=1e-6)
    # (not every leaf: a zero-initialised predictor after one Adam step is ±lr in both)
    kernels = [leaf for leaf in jax.tree.leaves(state) if jnp.ndim(leaf) == 3]
    assert any(not np.allclose(k[0], k[1]) for k in kernels)
    out = seeded.apply(state, case.x)
    for o in jax.tree.leaves(out):
        assert o.shape[0] == 2


def test_pipelined_runner_under_vmap_seeds():
    """The pipelined Runner's state changes structure while the pipeline fills, but a
    vmapped step is still one copy per seed."""
    case = build("runner-pipelined")
    seeded = sgjax.vmap_seeds(case.trainer, 2)
    state = seeded.init(jax.random.key(3), case.batch(0))
    for t in range(case.fill + 1):
        batches = jax.tree.map(lambda a: jnp.stack([a, a]), case.batch(t))
        state, info = seeded.step(state, batches)
    chex.assert_shape(info["loss"], (2,))
    kernel = [a for a in jax.tree.leaves(state.train.stages[0].params) if a.ndim == 3][0]
    assert not np.allclose(kernel[0], kernel[1])


# -------------------------------------------------- 1. every wrapper inside every trainer


def consumed(case, states, infos):
    """Per step, what the trainer consumed from the feedback: the update of the
    parameters below the cut (linear in the substitute under SGD), or the ``sg_norm``
    the trainer reports for the substitute it consumed."""
    if case.below is None:
        return [np.asarray(info["sg_norm"]) for info in infos]
    flat = lambda s: np.concatenate([np.ravel(a) for a in jax.tree.leaves(case.below(s))])  # noqa: E731
    return [flat(after) - flat(before) for before, after in zip(states[:-1], states[1:])]


def is_zero(m):
    return not np.any(np.asarray(m))


def counters(state):
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, F.CountedState))
             if isinstance(s, F.CountedState)]
    assert len(found) == 1, found
    return int(found[0].count)


SGD = optax.sgd(0.5)


def dni(kind):
    if kind in SPLITS:
        return F.synthetic(P.linear())
    if kind == "truncated-bptt":
        return F.synthetic(R.sg_model(N))
    return F.synthetic(M.message_sg_model(4))


def first_valid_target(kind):
    """The step at which the feedback first receives a valid target."""
    return {"runner-pipelined": 2, "truncated-bptt": 1}.get(kind, 0)


@pytest.mark.parametrize("kind", WITH_FEEDBACK)
def test_warmup_counts_every_consumption_and_ends(kind):
    """``warmup(synthetic, k)``: the substitute is zero for the first ``k`` steps (the
    unwrapped feedback's is not, at step k − 1) and non-zero after; the counter in the
    state counts every step (issue 19 §1: inside truncated_bptt and decoupled it stayed 0
    and the warm-up never ended)."""
    k, steps = 3, 5
    base = build(kind, dni(kind), SGD)
    used = consumed(base, *run(base, steps))
    assert not is_zero(used[k - 1])  # without warm-up the substitute is already used
    case = build(kind, F.warmup(dni(kind), k), SGD)
    states, infos = run(case, steps)
    used = consumed(case, states, infos)
    for t in range(steps):
        assert is_zero(used[t]) == (t < k), (t, used[t])
        assert counters(states[t + 1]) == t + 1, t


@pytest.mark.parametrize("kind", WITH_FEEDBACK)
def test_refit_every_fits_on_every_nth_valid_target(kind):
    """``refit_every(synthetic, n)``: the synthetic-gradient model's parameters change on
    the first valid target and every ``n``-th after, and at no other step."""
    n, steps = 2, 6
    case = build(kind, F.refit_every(dni(kind), n), SGD)
    states, _ = run(case, steps)
    first = first_valid_target(kind)
    for t in range(steps):
        before, after = (F.synthetic_variables(case.fstate(s))["params"]
                         for s in states[t:t + 2])
        changed = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                                jax.tree.leaves(after)))
        assert changed == (t >= first and (t - first) % n == 0), t
    assert counters(states[-1]) == steps - first


@pytest.mark.parametrize("kind", WITH_FEEDBACK)
def test_scaled_consumes_alpha_times_the_substitute(kind):
    """``scaled(fb, a)``: up to the first step with a non-zero substitute both runs are
    identical, and there what the trainer consumed is ``a ×`` the unwrapped one's; with
    ``a = 0`` the stages below the cut train as with ``none()``."""
    steps, alpha = 4, 0.25
    base = build(kind, dni(kind), SGD)
    used = consumed(base, *run(base, steps))
    t_star = next(t for t in range(steps) if not is_zero(used[t]))
    case = build(kind, F.scaled(dni(kind), alpha), SGD)
    scaled = consumed(case, *run(case, steps))
    for t in range(t_star):
        assert is_zero(scaled[t]), t
    np.testing.assert_allclose(scaled[t_star], alpha * used[t_star], rtol=1e-4, atol=1e-7)

    if case.below is None:  # sg_norm scales with alpha: checked above
        return
    off = build(kind, F.scaled(dni(kind), 0.0), SGD)
    s_off, i_off = run(off, steps)
    assert all(is_zero(m) for m in consumed(off, s_off, i_off))
    if kind != "complete-unlock":  # which needs synthetic gradients at every cut
        none = build(kind, F.none(), SGD)
        chex.assert_trees_all_equal(off.below(s_off[-1]), none.below(run(none, steps)[0][-1]))


def every_other(feedback):
    """A fourth wrapper, written only with public names: the substitute is used on every
    other request (the first included) and zero in between."""

    def wrap(inner):
        def grad(fstate, h, y, target=None):
            sub, state, info = inner.grad(fstate.inner, h, y, target)
            sub = jnp.where(fstate.count % 2 == 0, sub, jnp.zeros_like(sub))
            return sub, F.CountedState(state, fstate.count + 1), info

        return F.counted(inner, grad=grad)

    return F.transform(feedback, wrap, suffix=", every other step")


@pytest.mark.parametrize("kind", ["sync", "truncated-bptt"])
def test_a_user_written_wrapper_works_in_every_trainer(kind):
    steps = 6
    fb = every_other(dni(kind))
    assert fb.name.endswith(", every other step") and fb.needs == dni(kind).needs
    case = build(kind, fb, SGD)
    states, infos = run(case, steps)
    used = consumed(case, states, infos)
    for t in range(steps):
        if t % 2:
            assert is_zero(used[t]), t
        elif t >= 2:  # the synthetic-gradient model has been fitted by then
            assert not is_zero(used[t]), t
    assert counters(states[-1]) == steps


# --------------------------------------------------------------------------- 4. bad input


@pytest.mark.parametrize("alpha", [None, "x", np.ones(2), True])
def test_scaled_rejects_what_is_not_one_number(alpha):
    with pytest.raises(TypeError, match=re.escape(f"alpha={alpha!r}")):
        F.scaled(F.synthetic(P.linear()), alpha)


def _spec():
    return InterfaceSpec(h_shape=(W,), label_shape=(C,), out_shape=(C,), next_shape=(C,),
                         batch_size=B, optimizer=optax.sgd(0.1), example_scale=float(B))


@pytest.mark.parametrize("feedback,call,missing", [
    (F.backprop(), "grad", "grad"),
    (F.synthetic(P.linear()), "fit", "inputs"),
    (F.synthetic(P.linear(conditioned=True)), "fit", "labels"),
    (F.synthetic_prop(P.linear()), "grad", "inputs"),
])
def test_a_target_without_the_needed_field_is_one_clear_error(feedback, call, missing):
    iface = feedback.build(_spec())
    fstate = iface.init(jax.random.key(0))
    h = jnp.ones((B, W))
    full = Target(grad=h, inputs=h, labels=jnp.ones((B, C)))
    target = full._replace(**{missing: None})
    with pytest.raises(ValueError, match=rf"\['{missing}'\] is None.*{missing}=\.\.\."):
        if call == "grad":
            iface.grad(fstate, h, None, target)
        else:
            iface.fit(fstate, target)


def test_update_locked_grad_without_a_target_is_one_clear_error():
    iface = F.backprop().build(_spec())
    with pytest.raises(ValueError, match="needs a Target.*got None"):
        iface.grad((), jnp.ones((B, W)), None, None)


def test_truncated_bptt_rejects_bad_chunks_and_loss():
    net = R.net(R.lstm(N), D, C_R)
    with pytest.raises(TypeError, match="loss=None"):
        R.truncated_bptt(net, None, F.none(), optax.sgd(0.1), T=T, batch_size=B)
    tr = R.truncated_bptt(net, xent, F.none(), optax.sgd(0.1), T=T, batch_size=B)
    state = tr.init(jax.random.key(0))
    xs = jnp.zeros((T, B, D))
    resets = jnp.zeros((T, B), bool)
    with pytest.raises(ValueError, match=re.escape(f"targets has shape {(T, B + 1)}")):
        tr.step(state, R.Chunk(xs, jnp.zeros((T, B + 1), jnp.int32), resets))
    with pytest.raises(ValueError, match=re.escape(f"targets has shape {(T, B + 1)}")):
        tr.init(jax.random.key(0), R.Chunk(xs, jnp.zeros((T, B + 1), jnp.int32), resets))
    for bad in (C_R, -1):
        labels = jnp.zeros((T, B), jnp.int32).at[0, 0].set(bad)
        with pytest.raises(ValueError, match=f"class id {bad}, outside"):
            tr.step(state, R.Chunk(xs, labels, resets))


def test_runner_rejects_device_names():
    split = _split(F.synthetic(P.linear()), optax.sgd(0.1))
    with pytest.raises(TypeError, match="'cpu' is not a jax.Device"):
        sgjax.Runner(split, devices=["cpu", "cpu"])


def test_trainer_helpers_reject_what_is_not_a_trainer():
    with pytest.raises(TypeError, match="vmap_seeds needs a trainer"):
        sgjax.vmap_seeds(lambda s, b: (s, {}), 2)
    with pytest.raises(ValueError, match="seeds=0"):
        sgjax.vmap_seeds(sgjax.sync(_split(F.none(), optax.sgd(0.1))), 0)
    with pytest.raises(TypeError, match="fused needs a trainer or a step function"):
        sgjax.fused(3)
