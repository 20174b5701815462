"""Step-time benchmark on the DNI MNIST FCN shape (DNI A.1): 6 layers of 256
units with batch norm, batch 256, Adam; DNI between every layer.

Prints, from ONE run, steps/s and the ratio of each method's step time to
backprop's, for per-step jitted dispatch and for scan-fused chunks, and the
pipelined schedule on 2 devices against sync on one. Timings are interleaved
over several rounds and the median is reported, so that the ratios come from
the same conditions. The last column is the ratio of XLA's FLOP counts of the two
compiled steps (``cost_analysis``): the arithmetic each method must do, the floor of its
time ratio where the step is compute-bound.

    make bench                       # or: python benchmarks/step_time.py
    python benchmarks/step_time.py --rounds 7 --steps 200

On CPU the two "devices" are forced host devices sharing the same cores
(``--xla_force_host_platform_device_count=2``), so the pipelined row shows
that placement and overlap work, not a real speed-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402

import sgjax  # noqa: E402
from sgjax import feedback as F  # noqa: E402
from sgjax import layers as L  # noqa: E402
from sgjax import predictors as P  # noqa: E402

BATCH, WIDTH, DEPTH, INPUT = 256, 256, 6, (784,)


def network():
    hidden = [L.serial(L.dense(WIDTH), L.batch_norm(), L.relu) for _ in range(DEPTH - 1)]
    return hidden + [L.dense(10)]


def make_split(cuts, feedback):
    return sgjax.split_at(
        network(), cuts, feedback=feedback, loss=sgjax.losses.softmax_cross_entropy,
        optimizer=optax.adam(3e-5), input_shape=INPUT, batch_size=BATCH, num_classes=10,
    )


METHODS = {
    "Bprop": lambda: make_split((), None),
    "DNI linear": lambda: make_split("every", F.synthetic(P.linear())),
    "cDNI linear": lambda: make_split("every", F.synthetic(P.linear(conditioned=True))),
    "DNI mlp[1024,1024]": lambda: make_split("every", F.synthetic(P.mlp((1024, 1024)))),
    "cDNI mlp[1024,1024]": lambda: make_split(
        "every", F.synthetic(P.mlp((1024, 1024), conditioned=True))),
}


def data(chunk):
    key = jax.random.key(0)
    xs = jax.random.uniform(key, (chunk, BATCH, *INPUT))
    ys = jax.random.randint(key, (chunk, BATCH), 0, 10)
    return xs, ys


def per_step_timer(split, xs, ys):
    schedule = sgjax.sync(split)
    step = jax.jit(schedule.step, donate_argnums=(0,))
    state = [schedule.init(jax.random.key(1), xs[0], ys[0])]

    def run(n):
        ts = state[0]
        for i in range(n):
            ts, info = step(ts, xs[i % xs.shape[0]], ys[i % ys.shape[0]])
        jax.block_until_ready(ts)
        state[0] = ts

    return run


def fused_timer(split, xs, ys):
    schedule = sgjax.sync(split)
    run_chunk = sgjax.fused(schedule.step, donate=True)
    state = [schedule.init(jax.random.key(1), xs[0], ys[0])]

    def run(n):
        ts = state[0]
        for _ in range(n // xs.shape[0]):
            ts, _ = run_chunk(ts, xs, ys)
        jax.block_until_ready(ts)
        state[0] = ts

    return run


def runner_timer(split, xs, ys, schedule, devices):
    runner = sgjax.Runner(split, schedule=schedule, devices=devices)
    state = [runner.init(jax.random.key(1), xs[0], ys[0])]

    def run(n):
        st = state[0]
        for i in range(n):
            st, _ = runner.step(st, xs[i % xs.shape[0]], ys[i % ys.shape[0]])
        jax.block_until_ready(st)
        state[0] = st

    return run


def step_flops(split, xs, ys):
    """XLA's count of floating-point operations in one compiled sync step: the
    arithmetic a method cannot avoid, which bounds its step-time ratio from below when
    (as on a CPU) the step is compute-bound."""
    schedule = sgjax.sync(split)
    state = schedule.init(jax.random.key(1), xs[0], ys[0])
    cost = jax.jit(schedule.step).lower(state, xs[0], ys[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def measure(timers, steps, rounds):
    """Median steps/s per timer, rounds interleaved so conditions are shared."""
    for run in timers.values():
        run(steps)  # compile and warm up
    samples = {name: [] for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            t0 = time.perf_counter()
            run(steps)
            samples[name].append(steps / (time.perf_counter() - t0))
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved timing rounds; the median is reported "
                             "(with 3, ratios move by ±0.15 on 2 CPU cores)")
    args = parser.parse_args(argv)
    chunk = 50
    steps = max(chunk, args.steps // chunk * chunk)
    xs, ys = data(chunk)

    timers, flops = {}, {}
    for name, build in METHODS.items():
        split = build()
        flops[name] = step_flops(split, xs, ys)
        timers[(name, "per-step")] = per_step_timer(split, xs, ys)
        timers[(name, "scan-fused")] = fused_timer(split, xs, ys)
    two = make_split((3,), F.synthetic(P.linear()))
    devices = jax.devices()
    timers[("DNI linear, 2 stages", "Runner sync, 1 device")] = runner_timer(
        two, xs, ys, "sync", [devices[0]] * 2)
    if len(devices) >= 2:
        timers[("DNI linear, 2 stages", "Runner pipelined, 2 devices")] = runner_timer(
            two, xs, ys, "pipelined", devices[:2])
    rates = measure(timers, steps, args.rounds)

    print(f"\nsgjax step benchmark — {DEPTH}-layer FCN, {WIDTH} units, BN, batch {BATCH}, "
          f"Adam; {jax.devices()[0].platform} x{len(devices)} "
          f"({os.cpu_count()} CPU cores), jax {jax.__version__}; "
          f"median of {args.rounds} interleaved rounds of {steps} steps\n")
    print("| method | mode | steps/s | step time ÷ Bprop (same mode) | FLOPs ÷ Bprop |")
    print("|---|---|---:|---:|---:|")
    for (name, mode), rate in rates.items():
        base = rates.get(("Bprop", mode))
        if base is None:
            base_mode = "Runner sync, 1 device"
            ref = rates[("DNI linear, 2 stages", base_mode)]
            ratio = f"{ref / rate:.2f} (÷ Runner sync, 1 device)"
        else:
            ratio = f"{base / rate:.2f}"
        flop_ratio = f"{flops[name] / flops['Bprop']:.2f}" if name in flops else "—"
        print(f"| {name} | {mode} | {rate:.0f} | {ratio} | {flop_ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
