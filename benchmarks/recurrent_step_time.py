"""Recurrent DNI step-time benchmark (DNI §3.2: "the additional computational complexity
is negligible"): time per character of truncated BPTT, DNI and DNI + Aux at the same
``T``, and of BPTT at ``T = 20``, on the PTB shape (one-hot input of 50 symbols).

From ONE run: each configuration's training step is compiled once and fused over
``--chunks`` chunks (one ``lax.scan``); rounds are interleaved and the median reported,
so the ratios come from the same conditions.

    make bench                                    # includes this benchmark
    python benchmarks/recurrent_step_time.py --width 256 --batch 128 --T 5 --rounds 3

Defaults are CPU-sized (A.3's PTB model is 1024 units, batch 256: ``--width 1024
--batch 256`` on an accelerator).

Measured with ``--steps 100 --rounds 5`` (2 CPU cores shared with other jobs): ms per time
step BPTT T=5 5.68, DNI T=5 6.37 (1.12× BPTT at the same T), DNI + Aux T=5 14.45 (2.55×:
the auxiliary loss re-runs the previous chunk and the synthetic gradient model runs at
every step), BPTT T=20 5.88.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sgjax
from sgjax import feedback as F
from sgjax import recurrent as R

VOCAB = 50


def xent(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]


def make(method: str, width: int, batch: int, T: int):
    net = R.net(R.lstm(width), VOCAB, VOCAB, aux=method == "DNI + Aux")
    fb = F.none() if method == "BPTT" else F.scaled(F.synthetic(R.sg_model(width)), 0.1)
    return R.truncated_bptt(net, xent, fb, optax.adam(1e-3), T=T, batch_size=batch)


def data(chunks: int, T: int, batch: int):
    labels = jax.random.randint(jax.random.key(1), (chunks * T, batch), 0, VOCAB)
    return R.chunked(jax.nn.one_hot(labels, VOCAB), labels, T)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--T", type=int, default=5)
    ap.add_argument("--long-T", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200, help="time steps per timed call")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    configs = [("BPTT", args.T), ("DNI", args.T), ("DNI + Aux", args.T), ("BPTT", args.long_T)]
    runs = {}
    for method, T in configs:
        tr = make(method, args.width, args.batch, T)
        chunks = data(max(1, args.steps // T), T, args.batch)
        run = sgjax.fused(tr)
        state = tr.init(jax.random.key(0), jax.tree.map(lambda a: a[0], chunks))
        state, info = run(state, chunks)  # compile
        jax.block_until_ready(info["loss"])
        runs[(method, T)] = (run, state, chunks)
    times = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, (run, state, chunks) in runs.items():
            t0 = time.perf_counter()
            _, info = run(state, chunks)
            jax.block_until_ready(info["loss"])
            steps = chunks.inputs.shape[0] * chunks.inputs.shape[1]
            times[k].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    base, long_ = med[("BPTT", args.T)], med[("BPTT", args.long_T)]
    print(f"recurrent step time: LSTM {args.width} units, batch {args.batch}, vocabulary "
          f"{VOCAB}, {jax.devices()[0].device_kind}, median of {args.rounds} rounds")
    print(f"{'method':<12} {'T':>3} {'ms/time step':>13} {'chars/s':>10} "
          f"{'vs BPTT same T':>15} {'vs BPTT T=' + str(args.long_T):>13}")
    for (method, T), t in med.items():
        print(f"{method:<12} {T:>3} {1e3 * t:>13.3f} {args.batch / t:>10.0f} "
              f"{t / base:>15.2f} {t / long_:>13.2f}")


if __name__ == "__main__":
    main()
