"""The one contract every sgjax trainer implements (optax-style: pure functions of a state).

A *trainer* is anything with three pure functions:

* ``init(key, batch) -> state``: the initial state; ``batch`` is an example training batch
  (it fixes shapes and is checked; its values are not used).
* ``step(state, batch) -> (state, info)``: one training step. Pure and jittable, so
  :func:`sgjax.fused` compiles a chunk of steps into one ``jax.lax.scan`` and ``jax.vmap``
  runs a population (:func:`vmap_seeds`).
* ``apply(state, x) -> outputs``: inference (batch norm uses running statistics, dropout is
  off, nothing is trained).

``info`` is a dict of arrays. Every trainer reports ``"loss"``, the task loss of this step
as a scalar (per-example mean over the batch; summed over time steps for recurrent
trainers); the other entries are documented by each trainer (per-stage entries of a split
are named ``"<name>/<stage>"``, e.g. ``sg_loss/0``).

The trainers of sgjax and their batches:

============================================  ====================================
trainer                                       ``batch``
============================================  ====================================
:func:`sgjax.sync`, :class:`sgjax.Runner`     :class:`Batch` ``(x, y)``
:func:`sgjax.stochastic`                      :class:`Batch` ``(x, y, key)`` (and
                                              ``p_update`` if it was built with ``None``)
:func:`sgjax.unlock.complete_unlock`          :class:`Batch` ``(x, y)``, plus ``key`` when
                                              stages can be busy (``p_update`` as above)
:func:`sgjax.recurrent.truncated_bptt`        :class:`sgjax.recurrent.Chunk`
:func:`sgjax.multirate.end_to_end`,           :class:`sgjax.multirate.Window`
:func:`sgjax.multirate.decoupled`
============================================  ====================================

A trainer may also offer ``steady_step`` and ``fill_ticks``: a faster step that equals
``step`` once ``fill_ticks`` steps have run from any state (the pipelined
:class:`sgjax.Runner`: once its pipeline is full, no stage needs masking).
:func:`sgjax.fused` then runs the first ``fill_ticks`` steps of every chunk with ``step``
and the rest with ``steady_step``.

A plain tuple ``(x, y)``/``(x, y, key)`` is accepted wherever a :class:`Batch` is.
Feedback state is threaded through one path in every trainer: whatever a feedback's
``grad`` or ``fit`` returns as its new state is what the next call sees, so a wrapper such
as :func:`sgjax.feedback.warmup` works in every trainer without touching any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax


class Batch(NamedTuple):
    """One training batch of a split network.

    ``x``: ``(B, *input_shape)`` inputs; ``y``: their labels (``(B,)`` class ids or
    ``(B, *label_shape)``); ``key``: this step's randomness, for trainers that draw
    (which stages update or are busy); ``p_update``: the update probability, for
    trainers built with ``p_update=None`` so that it can be traced (``jax.vmap`` a
    population over it).
    """

    x: Any
    y: Any = None
    key: jax.Array | None = None
    p_update: Any = None


def as_batch(batch: Any, where: str) -> Batch:
    """``batch`` as a :class:`Batch` (a tuple ``(x, y[, key[, p_update]])`` is accepted);
    a clear ``TypeError`` naming ``where`` otherwise."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, tuple) and 1 <= len(batch) <= 4:
        return Batch(*batch)
    raise TypeError(
        f"{where}: a batch is sgjax.Batch(x, y) (or a tuple (x, y[, key[, p_update]])), "
        f"got {type(batch).__name__}"
    )


@runtime_checkable
class Trainer(Protocol):
    """``init(key, batch) -> state``, ``step(state, batch) -> (state, info)``,
    ``apply(state, x) -> outputs`` (see the module docstring)."""

    init: Callable[..., Any]
    step: Callable[..., tuple[Any, dict]]
    apply: Callable[..., Any]


class Seeded(NamedTuple):
    """A :class:`Trainer` running ``seeds`` independent copies of ``trainer`` at once
    (:func:`vmap_seeds`)."""

    init: Callable[..., Any]
    step: Callable[..., tuple[Any, dict]]
    apply: Callable[..., Any]
    trainer: Any
    seeds: int


def vmap_seeds(trainer: Trainer, seeds: int) -> Seeded:
    """``seeds`` independent runs of ``trainer`` as one trainer, ``jax.vmap``-ed.

    ``init(key, batch)`` splits ``key`` into one key per run (the batch is shared: it
    only fixes shapes); ``step(state, batches)`` takes batches with a leading axis of
    ``seeds`` (each run its own data); ``apply(state, x)`` runs every model on the same
    ``x`` and stacks the outputs ``(seeds, ...)``. Every state leaf has a leading axis
    of ``seeds``; ``info`` values too.
    """
    check_trainer(trainer, "vmap_seeds")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"vmap_seeds(seeds={seeds!r}): seeds must be a positive integer")

    def init(key, batch):
        return jax.vmap(lambda k: trainer.init(k, batch))(jax.random.split(key, seeds))

    return Seeded(init, jax.vmap(trainer.step), jax.vmap(trainer.apply, in_axes=(0, None)),
                  trainer, seeds)


def check_trainer(trainer: Any, where: str) -> None:
    """A clear ``TypeError`` naming ``where`` unless ``trainer`` has ``init``, ``step``
    and ``apply``."""
    if not isinstance(trainer, Trainer):
        missing = [n for n in ("init", "step", "apply") if not callable(getattr(trainer, n,
                                                                                 None))]
        raise TypeError(
            f"{where} needs a trainer (init(key, batch), step(state, batch), apply(state, x));"
            f" {type(trainer).__name__} has no {', '.join(missing)}"
        )


__all__ = ["Batch", "Seeded", "Trainer", "as_batch", "check_trainer", "vmap_seeds"]
