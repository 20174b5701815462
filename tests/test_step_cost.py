"""The DNI step does the arithmetic the method needs and nothing more (issue: a faster DNI
step). Counted by XLA (``cost_analysis``) on the compiled ``sync`` step, so the test is
exact and does not depend on the machine's load.

Every-layer DNI with linear synthetic-gradient models adds, per cut and per example, one
prediction ``SG(h) = h W + b`` and one predictor weight gradient ``hᵀ (SG(h) − δ)``:
``2 · B · w · w_in`` multiply-adds, ``4 · B · w · w_in`` flops (``w_in = w``, or ``w + 10``
for cDNI's ``[h, one-hot y]``). Everything else a DNI step adds (the regression error, the
predictors' Adam) is O(w²) or O(B w), a few per cent here. If ``fit`` recomputed the
prediction's forward pass instead of sharing it, the extra would be 1.5× that.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import pytest

import sgjax
from sgjax import feedback as F
from sgjax import layers as L
from sgjax import predictors as P

BATCH, WIDTH, DEPTH, CLASSES = 128, 128, 4, 10


def _step_flops(cuts, feedback) -> float:
    hidden = [L.serial(L.dense(WIDTH), L.batch_norm(), L.relu) for _ in range(DEPTH - 1)]
    split = sgjax.split_at(
        [*hidden, L.dense(CLASSES)], cuts, feedback=feedback,
        loss=sgjax.losses.softmax_cross_entropy, optimizer=optax.adam(1e-3),
        input_shape=(WIDTH,), batch_size=BATCH, num_classes=CLASSES)
    schedule = sgjax.sync(split)
    x, y = jnp.zeros((BATCH, WIDTH)), jnp.zeros((BATCH,), jnp.int32)
    state = schedule.init(jax.random.key(0), (x, y))
    cost = jax.jit(schedule.step).lower(state, (x, y)).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("conditioned", [False, True], ids=["DNI", "cDNI"])
def test_dni_adds_one_prediction_and_one_predictor_gradient_per_cut(conditioned):
    backprop = _step_flops((), None)
    dni = _step_flops("every", F.synthetic(P.linear(conditioned=conditioned)))
    w_in = WIDTH + (CLASSES if conditioned else 0)
    matmuls = (DEPTH - 1) * 4 * BATCH * WIDTH * w_in  # predict + weight gradient, per cut
    extra = (dni - backprop) / matmuls
    assert 1.0 <= extra < 1.15, (
        f"DNI adds {extra:.2f}× the arithmetic of its predictions and predictor gradients "
        "(1.5× would mean fit recomputes the prediction's forward pass)")
