"""sgjax.train: the sync protocol, stochastic updates, the Runner (one device), tracing
once, determinism, and an end-to-end cDNI run."""

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

B, D, W, C = 16, 8, 16, 4
NET = (  # cuts="every": three stages
    L.serial(L.dense(W), L.batch_norm(), L.relu),
    L.serial(L.dense(W), L.relu),
    L.dense(C),
)


def make(cuts="every", feedback=None, layers=NET, lr=1e-2):
    if feedback is None:
        feedback = F.synthetic(P.linear(conditioned=True))
    return sgjax.split_at(layers, cuts, feedback=feedback, loss=losses.softmax_cross_entropy,
                          optimizer=optax.adam(lr), input_shape=(D,), batch_size=B,
                          num_classes=C)


def batches(n, seed=1):
    """Random batches, made with numpy (no per-shape XLA compilations)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, B, D), dtype=np.float32),
            rng.integers(0, C, (n, B), dtype=np.int32))


def counting(split, traces=None):
    """The same split whose stage updates count how often they are traced (the Python
    body of a jitted function runs only when it is traced): ``counts[k]`` counts stage
    ``k``'s ``update`` and ``backward_pass``; ``traces``, if given (a dict), counts every
    stage function by ``(k, name)``, ``forward_pass`` too."""
    counts = [0] * len(split.stages)

    def wrap(k, name, fn):
        def counted(*args, **kwargs):
            if name != "forward_pass":
                counts[k] += 1
            if traces is not None:
                traces[k, name] = traces.get((k, name), 0) + 1
            return fn(*args, **kwargs)

        return counted

    stages = tuple(s._replace(**{name: wrap(k, name, getattr(s, name))
                                 for name in ("update", "forward_pass", "backward_pass")})
                   for k, s in enumerate(split.stages))
    return split._replace(stages=stages), counts


class Shared:
    """One cDNI split (its stage updates counting traces) and its compiled schedules,
    shared by the tests below so that each is compiled once per session."""

    _built = None

    def __new__(cls):
        if cls._built is None:
            self = super().__new__(cls)
            self.split, self.counts = counting(make())
            self.sched = sgjax.sync(self.split)
            self.step = jax.jit(self.sched.step)
            self.fused = sgjax.fused(self.sched.step)
            cls._built = self
        return cls._built


# ----------------------------------------------------------------------- sync --


def manual_tick(split, stages, x, y):
    """One sync step written out: bottom-up updates that only predict, then each
    predictor fitted to the target the stage above sent for this batch."""
    new, sent, h = [], [], x
    for stage, state in zip(split.stages, stages):
        st, h, below, _ = stage.update(state, h, y, None)
        new.append(st)
        sent.append(below)
    fitted = [split.stages[k].fit(new[k], sent[k + 1])[0] for k in range(len(new) - 1)]
    return (*fitted, new[-1]), sent


def test_sync_uses_then_fits_each_predictor_on_the_same_batch():
    """DNI Fig. 2: step t predicts SG(h_t), then fits it to the target for batch t."""
    sh = Shared()
    split, step = sh.split, sh.step
    xs, ys = batches(2)
    ts0 = sh.sched.init(jax.random.key(0), (xs[0], ys[0]))
    K = len(split.stages)
    assert all(p is None for p in ts0.pending)  # sync keeps nothing between steps
    ts1, info = step(ts0, (xs[0], ys[0]))
    assert set(info) >= {"loss", *(f"sg_loss/{k}" for k in range(K - 1))}
    expected, sent = jax.jit(lambda s, x, y: manual_tick(split, s, x, y))(
        ts0.stages, xs[0], ys[0])
    chex.assert_trees_all_close(ts1.stages, expected, rtol=1e-6, atol=1e-6)
    h = xs[0]
    for k in range(K - 1):  # the target stage k is fitted to is for its own output on batch 0
        h = split.stages[k].forward(ts0.stages[k], h)
        np.testing.assert_allclose(sent[k + 1].inputs, h, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(sent[k + 1].labels, jax.nn.one_hot(ys[0], C))
    for s in ts1.stages:
        assert int(s.step) == 1
    # Zero-initialised predictors: on the first step no SG reaches the lower stages...
    for k in range(K - 1):
        chex.assert_trees_all_equal(ts1.stages[k].params, ts0.stages[k].params)
    # ... the predictor just below the top is fitted to the true gradient, the ones lower
    # down to zero synthetic gradients: the signal moves down one interface per step.
    kernel = lambda ts, k: ts.stages[k].feedback.variables["params"][1]["kernel"]  # noqa: E731
    assert float(info[f"sg_loss/{K - 2}"]) > 0
    assert not np.allclose(kernel(ts1, K - 2), 0.0)
    np.testing.assert_array_equal(kernel(ts1, 0), 0.0)
    ts2, _ = step(ts1, (xs[1], ys[1]))
    assert not np.allclose(kernel(ts2, K - 3), 0.0)


def test_fused_equals_a_loop_of_steps():
    sh = Shared()
    xs, ys = batches(4)
    ts = sh.sched.init(jax.random.key(0), (xs[0], ys[0]))
    fused_ts, infos = sh.fused(ts, (xs, ys))
    losses_ = []
    for x, y in zip(xs, ys):
        ts, info = sh.step(ts, (x, y))
        losses_.append(info["loss"])
    chex.assert_trees_all_close(fused_ts.stages, ts.stages, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(infos["loss"], jnp.stack(losses_), rtol=1e-6)


# ----------------------------------------------------------------- stochastic --


def test_stochastic_with_p1_is_sync():
    sh = Shared()
    xs, ys = batches(4)
    keys = jax.random.split(jax.random.key(5), 4)
    ts = sh.sched.init(jax.random.key(0), (xs[0], ys[0]))
    a, _ = sh.fused(ts, (xs, ys))
    b, infos = sgjax.fused(sgjax.stochastic(sh.split, 1.0))(ts, (xs, ys, keys))
    assert bool(jnp.all(infos["active/0"]))
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
    for s in b.stages:
        assert int(s.step) == 4


def test_stochastic_skipping_stages_keep_their_parameters_but_fit_on_arrived_targets():
    """DNI Fig. 5: a stage that skips does no backward pass (parameters, optimiser and
    layer state unchanged, no target sent down), but a target that reached it still
    fits its synthetic-gradient model, so no message from above is lost."""
    split = make()
    xs, ys = batches(16)
    sto = sgjax.stochastic(split, 0.5)
    ts = sto.init(jax.random.key(0), (xs[0], ys[0]))
    step = jax.jit(sto.step)
    K = len(split.stages)
    seen_skip = seen_run = seen_skip_fit = False
    for t in range(16):
        new, info = step(ts, (xs[t], ys[t], jax.random.key(100 + t)))
        for k in range(K):
            if bool(info[f"active/{k}"]):
                seen_run = True
                assert int(new.stages[k].step) == int(ts.stages[k].step) + 1
                continue
            seen_skip = True
            for field in ("params", "layer_state", "opt_state", "step"):
                chex.assert_trees_all_equal(getattr(new.stages[k], field),
                                            getattr(ts.stages[k], field))
            if k == K - 1:
                continue
            count = lambda st, k=k: int(st.stages[k].feedback.opt_state[0].count)  # noqa: E731
            if bool(info[f"active/{k + 1}"]):  # a target arrived: fitted all the same
                seen_skip_fit = True
                assert count(new) == count(ts) + 1
                assert float(info[f"sg_loss/{k}"]) >= 0
            else:  # nobody above sent a target: nothing to fit
                chex.assert_trees_all_equal(new.stages[k].feedback, ts.stages[k].feedback)
        ts = new
    assert seen_skip and seen_run and seen_skip_fit
    steps = [int(s.step) for s in ts.stages]
    assert 0 < min(steps) and max(steps) < 16


def test_stochastic_learning_rate_schedules_count_global_steps():
    """DNI §3.1 / A.1: the learning rate drops at *global* steps. Under p_update < 1 each
    stage (and each predictor) still moves its schedule on when it skips, while Adam's
    bias correction counts its own updates; past the drop (to 0 here) nothing moves."""
    drop = 4
    lr = optax.piecewise_constant_schedule(1e-2, {drop: 0.0})
    split = sgjax.split_at(NET, "every", feedback=F.synthetic(P.linear(conditioned=True)),
                           loss=losses.softmax_cross_entropy, optimizer=optax.adam(lr),
                           input_shape=(D,), batch_size=B, num_classes=C)
    sto = sgjax.stochastic(split, 0.5)
    xs, ys = batches(drop + 3)
    ts = sto.init(jax.random.key(0), (xs[0], ys[0]))
    step = jax.jit(sto.step)
    for t in range(drop):
        ts, _ = step(ts, (xs[t], ys[t], jax.random.key(200 + t)))
    for k, s in enumerate(ts.stages):
        adam, sched = s.opt_state
        assert int(sched.count) == drop, k  # global steps
        assert int(adam.count) == int(s.step), k  # the stage's own updates
        if k < len(ts.stages) - 1:
            assert int(s.feedback.opt_state[1].count) == drop, k
    assert min(int(s.step) for s in ts.stages) < drop  # some stage did skip
    frozen = ts
    for t in range(drop, drop + 3):  # learning rate 0 from global step `drop` on
        ts, _ = step(ts, (xs[t], ys[t], jax.random.key(200 + t)))
    for k in range(len(ts.stages)):
        chex.assert_trees_all_equal(ts.stages[k].params, frozen.stages[k].params)
        if k < len(ts.stages) - 1:
            chex.assert_trees_all_equal(ts.stages[k].feedback.variables,
                                        frozen.stages[k].feedback.variables)


def test_stochastic_p_update_can_be_an_argument_for_vmap():
    split = make()
    xs, ys = batches(3)
    sto = sgjax.stochastic(split, None)
    ts = sto.init(jax.random.key(0), (xs[0], ys[0]))
    seeds = jnp.arange(3)
    ps = jnp.array([0.1, 0.5, 1.0])
    tss = jax.vmap(lambda s: sto.init(jax.random.key(s), (xs[0], ys[0])))(seeds)
    out, info = jax.jit(jax.vmap(sto.step, in_axes=(0, sgjax.Batch(None, None, 0, 0))))(
        tss, sgjax.Batch(xs[0], ys[0], jax.random.split(jax.random.key(1), 3), ps))
    chex.assert_shape(info["loss"], (3,))
    assert bool(jnp.all(info["active/0"][2]))  # p_update = 1: every stage updates
    single, _ = sto.step(ts, (xs[0], ys[0], jax.random.key(2), 1.0))
    assert int(single.stages[0].step) == 1
    with pytest.raises(ValueError, match="needs p_update in the batch"):
        sto.step(ts, (xs[0], ys[0], jax.random.key(2)))


def test_stochastic_rejects_bad_input():
    with pytest.raises(ValueError, match="p_update=0"):
        sgjax.stochastic(make(), 0)
    with pytest.raises(ValueError, match="update locked"):
        sgjax.stochastic(make(feedback=F.backprop()), 0.5)


# ------------------------------------------------------ runner and tracing --


def steps_without_retrace(step, state, xs, ys, counts):
    """Run ``step`` over the batches; assert no stage update is traced after step 2."""
    counts[:] = [0] * len(counts)
    for t, (x, y) in enumerate(zip(xs, ys)):
        state, _ = step(state, (x, y))
        if t == 1:
            after_two = list(counts)
            assert max(counts) <= 1, counts
    assert counts == after_two, (after_two, counts)
    return state


def test_runner_sync_matches_sync_and_traces_each_stage_once():
    sh = Shared()
    split, counts, step = sh.split, sh.counts, sh.step
    xs, ys = batches(5)
    runner = sgjax.Runner(split)
    rs = runner.init(jax.random.key(0), (xs[0], ys[0]))
    ts = sh.sched.init(jax.random.key(0), (xs[0], ys[0]))
    chex.assert_trees_all_equal(rs.stages, ts.stages)

    # Each stage update is traced at most once by the steps: init may already have traced
    # it abstractly (to size the placeholder targets) and jit can reuse that trace; and
    # other tests may have run the shared jitted step before.
    rs = steps_without_retrace(runner.step, rs, xs, ys, counts)
    ts = steps_without_retrace(step, ts, xs, ys, counts)
    if hasattr(step, "_cache_size"):
        assert step._cache_size() == 1

    chex.assert_trees_all_close(rs.stages, ts.stages, rtol=1e-6, atol=1e-6)
    x = xs[0]
    np.testing.assert_allclose(runner.apply(rs, x), split.apply(ts.stages, x),
                               rtol=1e-6, atol=1e-6)


def test_runner_update_locked_traces_once():
    traces = {}
    split, counts = counting(make(cuts=(2,), feedback=F.backprop()), traces)
    xs, ys = batches(4)
    runner = sgjax.Runner(split)
    rs = runner.init(jax.random.key(0), (xs[0], ys[0]))
    traces.clear()  # count only what the steps trace
    rs = steps_without_retrace(runner.step, rs, xs, ys, counts)
    _, info = runner.step(rs, (xs[0], ys[0]))
    # The waiting stage runs its forward pass once and finishes with backward_pass; each
    # placed (jitted) stage function is traced once over all the steps, the others never.
    for k, names in ((0, ("forward_pass", "backward_pass")), (1, ("update",))):
        for name in names:
            assert traces.get((k, name), 0) == 1, (k, name, traces)
        for name in {"update", "forward_pass", "backward_pass"} - set(names):
            assert traces.get((k, name), 0) == 0, (k, name, traces)
    assert np.isfinite(float(info["loss"]))


def test_runner_rejects_bad_input():
    split = make()  # 3 stages
    with pytest.raises(ValueError, match=r"devices=\[\]"):
        sgjax.Runner(split, devices=[])
    with pytest.raises(TypeError, match="'cpu' is not a jax.Device"):
        sgjax.Runner(split, devices=["cpu"])
    with pytest.raises(ValueError, match="schedule='async'"):
        sgjax.Runner(split, schedule="async")
    with pytest.raises(ValueError, match="pipelined schedule needs feedbacks that are not"):
        sgjax.Runner(make(feedback=F.backprop()), schedule="pipelined")


# -------------------------------------------------------------- determinism --


def run_dni(seed, fresh, steps=5):
    xs, ys = batches(steps)
    if fresh:  # built afresh: nothing shared with the other runs
        split = make()
        sched = sgjax.sync(split)
        fused = sgjax.fused(sched.step)
    else:
        sched, fused = Shared().sched, Shared().fused
    ts = sched.init(jax.random.key(seed), (xs[0], ys[0]))
    return fused(ts, (xs, ys))


def test_same_seed_same_numbers_different_seed_different_numbers():
    a = run_dni(0, fresh=False)
    b = run_dni(0, fresh=True)
    chex.assert_trees_all_equal(a, b)  # bitwise
    c = run_dni(1, fresh=False)
    for sa, sc in zip(a[0].stages, c[0].stages):
        kernels = [(pa, pc) for pa, pc in zip(jax.tree.leaves(sa.params),
                                              jax.tree.leaves(sc.params)) if pa.ndim == 2]
        assert kernels
        for pa, pc in kernels:
            assert not np.allclose(pa, pc)
    assert not np.allclose(a[1]["loss"], c[1]["loss"])


# --------------------------------------------------------------- end to end --


def teacher(num_classes=10, dim=20, n=512, steps=600, batch=32, seed=0):
    """A random linear teacher: y = argmax(x W) in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    y = np.argmax(x @ rng.standard_normal((dim, num_classes), dtype=np.float32), -1)
    idx = rng.integers(0, n, (steps, batch))
    return x, y.astype(np.int32), x[idx], y[idx].astype(np.int32)


def train_accuracy(cuts, feedback, data):
    x, y, xs, ys = data
    block = lambda: L.serial(L.dense(64), L.batch_norm(), L.relu)  # noqa: E731
    layers = (block(), block(), block(), L.dense(10))
    split = sgjax.split_at(layers, cuts, feedback=feedback, loss=losses.softmax_cross_entropy,
                           optimizer=optax.adam(1e-3), input_shape=(20,),
                           batch_size=xs.shape[1], num_classes=10)
    sched = sgjax.sync(split)
    ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
    ts, infos = sgjax.fused(sched)(ts, (xs, ys))
    assert np.all(np.isfinite(infos["loss"]))
    logits = jax.jit(split.apply)(ts.stages, x)
    return float(np.mean(np.argmax(logits, -1) == y))


def test_cdni_learns_and_no_bprop_does_not():
    data = teacher()
    acc_cdni = train_accuracy("every", F.synthetic(P.linear(conditioned=True)), data)
    acc_none = train_accuracy((3,), F.none(), data)
    # Calibrated over data seeds 0-2 (600 steps): cDNI 0.96-0.98, No Bprop below the top
    # layer (only the last layer learns) 0.51-0.56.
    assert acc_cdni >= 0.9, acc_cdni
    assert acc_none <= acc_cdni - 0.3, (acc_cdni, acc_none)


@pytest.mark.parametrize("chunks", [(7,), (2, 5), (1, 1, 1, 4)])
def test_pipelined_runner_fused_in_any_chunks_equals_its_steps(chunks):
    """``fused`` runs a chunk's first ``fill_ticks`` ticks with ``step`` and the rest with
    ``steady_step`` (no filling masks): chunks that start while the pipeline fills, or
    after, give the tick-by-tick numbers (NaN losses while filling included)."""
    split = make(feedback=F.synthetic(P.linear(conditioned=True)))
    runner = sgjax.Runner(split, schedule="pipelined")
    assert runner.fill_ticks == len(split.stages) - 1 == 2
    xs, ys = batches(sum(chunks))
    state = runner.init(jax.random.key(0), (xs[0], ys[0]))
    stepped, losses = state, []
    for x, y in zip(xs, ys):
        stepped, info = runner.step(stepped, (x, y))
        losses.append(float(info["loss"]))
    run, start, fused_losses = sgjax.fused(runner), 0, []
    for n in chunks:
        state, infos = run(state, sgjax.Batch(xs[start:start + n], ys[start:start + n]))
        fused_losses.extend(np.asarray(infos["loss"]).tolist())
        start += n
    chex.assert_trees_all_close(state, stepped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused_losses, losses, rtol=1e-6)
    assert np.isnan(losses[:2]).all() and np.isfinite(losses[2:]).all()
