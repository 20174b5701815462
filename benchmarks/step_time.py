"""Step-time benchmark on the DNI MNIST FCN shape (DNI A.1): 6 layers of 256
units with batch norm, batch 256, Adam; DNI between every layer.

Prints, from ONE run, steps/s and the ratio of each method's step time to
backprop's, for per-step jitted dispatch and for scan-fused chunks, and the
pipelined schedule on 2 devices against sync on one. Timings are interleaved
over several rounds; a ratio is the median over rounds of the two methods'
time ratio within a round, so that load that comes and goes cancels. Two rows
time a hand-written plain-JAX backprop and DNI step of the same network
(``plain_reference.py``): the yardstick for sgjax's own overhead. The last
column is the ratio of XLA's FLOP counts of the two compiled steps
(``cost_analysis``): the arithmetic each method must do (DNI adds one
prediction and one weight gradient per interface to backprop's work).

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
import plain_reference as plain  # noqa: E402  (sits beside this script)

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
    state = [schedule.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))]

    def run(n):
        ts = state[0]
        for i in range(n):
            ts, info = step(ts, sgjax.Batch(xs[i % xs.shape[0]], ys[i % ys.shape[0]]))
        jax.block_until_ready(ts)
        state[0] = ts

    return run


def fused_timer(split, xs, ys):
    schedule = sgjax.sync(split)
    run_chunk = sgjax.fused(schedule, donate=True)
    state = [schedule.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))]

    def run(n):
        ts = state[0]
        for _ in range(n // xs.shape[0]):
            ts, _ = run_chunk(ts, sgjax.Batch(xs, ys))
        jax.block_until_ready(ts)
        state[0] = ts

    return run


def runner_timer(split, xs, ys, schedule, devices):
    runner = sgjax.Runner(split, schedule=schedule, devices=devices)
    state = [runner.init(jax.random.key(1), sgjax.Batch(xs[0], ys[0]))]

    def run(n):
        st = state[0]
        for i in range(n):
            st, _ = runner.step(st, sgjax.Batch(xs[i % xs.shape[0]], ys[i % ys.shape[0]]))
        jax.block_until_ready(st)
        state[0] = st

    return run


def step_flops(split, xs, ys):
    """XLA's count of floating-point operations in one compiled sync step: the
    arithmetic a method cannot avoid, which bounds its step-time ratio from below when
    (as on a CPU) the step is compute-bound."""
    schedule = sgjax.sync(split)
    batch = sgjax.Batch(xs[0], ys[0])
    state = schedule.init(jax.random.key(1), batch)
    cost = jax.jit(schedule.step).lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def plain_timer(synthetic, xs, ys):
    """The hand-written plain-JAX step of ``plain_reference`` (scan-fused), and
    its FLOP count, on the same shape, data and optimiser."""
    optimizer = optax.adam(3e-5)
    grads_fn = plain.dni_grads if synthetic else plain.backprop_grads
    run_chunk = plain.fused_step(grads_fn, optimizer)
    params = plain.init(jax.random.key(1), DEPTH, WIDTH, INPUT[0], synthetic=synthetic)
    state = [(params, optimizer.init(params))]

    def run(n):
        carry = state[0]
        for _ in range(n // xs.shape[0]):
            carry = run_chunk(carry, xs, ys)
        jax.block_until_ready(carry)
        state[0] = carry

    def one_step(params, opt_state, x, y):
        return optimizer.update(grads_fn(params, x, y), opt_state, params)

    cost = jax.jit(one_step).lower(*state[0], xs[0], ys[0]).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return run, float(cost["flops"])


def measure(timers, steps, rounds):
    """Seconds per round for each timer, rounds interleaved so that the timers
    of one round share the machine's conditions."""
    for run in timers.values():
        run(steps)  # compile and warm up
    seconds = {name: [] for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            t0 = time.perf_counter()
            run(steps)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def paired_ratio(seconds, name, base):
    """Median over rounds of ``time(name) / time(base)`` within each round: the
    pairs ran back to back, so load that comes and goes cancels."""
    return statistics.median(a / b for a, b in zip(seconds[name], seconds[base]))


def base_of(name, mode):
    if name.startswith("plain-JAX"):
        return ("plain-JAX Bprop", mode), " (÷ plain-JAX Bprop)"
    if mode.startswith("Runner"):
        return ("DNI linear, 2 stages", "Runner sync, 1 device"), " (÷ Runner sync, 1 device)"
    return ("Bprop", mode), ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per timing round")
    parser.add_argument("--rounds", type=int, default=7,
                        help="interleaved timing rounds; ratios are the median of the "
                             "rounds' paired ratios (one round's ratio moves by ±0.3 on a "
                             "shared 2-core CPU)")
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
    for name, synthetic in (("plain-JAX Bprop", False), ("plain-JAX DNI linear", True)):
        timers[(name, "scan-fused")], flops[name] = plain_timer(synthetic, xs, ys)
    two = make_split((3,), F.synthetic(P.linear()))
    devices = jax.devices()
    timers[("DNI linear, 2 stages", "Runner sync, 1 device")] = runner_timer(
        two, xs, ys, "sync", [devices[0]] * 2)
    if len(devices) >= 2:
        timers[("DNI linear, 2 stages", "Runner pipelined, 2 devices")] = runner_timer(
            two, xs, ys, "pipelined", devices[:2])
    seconds = measure(timers, steps, args.rounds)

    print(f"\nsgjax step benchmark — {DEPTH}-layer FCN, {WIDTH} units, BN, batch {BATCH}, "
          f"Adam; {jax.devices()[0].platform} x{len(devices)} "
          f"({os.cpu_count()} CPU cores), jax {jax.__version__}; "
          f"{args.rounds} interleaved rounds of {steps} steps; steps/s: median; ratios: "
          f"median of the rounds' paired ratios\n")
    print("| method | mode | steps/s | step time ÷ Bprop (same mode) | FLOPs ÷ Bprop |")
    print("|---|---|---:|---:|---:|")
    for (name, mode), times in seconds.items():
        base, label = base_of(name, mode)
        ratio = f"{paired_ratio(seconds, (name, mode), base):.2f}{label}"
        flop_base = flops["plain-JAX Bprop" if name.startswith("plain-JAX") else "Bprop"]
        flop_ratio = f"{flops[name] / flop_base:.2f}" if name in flops else "—"
        rate = steps / statistics.median(times)
        print(f"| {name} | {mode} | {rate:.0f} | {ratio} | {flop_ratio} |")

    def fused(a, b):
        return paired_ratio(seconds, (a, "scan-fused"), (b, "scan-fused"))

    print("\nscan-fused, paired in the same rounds: "
          f"sgjax Bprop ÷ plain-JAX Bprop {fused('Bprop', 'plain-JAX Bprop'):.2f}; "
          f"sgjax DNI linear ÷ plain-JAX DNI linear "
          f"{fused('DNI linear', 'plain-JAX DNI linear'):.2f}; "
          f"plain-JAX DNI linear ÷ sgjax Bprop {fused('plain-JAX DNI linear', 'Bprop'):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
