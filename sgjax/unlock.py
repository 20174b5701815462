"""Complete unlock: synthetic inputs and synthetic gradients at every cut (DNI §3.1
"Complete Unlock", Fig. 5 right, Fig. 6, Appendix A.1).

With synthetic gradients alone (:func:`sgjax.sync`) a stage no longer waits for the
gradient from above, but it still waits for its *input* from below (forward locking).
Here every cut ``i`` (between stages ``i`` and ``i + 1``) also has a synthetic input
model ``I_i(x) -> ĥ_i``: "given the data, the synthetic input model produces an
approximation of what the input to the layer will be". Stage ``i + 1`` updates from
``ĥ_i = I_i(x)`` instead of waiting for stage ``i``, so every stage can run at any time.

Who owns which model (each model lives with the stage that *uses* its prediction):

* stage ``i`` owns its layers and the synthetic-gradient model ``M_i`` at its output
  (``StageState.feedback``, exactly as in :func:`sgjax.split_at`);
* stage ``i + 1`` owns the synthetic input model ``I_i`` at its input
  (``UnlockState.inputs[i]``).

Which messages exist (stages still talk only through messages):

* **data, to every stage**: the batch ``x`` (input models read it; stage 0 runs on it)
  and the labels ``y`` (the top stage's loss; cDNI models);
* **activation, up** from stage ``i`` to stage ``i + 1``: the output ``h_i`` that stage
  ``i`` computed this step on the input it had (``x`` for stage 0, ``ĥ_{i-1}`` above).
  It is the regression target of ``I_i``: ``L_I = mean_batch ||I_i(x) - h_i||²`` for the
  same batch (A.1: "train it to produce synthetic inputs ĥ_i such that ĥ_i ≃ h_i");
* **target, down** from stage ``i + 1`` to stage ``i``: the :class:`~sgjax.feedback.Target`
  of :func:`sgjax.split_at` — the gradient w.r.t. the input stage ``i + 1`` ran on (``ĥ_i``)
  and that input — the regression target of ``M_i``.

Order within one :func:`complete_unlock` step (DNI Fig. 2's "use on *t*, fit on *t*, use
on *t + 1*", for both kinds of model): every input model predicts ``ĥ_i`` for batch *t*
with its current parameters; every stage that is not busy updates from its input and its
synthetic gradient; then each model is fitted to the message that arrived for batch *t*.
No stage reads another stage's parameters. At test time all stages are connected
(:meth:`UnlockSchedule.apply` is :meth:`sgjax.Split.apply`): input models are not used.

Stochastic updates (Fig. 5 right): with ``p_update < 1`` each stage is *busy* with
probability ``1 − p_update`` — "does not do a forward pass or backwards pass", so it
sends neither an activation up nor a target down, and the models waiting for those
messages are not fitted this step. A message that does arrive is always consumed by its
model, whether the model's owner is busy or not (as in :func:`sgjax.stochastic`).
Learning-rate schedules count global steps: a busy stage, and a model whose message did not
arrive, still move their optimisers' schedules on by one step
(:func:`sgjax.optim.advance_schedules`), as the paper's decay points are global steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax import layers as L
from sgjax.optim import advance_schedules
from sgjax.split import Split, StageState
from sgjax.train import check_batch, merge_infos, skipped_schedules, unfitted_schedules
from sgjax.trainer import as_batch


class InputModel(NamedTuple):
    """A synthetic input model ``I(x) -> ĥ`` (DNI §3.1, Fig. 6), a pure pair:

    * ``init(key, x_shape, h_shape) -> variables`` from the shape of one data example and
      of one activation it predicts (no batch axis);
    * ``apply(variables, x, h_shape, *, train) -> (ĥ, state)`` maps data
      ``(B, *x_shape)`` to ``(B, *h_shape)`` and returns its new non-trainable state
      (batch norm). ``h_shape`` is the shape it was initialised for (so its layers may
      depend on it).

    Only ``variables["params"]`` is trained (as for :class:`sgjax.layers.Layer`).
    """

    init: Callable
    apply: Callable
    description: str = ""


def from_layer(layer: L.Layer, *, description: str = "layer") -> InputModel:
    """Any :class:`~sgjax.layers.Layer` reading the data as an input model (its output
    shape must be the activation's: :func:`complete_unlock` checks it for each cut)."""

    def init(key, x_shape, h_shape):
        del h_shape
        return layer.init(key, tuple(x_shape))[1]

    def apply(variables, x, h_shape, *, train=False):
        del h_shape
        return layer.apply(variables, x, train=train)

    return InputModel(init, apply, description)


def mlp(hidden: Sequence[int] = (1024,), *, batch_norm: bool = True) -> InputModel:
    """Dense input model: the data flattened, ``len(hidden)`` hidden layers of linear,
    batch norm and ReLU, then a linear layer of the activation's size, reshaped to the
    activation's shape. A.1: "the identical architecture used for the synthetic gradient
    model, but … a single hidden layer" (MNIST FCN: 1024 units, the default).

    Unlike a synthetic-gradient model the output layer keeps its ordinary (LeCun)
    initialisation: a zero synthetic input would give the stage above a constant input.
    """
    hidden = tuple(int(n) for n in hidden)
    if any(n < 1 for n in hidden):
        raise ValueError(f"hidden={hidden}: every hidden width must be a positive integer")
    name = f"input mlp{list(hidden)}" if hidden else "input linear"

    def build(h_shape):
        blocks = []
        for n in hidden:
            blocks += [L.dense(n)] + ([L.batch_norm()] if batch_norm else []) + [L.relu]
        unflatten = L.elementwise(lambda h: h.reshape(h.shape[0], *h_shape))
        return L.serial(L.flatten, *blocks, L.dense(math.prod(h_shape)), unflatten)

    built: dict[tuple, L.Layer] = {}  # the layers of each activation shape, built once

    def layer(h_shape):
        h_shape = tuple(h_shape)
        if h_shape not in built:
            built[h_shape] = build(h_shape)
        return built[h_shape]

    def init(key, x_shape, h_shape):
        return layer(h_shape).init(key, tuple(x_shape))[1]

    def apply(variables, x, h_shape, *, train=False):
        return layer(h_shape).apply(variables, x, train=train)

    return InputModel(init, apply, name)


class InputState(NamedTuple):
    """One synthetic input model's variables and its optimiser state."""

    variables: Any
    opt_state: Any


class UnlockState(NamedTuple):
    """The state of a completely unlocked split.

    ``stages``: every stage's :class:`~sgjax.split.StageState` (its layers and the
    synthetic-gradient model at its output), as under :func:`sgjax.sync`, so
    ``split.apply(state.stages, x)`` is test-time inference. ``inputs[i]``: the input
    model ``I_i`` of the cut after stage ``i``, owned by stage ``i + 1``.
    """

    stages: tuple[StageState, ...]
    inputs: tuple[InputState, ...]


class UnlockSchedule(NamedTuple):
    """A trainer (:class:`sgjax.trainer.Trainer`): ``init(key, batch) -> UnlockState``, a
    pure ``step(state, batch)`` (fusable with :func:`sgjax.fused`) and ``apply(state,
    x)``: test-time inference through the connected stages (input models unused)."""

    init: Callable[..., UnlockState]
    step: Callable[..., tuple[UnlockState, dict]]
    apply: Callable[[UnlockState, jax.Array], jax.Array]


def _check_split(split: Split) -> None:
    if not isinstance(split, Split):
        raise TypeError(f"complete_unlock needs an sgjax.Split (from split_at), got {split!r}")
    if len(split.stages) < 2:
        raise ValueError(
            "complete_unlock needs at least one cut: split_at(layers, cuts=...) with a "
            "synthetic-gradient feedback, e.g. cuts='every'"
        )
    for stage in split.stages[:-1]:
        fb = stage.feedback
        if not (fb.sg_trains and not fb.update_locked):
            raise ValueError(
                f"the cut after stage {stage.index} uses feedback {fb.name}, not a synthetic "
                "gradient: a completely unlocked stage cannot wait for the gradient from "
                "above, so every cut needs sgjax.feedback.synthetic(predictor) (DNI or cDNI)"
            )


def _check_models(split: Split, input_model) -> tuple[InputModel, ...]:
    n = len(split.stages) - 1
    models = (input_model,) * n if isinstance(input_model, InputModel) else input_model
    if not isinstance(models, list | tuple) or hasattr(models, "_fields"):  # NamedTuple
        raise TypeError(
            f"input_model={input_model!r} is not an sgjax.unlock.InputModel: build one with "
            "sgjax.unlock.mlp(hidden) or sgjax.unlock.from_layer(layer)"
        )
    models = tuple(models)
    if len(models) != n:
        raise ValueError(
            f"got {len(models)} input models for {n} cuts: give one InputModel for all cuts "
            "or exactly one per cut"
        )
    for i, m in enumerate(models):
        if not isinstance(m, InputModel):
            raise TypeError(
                f"input model for the cut after stage {i} is {m!r}, not an "
                "sgjax.unlock.InputModel (sgjax.unlock.mlp(hidden), from_layer(layer))"
            )
        h_shape = tuple(split.stages[i].out_shape)

        def out(key, m=m, h_shape=h_shape):
            variables = m.init(key, split.input_shape, h_shape)
            x = jnp.zeros((2, *split.input_shape), jnp.float32)
            return m.apply(variables, x, h_shape, train=True)[0]

        got = tuple(jax.eval_shape(out, jax.random.key(0)).shape[1:])
        if got != h_shape:
            raise ValueError(
                f"input model {m.description or i} for the cut after stage {i} produces "
                f"synthetic inputs of shape {got} but stage {i} outputs activations of "
                f"shape {h_shape}: its output must have exactly the activation's shape"
            )
    return models


def _check_p(p_update, n_stages: int):
    """``None`` (a step argument), or a tuple of ``n_stages`` floats in (0, 1]."""
    if p_update is None:
        return None
    values = tuple(p_update) if isinstance(p_update, list | tuple) else (p_update,) * n_stages
    if len(values) != n_stages:
        raise ValueError(
            f"p_update={p_update!r}: give one probability for every stage or exactly one "
            f"per stage ({n_stages})"
        )
    for p in values:
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 < p <= 1.0:
            raise ValueError(
                f"p_update={p_update!r}: every update probability must be a number in (0, 1]"
            )
    return tuple(float(p) for p in values)


def _zeros_like(shapes):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def input_loss(model: InputModel, variables, x, h):
    """``L_I = mean over the batch of ||I(x) - h||²`` (the target ``h`` is a message:
    no gradient flows into it) and the model's new state."""
    h_hat, state = model.apply(variables, x, tuple(h.shape[1:]), train=True)
    err = (h_hat - jax.lax.stop_gradient(h)).reshape(h.shape[0], -1)
    return jnp.mean(jnp.sum(err ** 2, axis=-1)), state


def _fit_input(model: InputModel, optimizer, istate: InputState, x, h, valid):
    """One optimiser step of ``I`` towards the activation message ``h`` (skipped when the
    message did not come: its sender was busy)."""

    def fit(istate):
        params = L.params_of(istate.variables)
        (loss, new_state), g = jax.value_and_grad(
            lambda p: input_loss(model, L.with_params(istate.variables, p), x, h),
            has_aux=True)(params)
        updates, opt_state = optimizer.update(g, istate.opt_state, params)
        variables = L.with_params({**istate.variables, **L.state_of(new_state)},
                                  optax.apply_updates(params, updates))
        return InputState(variables, opt_state), {"input_loss": loss}

    if valid is True:
        return fit(istate)
    out = jax.eval_shape(fit, istate)
    return jax.lax.cond(valid, fit, lambda s: (s, _zeros_like(out[1])), istate)


def complete_unlock(split: Split, input_model: InputModel | Sequence[InputModel], *,
                    optimizer: optax.GradientTransformation,
                    p_update: float | Sequence[float] | None = 1.0) -> UnlockSchedule:
    """Train ``split`` completely unlocked (DNI §3.1 "Complete Unlock", Fig. 6).

    Args:
      split: from :func:`sgjax.split_at` with a synthetic-gradient feedback
        (``feedback.synthetic``: DNI or cDNI) at every cut.
      input_model: one :class:`InputModel` for every cut, or one per cut; cut ``i``'s model
        predicts stage ``i``'s output from the data.
      optimizer: optax transformation of the input models' parameters.
      p_update: each stage's probability of not being busy at a step (Fig. 5 right): a
        float for every stage, or one per stage. ``1.0`` (default): every stage works
        every step, and the batch ``Batch(x, y)`` needs no key; otherwise
        ``Batch(x, y, key)``. ``None`` makes it part of the batch,
        ``Batch(x, y, key, p_update)`` (a scalar or ``(K,)`` array, may be traced:
        ``jax.vmap`` a population over it).

    Returns an :class:`UnlockSchedule`. ``init(key, batch)`` initialises the stages exactly
    as ``split.init(key)`` (so :func:`sgjax.sync` with the same key starts from the same
    network) and the input models from ``fold_in(key, 1)``. The step's info holds
    ``loss`` (the top stage's; 0 when it is busy), ``sg_loss/i``, ``input_loss/i`` (the
    fit of stage ``i``'s input model ``I_{i-1}``) and, when stochastic, ``active/i``.
    """
    _check_split(split)
    models = _check_models(split, input_model)
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer={optimizer!r} is not an optax.GradientTransformation: use e.g. "
            "optax.adam(1e-3)"
        )
    K = len(split.stages)
    fixed_p = _check_p(p_update, K)
    always = fixed_p is not None and all(p == 1.0 for p in fixed_p)

    def init(key, batch) -> UnlockState:
        x, y = as_batch(batch, "complete_unlock init")[:2]
        split.check_batch(x, y)
        stages = split.init(key)
        keys = jax.random.split(jax.random.fold_in(key, 1), K - 1)
        inputs = []
        for i, (m, k) in enumerate(zip(models, keys)):
            variables = m.init(k, split.input_shape, split.stages[i].out_shape)
            inputs.append(InputState(variables, optimizer.init(L.params_of(variables))))
        return UnlockState(stages, tuple(inputs))

    def active_stages(key, p):
        if always:
            return (True,) * K
        if key is None:
            raise ValueError(
                "complete_unlock with p_update < 1 draws which stages are busy: pass this "
                "step's key in the batch, Batch(x, y, key)"
            )
        p = jnp.asarray(p, jnp.float32)
        if p.ndim not in (0, 1) or (p.ndim == 1 and p.shape[0] != K):
            raise ValueError(f"p_update of shape {p.shape}: give a scalar or one per stage ({K})")
        active = jax.random.bernoulli(key, p, (K,))
        return tuple(active[k] for k in range(K))

    def run_stage(k, state, h_in, y, active):
        stage = split.stages[k]
        if active is True:
            return stage.update(state, h_in, y, None)
        shapes = jax.eval_shape(stage.update, state, h_in, y, None)

        def busy(state, h_in):
            # no forward pass, no backward pass: nothing goes up, nothing comes down
            return state, *_zeros_like(shapes[1:])

        return jax.lax.cond(active, lambda s, h: stage.update(s, h, y, None), busy,
                            state, h_in)

    def step(ts: UnlockState, batch):
        x, y, key, p_update = as_batch(batch, "complete_unlock step")
        check_batch(split, x, y)
        p = fixed_p if fixed_p is not None else p_update
        if p is None:
            raise ValueError(
                "complete_unlock(split, ..., p_update=None) needs p_update in the batch: "
                "Batch(x, y, key, p_update)"
            )
        active = active_stages(key, p)
        # Synthetic inputs for batch t from the input models as they are before this
        # batch's activations arrive (use on t, fit on t).
        stage_inputs = [x] + [m.apply(s.variables, x, split.stages[i].out_shape, train=True)[0]
                              for i, (m, s) in enumerate(zip(models, ts.inputs))]
        new, infos, h, sent = [None] * K, [None] * K, [None] * K, [None] * (K + 1)
        for k in range(K):
            new[k], h[k], sent[k], infos[k] = run_stage(k, ts.stages[k], stage_inputs[k], y,
                                                        active[k])
            new[k] = skipped_schedules(new[k], active[k])
            if not always:
                infos[k] = {**infos[k], "active": active[k]}
        new_inputs = list(ts.inputs)
        for k in range(K - 1):
            # the target down (invalid if stage k + 1 was busy) fits M_k, owned by stage k
            new[k], fit_info = split.stages[k].fit(new[k], sent[k + 1])
            new[k] = unfitted_schedules(new[k], sent[k + 1])
            infos[k] = {**infos[k], **fit_info}
            # the activation up (absent if stage k was busy) fits I_k, owned by stage k + 1
            new_inputs[k], in_info = _fit_input(models[k], optimizer, ts.inputs[k], x, h[k],
                                                active[k])
            new_inputs[k] = new_inputs[k]._replace(opt_state=advance_schedules(
                new_inputs[k].opt_state, 1 - jnp.asarray(active[k], jnp.int32)))
            infos[k + 1] = {**infos[k + 1], **in_info}
        return UnlockState(tuple(new), tuple(new_inputs)), merge_infos(infos)

    def apply(state: UnlockState, x):
        return split.apply(state.stages, x)

    return UnlockSchedule(init, step, apply)


__all__ = [
    "InputModel", "InputState", "UnlockSchedule", "UnlockState", "complete_unlock",
    "from_layer", "input_loss", "mlp",
]
