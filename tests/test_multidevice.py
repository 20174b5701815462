"""Stages on several devices (DESIGN: "stages placed on different devices give the same
numbers as on one device").

Forcing several CPU devices needs ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
before jax initialises, which must not leak into the rest of the suite. So in a normal
run this module holds one test, which re-runs this same file under pytest in a
subprocess with that flag and ``SGJAX_TEST_MULTIDEVICE=1``; in that subprocess the real
tests below are collected instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from subprocess_env import DEVICE_COUNT, subprocess_env

N_DEVICES = 4
FLAG = "SGJAX_TEST_MULTIDEVICE"

if os.environ.get(FLAG) != "1":
    import pytest

    pytestmark = pytest.mark.distributed

    def test_multidevice_in_subprocess():
        # XLA's default optimisation level here, not the tests' level 0 (conftest.py): the
        # one-device and K-device programs compile differently, and at level 0 (jax 0.5)
        # their rounding differs enough for Adam to turn it into a visible step; at the
        # default level they agree to 1e-6, which is what these tests pin
        env = subprocess_env(drop=("--xla_backend_optimization_level",),
                             add=(f"{DEVICE_COUNT}={N_DEVICES}",),
                             **{FLAG: "1", "SGJAX_TEST_XLA_OPT": "1"})
        env.pop("PYTEST_XDIST_WORKER", None)
        root = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-x",
               "--tb=short", "-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts="]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True,
                              timeout=600)
        report = proc.stdout[-6000:] + proc.stderr[-3000:]
        assert proc.returncode == 0, report
        assert " passed" in proc.stdout and "skipped" not in proc.stdout, report

else:
    import functools

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

    B, D, W, C = 8, 8, 16, 4
    NET = (
        L.serial(L.dense(W), L.batch_norm(), L.relu),
        L.serial(L.dense(W), L.tanh),
        L.dense(W),
        L.dense(C),
    )

    def make(feedback, cuts="every"):
        return sgjax.split_at(NET, cuts, feedback=feedback,
                              loss=losses.softmax_cross_entropy, optimizer=optax.adam(1e-2),
                              input_shape=(D,), batch_size=B, num_classes=C)

    def batches(n, seed=1):
        rng = np.random.default_rng(seed)
        return (rng.standard_normal((n, B, D), dtype=np.float32),
                rng.integers(0, C, (n, B), dtype=np.int32))

    @functools.cache
    def dni():
        """A 4-stage cDNI split and its single-device sync schedule, jitted (shared)."""
        split = make(F.synthetic(P.linear(conditioned=True)))
        sched = sgjax.sync(split)
        return split, sched, jax.jit(sched.step)

    def assert_on(tree, device):
        leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
        assert leaves
        for leaf in leaves:
            assert leaf.devices() == {device}, (leaf.devices(), device)

    def test_forced_devices():
        assert len(jax.devices()) == N_DEVICES
        assert all(d.platform == "cpu" for d in jax.devices())

    def test_runner_sync_on_devices_matches_one_device():
        split, sched, step = dni()
        K = len(split.stages)
        devices = jax.devices()[:K]
        assert K == N_DEVICES and len(set(devices)) == K
        xs, ys = batches(4)
        runner = sgjax.Runner(split, devices=devices)
        rs = runner.init(jax.random.key(0), (xs[0], ys[0]))
        for k in range(K):
            assert_on(rs.stages[k], devices[k])
        assert all(p is None for p in rs.pending)  # sync fits each target in its own step

        ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
        for x, y in zip(xs, ys):
            rs, rinfo = runner.step(rs, (x, y))
            ts, info = step(ts, (x, y))
        for k in range(K):  # still where they belong after training (each predictor
            assert_on(rs.stages[k], devices[k])  # was fitted on its own stage's device)
        chex.assert_trees_all_close(jax.device_get(rs), jax.device_get(ts),
                                    rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rinfo["loss"], info["loss"], rtol=1e-6)
        out = runner.apply(rs, xs[0])
        assert out.devices() == {devices[-1]}
        np.testing.assert_allclose(out, split.apply(ts.stages, xs[0]), rtol=1e-6, atol=1e-6)
        # the lower stages did learn from the synthetic gradients
        assert not np.allclose(rs.stages[0].params[0][0]["kernel"],
                               sched.init(jax.random.key(0), (xs[0], ys[0]))
                               .stages[0].params[0][0]["kernel"])

    def test_runner_sync_update_locked_on_devices_matches_one_device():
        split = make(F.backprop(), cuts=(1, 3))
        devices = jax.devices()[1:]  # any devices, not necessarily the first ones
        xs, ys = batches(3)
        runner = sgjax.Runner(split, devices=devices)
        rs = runner.init(jax.random.key(0), (xs[0], ys[0]))
        sched = sgjax.sync(split)
        ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
        step = jax.jit(sched.step)
        for x, y in zip(xs, ys):
            rs, _ = runner.step(rs, (x, y))
            ts, _ = step(ts, (x, y))
        for k in range(3):
            assert_on(rs.stages[k], devices[k])
        chex.assert_trees_all_close(jax.device_get(rs.stages), jax.device_get(ts.stages),
                                    rtol=1e-6, atol=1e-6)

    def assert_rows_on(state, devices):
        """Row j of every packed stage buffer lives on device j and nowhere else."""
        for buf in state.stages.values():
            assert buf.shape[0] == len(devices)
            for shard in buf.addressable_shards:
                j = shard.index[0].start
                assert shard.device == devices[j], (j, shard.device)
                assert shard.data.shape[0] == 1

    def placeholders(split, states, x, y):
        """``valid=False`` zero targets, made independently of sgjax.train."""
        inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
        for stage, state in zip(split.stages[:-1], states[:-1]):
            inputs.append(jax.eval_shape(stage.forward, state, inputs[-1]))
        targets, above = [None] * len(split.stages), None
        for k in reversed(range(1, len(split.stages))):
            out = jax.eval_shape(split.stages[k].update, states[k], inputs[k], y, above)
            above = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out[2])
            targets[k - 1] = above
        return targets

    def pipelined_reference(split, states, xs, ys):
        """On tick t stage k processes batch t − k, with the target that stage k + 1
        produced on tick t − 1 (itself for batch t − k − 2)."""
        K, T = len(split.stages), len(xs)
        updates = [jax.jit(s.update) for s in split.stages]
        states = list(states)
        targets = placeholders(split, states, xs[0], ys[0])
        produced = [None] * K  # produced[k] = stage k's output on the previous tick
        history = [{} for _ in range(K)]  # history[k][b] = stage k's output for batch b
        for t in range(T):
            new_produced, new_targets = [None] * K, list(targets)
            for k in range(K):
                b = t - k
                if b < 0:
                    continue
                x = xs[t] if k == 0 else produced[k - 1]
                if targets[k] is not None and bool(targets[k].valid):
                    # the documented staleness: the target is for batch t − k − 2
                    np.testing.assert_array_equal(targets[k].inputs, history[k][t - k - 2])
                states[k], h, below, _ = updates[k](states[k], x, ys[b], targets[k])
                history[k][b] = h
                new_produced[k] = h
                if k > 0:
                    new_targets[k - 1] = below
            produced, targets = new_produced, new_targets
        return tuple(states), tuple(targets)

    def test_pipelined_matches_its_documented_staleness():
        split, sched, step = dni()
        K = len(split.stages)
        devices = jax.devices()[:K]
        T = 7
        xs, ys = batches(T)
        runner = sgjax.Runner(split, schedule="pipelined", devices=devices)
        ps = runner.init(jax.random.key(0), (xs[0], ys[0]))
        init = runner.gather(ps).train.stages
        for t in range(T):
            ps, info = runner.step(ps, (xs[t], ys[t]))
            if t < K - 1:
                assert np.isnan(float(info["loss"]))  # no batch has reached the top yet
        assert np.isfinite(float(info["loss"]))
        assert_rows_on(ps, devices)
        gathered = runner.gather(ps)
        for k in range(K):
            assert int(gathered.train.stages[k].step) == T - k

        states, targets = pipelined_reference(split, init, xs, ys)
        chex.assert_trees_all_close(gathered.train.stages, states, rtol=1e-6, atol=1e-6)
        chex.assert_trees_all_close(gathered.train.pending[:-1], targets[:-1],
                                    rtol=1e-6, atol=1e-6)
        # one batch staler than sync: the result differs from the sync schedule's
        ts = sched.init(jax.random.key(0), (xs[0], ys[0]))
        for x, y in zip(xs, ys):
            ts, _ = step(ts, (x, y))
        assert not np.allclose(ts.stages[K - 2].params[0]["kernel"],
                               states[K - 2].params[0]["kernel"])

    def test_fewer_devices_than_stages_are_shared_in_contiguous_groups():
        split = make(F.none())  # 4 stages
        runner = sgjax.Runner(split, schedule="pipelined", devices=jax.devices()[:2])
        d = jax.devices()
        assert runner.devices == [d[0], d[0], d[1], d[1]]
        assert sgjax.Runner(split, devices=d[:1]).devices == [d[0]] * 4

    PIPELINED = {"dni": lambda: make(F.synthetic(P.linear())),
                 "cdni": lambda: make(F.synthetic(P.linear(conditioned=True))),
                 "cdni-mixed": lambda: make([F.synthetic(P.linear(conditioned=True)),
                                             F.none(), F.synthetic(P.mlp((8,)))])}
    PLACEMENTS = {"1 device": lambda: jax.devices()[:1],
                  "3 devices": lambda: jax.devices()[:3],  # stages 2, 3 share a device
                  "4 devices": lambda: jax.devices()[::-1]}  # any order

    @functools.cache
    def one_device_run(kind, T=9):
        """The pipelined Runner on one device, ``T`` ticks one by one: (states, infos)."""
        split = PIPELINED[kind]()
        runner = sgjax.Runner(split, schedule="pipelined")
        xs, ys = batches(T, seed=3)
        state = runner.init(jax.random.key(1), (xs[0], ys[0]))
        infos = []
        for t in range(T):
            state, info = runner.step(state, (xs[t], ys[t]))
            infos.append(info)
        return runner.gather(state), jax.device_get(infos)

    @pytest.mark.parametrize("kind, placement", [
        ("dni", "3 devices"), ("cdni", "1 device"), ("cdni", "3 devices"),
        ("cdni-mixed", "4 devices")])
    def test_pipelined_on_devices_equals_one_device_and_fuses(kind, placement):
        """Stepped tick by tick and fused into one program (sgjax.fused), the pipelined
        Runner on several devices gives the one-device numbers; inference too."""
        T = 9
        split = PIPELINED[kind]()
        runner = sgjax.Runner(split, schedule="pipelined", devices=PLACEMENTS[placement]())
        xs, ys = batches(T, seed=3)
        expected, infos = one_device_run(kind, T)
        state0 = runner.init(jax.random.key(1), (xs[0], ys[0]))
        state = state0
        for t in range(T):
            state, info = runner.step(state, (xs[t], ys[t]))
            np.testing.assert_allclose(info["loss"], infos[t]["loss"], rtol=1e-6)
        chex.assert_trees_all_close(runner.gather(state), expected, rtol=1e-6, atol=1e-6)
        fused_state, fused_info = sgjax.fused(runner)(state0, sgjax.Batch(xs, ys))
        chex.assert_trees_all_close(runner.gather(fused_state), expected, rtol=1e-6,
                                    atol=1e-6)
        np.testing.assert_allclose(fused_info["loss"], [i["loss"] for i in infos],
                                   rtol=1e-6)
        assert np.isnan(fused_info["loss"][: len(split.stages) - 1]).all()
        ts = expected.train.stages
        np.testing.assert_allclose(runner.apply(state, xs[0]), split.apply(ts, xs[0]),
                                   rtol=1e-6, atol=1e-6)

    def test_sync_on_several_devices_cannot_be_traced():
        split = make(F.none())
        runner = sgjax.Runner(split, devices=jax.devices()[:2])
        xs, ys = batches(2)
        state = runner.init(jax.random.key(0), (xs[0], ys[0]))
        with pytest.raises(ValueError, match="cannot be traced"):
            sgjax.fused(runner)(state, sgjax.Batch(xs, ys))

    def test_pipelined_stages_with_dropout_on_devices_equal_one_device():
        """A stage with a stochastic layer keeps its PRNG key in its packed state (as raw
        key data): on 3 devices the dropout masks, hence the numbers, are one device's."""
        from flax import linen as nn

        class Block(nn.Module):
            features: int

            @nn.compact
            def __call__(self, x, train=True):
                return nn.Dropout(0.25, deterministic=not train)(
                    nn.relu(nn.Dense(self.features)(x)))

        def call(m, x, train):
            return m(x, train=train)

        layers = [L.from_flax(Block(W), call), L.from_flax(Block(W), call), L.dense(C)]
        split = sgjax.split_at(layers, "every", feedback=F.synthetic(P.linear()),
                               loss=losses.softmax_cross_entropy, optimizer=optax.adam(1e-2),
                               input_shape=(D,), batch_size=B, num_classes=C)
        xs, ys = batches(6, seed=5)
        results = []
        for devices in (None, jax.devices()[:3]):
            runner = sgjax.Runner(split, schedule="pipelined", devices=devices)
            state = runner.init(jax.random.key(2), (xs[0], ys[0]))
            state, info = sgjax.fused(runner)(state, sgjax.Batch(xs, ys))
            results.append((runner.gather(state), np.asarray(info["loss"])))
        (one, loss_one), (three, loss_three) = results
        assert jax.dtypes.issubdtype(one.train.stages[0].rng.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(three.train.stages[0].rng),
                                      jax.random.key_data(one.train.stages[0].rng))
        strip = lambda s: [st._replace(rng=()) for st in s.train.stages]  # noqa: E731
        chex.assert_trees_all_close(strip(three), strip(one), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(loss_three, loss_one, rtol=1e-6)
