"""The post's own synthetic gradients: a linear regression from each layer's activation to
the gradient of that layer's *weights* (Greydanus' ``synthetic_vs_stale`` notebook, in JAX).

This is the method the post's figures and its caption ("Stale vs. synthetic gradients. Final
accuracies were 90.0% and 89.9% respectively") come from, before its EDIT (which says the
targets "should be the output activations of each layer rather than the actual gradients on
the weights"; that reading is :mod:`experiments.blog.birdseye`'s activation-gradient arm).

What is built, as the notebook does it (``np_nets/synthetic_vs_stale.ipynb``):

* the network (:class:`Params`, :func:`activations`): ``h1 = relu(x W1 + b1)``,
  ``h2 = relu(h1 W2 + b2)``, ``softmax(h2)`` with mean cross-entropy; 784-100-10; every
  weight and bias drawn ``N(0, 1) / sqrt(fan_out)`` (:func:`init_params`). The notebook's
  hand-written ``backward`` treats the output ReLU as the identity (``dh2 = probs - onehot``
  is used as the gradient of the pre-activation); :func:`activations` reproduces that with a
  straight-through ReLU, so ``jax.grad`` of :func:`loss` *is* the notebook's ``backward``.
  Its evaluation reads the raw class scores (:func:`scores`, no output ReLU);
* the synthetic gradient model (:class:`Params` of matrices, :func:`init_synthetic`): for
  each parameter ``θ`` of layer ``i``, a bias-free linear map ``M_θ`` of shape
  ``(n_i, |θ|)`` from the layer's own output ``h_i`` (post-ReLU, ``(B, n_i)``) to the
  flattened gradient of ``θ``; initialised ``N(0, 1) · 0.1 / sqrt(|θ|)``;
* its use (:func:`synthetic_gradient`): the batch mean of the per-example predictions
  ``h_i M_θ``, reshaped to ``θ``'s shape, replaces ``∂L/∂θ`` in the SGD step;
* its fit (:func:`regression_loss`, :func:`synthetic`): every ``every`` steps (steps
  ``0, every, 2·every, …``) the true batch-mean gradient is computed by backprop and each
  ``M_θ`` takes one SGD step at ``sg_lr`` on ``½ Σ_b ‖h_{i,b} M_θ − vec(∂L/∂θ)‖²`` (the
  notebook's ``sbackward``). The model update of that step uses the prediction made
  *before* the refit, as in the notebook;
* the two controls: :func:`backprop` (plain SGD) and :func:`stale` ("compute the gradient
  with backprop once every ten steps and otherwise use it to perform a parameter update":
  ``optax.chain(sgjax.optim.stale_gradients(every), optax.sgd(lr))``, with the backward pass
  skipped on the steps the transformation ignores).

Each method is a constructor returning a :class:`Method` (``init(key) -> state``,
``step(state, x, y) -> state``), pure and jittable. :func:`train` runs one method for
``steps`` steps with batches drawn like TensorFlow's ``mnist.train.next_batch`` (each epoch
a fresh permutation, consecutive slices), scan-fused between evaluations.
Run through the ``blog`` experiment: ``python -m experiments run blog --preset quick``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgjax.optim

SOURCE = {"W1": 0, "b1": 0, "W2": 1, "b2": 1}
"""Which activation (``h1`` = 0, ``h2`` = 1) predicts each parameter's gradient: a layer's
parameters are predicted from that layer's own output, as in the notebook's ``sforward``."""


class Params(NamedTuple):
    """The post's two-layer network (``W1``: ``(D, H)``, ``b1``: ``(H,)``, ``W2``:
    ``(H, K)``, ``b2``: ``(K,)``); the same container holds gradients and, in a synthetic
    gradient model, one matrix ``(n_i, |θ|)`` per parameter ``θ``."""

    W1: jax.Array
    b1: jax.Array
    W2: jax.Array
    b2: jax.Array


def init_params(key: jax.Array, sizes: Sequence[int] = (784, 100, 10)) -> Params:
    """The notebook's ``make_model``: every weight and bias ``N(0, 1) / sqrt(fan_out)``.
    ``sizes`` = ``(D, H, K)``."""
    if len(sizes) != 3 or any(int(n) < 1 for n in sizes):
        raise ValueError(f"sizes={tuple(sizes)!r}: the post's network is (inputs, hidden, "
                         "classes), e.g. (784, 100, 10)")
    d, h, k = (int(n) for n in sizes)
    kw1, kb1, kw2, kb2 = jax.random.split(key, 4)
    normal = jax.random.normal
    return Params(normal(kw1, (d, h)) / np.sqrt(h), normal(kb1, (h,)) / np.sqrt(h),
                  normal(kw2, (h, k)) / np.sqrt(k), normal(kb2, (k,)) / np.sqrt(k))


def _straight_through_relu(z: jax.Array) -> jax.Array:
    # relu forward, identity backward: the notebook's backward ignores the output ReLU
    return z + jax.lax.stop_gradient(jax.nn.relu(z) - z)


def activations(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(h1, h2)``, shapes ``(B, H)`` and ``(B, K)``, for inputs ``x`` ``(B, D)``: the
    notebook's ``forward`` (``h2`` feeds the softmax and predicts layer 2's gradients)."""
    h1 = jax.nn.relu(x @ params.W1 + params.b1)
    return h1, _straight_through_relu(h1 @ params.W2 + params.b2)


def scores(params: Params, x: jax.Array) -> jax.Array:
    """Class scores ``(B, K)`` as the notebook's ``eval_model`` computes them (no output
    ReLU)."""
    return jax.nn.relu(x @ params.W1 + params.b1) @ params.W2 + params.b2


def loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``softmax(h2)`` against integer labels ``y`` ``(B,)``; its
    ``jax.grad`` is the notebook's ``backward``."""
    _, h2 = activations(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(h2, y).mean()


gradients = jax.grad(loss)
"""``gradients(params, x, y) -> Params``: the true batch-mean gradient (the refit target)."""


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of ``x`` classified as ``y`` (the notebook's ``eval_model``)."""
    return jnp.mean(jnp.argmax(scores(params, x), axis=-1) == y)


def init_synthetic(key: jax.Array, params: Params, scale: float = 0.1) -> Params:
    """One matrix ``(n_i, |θ|)`` per parameter ``θ``, ``N(0, 1) · scale / sqrt(|θ|)`` (the
    notebook's ``smodel``); ``n_i`` is the width of the activation :data:`SOURCE` names."""
    widths = (params.W1.shape[1], params.W2.shape[1])
    keys = jax.random.split(key, len(Params._fields))
    return Params(*(jax.random.normal(k, (widths[SOURCE[name]], p.size)) * scale / np.sqrt(p.size)
                    for k, name, p in zip(keys, Params._fields, params)))


def predictions(smodel: Params, hs: Sequence[jax.Array]) -> Params:
    """Per-example predicted gradients, one ``(B, |θ|)`` array per parameter (the
    notebook's ``sforward``)."""
    return Params(*(hs[SOURCE[name]] @ m for name, m in zip(Params._fields, smodel)))


def synthetic_gradient(smodel: Params, hs: Sequence[jax.Array], like: Params) -> Params:
    """The gradient the model is updated with: the batch mean of :func:`predictions`,
    reshaped like ``like``. The map is linear, so it is computed as the prediction of the
    mean activation (``|θ|`` outputs once instead of ``B`` times)."""
    means = [jnp.mean(h, axis=0) for h in hs]
    return Params(*(jnp.reshape(means[SOURCE[name]] @ m, p.shape)
                    for name, m, p in zip(Params._fields, smodel, like)))


def regression_loss(smodel: Params, hs: Sequence[jax.Array], target: Params) -> jax.Array:
    """``½ Σ_θ Σ_b ‖h_{i,b} M_θ − vec(target_θ)‖²``: every example's prediction regressed
    on the batch-mean gradient; its gradient is the notebook's ``sbackward``."""
    hs = [jax.lax.stop_gradient(h) for h in hs]
    preds = predictions(smodel, hs)
    return 0.5 * sum(jnp.sum((s - jnp.ravel(t)) ** 2) for s, t in zip(preds, target))


class Method(NamedTuple):
    """A training method: ``init(key) -> state`` and ``step(state, x, y, fresh) -> state``,
    where ``fresh`` (a Python bool) says whether this step computes the true gradient (to
    apply it, reuse it or refit on it): the steps ``0, every, 2·every, …``
    (:func:`run_steps` passes it; a static flag rather than a ``lax.cond`` on the step
    counter, because XLA's conditional copies the 31 MB synthetic gradient model on every
    step). Every state has ``params`` (:class:`Params`) and ``step`` (int32 scalar)."""

    init: Callable[[jax.Array], Any]
    step: Callable[[Any, jax.Array, jax.Array, bool], Any]
    every: int = 1


class TrainState(NamedTuple):
    """Backprop's and stale backprop's state."""

    params: Params
    opt_state: Any
    step: jax.Array


class SyntheticState(NamedTuple):
    """Synthetic gradients' state: the network, the synthetic gradient model, their
    optimiser states and ``target``, the true gradient of the last refit."""

    params: Params
    opt_state: Any
    smodel: Params
    sg_opt_state: Any
    target: Params
    step: jax.Array


def _trained(optimizer: optax.GradientTransformation, sizes: Sequence[int],
             every: int) -> Method:
    def init(key):
        params = init_params(key, sizes)
        return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))

    def step(state, x, y, fresh):
        # off the fresh steps the optimiser ignores its input: skip the backward pass
        grads = (gradients(state.params, x, y) if fresh
                 else jax.tree.map(jnp.zeros_like, state.params))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state,
                          state.step + 1)

    return Method(init, step, every)


def backprop(lr: float, sizes: Sequence[int] = (784, 100, 10)) -> Method:
    """Plain SGD at ``lr`` with the true gradient on every step."""
    return _trained(optax.sgd(lr), sizes, 1)


def stale(lr: float, every: int = 10, sizes: Sequence[int] = (784, 100, 10)) -> Method:
    """SGD at ``lr`` with the gradient of steps ``0, every, 2·every, …`` reused until the
    next (``sgjax.optim.stale_gradients``)."""
    _check_every(every)
    return _trained(optax.chain(sgjax.optim.stale_gradients(every), optax.sgd(lr)), sizes,
                    every)


def synthetic(lr: float, sg_lr: float, every: int = 10, sizes: Sequence[int] = (784, 100, 10),
              init_scale: float = 0.1) -> Method:
    """SGD at ``lr`` with :func:`synthetic_gradient` on every step; on steps ``0, every,
    2·every, …`` the true gradient is computed and the synthetic gradient model takes one
    SGD step at ``sg_lr`` on :func:`regression_loss` (after its prediction for this step's
    update was made)."""
    _check_every(every)
    optimizer, sg_optimizer = optax.sgd(lr), optax.sgd(sg_lr)

    def init(key):
        k_params, k_sg = jax.random.split(key)
        params = init_params(k_params, sizes)
        smodel = init_synthetic(k_sg, params, init_scale)
        return SyntheticState(params, optimizer.init(params), smodel,
                              sg_optimizer.init(smodel), jax.tree.map(jnp.zeros_like, params),
                              jnp.zeros((), jnp.int32))

    def refit(state, hs, x, y):
        target = gradients(state.params, x, y)
        grads = jax.grad(regression_loss)(state.smodel, hs, target)
        updates, sg_opt_state = sg_optimizer.update(grads, state.sg_opt_state, state.smodel)
        return optax.apply_updates(state.smodel, updates), sg_opt_state, target

    def step(state, x, y, fresh):
        hs = activations(state.params, x)
        grads = synthetic_gradient(state.smodel, hs, state.params)
        smodel, sg_opt_state, target = (refit(state, hs, x, y) if fresh else
                                        (state.smodel, state.sg_opt_state, state.target))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return SyntheticState(optax.apply_updates(state.params, updates), opt_state, smodel,
                              sg_opt_state, target, state.step + 1)

    return Method(init, step, every)


def _check_every(every: int) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r}: the refit/recompute period must be a positive "
                         "int (the post's is 10)")


def batch_indices(n: int, steps: int, batch_size: int, seed: int | Sequence[int]
                  ) -> np.ndarray:
    """``(steps, batch_size)`` example indices in the order of TensorFlow's
    ``mnist.train.next_batch``: each epoch a fresh permutation of ``range(n)``, read in
    consecutive slices (an epoch's last incomplete slice is dropped)."""
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples")
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    order = np.concatenate([rng.permutation(n)[:per_epoch * batch_size]
                            for _ in range(epochs)])
    return order[:steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def run_steps(method: Method) -> Callable[..., Any]:
    """``run(state, idx, x, y) -> state``: ``method.step`` on batches ``x[idx[t]]``,
    ``y[idx[t]]`` for each row of ``idx`` ``(T, B)``, as one jitted ``lax.scan`` over periods
    of ``method.every`` steps, the first of each fresh. ``state`` must be at the start of a
    period and ``T`` a multiple of ``every``."""
    every = method.every

    @jax.jit
    def run(state, idx, x, y):
        if idx.shape[0] % every:
            raise ValueError(f"{idx.shape[0]} steps are not a whole number of periods of "
                             f"{every}; evaluate at multiples of {every}")

        def plain(s, i):
            return method.step(s, x[i], y[i], False), None

        def period(s, rows):
            s = method.step(s, x[rows[0]], y[rows[0]], True)
            return jax.lax.scan(plain, s, rows[1:])[0], None

        periods = idx.reshape(-1, every, idx.shape[-1])
        return jax.lax.scan(period, state, periods)[0]

    return run


class Trained(NamedTuple):
    """What :func:`train` returns: the final state, the evaluation steps, the test accuracy
    (%) at each, and ``probes`` (name -> one value per evaluation step)."""

    state: Any
    steps: list[int]
    accuracy: list[float]
    probes: dict[str, list[float]]


def train(method: Method, key: jax.Array, data: tuple[np.ndarray, ...], steps: int,
          batch_size: int, stops: Sequence[int], seed: int | Sequence[int],
          probe: Callable[..., dict[str, Any]] | None = None, population: int = 10_000
          ) -> Trained:
    """Train ``method`` from ``init(key)`` for ``steps`` steps on ``data`` =
    ``(x_train, y_train, x_test, y_test)`` (inputs flattened to ``(N, D)``), batches in the
    order ``batch_indices(..., seed)``, evaluating the test accuracy after each step in
    ``stops`` (the last must be ``steps``) and, if given, ``probe(state, batch,
    population)``: ``batch`` is the step just taken's, ``population`` the first
    ``population`` training examples."""
    if not stops or stops[-1] != steps:
        raise ValueError(f"stops={list(stops)!r} must end at steps={steps}")
    if any(s % method.every for s in stops):
        raise ValueError(f"stops={list(stops)!r}: every stop must be a multiple of the "
                         f"method's period {method.every}")
    x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in data)
    idx = batch_indices(len(y_train), steps, batch_size, seed)
    run = run_steps(method)
    evaluate = jax.jit(accuracy)
    probe = jax.jit(probe) if probe is not None else None
    pop = (x_train[:population], y_train[:population])
    state = method.init(key)
    done, acc, probes = 0, [], {}
    for stop in stops:
        state = run(state, jnp.asarray(idx[done:stop]), x_train, y_train)
        acc.append(100.0 * float(evaluate(state.params, x_test, y_test)))
        if probe is not None:
            last = idx[stop - 1]
            for name, value in probe(state, (x_train[last], y_train[last]), pop).items():
                probes.setdefault(name, []).append(float(value))
        done = stop
    return Trained(state, list(stops), acc, probes)


def agreement(applied: Params, params: Params, batch: tuple[jax.Array, jax.Array],
              population: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Cosines of the gradient a method applies, ``applied``, with the true gradient at
    ``params`` on ``batch`` (``same_batch``; W2 alone: ``same_batch_W2``) and on
    ``population`` (many training examples: the direction of the training loss), all
    parameters flattened together."""
    true = gradients(params, *batch)
    full = gradients(params, *population)
    return {"cosine_same_batch": _cosine(_flat(applied), _flat(true)),
            "cosine_same_batch_W2": _cosine(applied.W2, true.W2),
            "cosine_population": _cosine(_flat(applied), _flat(full))}


def synthetic_agreement(state: SyntheticState, batch: tuple[jax.Array, jax.Array],
                        population: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """:func:`agreement` of the synthetic gradient on ``batch`` at ``state``, plus its
    comparison with the last refit target as the notebook's heatmap cell makes it: W2's
    cosine (``cosine_target_W2``) and the sign agreement over all parameters
    (``sign_agreement_target``, :func:`sign_agreement`)."""
    syn = synthetic_gradient(state.smodel, activations(state.params, batch[0]), state.params)
    return {**agreement(syn, state.params, batch, population),
            "cosine_target_W2": _cosine(syn.W2, state.target.W2),
            "sign_agreement_target": sign_agreement(_flat(syn), _flat(state.target))}


def stale_agreement(state: TrainState, batch: tuple[jax.Array, jax.Array],
                    population: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """:func:`agreement` of the stored stale gradient (the one the last ``every`` steps
    applied) at ``state``."""
    stored = [s.grads for s in jax.tree.leaves(
        state.opt_state, is_leaf=lambda s: isinstance(s, sgjax.optim.StaleGradientsState))
        if isinstance(s, sgjax.optim.StaleGradientsState)]
    if len(stored) != 1:
        raise ValueError("stale_agreement needs the state of stale(): one "
                         f"StaleGradientsState in opt_state, found {len(stored)}")
    return agreement(stored[0], state.params, batch, population)


def _flat(g: Params) -> jax.Array:
    return jnp.concatenate([jnp.ravel(v) for v in g])


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = jnp.ravel(a), jnp.ravel(b)
    return jnp.dot(a, b) / jnp.maximum(jnp.linalg.norm(a) * jnp.linalg.norm(b), 1e-30)


def sign_agreement(synthetic: jax.Array, true: jax.Array, eps: float = 1e-3) -> jax.Array:
    """Fraction of entries with the same sign among those where both ``|synthetic|`` and
    ``|true|`` are at least ``eps`` (the notebook: "% same sign out of … nonzero
    gradients"); NaN when there are none."""
    s = jnp.where(jnp.abs(synthetic) < eps, 0.0, synthetic)
    t = jnp.where(jnp.abs(true) < eps, 0.0, true)
    both = (s * t) != 0
    return jnp.sum((s * t) > 0) / jnp.sum(both)


def time_per_step(method: Method, state: Any, data: tuple[np.ndarray, np.ndarray],
                  batch_size: int, steps: int, seed: int = 0) -> float:
    """Microseconds per step of ``steps`` scan-fused steps of ``method`` from ``state``,
    after a compiling call."""
    x, y = (jnp.asarray(a) for a in data)
    idx = jnp.asarray(batch_indices(len(y), steps, batch_size, seed))
    run = run_steps(method)
    jax.block_until_ready(run(state, idx, x, y))
    t = time.perf_counter()
    jax.block_until_ready(run(state, idx, x, y))
    return 1e6 * (time.perf_counter() - t) / steps


def parameter_count(sizes: Sequence[int] = (784, 100, 10)) -> dict[str, int]:
    """Weights of the network and of its synthetic gradient model (``Σ_θ n_i · |θ|``)."""
    d, h, k = sizes
    net = d * h + h + h * k + k
    sg = h * (d * h) + h * h + k * (h * k) + k * k
    return {"network": net, "synthetic_model": sg}
