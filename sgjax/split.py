"""``split_at``: cut a chain of layers into stages that talk only through
messages (DNI §2.1, Fig. 1 (c)–(d) and Fig. 2).

Each :class:`Stage` is a pair of pure functions with a named state:

* ``init(key) -> StageState``
* ``update(state, x, y, target) -> (state, h, target_below, info)``: the stage
  runs forward on its input ``x`` (``(B, *in_shape)``), obtains the gradient for
  its output ``h`` from its feedback (or from the loss, for the top stage),
  updates its parameters with the optimiser, and returns the :class:`Target`
  message for the stage below (its gradient w.r.t. ``x``, DNI Fig. 2).

A stage never reads another stage's parameters: ``h`` goes up, targets come
down. That is what lets each stage live on its own device (see
:mod:`sgjax.train`). ``cuts=()`` is one stage trained by plain backpropagation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgjax import layers as L
from sgjax.feedback import Feedback, InterfaceSpec, Target
from sgjax.predictors import Predictor


class StageState(NamedTuple):
    """Everything one stage owns.

    ``params``/``layer_state``: one entry per layer of the stage (trainable
    variables / batch-norm statistics); ``opt_state``: optimiser state of
    ``params``; ``feedback``: the state of the feedback at the stage's output
    (predictor, fixed matrix, …; ``()`` for the top stage); ``step``: number of
    updates applied.

    ``rng``: the stage's PRNG key if one of its layers is stochastic (dropout),
    else ``()``. ``Stage.init(key)`` derives it as ``fold_in(key, RNG_STREAM)``,
    so the parameters are drawn from ``key`` exactly as without it. Training
    passes (``update``, ``forward_pass``, ``forward``) use the key
    ``fold_in(rng, step)`` — fresh masks for every update, the same ones for a
    forward pass and its backward pass — and layer ``i`` of the stage gets
    ``fold_in(fold_in(rng, step), i)`` (:func:`stage_rngs`). Inference
    (``apply``) uses none.
    """

    params: tuple
    layer_state: tuple
    opt_state: Any
    feedback: Any
    step: jax.Array
    rng: Any = ()


RNG_STREAM = 0x5D1  # fold_in(stage key, RNG_STREAM): the stage's dropout stream


def stage_rngs(state: StageState, n_layers: int) -> tuple[jax.Array, ...] | None:
    """The keys the ``n_layers`` layers of a stage use in the training pass at
    ``state.step`` (``None`` for a stage without stochastic layers)."""
    if isinstance(state.rng, tuple) and not state.rng:
        return None
    return L.layer_rngs(jax.random.fold_in(state.rng, state.step), n_layers)


class Stage(NamedTuple):
    """One sub-network ``F_i^j`` as pure functions of its :class:`StageState`.

    * ``update(state, x, y, target) -> (state, h, target_below, info)``: one
      whole step, ``forward_pass`` then ``backward_pass``.
    * ``forward_pass(state, x) -> (h, residual)`` and
      ``backward_pass(state, residual, y, target) -> (state, target_below, info)``:
      the two halves, for stages that must wait for this batch's target (an
      update-locked feedback): the forward pass runs once and its
      :class:`Residual` is kept until the target arrives.
    * ``fit(state, target) -> (state, info)``: consume a target without
      updating the stage (a stage that skips, DNI Fig. 5).
    * ``forward(state, x) -> h`` runs the stage in training mode without
      changing it; ``apply(state, x) -> h`` runs it in inference mode.

    ``in_shape``/``out_shape`` exclude the batch axis; ``feedback`` is ``None``
    for the top stage.
    """

    index: int
    layers: tuple[L.Layer, ...]
    feedback: Feedback | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    init: Callable[[jax.Array], StageState]
    update: Callable[..., tuple[StageState, jax.Array, Target | None, dict]]
    forward: Callable[[StageState, jax.Array], jax.Array]
    apply: Callable[[StageState, jax.Array], jax.Array]
    forward_pass: Callable[..., tuple[jax.Array, Any]]
    backward_pass: Callable[..., tuple[StageState, Target | None, dict]]
    fit: Callable[..., tuple[StageState, dict]]

    @property
    def waits(self) -> bool:
        """True if this stage needs this batch's target before it can update
        (its feedback is update locked, Understanding-SG Table 1)."""
        return self.feedback is not None and self.feedback.update_locked


class Split(NamedTuple):
    """The result of :func:`split_at`: the stages, in order, plus helpers."""

    stages: tuple[Stage, ...]
    cuts: tuple[int, ...]
    input_shape: tuple[int, ...]
    label_fn: Callable[[jax.Array], jax.Array]
    num_classes: int | None = None

    @property
    def update_locked(self) -> bool:
        """True if some interface needs this batch's target before updating."""
        return any(s.waits for s in self.stages)

    def check_batch(self, x, y) -> None:
        """Raise a ``ValueError`` naming the problem if ``(x, y)`` cannot be a
        training batch: wrong input shape, a different number of labels than
        inputs, badly shaped labels, or (for concrete integer labels) class ids
        outside ``[0, num_classes)``, which one-hot encoding would silently
        turn into all-zero rows."""
        x = jnp.asarray(x) if not hasattr(x, "shape") else x
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"inputs x have shape {tuple(x.shape)} but the network expects "
                f"(batch, {', '.join(map(str, self.input_shape))})"
            )
        if y is None:
            return
        check_label_batch(x, y)
        labels = self.label_fn(y)
        if (labels is not None and self.num_classes is not None and _is_concrete(y)
                and jnp.issubdtype(jnp.asarray(y).dtype, jnp.integer)):
            y_host = np.asarray(y)  # numpy: no tracer even while a jit is being traced
            lo, hi = int(y_host.min()), int(y_host.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"label {bad} is not a class id in [0, {self.num_classes}): check the "
                    "labels or num_classes= in split_at"
                )

    def init(self, key: jax.Array) -> tuple[StageState, ...]:
        """Initial state of every stage (single device; see ``sgjax.train`` for placement)."""
        keys = jax.random.split(key, len(self.stages))
        return tuple(s.init(k) for s, k in zip(self.stages, keys))

    def apply(self, states: Sequence[StageState], x: jax.Array) -> jax.Array:
        """Inference through all stages (batch norm uses running statistics).

        Pure and jittable; for stages on several devices use ``Runner.apply``."""
        for stage, state in zip(self.stages, states):
            x = stage.apply(state, x)
        return x


def _shapes(layers: Sequence[L.Layer], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Output shape of each layer, evaluated abstractly (no parameters are made)."""
    shapes, shape = [], tuple(input_shape)
    for layer in layers:
        box: dict = {}

        def init(key, layer=layer, shape=shape, box=box):
            out_shape, variables = layer.init(key, shape)
            box["shape"] = tuple(out_shape)
            return variables

        jax.eval_shape(init, jax.random.key(0))
        shape = box["shape"]
        shapes.append(shape)
    return shapes


def _check_cuts(cuts, n_layers) -> tuple[int, ...]:
    if isinstance(cuts, str):
        if cuts != "every":
            raise ValueError(f"cuts={cuts!r}: use a sequence of layer indices or 'every'")
        return tuple(range(1, n_layers))
    cuts = tuple(cuts)
    for c in cuts:
        if not isinstance(c, int) or isinstance(c, bool):
            raise TypeError(f"cut {c!r} is not an integer layer index")
        if not 1 <= c <= n_layers - 1:
            raise ValueError(
                f"cut {c} is out of range: with {n_layers} layers a cut must be in "
                f"1..{n_layers - 1} (a cut at i puts layers[:i] below it, like jnp.split)"
            )
    if list(cuts) != sorted(set(cuts)):
        raise ValueError(f"cuts {cuts} must be strictly increasing, without repeats")
    return cuts


def _not_a_feedback(f, where: str) -> TypeError | None:
    """The error for a value that is not a Feedback but looks like a common slip
    (a constructor not called, a predictor not wrapped, a name), else ``None``."""
    if isinstance(f, Predictor):
        return TypeError(
            f"{where} is a synthetic-gradient Predictor ({f.description or 'predictor'}), "
            "not a Feedback: wrap it, e.g. feedback=sgjax.feedback.synthetic(predictor)"
        )
    if isinstance(f, str):
        return TypeError(
            f"{where}={f!r} is not an sgjax.feedback.Feedback: build one with a "
            "constructor, e.g. sgjax.feedback.synthetic(sgjax.predictors.linear())"
        )
    if callable(f) and not isinstance(f, Feedback):
        name = getattr(f, "__name__", repr(f))
        return TypeError(
            f"{where} is the function {name}, not a Feedback: call it, e.g. "
            f"feedback={name}(...) (sgjax.feedback.backprop(), "
            "sgjax.feedback.synthetic(sgjax.predictors.linear()))"
        )
    return None


def _check_feedback(feedback, n_cuts) -> tuple[Feedback, ...]:
    error = _not_a_feedback(feedback, "feedback")
    if error is not None:
        raise error
    if not isinstance(feedback, (Feedback, Iterable)):
        raise TypeError(
            f"feedback={feedback!r} is not an sgjax.feedback.Feedback nor a sequence of "
            "them: use e.g. sgjax.feedback.synthetic(sgjax.predictors.linear())"
        )
    feedbacks = (feedback,) * n_cuts if isinstance(feedback, Feedback) else tuple(feedback)
    for i, f in enumerate(feedbacks):
        error = None if isinstance(f, str) else _not_a_feedback(f, f"feedback[{i}]")
        if error is not None:
            raise error
    if len(feedbacks) != n_cuts:
        raise ValueError(
            f"got {len(feedbacks)} feedbacks for {n_cuts} cuts: give one Feedback for all "
            "cuts or exactly one per cut"
        )
    for i, f in enumerate(feedbacks):
        if not isinstance(f, Feedback):
            raise TypeError(
                f"feedback for the interface after stage {i} is {f!r}, not an "
                "sgjax.feedback.Feedback: use one of sgjax.feedback.backprop(), none(), "
                "synthetic(predictor), synthetic_prop(predictor), dfa(), "
                "feedback_alignment(), kickback(), stale(decay)"
            )
    return feedbacks


def default_label_fn(num_classes: int | None, positions: Sequence[int] = ()
                     ) -> Callable[[jax.Array], jax.Array]:
    """Integer class labels ``(B,)`` become one-hot ``(B, num_classes)``; float
    targets pass unchanged. Static misuse (float class ids, ``(B, 1)`` integer
    labels, integer labels without ``num_classes``) is a ``ValueError``.

    ``positions``: for a network with one output per position (a sequence
    ``(T, num_classes)``), integer labels are ``(B, *positions)`` — one class
    per position, e.g. per token — and become ``(B, *positions, num_classes)``."""
    positions = tuple(positions)

    def label_fn(y):
        if y is None:
            return None
        y = jnp.asarray(y)
        if jnp.issubdtype(y.dtype, jnp.integer):
            if num_classes is None:
                raise ValueError("integer labels need num_classes= in split_at")
            if y.shape[1:] != positions:
                expected = "(batch,)" if not positions else (
                    f"(batch, {', '.join(map(str, positions))})")
                hint = ("squeeze a trailing axis, e.g. y.reshape(-1)" if not positions else
                        "one class id per output position")
                raise ValueError(
                    f"integer class labels must have shape {expected}, got "
                    f"{tuple(y.shape)}: {hint}"
                )
            return jax.nn.one_hot(y, num_classes)
        if num_classes is not None and y.ndim == 1 + len(positions):
            raise ValueError(
                f"labels of dtype {y.dtype} and shape {tuple(y.shape)} look like class ids "
                "stored as floats: class ids must be integers (y.astype(jnp.int32)); "
                f"float labels must be one-hot of shape "
                f"({', '.join(('batch', *map(str, positions)))}, {num_classes})"
            )
        return y

    return label_fn


def check_label_batch(x, y) -> None:
    """``ValueError`` unless there is one label per example of ``x``."""
    if jnp.shape(y)[:1] != x.shape[:1]:
        raise ValueError(
            f"labels y have batch size {jnp.shape(y)[:1]} but inputs x have {x.shape[0]} "
            "examples: give one label per example"
        )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


class Residual(NamedTuple):
    """What a stage's forward pass keeps for its backward pass (stays on the
    stage's device): the input ``x``, the output ``h``, the two VJPs (first
    layer, rest of the stage) and the layers' new state (batch-norm statistics)."""

    x: jax.Array
    h: jax.Array
    vjp_first: Any
    vjp_rest: Any
    layer_state: tuple


def measure_example_scale(loss, out_shape, batch_size, y_example) -> float:
    """How many times larger a per-example gradient is than ``∂loss/∂output``:
    ``batch_size`` for a batch-mean loss, ``1`` for a summed loss.

    Measured once, on a random probe, by comparing ``loss`` with the sum of the
    same loss applied to each example alone (batch of one, where mean = sum).
    Raises ``ValueError`` if the loss is not a scalar or is neither.
    """
    k_out, k_y = jax.random.split(jax.random.key(0))
    out = jax.random.normal(k_out, (batch_size, *out_shape))
    y = y_example(k_y)
    value = loss(out, y)
    if jnp.ndim(value) != 0:
        raise ValueError(
            f"loss must return a scalar (a batch mean or sum), got shape {jnp.shape(value)}: "
            "reduce it, e.g. jnp.mean(per_example_loss)"
        )
    g_batch = jax.grad(loss)(out, y)
    g_example = jax.grad(
        lambda o: jnp.sum(jax.vmap(lambda oi, yi: loss(oi[None], yi[None]))(o, y)))(out)
    num, den = float(jnp.linalg.norm(g_example)), float(jnp.linalg.norm(g_batch))
    ratio = num / den if den > 0 else float("nan")
    for scale in (float(batch_size), 1.0):
        if abs(ratio - scale) <= 1e-3 * scale:
            return scale
    raise ValueError(
        f"could not tell whether the loss is a batch mean or a batch sum (per-example "
        f"gradients are {ratio:.4g}× its gradient with batch size {batch_size}): pass "
        "example_scale= to split_at (batch_size for a mean, 1 for a sum)"
    )


def split_at(
    layers: Sequence[L.Layer],
    cuts: Sequence[int] | str = (),
    *,
    feedback: Feedback | Sequence[Feedback] | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    input_shape: Sequence[int],
    batch_size: int,
    num_classes: int | None = None,
    label_shape: Sequence[int] | None = None,
    predictor_optimizer: optax.GradientTransformation | None = None,
    example_scale: float | None = None,
) -> Split:
    """Cut ``layers`` at ``cuts`` into independently updated stages.

    Args:
      layers: the network as a chain of :class:`~sgjax.layers.Layer`.
      cuts: layer indices, like ``jnp.split``: ``(2, 4)`` gives stages
        ``layers[:2]``, ``layers[2:4]``, ``layers[4:]``; ``"every"`` cuts after
        every layer (DNI Fig. 1 (d)); ``()`` is plain backpropagation.
      feedback: one :class:`Feedback` for every cut, or one per cut. Mixed
        feedbacks keep their own protocols (see :mod:`sgjax.train`).
      loss: ``loss(output, y) -> scalar``, a mean or a sum over the batch.
      optimizer: optax transformation for every stage's parameters.
      input_shape: shape of one input example (no batch axis).
      batch_size: the training batch size (fixes message shapes). A stage whose
        feedback trains a synthetic-gradient model on a batch-mean loss takes
        training batches of exactly this size (``ValueError`` otherwise).
      num_classes: turns integer labels into one-hot ``(B, num_classes)``; the
        network must then output ``num_classes`` units — or, one class per
        position, ``(T, num_classes)`` with integer labels ``(B, T)`` (e.g. one
        per token), which cDNI predictors read position by position.
      label_shape: shape of one label vector when labels are not integers.
      predictor_optimizer: optimiser for trainable feedback (default ``optimizer``).
      example_scale: per-example gradient ÷ loss gradient (``batch_size`` for a
        batch-mean loss, 1 for a sum). ``None`` measures it from ``loss``
        (:func:`measure_example_scale`); synthetic-gradient models use it to
        regress per-example gradients, so the reduction does not matter.
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("split_at needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, L.Layer):
            raise TypeError(f"layers[{i}] is {layer!r}, not an sgjax.layers.Layer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    for name, opt in (("optimizer", optimizer), ("predictor_optimizer", predictor_optimizer)):
        if opt is not None and not isinstance(opt, optax.GradientTransformation):
            raise TypeError(
                f"{name}={opt!r} is not an optax.GradientTransformation: use e.g. "
                "optax.adam(1e-3)"
            )
    if not callable(loss):
        raise TypeError(
            f"loss={loss!r} is not callable: use e.g. sgjax.losses.softmax_cross_entropy")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(
            num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    cuts = _check_cuts(cuts, len(layers))
    if feedback is None and cuts:
        raise ValueError("cuts were given but no feedback: pass feedback=sgjax.feedback....")
    if feedback is not None and not cuts:
        raise ValueError(
            f"feedback={feedback!r} was given but there is no cut to put it on (cuts=() "
            f"with {len(layers)} layer(s): one stage, plain backpropagation): give at least "
            "one cut, e.g. cuts='every', or drop feedback="
        )
    feedbacks = _check_feedback(feedback, len(cuts)) if cuts else ()
    for i, f in enumerate(feedbacks):
        unlocked_above = [g.name for g in feedbacks[i + 1:] if not g.update_locked]
        if "error" in f.needs and unlocked_above:
            raise ValueError(
                f"feedback {f.name} at cut {cuts[i]} needs this batch's output error, but "
                f"the interfaces above it ({', '.join(unlocked_above)}) do not wait for it: "
                "put direct-error feedbacks (DFA, Kickback) only below update-locked ones"
            )
    input_shape = tuple(int(s) for s in input_shape)
    shapes = _shapes(layers, input_shape)
    out_shape = shapes[-1]
    positions: tuple[int, ...] = ()  # one class per position: a sequence output (T, C)
    if num_classes is not None:
        if not out_shape or out_shape[-1] != num_classes:
            raise ValueError(
                f"num_classes={num_classes} but the network outputs shape {out_shape}: the "
                f"last layer must have {num_classes} units (e.g. layers.dense({num_classes})), "
                f"or {num_classes} on its last axis for one class per position"
            )
        positions = out_shape[:-1]
    label_fn = default_label_fn(num_classes, positions)
    if label_shape is None:
        label_shape = (*positions, num_classes) if num_classes is not None else ()
    label_shape = tuple(label_shape)
    for i, f in enumerate(feedbacks):
        h_shape = shapes[cuts[i] - 1]
        if "labels" in f.needs and label_shape[:-1] and label_shape[:-1] != h_shape[:-1]:
            raise ValueError(
                f"feedback {f.name} at cut {cuts[i]} is conditioned on labels of shape "
                f"{label_shape} (one per position) but the activations there have shape "
                f"{h_shape}: per-position labels need activations (positions..., features) "
                f"with the same positions {label_shape[:-1]}; cut where they are intact, or "
                "use an unconditioned predictor"
            )
    if example_scale is None:
        def y_example(key):
            if num_classes is not None:
                return jax.random.randint(key, (batch_size, *positions), 0, num_classes)
            return jax.random.uniform(key, (batch_size, *(label_shape or out_shape)))

        example_scale = measure_example_scale(loss, out_shape, batch_size, y_example)
    else:
        example_scale = _check_example_scale(example_scale)

    bounds = (0, *cuts, len(layers))
    stages = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        in_shape = input_shape if lo == 0 else shapes[lo - 1]
        top = k == len(bounds) - 2
        fb = None if top else feedbacks[k]
        spec = None
        if fb is not None:
            spec = InterfaceSpec(
                h_shape=shapes[hi - 1], label_shape=label_shape, out_shape=out_shape,
                next_shape=shapes[hi], batch_size=batch_size,
                optimizer=predictor_optimizer or optimizer, example_scale=float(example_scale),
            )
        # The message to the stage below holds what its feedback reads, plus the
        # output error whenever a feedback further down needs it (DFA, Kickback).
        below_needs = frozenset()
        if k > 0:
            below_needs = feedbacks[k - 1].needs | (
                {"error"} if any("error" in f.needs for f in feedbacks[:k]) else set())
        stages.append(_make_stage(
            k, layers[lo:hi], in_shape, shapes[hi - 1], fb, spec, loss, optimizer, label_fn,
            below_needs=below_needs, needs_input_grad=lo > 0, batch_size=batch_size,
        ))
    return Split(tuple(stages), cuts, input_shape, label_fn, num_classes)


def _check_example_scale(example_scale) -> float:
    """``example_scale`` as a positive finite float, else a clear error naming it."""
    hint = "batch_size for a batch-mean loss, 1 for a summed one"
    if isinstance(example_scale, (bool, str, bytes)):
        raise TypeError(f"example_scale={example_scale!r} must be a number ({hint})")
    try:
        value = float(example_scale)
    except (TypeError, ValueError):
        raise TypeError(f"example_scale={example_scale!r} must be a number ({hint})") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"example_scale={example_scale!r} must be positive and finite ({hint})")
    return value


def _make_stage(index, layers, in_shape, out_shape, feedback, spec, loss, optimizer,
                label_fn, *, below_needs, needs_input_grad, batch_size) -> Stage:
    interface = feedback.build(spec) if feedback is not None else None
    first, rest = layers[0], layers[1:]
    stochastic = any(layer.stochastic for layer in layers)

    def init(key):
        k_layers, k_fb = jax.random.split(key)
        keys = jax.random.split(k_layers, len(layers))
        params, states, shape = [], [], in_shape
        for k, layer in zip(keys, layers):
            shape, v = layer.init(k, shape)
            params.append(L.params_of(v))
            states.append(L.state_of(v))
        params, states = tuple(params), tuple(states)
        fstate = interface.init(k_fb) if interface is not None else ()
        rng = jax.random.fold_in(key, RNG_STREAM) if stochastic else ()
        return StageState(params, states, optimizer.init(params), fstate,
                          jnp.zeros((), jnp.int32), rng)

    # A synthetic-gradient model regresses per-example gradients example_scale · δ, and
    # example_scale (batch_size for a batch-mean loss) holds for the declared batch size only.
    scaled_by_batch = (feedback is not None and feedback.sg_trains
                       and spec.example_scale != 1.0)

    def check_input(x):
        if tuple(x.shape[1:]) != tuple(in_shape):
            raise ValueError(
                f"stage {index} expects inputs of shape (batch, {', '.join(map(str, in_shape))})"
                f" but got {tuple(x.shape)}"
            )

    def check_training_batch(x):
        check_input(x)
        if scaled_by_batch and x.shape[0] != batch_size:
            raise ValueError(
                f"stage {index} was split with batch_size={batch_size} but is trained on a "
                f"batch of {x.shape[0]}: its feedback {feedback.name} scales gradients by "
                f"example_scale={spec.example_scale:g}, measured for batch_size={batch_size}. "
                f"Pass batch_size={x.shape[0]} to split_at, or drop the partial batch "
                "(inference, split.apply, takes any batch size)"
            )

    def forward_pass(state, x):
        """Run the stage in training mode and keep what its backward pass needs."""
        check_training_batch(x)
        p_first, p_rest = state.params[0], state.params[1:]
        s_first, s_rest = state.layer_state[0], state.layer_state[1:]
        rngs = stage_rngs(state, len(layers))
        r_first, r_rest = (None, None) if rngs is None else (rngs[:1], rngs[1:])

        def f_first(p, x):
            return L.run((first,), (p,), (s_first,), x, train=True, rngs=r_first)

        def f_rest(p, a):
            return L.run(rest, p, s_rest, a, train=True, rngs=r_rest)

        if needs_input_grad:
            a, vjp_first, new_first = jax.vjp(f_first, p_first, x, has_aux=True)
        else:
            a, vjp_first, new_first = jax.vjp(lambda p: f_first(p, x), p_first, has_aux=True)
        h, vjp_rest, new_rest = jax.vjp(f_rest, p_rest, a, has_aux=True)
        return h, Residual(x, h, vjp_first, vjp_rest, (*new_first, *new_rest))

    def backward_pass(state, residual, y, target=None):
        """Obtain ``∂L/∂h`` (loss or feedback), update, and build the message below."""
        if y is not None:
            check_label_batch(residual.x, y)
        labels = label_fn(y)
        h = residual.h
        if interface is None:
            if labels is None:
                raise ValueError("the top stage needs labels y to compute the loss")
            loss_value, grad_h = jax.value_and_grad(loss)(h, y)
            if jnp.ndim(loss_value) != 0:
                raise ValueError(
                    f"loss must return a scalar, got shape {jnp.shape(loss_value)}"
                )
            error, fstate, info = grad_h, state.feedback, {"loss": loss_value}
        else:
            if target is None and interface.update_locked:
                raise ValueError(
                    f"stage {index} has the update-locked feedback {feedback.name} and needs "
                    "this batch's Target message from the stage above (use a schedule from "
                    "sgjax.train)"
                )
            grad_h, fstate, info = interface.step(state.feedback, h, labels, target)
            if grad_h.shape != h.shape:
                raise ValueError(
                    f"feedback {feedback.name} at stage {index} gave a gradient of shape "
                    f"{grad_h.shape} for activations of shape {h.shape}"
                )
            error = target.error if target is not None else None
        g_rest, pre_grad = residual.vjp_rest(grad_h)
        if needs_input_grad:
            g_first, grad_x = residual.vjp_first(pre_grad)
        else:
            (g_first,), grad_x = residual.vjp_first(pre_grad), None
        grads = (g_first, *g_rest)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = StageState(params, residual.layer_state, opt_state, fstate, state.step + 1,
                               state.rng)
        below = None
        if needs_input_grad:
            fields = dict(grad=grad_x, inputs=residual.x, labels=labels, pre_grad=pre_grad,
                          error=error)
            below = Target(**{k: v for k, v in fields.items() if k in below_needs},
                           valid=True)
        return new_state, below, info

    def update(state, x, y, target=None):
        h, residual = forward_pass(state, x)
        new_state, below, info = backward_pass(state, residual, y, target)
        return new_state, h, below, info

    def fit(state, target):
        """Only consume ``target`` (fit the feedback): a stage that skips its update."""
        if interface is None:
            return state, {}
        fstate, info = interface.fit(state.feedback, target)
        return state._replace(feedback=fstate), info

    def forward(state, x):
        check_input(x)
        return L.run(layers, state.params, state.layer_state, x, train=True,
                     rngs=stage_rngs(state, len(layers)))[0]

    def apply(state, x):
        check_input(x)
        return L.run(layers, state.params, state.layer_state, x, train=False)[0]

    return Stage(index, tuple(layers), feedback, tuple(in_shape), tuple(out_shape), init,
                 update, forward, apply, forward_pass, backward_pass, fit)
