"""Pieces shared by the DNI feed-forward figure experiments (``stale``, ``sparse``,
``single``, ``linear``, ``underfit``, ``blog``): MNIST FCN splits with arbitrary cuts, the
synthetic-versus-true gradient comparison of DNI Fig. 10, and a run context for several
trainings inside one cell.

The networks and synthetic gradient models are those of :mod:`experiments.dni.table1`
(A.1); the loss is the batch-mean softmax cross-entropy (sgjax regresses per-example
gradients whatever the reduction, :class:`sgjax.feedback.InterfaceSpec`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import sgjax
from experiments import training
from experiments.dni import table1


def fcn_split(depth: int, cuts: Sequence[int] | str, feedback, config: table1.Config,
              input_shape: Sequence[int], *, layers: Sequence[sgjax.Layer] | None = None,
              optimizer=None, predictor_optimizer=None,
              example_scale: float | None = None) -> sgjax.Split:
    """A.1's ``depth``-layer MNIST FCN (or ``layers``) cut at ``cuts`` with ``feedback``
    (one for all cuts or one per cut; ``cuts=()`` is backprop), Adam with the preset's
    piecewise-constant learning rate (or ``optimizer``); ``predictor_optimizer`` and
    ``example_scale`` go to :func:`sgjax.split_at` (defaults: the layers' optimiser, and
    per-example targets measured from the loss)."""
    cuts = cuts if isinstance(cuts, str) else tuple(cuts)
    return sgjax.split_at(
        list(layers) if layers is not None else table1.make_layers("mnist", "fcn", depth,
                                                                   config),
        cuts, feedback=feedback if cuts else None, loss=sgjax.losses.softmax_cross_entropy,
        optimizer=optimizer or training.piecewise_adam(config.lr, config.lr_boundaries,
                                                       config.lr_factor),
        input_shape=tuple(input_shape), batch_size=config.batch_size,
        num_classes=table1.NUM_CLASSES, predictor_optimizer=predictor_optimizer,
        example_scale=example_scale)


def gradient_pair(split: sgjax.Split, states: Sequence[sgjax.StageState], k: int,
                  predictor: sgjax.Predictor, x: jax.Array, y: jax.Array,
                  loss: Callable = sgjax.losses.softmax_cross_entropy
                  ) -> tuple[jax.Array, jax.Array]:
    """The synthetic and the true gradient at the output ``h`` of stage ``k`` for the
    batch ``(x, y)``, both per example (DNI Fig. 10, the blog post's heatmaps).

    ``h`` is computed by the stages ``0..k`` in training mode (as during training);
    the synthetic gradient is ``predictor``'s prediction from the variables in stage
    ``k``'s feedback state (``SG(h[, y])``, the per-example gradient the model regresses);
    the true gradient is ``∂/∂h Σ_examples loss`` backpropagated through every stage above
    ``k`` in training mode — the gradient backprop would have given, not the bootstrapped
    target. ``loss`` is the batch-mean loss of the split (multiplied by the batch size to
    give per-example gradients). Returns two ``(B, *h_shape)`` arrays.
    """
    if not 0 <= k < len(split.stages) - 1:
        raise ValueError(f"stage {k} has no interface above it: use 0..{len(split.stages) - 2}")
    h = x
    for stage, state in zip(split.stages[:k + 1], states):
        h = stage.forward(state, h)
    labels = split.label_fn(y)
    variables = sgjax.feedback.synthetic_variables(states[k].feedback)
    synthetic, _ = predictor.apply(variables, h, labels if predictor.conditioned else None,
                                   train=True)

    def summed_loss(h):
        out = h
        for stage, state in zip(split.stages[k + 1:], states[k + 1:]):
            out = stage.forward(state, out)
        return x.shape[0] * loss(out, y)

    return synthetic, jax.grad(summed_loss)(h)


def gradient_quality(split, states, k, predictor, x, y) -> dict[str, jax.Array]:
    """:func:`sgjax.metrics.all_metrics` of :func:`gradient_pair`: ``l2_error`` (mean
    squared distance per example), ``cosine`` and ``sign_error`` (fraction of dimensions
    whose sign is wrong)."""
    s, t = gradient_pair(split, states, k, predictor, x, y)
    return sgjax.metrics.all_metrics(s, t)


def train_fcn(ctx, split: sgjax.Split, ds, config: table1.Config, *,
              schedule: sgjax.Schedule | None = None,
              probe: Callable[[Any, int], dict[str, Any]] | None = None,
              eval_train: bool = False, log_info: bool = False,
              train_eval_limit: int = 10_000) -> training.Trained:
    """Train ``split`` on ``ds`` with :func:`experiments.training.train_and_evaluate`
    (uniform batches of ``config.batch_size``), logging ``test_error`` (and
    ``train_error`` on the first ``train_eval_limit`` training examples with
    ``eval_train``) every ``config.eval_every`` steps, plus ``probe(train_state, step)`` — a
    dict of scalars, e.g. :func:`gradient_quality` on a fixed batch — at the same steps.
    ``log_info`` logs every scalar the schedule reports (``sg_loss_<stage>``)."""
    schedule = schedule or sgjax.sync(split)
    x_train = jnp.asarray(ds.x_train.reshape(ds.x_train.shape[0], *split.input_shape))
    y_train = jnp.asarray(ds.y_train)
    x_test = jnp.asarray(ds.x_test.reshape(ds.x_test.shape[0], *split.input_shape))
    y_test = jnp.asarray(ds.y_test)
    compiler = training.FAST_COMPILE if config.fast_compile else None
    k_init, k_data = jax.random.split(ctx.key())
    b = config.batch_size
    state = schedule.init(k_init, sgjax.Batch(x_train[:b], y_train[:b]))
    apply = training.inference_fn(split, compiler_options=compiler)

    def evaluate(ts, step):
        out = {"test_error": training.evaluate_error(apply, ts.stages, x_test, y_test)}
        if eval_train:
            out["train_error"] = training.evaluate_error(
                apply, ts.stages, x_train[:train_eval_limit], y_train[:train_eval_limit])
        if probe is not None:
            out.update(probe(ts, step))
        return out

    return training.train_and_evaluate(
        ctx, schedule, state, steps=config.steps, chunk=config.chunk,
        eval_every=config.eval_every, batch_fn=training.uniform_batches(b),
        data=(x_train, y_train), key=k_data, evaluate=evaluate,
        metrics=None if log_info else ("loss",), compiler_options=compiler)


class SubContext:
    """A :class:`~experiments.framework.RunContext` as seen by one of several trainings
    inside a cell: its curves get the suffix ``_<suffix>``, its key is folded with
    ``index``, and it does not checkpoint (a killed cell restarts from its first run)."""

    def __init__(self, ctx, index: int, suffix: str):
        self._ctx, self._index, self._suffix = ctx, index, suffix

    def key(self) -> jax.Array:
        return jax.random.fold_in(self._ctx.key(), self._index)

    def restore(self, like: Any) -> tuple[int, Any]:
        return 0, like

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        return False

    def progress(self, total: int, *, start: int = 0, desc: str | None = None):
        return self._ctx.progress(total, start=start, desc=desc or self._suffix)

    def log(self, step: int, **values: Any) -> None:
        self._ctx.log(step, **{f"{k}_{self._suffix}": v for k, v in values.items()})

    def close(self) -> None:
        self._ctx.close()
