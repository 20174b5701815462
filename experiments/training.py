"""The shared training loop of the reproduction suite: a split classifier
trained on device-resident data, a chunk of steps per compiled call.

Each chunk is one ``jax.lax.scan`` over ``chunk`` steps of a schedule from
:mod:`sgjax.train`; batches are drawn inside the compiled program (uniform
indices into the training set, with replacement), so the host only dispatches
one call per chunk. Test error is measured between chunks. The state, the data
key and the curves are checkpointed through the framework's
:class:`~experiments.framework.RunContext`, so a killed run resumes inside a cell.

Typical use (see ``experiments/dni/table1.py``)::

    layers = mlp_layers(depth=4, width=256, num_classes=10)
    split = sgjax.split_at(layers, "every", feedback=sgjax.feedback.synthetic(
        sgjax.predictors.mlp((1024, 1024))), loss=sgjax.losses.softmax_cross_entropy,
        optimizer=piecewise_adam(3e-5, (300_000, 400_000)), input_shape=(28, 28, 1),
        batch_size=256, num_classes=10)
    ts, final = train_classifier(ctx, split, ds, steps=500_000, batch_size=256,
                                 chunk=1000, eval_every=5000)

``FAST_COMPILE`` (``compiler_options=FAST_COMPILE``) asks XLA for its cheapest
backend optimisation: it roughly halves compile time, which dominates runs of a
few steps (smoke presets), at the cost of slower steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sgjax

FAST_COMPILE: dict[str, Any] = {"xla_backend_optimization_level": 0}
"""XLA compiler options for runs of a few steps, where compiling dominates."""


def inference_fn(split: sgjax.Split, *, compiler_options: Mapping[str, Any] | None = None
                 ) -> Callable:
    """A jitted ``apply(stage_states, x) -> logits`` in inference mode (batch norm uses
    its running statistics).

    ``jax.jit(split.apply)`` with XLA ``compiler_options`` (e.g. :data:`FAST_COMPILE`).
    """

    def apply(states, x):
        for stage, state in zip(split.stages, states):
            x = stage.apply(state, x)
        return x

    return jax.jit(apply, compiler_options=dict(compiler_options or {}) or None)


def evaluate_error(apply: Callable, states, x: jax.Array, y: jax.Array,
                   batch_size: int = 1000) -> float:
    """Classification error (%) of ``apply(states, x)`` over ``(x, y)`` in batches."""
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        logits = apply(states, x[i:i + batch_size])
        wrong += int(jnp.sum(jnp.argmax(logits, -1) != y[i:i + batch_size]))
    return 100.0 * wrong / x.shape[0]


def make_chunk(schedule: sgjax.Schedule, x_train: jax.Array, y_train: jax.Array,
               batch_size: int, chunk: int, *, keyed: bool = False, with_info: bool = False,
               compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """``run(train_state, key) -> (train_state, key, mean_loss)``: ``chunk`` steps
    in one compiled scan, batches sampled uniformly from the device-resident
    training set. ``keyed`` passes a per-step key to ``schedule.step`` (the
    stochastic schedule). With ``with_info`` the last output is instead the dict
    of every scalar the schedule reports (``loss``, ``sg_loss/<stage>``, …),
    each averaged over the chunk."""
    n = x_train.shape[0]

    def run(ts, key):
        key, k_idx, k_step = jax.random.split(key, 3)
        idx = jax.random.randint(k_idx, (chunk, batch_size), 0, n)
        step_keys = jax.random.split(k_step, chunk)

        def body(ts, inputs):
            i, k = inputs
            args = (ts, x_train[i], y_train[i]) + ((k,) if keyed else ())
            ts, info = schedule.step(*args)
            if with_info:
                return ts, {name: jnp.mean(v) for name, v in info.items()
                            if jnp.ndim(v) == 0 or v.size == 1}
            return ts, info["loss"]

        ts, out = jax.lax.scan(body, ts, (idx, step_keys))
        return ts, key, jax.tree.map(lambda v: jnp.mean(v.astype(jnp.float32)), out)

    return jax.jit(run, donate_argnums=(0,),
                   compiler_options=dict(compiler_options or {}) or None)


def _curve_name(name: str) -> str:
    """``sg_loss/0`` -> ``sg_loss_0`` (curve names become file names in reports)."""
    return name.replace("/", "_")


def train_classifier(
    ctx,
    split: sgjax.Split,
    data,
    *,
    steps: int,
    batch_size: int,
    chunk: int,
    eval_every: int,
    schedule: sgjax.Schedule | None = None,
    keyed: bool = False,
    eval_train: bool = False,
    train_eval_limit: int = 10000,
    log_info: bool = False,
    eval_batch_size: int = 1000,
    compiler_options: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, float]]:
    """Train ``split`` on ``data`` (an :class:`experiments.data.Dataset`-like
    object with ``x_train, y_train, x_test, y_test``) and log ``loss`` and
    ``test_error`` (%) every ``eval_every`` steps through ``ctx``.

    ``eval_train`` also logs ``train_error`` on the first ``train_eval_limit``
    training examples; ``log_info`` also logs every other scalar the schedule
    reports, averaged over the last chunk (``sg_loss_<stage>`` for synthetic
    gradients). ``compiler_options`` go to XLA (e.g. :data:`FAST_COMPILE`).

    Returns the final train state and the last measurement,
    ``{"test_error": …[, "train_error": …]}``.
    """
    if eval_every % chunk:
        raise ValueError(f"eval_every={eval_every} must be a multiple of chunk={chunk}")
    schedule = schedule or sgjax.sync(split)
    x_train = jnp.asarray(data.x_train.reshape(data.x_train.shape[0], *split.input_shape))
    y_train = jnp.asarray(data.y_train)
    x_test = jnp.asarray(data.x_test.reshape(data.x_test.shape[0], *split.input_shape))
    y_test = jnp.asarray(data.y_test)

    key = ctx.key()
    k_init, k_data = jax.random.split(key)
    ts = schedule.init(k_init, x_train[:batch_size], y_train[:batch_size])
    start, (ts, k_data) = ctx.restore((ts, k_data))
    run = make_chunk(schedule, x_train, y_train, batch_size, chunk, keyed=keyed,
                     with_info=log_info, compiler_options=compiler_options)
    apply = inference_fn(split, compiler_options=compiler_options)

    def measure():
        out = {"test_error": evaluate_error(apply, ts.stages, x_test, y_test, eval_batch_size)}
        if eval_train:
            out["train_error"] = evaluate_error(apply, ts.stages, x_train[:train_eval_limit],
                                                y_train[:train_eval_limit], eval_batch_size)
        return out

    bar = ctx.progress(steps, start=start)
    step = start
    last: dict[str, float] | None = None
    while step < steps:
        ts, k_data, info = run(ts, k_data)
        step += chunk
        bar.update(chunk)
        if step % eval_every == 0 or step >= steps:
            info = {_curve_name(k): v for k, v in info.items()} if log_info else {"loss": info}
            last = measure()
            ctx.log(step, **info, **last)
            ctx.save(step, (ts, k_data))
    ctx.close()
    return ts, last if last is not None else measure()


def mlp_layers(depth: int, width: int, num_classes: int, *, batch_norm: bool = True,
               activation: sgjax.Layer = sgjax.layers.relu) -> list[sgjax.Layer]:
    """``depth`` layers of DNI A.1's FCN: ``depth − 1`` hidden blocks of linear,
    batch norm and ReLU, then the linear classifier (so ``depth`` layers give
    ``depth − 1`` interfaces when cut everywhere). The first block flattens its input."""
    if depth < 1:
        raise ValueError(f"mlp_layers: depth={depth} must be at least 1")
    L = sgjax.layers
    if depth == 1:
        return [L.serial(L.flatten, L.dense(num_classes))]
    hidden = [L.serial(L.flatten, L.dense(width), *([L.batch_norm()] if batch_norm else []),
                       activation)]
    hidden += [L.serial(L.dense(width), *([L.batch_norm()] if batch_norm else []), activation)
               for _ in range(depth - 2)]
    return hidden + [L.dense(num_classes)]


def cnn_layers(depth: int, channels: int, num_classes: int) -> list[sgjax.Layer]:
    """DNI A.1's CNN: ``depth − 1`` convolutional blocks (5×5, resolution
    preserving, batch norm, ReLU; 3×3 max-pool after the first, avg-pool after
    the rest, stride 3, ``SAME`` padding), then a linear classifier on the
    flattened features. 28×28 inputs shrink to 10×10, 4×4, 2×2; 32×32 to 11×11,
    4×4, 2×2."""
    if depth < 2:
        raise ValueError(f"cnn_layers: depth={depth} must be at least 2")
    L = sgjax.layers
    blocks = [L.serial(L.conv(channels, 5), L.batch_norm(), L.relu, L.max_pool(3))]
    blocks += [L.serial(L.conv(channels, 5), L.batch_norm(), L.relu, L.avg_pool(3))
               for _ in range(depth - 2)]
    return blocks + [L.serial(L.flatten, L.dense(num_classes))]


def piecewise_adam(lr: float, boundaries: Sequence[int] = (), factor: float = 0.1):
    """Adam whose learning rate is multiplied by ``factor`` at each boundary
    (A.1: 3e-5, divided by 10 at 300k and 400k steps)."""
    import optax

    schedule = optax.piecewise_constant_schedule(lr, {int(b): factor for b in boundaries})
    return optax.adam(schedule)


def as_numpy_curves(curves: dict) -> dict[str, np.ndarray]:
    """Framework curves ``{name: [(step, value), …]}`` as ``(n, 2)`` arrays."""
    return {k: np.asarray(v, dtype=float) for k, v in curves.items()}
