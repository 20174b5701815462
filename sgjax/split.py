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

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax import layers as L
from sgjax.feedback import Feedback, InterfaceSpec, Target


class StageState(NamedTuple):
    """Everything one stage owns.

    ``params``/``layer_state``: one entry per layer of the stage (trainable
    variables / batch-norm statistics); ``opt_state``: optimiser state of
    ``params``; ``feedback``: the state of the feedback at the stage's output
    (predictor, fixed matrix, …; ``()`` for the top stage); ``step``: number of
    updates applied.
    """

    params: tuple
    layer_state: tuple
    opt_state: Any
    feedback: Any
    step: jax.Array


class Stage(NamedTuple):
    """One sub-network ``F_i^j``: pure ``init``/``update``/``forward``/``apply``.

    ``forward(state, x) -> h`` runs the stage in training mode without changing
    it (used when an update-locked feedback needs ``h`` before the update);
    ``apply(state, x) -> h`` runs it in inference mode. ``in_shape``/``out_shape``
    exclude the batch axis; ``feedback`` is ``None`` for the top stage.
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


class Split(NamedTuple):
    """The result of :func:`split_at`: the stages, in order, plus helpers."""

    stages: tuple[Stage, ...]
    cuts: tuple[int, ...]
    input_shape: tuple[int, ...]
    label_fn: Callable[[jax.Array], jax.Array]

    @property
    def update_locked(self) -> bool:
        """True if some interface needs this batch's target before updating."""
        return any(s.feedback is not None and s.feedback.update_locked for s in self.stages)

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


def _run_layers(layers, params, states, x, train):
    new_states = []
    for layer, p, s in zip(layers, params, states):
        x, s = layer.apply(L.with_params(s, p), x, train=train)
        new_states.append(s)
    return x, tuple(new_states)


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


def _check_feedback(feedback, n_cuts) -> tuple[Feedback, ...]:
    if isinstance(feedback, str):
        raise TypeError(
            f"feedback={feedback!r} is not an sgjax.feedback.Feedback: build one with a "
            "constructor, e.g. sgjax.feedback.synthetic(sgjax.predictors.linear())"
        )
    feedbacks = (feedback,) * n_cuts if isinstance(feedback, Feedback) else tuple(feedback)
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


def default_label_fn(num_classes: int | None) -> Callable[[jax.Array], jax.Array]:
    """Integer class labels become one-hot vectors; float targets pass unchanged."""

    def label_fn(y):
        if y is None:
            return None
        if jnp.issubdtype(y.dtype, jnp.integer):
            if num_classes is None:
                raise ValueError("integer labels need num_classes= in split_at")
            return jax.nn.one_hot(y, num_classes)
        return y

    return label_fn


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
) -> Split:
    """Cut ``layers`` at ``cuts`` into independently updated stages.

    Args:
      layers: the network as a chain of :class:`~sgjax.layers.Layer`.
      cuts: layer indices, like ``jnp.split``: ``(2, 4)`` gives stages
        ``layers[:2]``, ``layers[2:4]``, ``layers[4:]``; ``"every"`` cuts after
        every layer (DNI Fig. 1 (d)); ``()`` is plain backpropagation.
      feedback: one :class:`Feedback` for every cut, or one per cut.
      loss: ``loss(output, y) -> scalar`` averaged over the batch.
      optimizer: optax transformation for every stage's parameters.
      input_shape: shape of one input example (no batch axis).
      batch_size: the training batch size (fixes message shapes).
      num_classes: turns integer labels into one-hot ``(B, num_classes)``.
      label_shape: shape of one label vector when labels are not integers.
      predictor_optimizer: optimiser for trainable feedback (default ``optimizer``).
    """
    layers = tuple(layers)
    if not layers:
        raise ValueError("split_at needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, L.Layer):
            raise TypeError(f"layers[{i}] is {layer!r}, not an sgjax.layers.Layer")
    cuts = _check_cuts(cuts, len(layers))
    if feedback is None and cuts:
        raise ValueError("cuts were given but no feedback: pass feedback=sgjax.feedback....")
    feedbacks = _check_feedback(feedback, len(cuts)) if cuts else ()
    input_shape = tuple(int(s) for s in input_shape)
    shapes = _shapes(layers, input_shape)
    label_fn = default_label_fn(num_classes)
    if label_shape is None:
        label_shape = (num_classes,) if num_classes is not None else ()
    label_shape = tuple(label_shape)
    out_shape = shapes[-1]

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
                optimizer=predictor_optimizer or optimizer,
            )
        stages.append(_make_stage(
            k, layers[lo:hi], in_shape, shapes[hi - 1], fb, spec, loss, optimizer, label_fn,
            needs_input_grad=lo > 0,
        ))
    return Split(tuple(stages), cuts, input_shape, label_fn)


def _make_stage(index, layers, in_shape, out_shape, feedback, spec, loss, optimizer,
                label_fn, needs_input_grad) -> Stage:
    interface = feedback.build(spec) if feedback is not None else None
    first, rest = layers[0], layers[1:]

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
        return StageState(params, states, optimizer.init(params), fstate,
                          jnp.zeros((), jnp.int32))

    def check_input(x):
        if tuple(x.shape[1:]) != tuple(in_shape):
            raise ValueError(
                f"stage {index} expects inputs of shape (batch, {', '.join(map(str, in_shape))})"
                f" but got {tuple(x.shape)}"
            )

    def update(state, x, y, target=None):
        check_input(x)
        labels = label_fn(y)
        p_first, p_rest = state.params[0], state.params[1:]
        s_first, s_rest = state.layer_state[0], state.layer_state[1:]

        def f_first(p, x):
            return _run_layers((first,), (p,), (s_first,), x, True)

        def f_rest(p, a):
            return _run_layers(rest, p, s_rest, a, True)

        if needs_input_grad:
            a, vjp_first, new_first = jax.vjp(f_first, p_first, x, has_aux=True)
        else:
            a, vjp_first, new_first = jax.vjp(lambda p: f_first(p, x), p_first, has_aux=True)
        h, vjp_rest, new_rest = jax.vjp(f_rest, p_rest, a, has_aux=True)

        if interface is None:
            if labels is None:
                raise ValueError("the top stage needs labels y to compute the loss")
            loss_value, grad_h = jax.value_and_grad(loss)(h, y)
            error, fstate, info = grad_h, state.feedback, {"loss": loss_value}
        else:
            if target is None:
                raise ValueError(
                    f"stage {index} has feedback {feedback.name} and needs the Target "
                    "message from the stage above (use a schedule from sgjax.train)"
                )
            grad_h, fstate, info = interface.step(state.feedback, h, labels, target)
            if grad_h.shape != h.shape:
                raise ValueError(
                    f"feedback {feedback.name} at stage {index} gave a gradient of shape "
                    f"{grad_h.shape} for activations of shape {h.shape}"
                )
            error = target.error
        g_rest, pre_grad = vjp_rest(grad_h)
        if needs_input_grad:
            g_first, grad_x = vjp_first(pre_grad)
        else:
            (g_first,), grad_x = vjp_first(pre_grad), None
        grads = (g_first, *g_rest)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = StageState(params, (*new_first, *new_rest), opt_state, fstate,
                               state.step + 1)
        below = None
        if needs_input_grad:
            below = Target(inputs=x, labels=labels, grad=grad_x, pre_grad=pre_grad,
                           error=error, valid=jnp.ones((), bool))
        return new_state, h, below, info

    def forward(state, x):
        check_input(x)
        return _run_layers(layers, state.params, state.layer_state, x, True)[0]

    def apply(state, x):
        check_input(x)
        return _run_layers(layers, state.params, state.layer_state, x, False)[0]

    return Stage(index, tuple(layers), feedback, tuple(in_shape), tuple(out_shape), init,
                 update, forward, apply)
