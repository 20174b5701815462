"""A pipelined DNI/cDNI run of K stages as K processes (``python -m sgjax.launch``), used
by ``tests/test_multiprocess.py``; also the one-process reference it is compared with.

``python tests/pipeline_processes.py OUT [DIE_AT]``: every process builds the same split,
feeds the same batches and runs the same code; process 0 writes what it gathered to
``OUT`` (a pickle). With ``DIE_AT``, process 1 dies (``os._exit(3)``) at that tick.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

KINDS = ("dni", "cdni")
TICKS = 20
B, D, W, C = 8, 8, 16, 4


def make_split(kind: str, K: int):
    import optax

    import sgjax
    from sgjax import feedback as F
    from sgjax import layers as L
    from sgjax import losses
    from sgjax import predictors as P

    # (no bias before batch norm: its gradient is zero, and Adam's ratio of two ~1e-9
    # moments makes it chaotic under any change of rounding, e.g. another jax version)
    hidden = (L.serial(L.dense(W), L.relu),
              L.serial(L.dense(W, use_bias=False), L.batch_norm(), L.tanh), L.dense(W))
    predictor = P.linear(conditioned=kind == "cdni")
    return sgjax.split_at((*hidden[:K - 1], L.dense(C)), "every",
                          feedback=F.synthetic(predictor), loss=losses.softmax_cross_entropy,
                          optimizer=optax.adam(1e-2), input_shape=(D,), batch_size=B,
                          num_classes=C)


def batches():
    rng = np.random.default_rng(3)
    return (rng.standard_normal((TICKS, B, D), dtype=np.float32),
            rng.integers(0, C, (TICKS, B), dtype=np.int32))


def run(kind: str, K: int, die_at: int | None = None):
    """``TICKS`` pipelined ticks; returns (gathered state, losses, apply(x_0))."""
    import jax

    import sgjax

    runner = sgjax.Runner(make_split(kind, K), schedule="pipelined")
    xs, ys = batches()
    state = runner.init(jax.random.key(1), (xs[0], ys[0]))
    if jax.process_count() > 1:  # each process holds only its own stages' rows
        for buf in state.stages.values():
            assert not buf.is_fully_addressable
            assert [s.device for s in buf.addressable_shards] == jax.local_devices()
    losses = []
    for t in range(TICKS):
        if t == die_at and jax.process_index() == 1:
            os._exit(3)
        state, info = runner.step(state, (xs[t], ys[t]))
        losses.append(float(info["loss"]))
    return jax.device_get(runner.gather(state)), losses, np.asarray(runner.apply(state, xs[0]))


def main(argv):
    import sgjax.launch

    sgjax.launch.initialize()
    import jax

    out, die_at = argv[0], int(argv[1]) if len(argv) > 1 else None
    results = {kind: run(kind, jax.process_count(), die_at) for kind in KINDS}
    if jax.process_index() == 0:
        with open(out, "wb") as f:
            pickle.dump(results, f)
    print(f"process {jax.process_index()}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
