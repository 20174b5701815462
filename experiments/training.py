"""The one training loop of the reproduction suite, and the networks A.1 describes.

:func:`train_and_evaluate` runs any trainer of sgjax's contract (:mod:`sgjax.trainer`),
or any pure ``step(state, batch) -> (state, info)``, for ``steps`` steps, a chunk of
steps per compiled call (:func:`sgjax.fused`: one ``jax.lax.scan``, batches gathered
inside it from device-resident data), with

* per-step metrics: the scalars of ``info`` (``loss``, ``sg_loss/<stage>``, …) averaged
  over the steps since the last evaluation and logged as curves;
* periodic evaluation: ``evaluate(state, step)`` every ``eval_every`` steps, at the steps
  in ``eval_at`` and at the end; the loop stops exactly there (never past ``steps``);
* checkpoint/resume: the state is checkpointed through the run context at every
  evaluation (throttled), and a killed run resumes from it; batches depend only on the
  seed and the step index, so a resumed run draws the same batches;
* ``vmap`` over seeds: with ``seeds=S`` the state carries a leading axis of ``S``
  independent runs, the step is vmapped over it and each run draws its own batches.

:func:`train_classifier` is that loop for a split classifier on a
:class:`experiments.data.Dataset` (uniform batches with replacement, test error)::

    layers = mlp_layers(depth=4, width=256, num_classes=10)
    split = sgjax.split_at(layers, "every", feedback=sgjax.feedback.synthetic(
        sgjax.predictors.mlp((1024, 1024))), loss=sgjax.losses.softmax_cross_entropy,
        optimizer=piecewise_adam(3e-5, (300_000, 400_000)), input_shape=(28, 28, 1),
        batch_size=256, num_classes=10)
    state, final = train_classifier(ctx, split, ds, steps=500_000, batch_size=256,
                                    chunk=1000, eval_every=5000)

``FAST_COMPILE`` (``compiler_options=FAST_COMPILE``) asks XLA for its cheapest
backend optimisation: it roughly halves compile time, which dominates runs of a
few steps (smoke presets), at the cost of slower steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sgjax

FAST_COMPILE: dict[str, Any] = {"xla_backend_optimization_level": 0}
"""XLA compiler options for runs of a few steps, where compiling dominates."""


class Evaluation(NamedTuple):
    """What ``evaluate`` may return instead of a plain ``{name: value}`` dict, to steer the
    loop: ``metrics`` to log; ``state``, if not ``None``, replaces the training state from
    here on (kept in the state, a curriculum's level or the best parameters so far are
    checkpointed with it, so a resumed run continues exactly); ``stop=True`` ends training
    at this step (early stopping, or a curriculum that is complete)."""

    metrics: Mapping[str, Any]
    state: Any = None
    stop: bool = False


def _unaliased(state: Any) -> Any:
    """``state`` with every array leaf a distinct buffer (a leaf that repeats an earlier
    one is copied): the loop donates the state to the compiled chunk, and XLA cannot
    donate one buffer twice (e.g. two fields initialised with the same zeros)."""
    seen: set[int] = set()

    def distinct(leaf):
        if isinstance(leaf, jax.Array) and id(leaf) in seen:
            return jnp.copy(leaf)
        seen.add(id(leaf))
        return leaf

    return jax.tree.map(distinct, state)


def _evaluation(result: Any) -> Evaluation:
    return result if isinstance(result, Evaluation) else Evaluation(dict(result))


class Trained(NamedTuple):
    """What :func:`train_and_evaluate` returns (unpacks as ``state, metrics``).

    ``state``: the final state (leading axis ``S`` with ``seeds=S``). ``metrics``: the last
    values logged: the training metrics averaged over the last evaluation interval and the
    last evaluation, as floats (means over seeds; with ``seeds`` also
    ``<name>_per_seed``: a list of ``S`` floats).
    """

    state: Any
    metrics: dict[str, Any]


def stops(steps: int, eval_every: int | None = None, eval_at: Sequence[int] = ()
          ) -> list[int]:
    """The sorted steps at which the loop evaluates, logs and checkpoints: the multiples
    of ``eval_every``, ``eval_at`` and ``steps`` itself."""
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if eval_every is not None and (not isinstance(eval_every, int | np.integer)
                                   or eval_every < 1):
        raise ValueError(f"eval_every={eval_every!r} must be a positive integer or None")
    bad = [s for s in eval_at if not 1 <= s <= steps]
    if bad:
        raise ValueError(f"eval_at={list(eval_at)}: {bad} outside 1..{steps}")
    marks = set(int(s) for s in eval_at) | {int(steps)}
    if eval_every:
        marks |= set(range(eval_every, steps + 1, eval_every))
    return sorted(marks)


def _curve_name(name: str) -> str:
    """``sg_loss/0`` -> ``sg_loss_0`` (curve names become file names in reports)."""
    return name.replace("/", "_")


def _summarise(values: Mapping[str, Any], seeds: int | None) -> dict[str, Any]:
    """Floats (means over seeds) and, with seeds, ``<name>_per_seed`` lists."""
    out = {}
    for name, v in values.items():
        v = np.asarray(jax.device_get(v), np.float64)
        out[name] = float(v.mean())
        if seeds is not None and v.ndim == 1:
            out[f"{name}_per_seed"] = v.tolist()
    return out


def train_and_evaluate(
    ctx,
    trainer: Any,
    state: Any,
    *,
    steps: int,
    chunk: int,
    eval_every: int | None = None,
    eval_at: Sequence[int] = (),
    batch_fn: Callable | None = None,
    data: Any = None,
    key: jax.Array | None = None,
    evaluate: Callable[[Any, int], Mapping[str, Any]] | None = None,
    metrics: Sequence[str] | None = ("loss",),
    seeds: int | None = None,
    compiler_options: Mapping[str, Any] | None = None,
    stopped: Callable[[Any], bool] | None = None,
) -> Trained:
    """Train ``state`` with ``step`` for ``steps`` steps, evaluating, logging and
    checkpointing through ``ctx`` (a :class:`~experiments.framework.RunContext`).

    Args:
        ctx: the cell's run context (``restore``, ``save``, ``log``, ``progress``, ``close``).
        trainer: a trainer (:class:`sgjax.Trainer`; its ``step`` is used) or a pure
            ``step(state, batch) -> (state, info)``; ``info`` maps names to scalars.
        state: the initial state (replaced by the checkpoint when resuming; its buffers
            are donated to the compiled chunk, so do not reuse it). With ``seeds=S`` every
            leaf has a leading axis of size ``S``.
        steps: total number of steps (the loop never runs past it).
        chunk: steps per compiled call; a call stops early at the next evaluation step.
        eval_every, eval_at: evaluate every ``eval_every`` steps and at the steps in
            ``eval_at`` (always at ``steps`` too).
        batch_fn: ``batch_fn(data, key) -> batch`` (e.g. an :class:`sgjax.Batch`), traced
            inside the compiled scan with this step's key (``jax.random.fold_in(key, t)`` at
            global step ``t``); ``None``: the batch is ``None`` (full-batch runs keep the
            data in the state or the closure).
        data: pytree of arrays passed to ``batch_fn`` (an argument of the compiled call,
            not a constant baked into it).
        key: base key of the batch keys (default: ``fold_in(ctx.key(), 1)``). With
            ``seeds`` it is split into one key per run.
        evaluate: host-side ``evaluate(state, step) -> {name: value}`` (values scalars, or
            ``(S,)`` arrays with ``seeds``), logged with the training metrics; or an
            :class:`Evaluation`, which may also replace the state (a curriculum, the best
            parameters so far) and stop training (early stopping).
        metrics: names in ``info`` to log (mean over the steps since the last evaluation);
            ``None`` logs every scalar (``sg_loss/1`` becomes the curve ``sg_loss_1``).
        seeds: vmap ``step`` (and ``batch_fn``) over a leading axis of ``seeds`` runs.
        compiler_options: XLA options for the compiled chunk (e.g. :data:`FAST_COMPILE`).
        stopped: ``stopped(state) -> bool`` for a run whose ``evaluate`` may stop it early:
            true for a state restored from a checkpoint taken when it stopped, so a resumed
            run does no further steps.

    Returns:
        :class:`Trained` ``(state, metrics)``.
    """
    step = trainer.step if hasattr(trainer, "step") else trainer
    if not callable(step):
        raise TypeError(f"train_and_evaluate needs a trainer or a step function, got "
                        f"{trainer!r}")
    marks = stops(steps, eval_every, eval_at)
    if isinstance(chunk, bool) or not isinstance(chunk, int | np.integer) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} must be a positive integer")
    if seeds is not None and (not isinstance(seeds, int | np.integer) or seeds < 1):
        raise ValueError(f"seeds={seeds!r} must be a positive integer or None")
    base = jax.random.fold_in(ctx.key(), 1) if key is None else key
    keys = base if seeds is None else jax.random.split(base, seeds)

    def batch_at(d, t):
        user_data, k = d
        if batch_fn is None:
            return None
        if seeds is None:
            return batch_fn(user_data, jax.random.fold_in(k, t))
        return jax.vmap(lambda k_s: batch_fn(user_data, jax.random.fold_in(k_s, t)))(k)

    body = jax.vmap(step) if seeds is not None else step

    def scalars(info):
        if metrics is not None:
            missing = [m for m in metrics if m not in info]
            if missing:
                raise ValueError(f"metrics {missing} not in the step's info "
                                 f"(it reports {sorted(info)})")
            return {_curve_name(m): info[m] for m in metrics}
        per_step = () if seeds is None else (seeds,)
        return {_curve_name(k): v for k, v in info.items() if jnp.shape(v) == per_step}

    def logged_step(state, batch):
        state, info = body(state, batch)
        return state, scalars(info)

    run = jax.jit(sgjax.fused(logged_step, batch_fn=batch_at), donate_argnums=(0,),
                  compiler_options=dict(compiler_options or {}) or None)

    start, state = ctx.restore(state)
    state = _unaliased(state)
    bar = ctx.progress(steps, start=start)
    t, last = start, {}
    sums, count = None, 0
    done = start > 0 and stopped is not None and stopped(state)
    for mark in (m for m in marks if m > start and not done):
        while t < mark:
            n = min(chunk, mark - t)
            state, infos = run(state, jnp.arange(t, t + n), data=(data, keys))
            chunk_sums = jax.tree.map(lambda v: jnp.sum(v, axis=0), infos)
            sums = chunk_sums if sums is None else jax.tree.map(jnp.add, sums, chunk_sums)
            count += n
            t += n
            bar.update(n)
        train = {k: v / count for k, v in (sums or {}).items()}
        sums, count = None, 0
        evaluation = _evaluation(evaluate(state, t) if evaluate is not None else {})
        state = _unaliased(evaluation.state) if evaluation.state is not None else state
        last = _summarise({**train, **evaluation.metrics}, seeds)
        ctx.log(t, **{k: v for k, v in last.items() if not k.endswith("_per_seed")})
        ctx.save(t, state)
        if evaluation.stop:
            break
    if not last and evaluate is not None:  # resumed from a checkpoint taken at the end
        last = _summarise(_evaluation(evaluate(state, t)).metrics, seeds)
    ctx.close()
    return Trained(state, last)


# --------------------------------------------------------------------------- classifiers


def inference_fn(split: sgjax.Split, *, compiler_options: Mapping[str, Any] | None = None,
                 seeds: bool = False) -> Callable:
    """A jitted ``apply(stage_states, x) -> logits`` in inference mode (batch norm uses
    its running statistics); with ``seeds`` the states carry a leading axis of runs and
    the logits are ``(S, B, C)``. ``compiler_options`` go to XLA."""

    def apply(states, x):
        for stage, state in zip(split.stages, states):
            x = stage.apply(state, x)
        return x

    if seeds:
        apply = jax.vmap(apply, in_axes=(0, None))
    return jax.jit(apply, compiler_options=dict(compiler_options or {}) or None)


def evaluate_error(apply: Callable, states, x: jax.Array, y: jax.Array,
                   batch_size: int = 1000) -> np.ndarray:
    """Classification error (%) of ``apply(states, x)`` over ``(x, y)`` in batches: a
    scalar array, or ``(S,)`` when ``apply`` returns ``(S, B, C)`` logits."""
    wrong = 0
    for i in range(0, x.shape[0], batch_size):
        logits = apply(states, x[i:i + batch_size])
        wrong = wrong + jnp.sum(jnp.argmax(logits, -1) != y[i:i + batch_size], axis=-1)
    return 100.0 * np.asarray(wrong, np.float64) / x.shape[0]


def uniform_batches(batch_size: int, *, keyed: bool = False) -> Callable:
    """``batch_fn(data, key) -> Batch(x, y[, key])`` for :func:`train_and_evaluate`:
    ``batch_size`` examples of ``data = (x_train, y_train)`` drawn uniformly with
    replacement; ``keyed`` adds a key for the step itself (:func:`sgjax.stochastic`)."""

    def batch_fn(data, key):
        x, y = data
        k_idx, k_step = jax.random.split(key)
        idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])
        return sgjax.Batch(x[idx], y[idx], k_step) if keyed else sgjax.Batch(x[idx], y[idx])

    return batch_fn


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
    seeds: int | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> Trained:
    """:func:`train_and_evaluate` for ``split`` on ``data`` (a
    :class:`experiments.data.Dataset`-like object with ``x_train, y_train, x_test,
    y_test``): batches of ``batch_size`` drawn uniformly with replacement; ``loss`` and
    ``test_error`` (%) logged every ``eval_every`` steps and at the end.

    ``schedule`` defaults to :func:`sgjax.sync`; ``keyed`` puts a per-step key in its
    batch (:func:`sgjax.stochastic`). ``eval_train`` also logs ``train_error`` on the first
    ``train_eval_limit`` training examples; ``log_info`` logs every scalar the schedule
    reports (``sg_loss_<stage>`` for synthetic gradients), averaged over the interval.
    ``seeds=S`` trains ``S`` independently initialised copies at once (vmapped; the metrics
    are means over them, with ``*_per_seed`` lists). ``compiler_options`` go to XLA (e.g.
    :data:`FAST_COMPILE`).

    Returns :class:`Trained` ``(train_state, metrics)``; ``metrics`` holds ``test_error``
    (and ``train_error``) of the final state and the last logged training metrics.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    schedule = schedule or sgjax.sync(split)
    x_train = jnp.asarray(data.x_train.reshape(data.x_train.shape[0], *split.input_shape))
    y_train = jnp.asarray(data.y_train)
    x_test = jnp.asarray(data.x_test.reshape(data.x_test.shape[0], *split.input_shape))
    y_test = jnp.asarray(data.y_test)

    k_init, k_data = jax.random.split(ctx.key())
    x0, y0 = x_train[:batch_size], y_train[:batch_size]
    if seeds is None:
        state = schedule.init(k_init, sgjax.Batch(x0, y0))
    else:
        init_keys = jax.random.split(k_init, seeds)
        state = jax.vmap(lambda k: schedule.init(k, sgjax.Batch(x0, y0)))(init_keys)
    apply = inference_fn(split, compiler_options=compiler_options, seeds=seeds is not None)

    def evaluate(ts, step):
        del step
        out = {"test_error": evaluate_error(apply, ts.stages, x_test, y_test, eval_batch_size)}
        if eval_train:
            out["train_error"] = evaluate_error(apply, ts.stages, x_train[:train_eval_limit],
                                                y_train[:train_eval_limit], eval_batch_size)
        return out

    return train_and_evaluate(
        ctx, schedule, state, steps=steps, chunk=chunk, eval_every=eval_every,
        batch_fn=uniform_batches(batch_size, keyed=keyed), data=(x_train, y_train),
        key=k_data, evaluate=evaluate, metrics=None if log_info else ("loss",), seeds=seeds,
        compiler_options=compiler_options)


# --------------------------------------------------------------------------- networks


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
