"""The pipelined Runner's speed (issue 20, §4): compiled vs fused sync on one device, on K
forced devices, as K local processes, and a throughput model of K real devices.

Prints, from ONE run (timings interleaved over rounds; ratios are medians of the rounds'
paired ratios, as in ``step_time.py``):

1. A tiny, dispatch-bound network (3 stages of 32 units, batch 16, linear DNI) and DNI
   Table 1's 6-layer MNIST FCN (256 units, batch norm, batch 256, linear DNI after every
   layer): the pipelined Runner stepped tick by tick and fused (``sgjax.fused(runner)``,
   one dispatch per chunk), on one device and on K forced CPU devices, each ÷ the fused
   ``sync`` step on one device; and whether K devices give the one-device numbers.
2. The 6-layer network as K local processes (``sgjax.launch``, one CPU device each, gloo):
   ticks per second and per CPU-second (all processes' CPU time), ÷ one process.
3. A throughput model: every stage's share of a pipelined tick timed alone (fused, one
   stage at a time) and the time to move one interface's messages between two devices;
   K stages on K devices can run a tick in ``max_k t_k + transfer`` instead of
   ``Σ_k t_k``: the predicted speed-up, for the 6-layer network and for a deep, wide one
   (12 layers of 1024 units) whose stages are balanced.

On this CPU the forced devices and the processes share the machine's cores (and XLA's CPU
matmuls are multi-threaded already), so rows 1–2 show that placement works and what it
costs; the model (3) is what K real devices would give.

    make bench                # or: python benchmarks/runner_time.py
    python benchmarks/runner_time.py --rounds 5 --steps 200
"""

from __future__ import annotations

import os

DEVICES = 6
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")

import argparse  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from step_time import measure, paired_ratio  # noqa: E402  (sits beside this script)

import sgjax  # noqa: E402
from sgjax import feedback as F  # noqa: E402
from sgjax import layers as L  # noqa: E402
from sgjax import predictors as P  # noqa: E402
from sgjax.train import _pipelined_stage  # noqa: E402

CHUNK = 50


def fcn(depth, width, inputs, batch, *, bn=True):
    hidden = [L.serial(L.dense(width), L.batch_norm(), L.relu) if bn else
              L.serial(L.dense(width), L.relu) for _ in range(depth - 1)]
    return sgjax.split_at(
        [*hidden, L.dense(10)], "every", feedback=F.synthetic(P.linear()),
        loss=sgjax.losses.softmax_cross_entropy, optimizer=optax.adam(3e-5),
        input_shape=(inputs,), batch_size=batch, num_classes=10)


NETWORKS = {  # name: (split builder, input width, batch)
    "tiny: 3 stages of 32 units, batch 16": (lambda: fcn(3, 32, 32, 16, bn=False), 32, 16),
    "DNI Table 1: 6 layers of 256, batch 256": (lambda: fcn(6, 256, 784, 256), 784, 256),
}
TICKS_SCALE = {"tiny: 3 stages of 32 units, batch 16": 10}
"""Rounds of the tiny network run this many times more ticks (a tick takes microseconds)."""
WIDE = ("12 layers of 1024, batch 256", lambda: fcn(12, 1024, 784, 256), 784, 256)


def data(inputs, batch, chunk=CHUNK):
    key = jax.random.key(0)
    return (jax.random.uniform(key, (chunk, batch, inputs)),
            jax.random.randint(key, (chunk, batch), 0, 10))


def fused_timer(trainer, xs, ys):
    run_chunk = sgjax.fused(trainer)
    state = [trainer.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))]

    def run(n):
        st = state[0]
        for _ in range(n // xs.shape[0]):
            st, _ = run_chunk(st, sgjax.Batch(xs, ys))
        jax.block_until_ready(st)
        state[0] = st

    return run


def stepped_timer(runner, xs, ys):
    state = [runner.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))]

    def run(n):
        st = state[0]
        for i in range(n):
            st, _ = runner.step(st, sgjax.Batch(xs[i % xs.shape[0]], ys[i % ys.shape[0]]))
        jax.block_until_ready(st)
        state[0] = st

    return run


def same_numbers(split, devices, xs, ys) -> float:
    """Largest |difference| between the K-device and the one-device pipelined run after
    one fused chunk (0.0: identical)."""
    results = []
    for placement in (None, devices):
        runner = sgjax.Runner(split, schedule="pipelined", devices=placement)
        state = runner.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))
        state, _ = sgjax.fused(runner)(state, sgjax.Batch(xs, ys))
        results.append(runner.gather(state))
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64)
                                                         - np.asarray(b, np.float64)),
                                                  initial=0.0)),
                         *[jax.tree.map(lambda a: jax.random.key_data(a) if jax.dtypes
                                        .issubdtype(a.dtype, jax.dtypes.prng_key) else a, r)
                           for r in results])
    return max(jax.tree.leaves(diffs))


def section_devices(steps, rounds):
    print("\n## 1. The pipelined Runner compiled, one device and K forced devices\n")
    print("| network | trainer | devices | ticks/s | time ÷ fused sync (1 device) |")
    print("|---|---|---:|---:|---:|")
    devices = jax.devices()
    checks = []
    for name, (build, inputs, batch) in NETWORKS.items():
        split = build()
        K = len(split.stages)
        xs, ys = data(inputs, batch)
        timers = {
            ("sync, fused", 1): fused_timer(sgjax.sync(split), xs, ys),
            ("Runner pipelined, stepped", 1): stepped_timer(
                sgjax.Runner(split, schedule="pipelined"), xs, ys),
            ("Runner pipelined, fused", 1): fused_timer(
                sgjax.Runner(split, schedule="pipelined"), xs, ys),
        }
        for k in sorted({2, min(K, len(devices))}):
            timers[("Runner pipelined, fused", k)] = fused_timer(
                sgjax.Runner(split, schedule="pipelined", devices=devices[:k]), xs, ys)
        n = steps * TICKS_SCALE.get(name, 1)
        seconds = measure(timers, n, rounds)
        for (trainer, k), times in seconds.items():
            ratio = paired_ratio(seconds, (trainer, k), ("sync, fused", 1))
            print(f"| {name} | {trainer} | {k} | {n / statistics.median(times):.0f} | "
                  f"{ratio:.2f} |")
        checks.append((name, min(K, len(devices)),
                       same_numbers(split, devices[:min(K, len(devices))], xs, ys)))
    print()
    for name, k, diff in checks:
        print(f"{name}: {k} devices vs 1 device after {CHUNK} fused ticks, largest |difference| "
              f"over every state leaf: {diff:.3g}")
    print("(Rounding: XLA may fuse a stage's arithmetic differently when its neighbours share "
          "its program, and Adam turns a rounding difference in a near-zero gradient — a bias "
          "before batch norm — into a learning-rate-sized step; tests/test_multidevice.py "
          "holds K devices to the one-device numbers within 1e-6.)")


PROCESS_SCRIPT = """
import sys, time
import sgjax.launch
sgjax.launch.initialize()
import jax, numpy as np
sys.path.insert(0, {here!r})
import runner_time as rt
split = rt.NETWORKS[{name!r}][0]()
xs, ys = rt.data({inputs}, {batch})
runner = sgjax.Runner(split, schedule="pipelined")
run = sgjax.fused(runner)
state = runner.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))
state, _ = run(state, sgjax.Batch(xs, ys))  # compile
jax.block_until_ready(state)
best = None
for _ in range({rounds}):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range({chunks}):
        state, info = run(state, sgjax.Batch(xs, ys))
    jax.block_until_ready(state)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    best = (wall, cpu) if best is None or wall < best[0] else best
print(f"RESULT {{jax.process_index()}} {{best[0]:.6f}} {{best[1]:.6f}}", flush=True)
"""


def section_processes(steps, rounds):
    print("\n## 2. K local processes (sgjax.launch, one CPU device each, gloo)\n")
    print("| network | processes | ticks/s | ticks per CPU-second | ticks/s ÷ 1 process |")
    print("|---|---:|---:|---:|---:|")
    from sgjax import launch

    name = "DNI Table 1: 6 layers of 256, batch 256"
    _, inputs, batch = NETWORKS[name]
    chunks = max(1, steps // CHUNK)
    here = str(Path(__file__).resolve().parent)
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "processes.py"
        script.write_text(PROCESS_SCRIPT.format(here=here, name=name, inputs=inputs,
                                                batch=batch, rounds=rounds, chunks=chunks))
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}  # 1 device each
        for K in (1, 2, 3):
            out = io.StringIO()
            result = launch.launch([sys.executable, str(script)], K, timeout=600, env=env,
                                   stdout=out, stderr=io.StringIO())
            if result.returncode:
                print(f"| {name} | {K} | failed: {result.message} | | |")
                continue
            rows = [line.split() for line in out.getvalue().splitlines() if "RESULT" in line]
            wall = max(float(r[-2]) for r in rows)
            cpu = sum(float(r[-1]) for r in rows)
            ticks = chunks * CHUNK
            base = base or ticks / wall
            print(f"| {name} | {K} | {ticks / wall:.0f} | {ticks / cpu:.0f} | "
                  f"{ticks / wall / base:.2f} |")


def stage_times(split, inputs, batch, rounds):
    """Seconds per tick of each stage's share of a pipelined tick, timed alone (a fused
    scan of that stage only, on its valid messages after the pipeline has filled)."""
    xs, ys = data(inputs, batch, chunk=len(split.stages) + 1)
    runner = sgjax.Runner(split, schedule="pipelined")
    state = runner.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))
    state, _ = sgjax.fused(runner)(state, sgjax.Batch(xs, ys))
    x, y = xs[0], ys[0]
    times, messages = [], []
    for k, stage in enumerate(split.stages):
        inbox, pending = state.inbox[k], state.train.pending[k]

        @jax.jit
        def alone(st, stage=stage, inbox=inbox, pending=pending):
            def body(st, _):
                return _pipelined_stage(stage, st, inbox, pending, x, y)[0], None
            return jax.lax.scan(body, st, None, length=CHUNK)[0]

        st = state.train.stages[k]
        jax.block_until_ready(alone(st))
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            jax.block_until_ready(alone(st))
            best = min(best, (time.perf_counter() - t0) / CHUNK)
        times.append(best)
        if k + 1 < len(split.stages):
            messages.append((state.inbox[k + 1], state.train.pending[k]))
    return times, messages


def transfer_time(message, rounds) -> float:
    """Seconds to move one interface's messages (up and down) from device 0 to device 1."""
    a, b = jax.devices()[0], jax.devices()[1]
    message = jax.device_put(message, a)
    jax.block_until_ready(jax.device_put(message, b))
    best = float("inf")
    for _ in range(rounds * 5):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.device_put(message, b))
        best = min(best, time.perf_counter() - t0)
    return best


def section_model(rounds):
    print("\n## 3. Throughput model: K stages on K devices, from per-stage times\n")
    print("| network | K | slowest stage (ms) | Σ stages (ms) | transfer (ms) | "
          "predicted speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    table1 = ("6 layers of 256, batch 256 (DNI Table 1)",
              *NETWORKS["DNI Table 1: 6 layers of 256, batch 256"])
    for name, build, inputs, batch in (table1, WIDE):
        split = build()
        times, messages = stage_times(split, inputs, batch, rounds)
        transfer = max(transfer_time(m, rounds) for m in messages)
        total, slowest = sum(times), max(times)
        print(f"| {name} | {len(times)} | {slowest * 1e3:.3f} | {total * 1e3:.3f} | "
              f"{transfer * 1e3:.3f} | {total / (slowest + transfer):.2f} |")
        print(f"|  per-stage ms: {', '.join(f'{t * 1e3:.3f}' for t in times)} | | | | | |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="ticks per timing round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--skip-processes", action="store_true",
                        help="leave out section 2 (K local processes)")
    args = parser.parse_args(argv)
    steps = max(CHUNK, args.steps // CHUNK * CHUNK)
    print(f"sgjax pipelined Runner benchmark — {jax.devices()[0].platform} x"
          f"{len(jax.devices())} (forced), {os.cpu_count()} CPU cores, jax {jax.__version__}; "
          f"{args.rounds} rounds of {steps} ticks")
    section_devices(steps, args.rounds)
    if not args.skip_processes:
        section_processes(steps, args.rounds)
    section_model(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
