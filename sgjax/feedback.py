"""Feedback: how a stage gets the gradient for its output, and how that source
is trained (Czarnecki et al. 2017, §6 and Table 1; DNI §2.1 and §3.1).

Every method is one constructor returning a :class:`Feedback`. A feedback is
placed at an interface (a cut between two stages); it owns whatever the method
needs — a synthetic-gradient predictor and its optimiser state, a fixed random
matrix, an exponential average — and replaces ``∂L/∂h`` for the stage below
the cut with its own substitute ``∂L/∂h^`` (Table 1, first row).

The stage above the cut sends back a :class:`Target` message: the activations
``h`` it received, their labels, and the gradient it computed for them (for a
synthetic stage above, its synthetic gradient backpropagated through it, DNI
Fig. 2). Feedbacks that are *update locked* (Table 1) need that message for the
same batch before the stage below can update; the others use it only to train
their gradient model, so it may arrive later.

Table 1's columns are attributes (``sg_trains``, ``update_locked``,
``backwards_locked``, ``direct_error``) and its formula rows are strings in
``table``, so the Understanding-SG Table 1 experiment prints them from here.
Each trainable-free method also exposes ``Interface.sg_loss``: the loss
``L_SG(t, SG(h))`` of its SG-module view, whose gradient w.r.t. ``h`` is the
method's prescribed substitute (the paper's §6 claim; tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax import layers as L
from sgjax.predictors import Predictor


class Target(NamedTuple):
    """The message a stage sends to the stage below (arrays carry a batch axis).

    Attributes:
      inputs: ``(B, *h_shape)`` the activations ``h`` this target is for.
      labels: ``(B, C)`` their labels (one-hot for classification).
      grad: ``(B, *h_shape)`` gradient w.r.t. ``h`` computed by the stage above
        (true gradient, or its synthetic gradient backpropagated through it).
      pre_grad: ``(B, *g_shape)`` gradient w.r.t. ``g``, the output of the
        first layer of the stage above (used by feedback alignment).
      error: ``(B, *out_shape)`` the output error ``∂L/∂p`` at the network
        output ``p`` (used by DFA and Kickback).
      valid: scalar bool; ``False`` for the placeholder before any target exists.
    """

    inputs: jax.Array
    labels: jax.Array
    grad: jax.Array
    pre_grad: jax.Array
    error: jax.Array
    valid: jax.Array


class InterfaceSpec(NamedTuple):
    """Static facts about one interface, given to :attr:`Feedback.build`.

    ``h_shape`` is the activation shape at the cut, ``label_shape`` the label
    vector's, ``out_shape`` the network output's, ``next_shape`` the output of
    the first layer above the cut; ``optimizer`` trains SG modules.
    """

    h_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    next_shape: tuple[int, ...]
    batch_size: int
    optimizer: optax.GradientTransformation


class Interface(NamedTuple):
    """A feedback bound to one interface.

    ``init(key) -> fstate``;
    ``step(fstate, h, y, target) -> (substitute, fstate, info)`` gives the
    substitute for ``∂L/∂h`` (shape of ``h``) and trains the gradient source on
    ``target``; ``sg_loss(fstate, h, y, target) -> scalar`` is the Table 1
    SG-module loss, where defined.
    """

    init: Callable[[jax.Array], Any]
    step: Callable[..., tuple[jax.Array, Any, dict]]
    sg_loss: Callable[..., jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class Feedback:
    """One method of Understanding-SG Table 1 (or a DNI baseline).

    ``build(spec) -> Interface`` binds the method to an interface.
    """

    name: str
    build: Callable[[InterfaceSpec], Interface]
    sg_trains: bool
    update_locked: bool
    backwards_locked: bool
    direct_error: bool
    table: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Feedback({self.name})"


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------- backprop --


def backprop() -> Feedback:
    """True gradients: ``∂L/∂h`` backpropagated from the stage above (locked)."""

    def build(spec):
        def step(fstate, h, y, target):
            return target.grad, fstate, {}

        def sg_loss(fstate, h, y, target):  # SG(h) = h, t = -∂L/∂h, L = -<t, s>
            return -jnp.vdot(-jax.lax.stop_gradient(target.grad), h)

        return Interface(lambda key: (), step, sg_loss)

    return Feedback(
        "Bprop", build, sg_trains=False, update_locked=True, backwards_locked=True,
        direct_error=False,
        table=dict(substitute="∂L/∂h", sg_module="h", sg_target="-∂L/∂h",
                   sg_loss="-<t, s>"),
    )


def none() -> Feedback:
    """No gradient at all crosses the cut ("No Bprop", DNI Table 1): the stages
    below receive zero and their parameters never change."""

    def build(spec):
        def step(fstate, h, y, target):
            return jnp.zeros_like(h), fstate, {}

        return Interface(lambda key: (), step)

    return Feedback(
        "No Bprop", build, sg_trains=False, update_locked=False, backwards_locked=False,
        direct_error=False, table=dict(substitute="0", sg_module="—", sg_target="—",
                                       sg_loss="—"),
    )


# ------------------------------------------------------ synthetic gradients --


class SyntheticState(NamedTuple):
    """A synthetic-gradient model's variables and its optimiser state."""

    variables: Any
    opt_state: Any


def _synthetic_parts(predictor: Predictor, spec: InterfaceSpec):
    """init / predict / L2-loss / fit shared by DNI and SG + prop."""
    num_classes = spec.label_shape[-1] if spec.label_shape else 0

    def init(key):
        variables = predictor.init(key, spec.h_shape, num_classes)
        return SyntheticState(variables, spec.optimizer.init(variables.get("params", {})))

    def predict(variables, h, y):
        y = y if predictor.conditioned else None
        return predictor.apply(variables, h, y, train=True)

    def l2(params, variables, h, y, grad):
        """``L_SG = Σ_batch ||SG(h, y) - δ||²`` and the predictor's new state."""
        s, new_state = predict({**variables, "params": params}, h, y)
        return jnp.sum((s - jax.lax.stop_gradient(grad)) ** 2), new_state

    def fit(fstate, h, y, target):
        # Computed unconditionally and selected with `where` rather than
        # `lax.cond`: cheaper inside a fused scan than a branch on CPU/GPU.
        params = fstate.variables.get("params", {})
        (loss, new_state), g = jax.value_and_grad(l2, has_aux=True)(
            params, fstate.variables, target.inputs, target.labels, target.grad
        )
        updates, opt_state = spec.optimizer.update(g, fstate.opt_state, params)
        # Keep the variables' structure (a parameter-free predictor, e.g.
        # predictors.from_fn, has no "params" entry) so the tree.map below applies.
        variables = L.with_params({**fstate.variables, **L.state_of(new_state)},
                                  optax.apply_updates(params, updates))
        fitted = SyntheticState(variables, opt_state)
        fstate = jax.tree.map(lambda new, old: jnp.where(target.valid, new, old), fitted, fstate)
        return fstate, {"sg_loss": jnp.where(target.valid, loss, 0.0)}

    return init, predict, l2, fit


def synthetic(predictor: Predictor) -> Feedback:
    """DNI / cDNI (DNI §2.1): the substitute is ``SG(h, y)`` from a learnt
    predictor, fitted with ``L_SG = ||SG(h, y) - δ||²`` to the target ``δ`` sent
    back by the stage above (DNI Fig. 2). Not update locked: the stage below
    updates as soon as ``h`` exists; the target only trains the predictor.

    Order within a step: the predictor is first fitted to the newest target it
    has received, then used for the new batch. With the ``sync`` schedule the
    newest target is the previous batch's, which is exactly the paper's order
    (use on batch t, fit on batch t, use on batch t+1, …).
    """
    if not isinstance(predictor, Predictor):
        raise TypeError(
            f"synthetic() needs an sgjax.predictors.Predictor (e.g. predictors.linear()), "
            f"got {predictor!r}"
        )

    def build(spec):
        init, predict, l2, fit = _synthetic_parts(predictor, spec)

        def step(fstate, h, y, target):
            fstate, info = fit(fstate, h, y, target)
            s, _ = predict(fstate.variables, h, y)
            return s, fstate, info

        return Interface(init, step)

    cond = "c" if predictor.conditioned else ""
    return Feedback(
        f"{cond}DNI", build, sg_trains=True, update_locked=False, backwards_locked=False,
        direct_error=False,
        table=dict(substitute="SG(h, y)", sg_module="SG(h, y)", sg_target="∂L/∂h",
                   sg_loss="||t - s||²"),
    )


def synthetic_prop(predictor: Predictor, alpha: float = 1.0) -> Feedback:
    """SG + prop (Czarnecki §6): the substitute is ``SG(h, y) + α ∂L_SG/∂h``,
    with ``L_SG = ||SG(h, y) - ∂L/∂h||²`` on the same batch, so the stage below
    and the SG module "conspire". Update locked (it needs this batch's target).
    The predictor is used first, then fitted to the same target."""

    def build(spec):
        init, predict, l2, fit = _synthetic_parts(predictor, spec)

        def step(fstate, h, y, target):
            params = fstate.variables.get("params", {})
            s, _ = predict(fstate.variables, h, y)
            dsg_dh = jax.grad(lambda h: l2(params, fstate.variables, h, y, target.grad)[0])(h)
            fstate, info = fit(fstate, h, y, target)
            return s + alpha * dsg_dh, fstate, info

        return Interface(init, step)

    return Feedback(
        "SG + prop", build, sg_trains=True, update_locked=True, backwards_locked=True,
        direct_error=False,
        table=dict(substitute="SG(h, y) + α ∂L_SG/∂h", sg_module="SG(h, y)",
                   sg_target="∂L/∂h", sg_loss="||t - s||²"),
    )


# ------------------------------------------------------- fixed random maps --


def _projection_feedback(
    name: str, matrix: Callable[[jax.Array, int, int], jax.Array],
    source: Callable[[Target], jax.Array], source_shape: Callable[[InterfaceSpec], tuple],
    backwards_locked: bool, direct_error: bool, table: Mapping[str, str],
) -> Feedback:
    """Substitute ``e Aᵀ`` for a fixed matrix ``A`` (SG module ``h A``, target
    ``-e``, loss ``-<t, s>``) where ``e = source(target)``: DFA, FA, Kickback."""

    def build(spec):
        h_size = int(jnp.prod(jnp.array(spec.h_shape)))
        e_size = int(jnp.prod(jnp.array(source_shape(spec))))

        def init(key):
            return matrix(key, h_size, e_size)

        def step(fstate, h, y, target):
            e = _flat(source(target))
            return (e @ fstate.T).reshape(h.shape), fstate, {}

        def sg_loss(fstate, h, y, target):
            s = _flat(h) @ fstate
            t = -jax.lax.stop_gradient(_flat(source(target)))
            return -jnp.vdot(t, s)

        return Interface(init, step, sg_loss)

    return Feedback(name, build, sg_trains=False, update_locked=True,
                    backwards_locked=backwards_locked, direct_error=direct_error, table=table)


def _random_matrix(scale: float | None):
    def make(key, h_size, e_size):
        std = scale if scale is not None else 1.0 / jnp.sqrt(e_size)
        return std * jax.random.normal(key, (h_size, e_size), jnp.float32)

    return make


def dfa(scale: float | None = None) -> Feedback:
    """Direct feedback alignment (Nøkland 2016): ``∂L/∂h^ = (∂L/∂p) Aᵀ`` with a
    fixed random ``A`` of shape ``(|h|, |p|)`` (std ``scale``, default
    ``1/sqrt(|p|)``), ``p`` the network output. Update locked, not backwards
    locked, direct error."""
    return _projection_feedback(
        "DFA", _random_matrix(scale), lambda t: t.error, lambda s: s.out_shape,
        backwards_locked=False, direct_error=True,
        table=dict(substitute="(∂L/∂p) Aᵀ", sg_module="h A", sg_target="-∂L/∂p",
                   sg_loss="-<t, s>"),
    )


def kickback() -> Feedback:
    """Kickback (Balduzzi et al. 2014) in Czarnecki's form: DFA with ``A = 1``,
    i.e. ``∂L/∂h^ = (∂L/∂p) 1ᵀ``: every unit receives the summed output error."""
    return _projection_feedback(
        "Kickback", lambda key, h, e: jnp.ones((h, e), jnp.float32),
        lambda t: t.error, lambda s: s.out_shape, backwards_locked=False, direct_error=True,
        table=dict(substitute="(∂L/∂p) 1ᵀ", sg_module="h 1", sg_target="-∂L/∂p",
                   sg_loss="-<t, s>"),
    )


def feedback_alignment(scale: float | None = None) -> Feedback:
    """Feedback alignment (Lillicrap et al. 2016): ``∂L/∂h^ = (∂L/∂g) Aᵀ`` where
    ``g`` is the output of the first layer above the cut and ``A`` a fixed random
    ``(|h|, |g|)`` matrix standing in for that layer's weights. Make the first
    layer above each cut a ``dense`` layer to get Lillicrap's rule exactly."""
    return _projection_feedback(
        "FA", _random_matrix(scale), lambda t: t.pre_grad, lambda s: s.next_shape,
        backwards_locked=True, direct_error=False,
        table=dict(substitute="(∂L/∂g) Aᵀ", sg_module="h A", sg_target="-∂L/∂g",
                   sg_loss="-<t, s>"),
    )


# -------------------------------------------------------------- stale (DNI) --


def stale(decay: float = 0.9) -> Feedback:
    """Exponential average of past true gradients w.r.t. the activations (the
    DNI §3.1 baseline): ``m ← decay·m + (1-decay)·δ`` with the newest target,
    then ``∂L/∂h^ = m``.
    The average is over past *batches*, position by position, so it belongs to
    other examples than the ones it is applied to (as in the paper)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"stale(decay={decay!r}): decay must be in [0, 1)")

    def build(spec):
        def init(key):
            return jnp.zeros((spec.batch_size, *spec.h_shape), jnp.float32)

        def step(fstate, h, y, target):
            if target.grad.shape != fstate.shape:
                raise ValueError(
                    f"stale feedback keeps an average of shape {fstate.shape} but got a "
                    f"target of shape {target.grad.shape}: use a fixed batch size"
                )
            new = decay * fstate + (1.0 - decay) * target.grad
            fstate = jnp.where(target.valid, new, fstate)
            return fstate, fstate, {}

        return Interface(init, step)

    return Feedback(
        f"Stale({decay})", build, sg_trains=False, update_locked=False,
        backwards_locked=False, direct_error=False,
        table=dict(substitute="EMA of past ∂L/∂h", sg_module="—", sg_target="∂L/∂h",
                   sg_loss="—"),
    )


ALL = {
    "backprop": backprop, "none": none, "synthetic": synthetic,
    "synthetic_prop": synthetic_prop, "dfa": dfa, "feedback_alignment": feedback_alignment,
    "kickback": kickback, "stale": stale,
}
