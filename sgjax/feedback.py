"""Feedback: how a stage gets the gradient for its output, and how that source
is trained (Czarnecki et al. 2017, §6 and Table 1; DNI §2.1 and §3.1).

Every method is one constructor returning a :class:`Feedback`. A feedback is
placed at an interface (a cut between two stages); it owns whatever the method
needs — a synthetic-gradient predictor and its optimiser state, a fixed random
matrix, an exponential average — and replaces ``∂L/∂h`` for the stage below
the cut with its own substitute ``∂L/∂h^`` (Table 1, first row).

The stage above the cut sends back a :class:`Target` message holding only what
the feedback reads (``Feedback.needs``): for DNI the activations ``h`` it
received (and their labels, for cDNI) and the gradient it computed for them
(its own synthetic gradient backpropagated through it, DNI Fig. 2). A bound
feedback (:class:`Interface`) is three pure functions of its state: ``init``,
``grad`` (the substitute for this batch) and ``fit`` (train the gradient source
on a message). Feedbacks that are *update locked* (Table 1) need that message
for the same batch before the stage below can update; the others use it only to
train their gradient model, so it may arrive later. Wrappers (``scaled``,
``refit_every``, ``warmup``) take a feedback and return one, as optax
transformations chain.

Table 1's columns are attributes (``sg_trains``, ``update_locked``,
``backwards_locked``, ``direct_error``) and its formula rows are strings in
``table``, so the Understanding-SG Table 1 experiment prints them from here.
Each trainable-free method also exposes ``Interface.sg_loss``: the loss
``L_SG(t, SG(h))`` of its SG-module view, whose gradient w.r.t. ``h`` is the
method's prescribed substitute (the paper's §6 claim; tested).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax import layers as L
from sgjax import metrics
from sgjax.predictors import Predictor


class Target(NamedTuple):
    """The message a stage sends to the stage below (arrays carry a batch axis).

    A stage fills only the fields the feedback below it reads
    (:attr:`Feedback.needs`); the others are ``None``.

    Attributes:
      grad: ``(B, *h_shape)`` gradient w.r.t. ``h`` computed by the stage above
        (true gradient, or its synthetic gradient backpropagated through it),
        in the units of the task loss as given.
      inputs: ``(B, *h_shape)`` the activations ``h`` this target is for (read
        by synthetic-gradient models, which are fitted on them).
      labels: ``(B, C)`` their labels (one-hot for classification; read by cDNI).
      pre_grad: ``(B, *g_shape)`` gradient w.r.t. ``g``, the output of the
        first layer of the stage above (used by feedback alignment).
      error: ``(B, *out_shape)`` the output error ``∂L/∂p`` at the network
        output ``p`` (used by DFA and Kickback).
      valid: scalar bool; ``False`` for the placeholder before any target exists.
    """

    grad: Any = None
    inputs: Any = None
    labels: Any = None
    pre_grad: Any = None
    error: Any = None
    valid: Any = True


TARGET_FIELDS = frozenset(("grad", "inputs", "labels", "pre_grad", "error"))


class InterfaceSpec(NamedTuple):
    """Static facts about one interface, given to :meth:`Feedback.build`.

    ``h_shape`` is the activation shape at the cut, ``label_shape`` the label
    vector's, ``out_shape`` the network output's, ``next_shape`` the output of
    the first layer above the cut; ``optimizer`` trains SG modules.

    ``example_scale`` turns a gradient of the task loss into a *per-example*
    gradient: the batch size ``B`` when the loss is a batch mean, ``1`` when it
    is a sum (:func:`sgjax.split_at` measures it from the loss). Synthetic-
    gradient models regress per-example gradients ``example_scale · δ`` and
    their prediction is divided by it when consumed, so DNI trains the same
    whether the loss is averaged or summed over the batch.
    """

    h_shape: tuple[int, ...]
    label_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    next_shape: tuple[int, ...]
    batch_size: int
    optimizer: optax.GradientTransformation
    example_scale: float = 1.0


class Interface(NamedTuple):
    """A feedback bound to one interface: pure functions of its state ``fstate``.

    * ``init(key) -> fstate``
    * ``grad(fstate, h, y, target) -> (substitute, fstate, info)``: the
      substitute for ``∂L/∂h`` (shape of ``h``, ``(B, *h_shape)``) for this
      batch. ``target`` is this batch's :class:`Target` for update-locked
      feedbacks and is ignored (may be ``None``) otherwise.
    * ``fit(fstate, target) -> (fstate, info)``: train the gradient source on a
      message from the stage above (DNI Fig. 2); a ``valid=False`` target
      leaves ``fstate`` unchanged.
    * ``sg_loss(fstate, h, y, target) -> scalar``: the Understanding-SG Table 1
      SG-module loss, where defined.

    ``update_locked`` fixes the order of :meth:`step`.
    """

    init: Callable[[jax.Array], Any]
    grad: Callable[..., tuple[jax.Array, Any, dict]]
    fit: Callable[..., tuple[Any, dict]]
    sg_loss: Callable[..., jax.Array] | None = None
    update_locked: bool = False

    def step(self, fstate, h, y, target):
        """Substitute for this batch and the fitted state, in the method's order.

        Not update locked (DNI, stale, none): first fit to the newest target
        received (under ``sync``, the previous batch's), then predict for ``h``:
        DNI Fig. 2's "use on t, fit on t, use on t + 1"; ``target=None`` only
        predicts (the schedule fits separately, see :mod:`sgjax.train`). Update locked (Bprop,
        SG + prop, FA, DFA, Kickback): compute the substitute from this batch's
        ``target``, then fit to that same target.
        """
        if self.update_locked:
            sub, fstate, info = self.grad(fstate, h, y, target)
            fstate, fit_info = self.fit(fstate, target)
        else:
            fit_info = {}
            if target is not None:
                fstate, fit_info = self.fit(fstate, target)
            sub, fstate, info = self.grad(fstate, h, y, None)
        return sub, fstate, {**info, **fit_info}


def _no_fit(fstate, target):
    return fstate, {}


@dataclasses.dataclass(frozen=True)
class Feedback:
    """One method of Understanding-SG Table 1 (or a DNI baseline).

    ``make(spec) -> Interface`` binds the method to an interface (use
    :meth:`build`). ``needs`` names the :class:`Target` fields it reads, so the
    stage above sends only those. Table 1's columns are the boolean attributes.
    """

    name: str
    make: Callable[[InterfaceSpec], Interface]
    sg_trains: bool
    update_locked: bool
    backwards_locked: bool
    direct_error: bool
    needs: frozenset = frozenset()
    table: Mapping[str, str] = dataclasses.field(default_factory=dict)
    scale: float = 1.0
    """The factor :func:`scaled` applies to the substitute when it is consumed (the
    product over nested wrappers; 1 for an unwrapped method)."""

    def __post_init__(self):
        unknown = set(self.needs) - TARGET_FIELDS
        if unknown:
            raise ValueError(f"Feedback {self.name}: unknown Target fields {sorted(unknown)}")

    def build(self, spec: InterfaceSpec) -> Interface:
        """The :class:`Interface` of this method at the interface ``spec``. Its ``grad``
        (update-locked methods) and ``fit`` raise a clear ``ValueError`` when given a
        :class:`Target` without a field the method ``needs``."""
        interface = self.make(spec)
        grad, fit = interface.grad, interface.fit

        def checked_grad(fstate, h, y, target=None):
            if self.update_locked:
                self._check_target(target, "its substitute for this batch")
            return grad(fstate, h, y, target)

        def checked_fit(fstate, target):
            self._check_target(target, "fitting")
            return fit(fstate, target)

        return interface._replace(grad=checked_grad, fit=checked_fit,
                                  update_locked=self.update_locked)

    def _check_target(self, target, what: str) -> None:
        if target is None and self.needs:
            raise ValueError(
                f"{self!r} needs a Target (with {', '.join(sorted(self.needs))}) for {what}, "
                "got None: the stage above must send this batch's target first"
            )
        if not isinstance(target, Target):
            if target is None:
                return
            raise TypeError(f"{self!r}: a target must be an sgjax.Target, got "
                            f"{type(target).__name__}")
        missing = sorted(f for f in self.needs if getattr(target, f) is None)
        if missing:
            raise ValueError(
                f"{self!r} needs the Target fields {sorted(self.needs)} but {missing} "
                f"{'is' if len(missing) == 1 else 'are'} None: build the target with "
                f"{', '.join(f'{m}=...' for m in missing)} (the stage above sends what "
                "Feedback.needs names)"
            )

    def __repr__(self) -> str:
        return f"Feedback({self.name})"


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


def _when_valid(target: Target, fit: Callable, fstate: Any) -> tuple[Any, dict]:
    """``fit(fstate)`` if the target is a real message, else ``fstate`` unchanged.

    A ``lax.cond`` when validity is only known at run time: only the taken
    branch runs (under ``vmap`` it becomes a select).
    """
    if isinstance(target.valid, bool):  # known while tracing: no branch at all, so
        # inside one compiled step the fit can share the prediction's forward pass
        return fit(fstate) if target.valid else _no_fit_like(fit, fstate)
    valid = jnp.asarray(target.valid, bool)
    out = jax.eval_shape(fit, fstate)
    skip = lambda fs: (fs, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out[1]))
    return jax.lax.cond(valid, fit, skip, fstate)


def _no_fit_like(fit: Callable, fstate: Any) -> tuple[Any, dict]:
    out = jax.eval_shape(fit, fstate)
    return fstate, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out[1])


# ----------------------------------------------------------------- backprop --


def backprop() -> Feedback:
    """True gradients: ``∂L/∂h`` backpropagated from the stage above (locked)."""

    def make(spec):
        def grad(fstate, h, y, target):
            return target.grad, fstate, {}

        def sg_loss(fstate, h, y, target):  # SG(h) = h, t = -∂L/∂h, L = -<t, s>
            return -jnp.vdot(-jax.lax.stop_gradient(target.grad), h)

        return Interface(lambda key: (), grad, _no_fit, sg_loss)

    return Feedback(
        "Bprop", make, sg_trains=False, update_locked=True, backwards_locked=True,
        direct_error=False, needs=frozenset({"grad"}),
        table=dict(substitute="∂L/∂h", sg_module="h", sg_target="-∂L/∂h",
                   sg_loss="-<t, s>"),
    )


def none() -> Feedback:
    """No gradient at all crosses the cut ("No Bprop", DNI Table 1): the stages
    below receive zero and their parameters never change."""

    def make(spec):
        def grad(fstate, h, y, target):
            return jnp.zeros_like(h), fstate, {}

        return Interface(lambda key: (), grad, _no_fit)

    return Feedback(
        "No Bprop", make, sg_trains=False, update_locked=False, backwards_locked=False,
        direct_error=False, table=dict(substitute="0", sg_module="—", sg_target="—",
                                       sg_loss="—"),
    )


# ------------------------------------------------------ synthetic gradients --


class SyntheticState(NamedTuple):
    """A synthetic-gradient model's variables and its optimiser state."""

    variables: Any
    opt_state: Any


class _SyntheticModel(NamedTuple):
    """init / predict / regression loss / fit of one synthetic-gradient model,
    shared by DNI and SG + prop. Predictions and targets are per-example
    gradients (``example_scale · δ``; see :class:`InterfaceSpec`)."""

    init: Callable
    predict: Callable
    l2: Callable
    fit: Callable


def _synthetic_model(predictor: Predictor, spec: InterfaceSpec) -> _SyntheticModel:
    num_classes = spec.label_shape[-1] if spec.label_shape else 0
    scale = spec.example_scale

    def init(key):
        variables = predictor.init(key, spec.h_shape, num_classes)
        return SyntheticState(variables, spec.optimizer.init(L.params_of(variables)))

    def predict(variables, h, y):
        y = y if predictor.conditioned else None
        return predictor.apply(variables, h, y, train=True)

    def l2(params, variables, h, y, grad):
        """``L_SG = Σ_batch ||SG(h, y) - example_scale · δ||²``, with the predictor's new
        state and ``(SG(h, y), example_scale · δ)`` (both per example) as aux."""
        s, new_state = predict(L.with_params(variables, params), h, y)
        t = scale * jax.lax.stop_gradient(grad)
        return jnp.sum((s - t) ** 2), (new_state, s, t)

    def fit(fstate, target):
        def fit_valid(fstate):
            params = L.params_of(fstate.variables)
            (loss, (new_state, s, t)), g = jax.value_and_grad(l2, has_aux=True)(
                params, fstate.variables, target.inputs, target.labels, target.grad
            )
            updates, opt_state = spec.optimizer.update(g, fstate.opt_state, params)
            variables = L.with_params({**fstate.variables, **L.state_of(new_state)},
                                      optax.apply_updates(params, updates))
            info = {"sg_loss": loss, **fit_diagnostics(s, t, L.state_of(new_state))}
            return SyntheticState(variables, opt_state), info

        return _when_valid(target, fit_valid, fstate)

    return _SyntheticModel(init, predict, l2, fit)


def fit_diagnostics(synthetic: jax.Array, target: jax.Array, model_state: Any = None
                    ) -> dict[str, jax.Array]:
    """Scalars that show how a synthetic-gradient model tracks its target (DNI Fig. 10),
    from the ``(B, *h_shape)`` prediction ``SG(h)`` used for a batch and the target it is
    then fitted to (both per example, as the model regresses them):

    * ``sg_norm`` / ``target_norm``: mean over examples of ``‖SG(h_i)‖`` / ``‖t_i‖``
      (the model's own prediction, before a wrapper such as :func:`scaled` or
      :func:`warmup` changes what is consumed; the recurrent and multi-rate trainers'
      ``sg_norm`` is the substitute they consumed);
    * ``sg_cosine``: mean over examples of their cosine (0 where either is zero);
    * ``sg_bn_mean`` / ``sg_bn_var`` (only if ``model_state`` holds batch-norm
      statistics): the mean absolute running mean and the mean running variance over
      every batch-norm unit of the model, after this fit.

    A few reductions: cheap next to the model's own forward pass.
    """
    s = synthetic.reshape(synthetic.shape[0], -1)
    t = target.reshape(target.shape[0], -1)
    out = {"sg_norm": jnp.mean(jnp.linalg.norm(s, axis=-1)),
           "target_norm": jnp.mean(jnp.linalg.norm(t, axis=-1)),
           # per-example targets can be tiny: a small eps keeps their cosine defined
           "sg_cosine": metrics.cosine_similarity(s, t, eps=1e-30)}
    stats: dict[str, list] = {"mean": [], "var": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model_state):
        keys = [getattr(k, "key", None) for k in path]
        if "batch_stats" in keys and keys[-1] in stats:
            stats[keys[-1]].append(leaf.ravel())
    if stats["mean"]:
        out["sg_bn_mean"] = jnp.mean(jnp.abs(jnp.concatenate(stats["mean"])))
        out["sg_bn_var"] = jnp.mean(jnp.concatenate(stats["var"]))
    return out


def _synthetic_needs(predictor: Predictor) -> frozenset:
    return frozenset({"grad", "inputs", *(("labels",) if predictor.conditioned else ())})


def _check_predictor(predictor, where: str) -> None:
    if not isinstance(predictor, Predictor):
        raise TypeError(
            f"{where} needs an sgjax.predictors.Predictor (e.g. predictors.linear()), "
            f"got {predictor!r}"
        )


def synthetic(predictor: Predictor) -> Feedback:
    """DNI / cDNI (DNI §2.1): the substitute is ``SG(h, y)`` from a learnt
    predictor, fitted with ``L_SG = ||SG(h, y) - δ||²`` to the target ``δ`` sent
    back by the stage above (DNI Fig. 2). Not update locked: the stage below
    updates as soon as ``h`` exists; the target only trains the predictor.

    Order within a step: the predictor is first fitted to the newest target it
    has received, then used for the new batch. With the ``sync`` schedule the
    newest target is the previous batch's, which is exactly the paper's order
    (use on batch t, fit on batch t, use on batch t+1, …). The model works in
    per-example units whatever the loss's batch reduction (``example_scale``).
    """
    _check_predictor(predictor, "synthetic()")

    def make(spec):
        model = _synthetic_model(predictor, spec)

        def grad(fstate, h, y, target=None):
            s, _ = model.predict(fstate.variables, h, y)
            return s / spec.example_scale, fstate, {}

        return Interface(model.init, grad, model.fit)

    cond = "c" if predictor.conditioned else ""
    return Feedback(
        f"{cond}DNI", make, sg_trains=True, update_locked=False, backwards_locked=False,
        direct_error=False, needs=_synthetic_needs(predictor),
        table=dict(substitute="SG(h, y)", sg_module="SG(h, y)", sg_target="∂L/∂h",
                   sg_loss="||t - s||²"),
    )


def synthetic_prop(predictor: Predictor, alpha: float = 1.0) -> Feedback:
    """SG + prop (Czarnecki §6): the substitute is ``SG(h, y) + α ∂L_SG/∂h``,
    with ``L_SG = ||SG(h, y) - ∂L/∂h||²`` on the same batch, so the stage below
    and the SG module "conspire". Update locked (it needs this batch's target).
    The predictor is used first, then fitted to the same target.

    Units: ``SG`` and ``L_SG`` are in per-example units (see :class:`InterfaceSpec`):
    the substitute is ``(SG + α ∂L_SG/∂h) / example_scale``, so with a batch-mean loss
    ``α`` acts as ``α · B`` on the gradient in the loss's own units; ``α`` is unit-free
    only relative to the per-example regression loss.
    """
    _check_predictor(predictor, "synthetic_prop()")

    def make(spec):
        model = _synthetic_model(predictor, spec)

        def grad(fstate, h, y, target):
            params = L.params_of(fstate.variables)
            s, _ = model.predict(fstate.variables, h, y)
            dsg_dh = jax.grad(lambda h: model.l2(params, fstate.variables, h, y,
                                                 target.grad)[0])(h)
            return (s + alpha * dsg_dh) / spec.example_scale, fstate, {}

        return Interface(model.init, grad, model.fit)

    return Feedback(
        "SG + prop", make, sg_trains=True, update_locked=True, backwards_locked=True,
        direct_error=False, needs=_synthetic_needs(predictor),
        table=dict(substitute="SG(h, y) + α ∂L_SG/∂h", sg_module="SG(h, y)",
                   sg_target="∂L/∂h", sg_loss="||t - s||²"),
    )


# ------------------------------------------------------- fixed random maps --


def _projection_feedback(
    name: str, matrix: Callable[[jax.Array, int, int], jax.Array], source: str,
    source_shape: Callable[[InterfaceSpec], tuple],
    backwards_locked: bool, direct_error: bool, table: Mapping[str, str],
) -> Feedback:
    """Substitute ``e Aᵀ`` for a fixed matrix ``A`` (SG module ``h A``, target
    ``-e``, loss ``-<t, s>``) where ``e`` is the :class:`Target` field
    ``source``: DFA and Kickback (``error``), FA (``pre_grad``)."""

    def make(spec):
        h_size = math.prod(spec.h_shape)
        e_size = math.prod(source_shape(spec))

        def init(key):
            return matrix(key, h_size, e_size)

        def grad(fstate, h, y, target):
            e = _flat(getattr(target, source))
            return (e @ fstate.T).reshape(h.shape), fstate, {}

        def sg_loss(fstate, h, y, target):
            s = _flat(h) @ fstate
            t = -jax.lax.stop_gradient(_flat(getattr(target, source)))
            return -jnp.vdot(t, s)

        return Interface(init, grad, _no_fit, sg_loss)

    return Feedback(name, make, sg_trains=False, update_locked=True,
                    backwards_locked=backwards_locked, direct_error=direct_error,
                    needs=frozenset({source}), table=table)


def _random_matrix(scale: float | None):
    def make(key, h_size, e_size):
        std = scale if scale is not None else 1.0 / math.sqrt(e_size)
        return std * jax.random.normal(key, (h_size, e_size), jnp.float32)

    return make


def dfa(scale: float | None = None) -> Feedback:
    """Direct feedback alignment (Nøkland 2016): ``∂L/∂h^ = (∂L/∂p) Aᵀ`` with a
    fixed random ``A`` of shape ``(|h|, |p|)`` (std ``scale``, default
    ``1/sqrt(|p|)``), ``p`` the network output. Update locked, not backwards
    locked, direct error."""
    return _projection_feedback(
        "DFA", _random_matrix(scale), "error", lambda s: s.out_shape,
        backwards_locked=False, direct_error=True,
        table=dict(substitute="(∂L/∂p) Aᵀ", sg_module="h A", sg_target="-∂L/∂p",
                   sg_loss="-<t, s>"),
    )


def kickback() -> Feedback:
    """Kickback (Balduzzi et al. 2014) in Czarnecki's form: DFA with ``A = 1``,
    i.e. ``∂L/∂h^ = (∂L/∂p) 1ᵀ``: every unit receives the summed output error."""
    return _projection_feedback(
        "Kickback", lambda key, h, e: jnp.ones((h, e), jnp.float32),
        "error", lambda s: s.out_shape, backwards_locked=False, direct_error=True,
        table=dict(substitute="(∂L/∂p) 1ᵀ", sg_module="h 1", sg_target="-∂L/∂p",
                   sg_loss="-<t, s>"),
    )


def feedback_alignment(scale: float | None = None) -> Feedback:
    """Feedback alignment (Lillicrap et al. 2016): ``∂L/∂h^ = (∂L/∂g) Aᵀ`` where
    ``g`` is the output of the first layer above the cut and ``A`` a fixed random
    ``(|h|, |g|)`` matrix standing in for that layer's weights. Make the first
    layer above each cut a ``dense`` layer to get Lillicrap's rule exactly."""
    return _projection_feedback(
        "FA", _random_matrix(scale), "pre_grad", lambda s: s.next_shape,
        backwards_locked=True, direct_error=False,
        table=dict(substitute="(∂L/∂g) Aᵀ", sg_module="h A", sg_target="-∂L/∂g",
                   sg_loss="-<t, s>"),
    )


# -------------------------------------------------------------- stale (DNI) --


def stale(decay: float = 0.9) -> Feedback:
    """Exponential average of past true gradients w.r.t. the activations (the
    DNI §3.1 baseline): ``m ← decay·m + (1-decay)·δ`` with each target received,
    and ``∂L/∂h^ = m``.
    The average is over past *batches*, position by position, so it belongs to
    other examples than the ones it is applied to (as in the paper)."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"stale(decay={decay!r}): decay must be in [0, 1)")

    def make(spec):
        def init(key):
            return jnp.zeros((spec.batch_size, *spec.h_shape), jnp.float32)

        def fit(fstate, target):
            if target.grad.shape != fstate.shape:
                raise ValueError(
                    f"stale feedback keeps an average of shape {fstate.shape} but got a "
                    f"target of shape {target.grad.shape}: use a fixed batch size"
                )
            new = decay * fstate + (1.0 - decay) * target.grad
            return jnp.where(jnp.asarray(target.valid, bool), new, fstate), {}

        def grad(fstate, h, y, target=None):
            return fstate, fstate, {}

        return Interface(init, grad, fit)

    return Feedback(
        f"Stale({decay})", make, sg_trains=False, update_locked=False,
        backwards_locked=False, direct_error=False, needs=frozenset({"grad"}),
        table=dict(substitute="EMA of past ∂L/∂h", sg_module="—", sg_target="∂L/∂h",
                   sg_loss="—"),
    )


# ----------------------------------------------------------------- wrappers --
# Modifiers take a Feedback and return one, the way optax transformations chain:
# scaled(refit_every(synthetic(p), 10), 0.1) is a valid feedback. They are built from two
# public pieces, so a user writes a new one without private names: ``transform`` (a
# feedback whose interface is a function of the wrapped one's) and ``counted`` (an
# interface whose state carries a counter its grad/fit advance).


def transform(feedback: Feedback, wrap: Callable[[Interface], Interface], *, suffix: str,
              scale: float = 1.0) -> Feedback:
    """A new :class:`Feedback` whose interface at every cut is ``wrap(inner)``, ``inner``
    being ``feedback``'s interface there (the way an optax transformation wraps another).

    ``suffix`` is appended to the name (``"DNI, warm-up 10"``); ``scale`` multiplies
    :attr:`Feedback.scale` (the factor the substitute is multiplied by when consumed).
    Table 1's attributes and ``needs`` are the wrapped feedback's. ``wrap`` returns an
    :class:`Interface` (typically ``inner._replace(grad=..., fit=...)`` or
    :func:`counted`); whatever state its ``grad`` and ``fit`` return is what every
    trainer passes to the next call.
    """
    _check_feedback(feedback, "transform()")
    if not callable(wrap):
        raise TypeError(f"transform(wrap={wrap!r}): wrap must be a function Interface -> "
                        "Interface")

    def make(spec):
        out = wrap(feedback.build(spec))
        if not isinstance(out, Interface):
            raise TypeError(f"transform: wrap returned {type(out).__name__}, not an "
                            "sgjax.feedback.Interface")
        return out

    return dataclasses.replace(feedback, name=f"{feedback.name}{suffix}", make=make,
                               scale=feedback.scale * scale)


class CountedState(NamedTuple):
    """State of a wrapper that counts: the wrapped feedback's state and a counter."""

    inner: Any
    count: jax.Array


def counted(inner: Interface, *, grad: Callable | None = None, fit: Callable | None = None
            ) -> Interface:
    """``inner`` with its state wrapped in :class:`CountedState` ``(inner, count)``, the
    count starting at 0.

    ``grad(fstate, h, y, target) -> (substitute, fstate, info)`` and
    ``fit(fstate, target) -> (fstate, info)`` receive and return the
    :class:`CountedState` (advancing ``count`` is theirs to do; call ``inner.grad``/
    ``inner.fit`` on ``fstate.inner``). Either one left ``None`` passes through to
    ``inner`` and leaves the count alone. E.g. :func:`warmup` counts in ``grad``,
    :func:`refit_every` in ``fit``.
    """

    def init(key):
        return CountedState(inner.init(key), jnp.zeros((), jnp.int32))

    def passthrough_grad(fstate, h, y, target=None):
        sub, state, info = inner.grad(fstate.inner, h, y, target)
        return sub, fstate._replace(inner=state), info

    def passthrough_fit(fstate, target):
        state, info = inner.fit(fstate.inner, target)
        return fstate._replace(inner=state), info

    sg_loss = None
    if inner.sg_loss is not None:
        sg_loss = lambda fstate, *args: inner.sg_loss(fstate.inner, *args)
    return inner._replace(init=init, grad=grad or passthrough_grad,
                          fit=fit or passthrough_fit, sg_loss=sg_loss)


def _check_alpha(alpha) -> float:
    """``alpha`` as a float: one finite real number (a Python number or a 0-d array)."""
    shape = getattr(alpha, "shape", None)
    real = (isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)) or (
        shape == () and jnp.issubdtype(jnp.asarray(alpha).dtype, jnp.number))
    if not real:
        raise TypeError(f"scaled(alpha={alpha!r}): alpha must be one real number, e.g. 0.1")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"scaled(alpha={alpha!r}): alpha must be a finite number")
    return alpha


def scaled(feedback: Feedback, alpha: float) -> Feedback:
    """The substitute of ``feedback`` multiplied by ``alpha`` when consumed
    (DNI A.3: the recurrent synthetic gradient ×0.1; A.4: ×10 before entering
    network A). What the gradient source is fitted to is unchanged. The factor is
    recorded as ``Feedback.scale`` (multiplied through nested wrappers)."""
    _check_feedback(feedback, "scaled()")
    alpha = _check_alpha(alpha)

    def wrap(inner):
        def grad(fstate, h, y, target=None):
            sub, fstate, info = inner.grad(fstate, h, y, target)
            return alpha * sub, fstate, info

        sg_loss = None
        if inner.sg_loss is not None:
            sg_loss = lambda *args: alpha * inner.sg_loss(*args)
        return inner._replace(grad=grad, sg_loss=sg_loss)

    return transform(feedback, wrap, suffix=f" ×{alpha:g}", scale=alpha)


def refit_every(feedback: Feedback, n: int) -> Feedback:
    """Fit the gradient source only on every ``n``-th valid message (the first
    one included) and ignore the others (the blog post's protocol: the
    synthetic-gradient model is refitted every ``n`` steps and used unchanged
    in between)."""
    _check_feedback(feedback, "refit_every()")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"refit_every(n={n!r}): n must be a positive integer")

    def wrap(inner):
        def fit(fstate, target):
            valid = jnp.asarray(target.valid, bool)
            due = valid & (fstate.count % n == 0)
            state, info = inner.fit(fstate.inner, target._replace(valid=due))
            return CountedState(state, fstate.count + valid.astype(jnp.int32)), info

        return counted(inner, fit=fit)

    return transform(feedback, wrap, suffix=f", refit every {n}")


def warmup(feedback: Feedback, steps: int) -> Feedback:
    """Observe-only warm-up: for the first ``steps`` batches the gradient source
    is fitted as usual but not used (the substitute is zero, as with
    :func:`none`); afterwards ``feedback`` acts unchanged. A batch counts when the
    substitute is requested for it (one ``grad`` call: a step of a split's stage, a
    chunk of :func:`sgjax.recurrent.truncated_bptt`, an update of network A in
    :func:`sgjax.multirate.decoupled`)."""
    _check_feedback(feedback, "warmup()")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"warmup(steps={steps!r}): steps must be a non-negative integer")

    def wrap(inner):
        def grad(fstate, h, y, target=None):
            sub, state, info = inner.grad(fstate.inner, h, y, target)
            sub = jnp.where(fstate.count < steps, jnp.zeros_like(sub), sub)
            return sub, CountedState(state, fstate.count + 1), info

        return counted(inner, grad=grad)._replace(sg_loss=None)

    return transform(feedback, wrap, suffix=f", warm-up {steps}")


def synthetic_variables(fstate: Any) -> Any:
    """The variables of the one synthetic-gradient model inside a feedback state (a
    stage's ``StageState.feedback``, a recurrent or multi-rate trainer's ``fstate``),
    looking through wrappers such as :func:`refit_every`. ``ValueError`` if it holds
    none or several."""
    found = [s for s in jax.tree.leaves(fstate, is_leaf=lambda x: isinstance(x, SyntheticState))
             if isinstance(s, SyntheticState)]
    if len(found) != 1:
        raise ValueError(f"expected one synthetic-gradient model in this feedback state, "
                         f"found {len(found)}: {type(fstate).__name__}")
    return found[0].variables


def _check_feedback(feedback, where: str) -> None:
    if not isinstance(feedback, Feedback):
        raise TypeError(f"{where} wraps an sgjax.feedback.Feedback, got {feedback!r}")


ALL = {
    "backprop": backprop, "none": none, "synthetic": synthetic,
    "synthetic_prop": synthetic_prop, "dfa": dfa, "feedback_alignment": feedback_alignment,
    "kickback": kickback, "stale": stale,
}

WRAPPERS = {"scaled": scaled, "refit_every": refit_every, "warmup": warmup}
"""The wrappers built into sgjax; :func:`transform` and :func:`counted` build others."""
