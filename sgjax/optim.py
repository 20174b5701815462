"""Optax transformations for the baselines of the synthetic-gradient papers.

:func:`stale_gradients` is the "stale gradients" baseline of Greydanus' post "A bird's eye
view of synthetic gradients" (section "Pros and Cons"): the parameter gradient is computed
by backprop once every ``every`` steps and reused for the updates in between, so the
network does backprop at the same rate as a synthetic-gradient model refitted every
``every`` steps (:func:`sgjax.feedback.refit_every`). It is the parameter-space cousin of
:func:`sgjax.feedback.stale` (DNI §3.1), which averages past *activation* gradients.

Use it ahead of the optimiser, like any optax transformation::

    opt = optax.chain(sgjax.optim.stale_gradients(10), optax.sgd(0.1))

Every update call consumes one step. On the steps where the gradient is stale the incoming
gradient is ignored, so the caller may skip computing it:
``needs_fresh_gradient(opt_state)`` says whether the next update will read it (e.g. inside
``jax.lax.cond``; pass any tree, such as zeros, on the other steps).

:func:`advance_schedules` moves the step counters that drive learning-rate schedules without
updating anything else: the schedules of :func:`sgjax.stochastic` and
:func:`sgjax.unlock.complete_unlock` call it for every module that skips a step, so that a
schedule such as A.1's "divided by 10 at 300k and 400k steps" counts *global* steps, as the
DNI paper does (§3.1, Fig. 5), not the module's own updates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class StaleGradientsState(NamedTuple):
    """State of :func:`stale_gradients`.

    ``until_fresh``: int32 scalar, updates left before the next fresh gradient is taken
    (0: the next update stores and uses its incoming gradient). ``grads``: the stored
    gradient, a tree like the parameters (zeros before the first update).
    """

    until_fresh: jax.Array
    grads: Any


def stale_gradients(every: int) -> optax.GradientTransformation:
    """Recompute the gradient every ``every`` updates and reuse it in between.

    Update ``t`` (counting from 0) outputs ``g_{every·⌊t/every⌋}``: on updates ``0, every,
    2·every, …`` the incoming gradient is stored and passed on unchanged; on the others the
    stored one is passed on and the incoming one is ignored. ``every=1`` is the identity.

    Args:
      every: positive int, the number of updates that share one gradient.

    Returns:
      An ``optax.GradientTransformation`` whose state is :class:`StaleGradientsState`.
    """
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"stale_gradients(every={every!r}): every must be a positive int "
                         "(1 recomputes the gradient on every update)")

    def init(params):
        return StaleGradientsState(jnp.zeros((), jnp.int32),
                                   jax.tree.map(jnp.zeros_like, params))

    def update(updates, state, params=None):
        del params
        fresh = state.until_fresh == 0
        grads = jax.tree.map(lambda g, s: jnp.where(fresh, g, s).astype(s.dtype),
                             updates, state.grads)
        until = jnp.where(fresh, every - 1, state.until_fresh - 1).astype(jnp.int32)
        return grads, StaleGradientsState(until, grads)

    return optax.GradientTransformation(init, update)


SCHEDULE_STATES = (optax.ScaleByScheduleState, optax.InjectHyperparamsState,
                   optax.InjectStatefulHyperparamsState)
"""The optax states whose ``count`` is the step a schedule is evaluated at."""


def advance_schedules(opt_state: Any, by: Any = 1) -> Any:
    """``opt_state`` with every schedule's step counter moved on by ``by``.

    Only the ``count`` of :data:`SCHEDULE_STATES` (``optax.scale_by_schedule``, i.e.
    ``optax.adam(schedule)``'s learning rate, and ``optax.inject_hyperparams``) changes;
    moments and their bias-correction counts (``ScaleByAdamState.count``) do not, since the
    module took no update. ``by`` may be a traced int (e.g. ``1 - active``).

    Args:
      opt_state: any optax state, or any tree holding such states (a stage's or a
        predictor's state).
      by: non-negative int scalar, the number of skipped steps.

    Returns:
      A tree of the same structure and dtypes.
    """

    def advance(node):
        if not isinstance(node, SCHEDULE_STATES):
            return node
        count = node.count + jnp.asarray(by, node.count.dtype)
        if isinstance(node, optax.ScaleByScheduleState):
            return node._replace(count=count)
        return node._replace(count=count, inner_state=advance_schedules(node.inner_state, by))

    return jax.tree.map(advance, opt_state, is_leaf=lambda n: isinstance(n, SCHEDULE_STATES))


def needs_fresh_gradient(opt_state: Any) -> jax.Array:
    """Whether the next update of ``opt_state`` reads its incoming gradient.

    ``opt_state`` is the state of :func:`stale_gradients` or of any chain containing it
    (every :class:`StaleGradientsState` in the tree is consulted; the result is true if
    any of them takes a fresh gradient). A state without one always needs it.
    """
    found = [s for s in jax.tree.leaves(
        opt_state, is_leaf=lambda s: isinstance(s, StaleGradientsState))
        if isinstance(s, StaleGradientsState)]
    if not found:
        return jnp.ones((), bool)
    return jnp.any(jnp.stack([s.until_fresh == 0 for s in found]))


__all__ = ["SCHEDULE_STATES", "StaleGradientsState", "advance_schedules", "needs_fresh_gradient",
           "stale_gradients"]
