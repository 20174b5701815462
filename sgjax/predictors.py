"""Synthetic-gradient models ``M(h, y) ≈ ∂L/∂h`` (DNI §2.1, Appendix A.1).

A :class:`Predictor` is a pure pair:

* ``init(key, h_shape, num_classes) -> variables`` sized from the shape of one
  activation ``h`` (no batch axis) and the number of classes;
* ``apply(variables, h, y, *, train) -> (synthetic, state)`` maps activations
  ``h`` of shape ``(B, *h_shape)`` (and one-hot labels ``y`` of shape
  ``(B, num_classes)``, or ``(B, T, num_classes)`` with one label per position
  of a sequence, when ``conditioned``) to a synthetic gradient of exactly the
  shape of ``h``.

The final layer of every model is zero-initialised, so the first synthetic
gradient is exactly zero (A.1). Conditioning on the label (cDNI) concatenates
the one-hot label to the input of a dense model, and ten one-hot *channel
masks* to the input of a convolutional one (A.1).

Activations with positions (a sequence ``(B, T, D)``, an image ``(B, H, W, C)``)
can be modelled *per position*: ``conv`` works per pixel, and
``mlp(..., per_position=True)`` applies one dense model to the last axis at
every position (the weights are shared, so their number does not grow with
``T``), reading the label of that position when conditioned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sgjax import layers as L


class Predictor(NamedTuple):
    """A synthetic-gradient model; ``conditioned`` says whether it reads the label."""

    init: Callable
    apply: Callable
    conditioned: bool
    description: str = ""


def _label_input(h: jax.Array, y: jax.Array | None, conditioned: bool) -> jax.Array:
    """The predictor's input: ``h``, with the one-hot label appended when conditioned.

    Dense activations ``(B, d)`` get ``(B, d + C)``; activations with positions
    ``(B, *P, ch)`` (a sequence ``P = (T,)``, an image ``P = (H, W)``) get ``C``
    extra channels: the label of the example at every position (from ``y`` of
    shape ``(B, C)``; the channel of the true class is filled with ones), or each
    position's own label (from ``y`` of shape ``(B, *P, C)``).
    """
    if not conditioned:
        return h
    if y is None:
        raise ValueError(
            "this synthetic-gradient predictor is conditioned on the label (cDNI) but "
            "no label was given: pass the one-hot labels `y`, or use an unconditioned "
            "predictor"
        )
    y = y.astype(h.dtype)
    if h.ndim == 2 and y.ndim == 2:
        return jnp.concatenate([h, y], axis=-1)
    positions = h.shape[1:-1]
    if y.ndim == 2:
        y = y.reshape(y.shape[0], *(1,) * len(positions), y.shape[-1])
    elif y.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"cannot condition activations of shape {tuple(h.shape)} on labels of shape "
            f"{tuple(y.shape)}: labels must be (batch, classes) for the whole example, or "
            f"(batch, {', '.join(map(str, positions))}, classes), one per position"
        )
    masks = jnp.broadcast_to(y, (*h.shape[:-1], y.shape[-1]))
    return jnp.concatenate([h, masks], axis=-1)


def from_layer(layer: L.Layer, *, conditioned: bool = False, description: str = "") -> Predictor:
    """Wrap any :class:`~sgjax.layers.Layer` as a predictor.

    Raises ``ValueError`` at ``init`` if the layer's output shape differs from
    the activation shape it must predict a gradient for.
    """

    def init(key, h_shape, num_classes):
        h_shape = tuple(h_shape)
        in_shape = h_shape[:-1] + (h_shape[-1] + (num_classes if conditioned else 0),)
        out_shape, variables = layer.init(key, in_shape)
        if tuple(out_shape) != h_shape:
            raise ValueError(
                f"synthetic-gradient predictor {description or layer!s} produces shape "
                f"{tuple(out_shape)} but the activation it predicts a gradient for has "
                f"shape {h_shape}: its last layer must output exactly the activation shape"
            )
        return variables

    def apply(variables, h, y=None, *, train=False):
        return L.apply_layer(layer, variables, _label_input(h, y, conditioned), train=train)

    return Predictor(init, apply, conditioned, description)


def from_fn(fn: Callable[[jax.Array, jax.Array | None], jax.Array], *,
            conditioned: bool = False, description: str = "fixed function") -> Predictor:
    """A parameter-free predictor ``fn(h, y)`` (e.g. an oracle in tests)."""

    def init(key, h_shape, num_classes):
        del key, h_shape, num_classes
        return {}

    def apply(variables, h, y=None, *, train=False):
        del train
        if conditioned and y is None:
            _label_input(h, y, conditioned)
        return fn(h, y), variables

    return Predictor(init, apply, conditioned, description)


def _zero_dense(features: int) -> L.Layer:
    zeros = jax.nn.initializers.zeros
    return L.dense(features, kernel_init=zeros, bias_init=zeros)


def _widths(hidden, where: str) -> tuple[int, ...]:
    """``hidden`` as a tuple of positive ints, else a ``ValueError`` naming the bad width."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable):
        raise ValueError(f"{where}(hidden={hidden!r}): give a sequence of layer widths, "
                         "e.g. (1024, 1024), or () for a linear model")
    hidden = tuple(hidden)
    for n in hidden:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{where}(hidden={tuple(hidden)!r}): width {n!r} is not a "
                             "positive integer")
    return tuple(int(n) for n in hidden)


def _dense_blocks(hidden: Sequence[int], bn: bool) -> list[L.Layer]:
    blocks = []
    for n in hidden:
        blocks += [L.dense(n)] + ([L.batch_norm()] if bn else []) + [L.relu]
    return blocks


def _reshaped_dense_head(hidden: Sequence[int], bn: bool) -> Callable[[tuple], L.Layer]:
    """MLP on the flattened activation, reshaped back to the activation's shape."""

    def build(h_shape):
        size = 1
        for s in h_shape:
            size *= s
        unflatten = L.elementwise(lambda g: g.reshape(g.shape[0], *h_shape))
        return L.serial(L.flatten, *_dense_blocks(hidden, bn), _zero_dense(size), unflatten)

    return build


def _per_position_dense_head(hidden: Sequence[int], bn: bool) -> Callable[[tuple], L.Layer]:
    """MLP on the last axis, the same at every position (batch norm over batch and
    positions, per unit)."""

    flat = _reshaped_dense_head(hidden, bn)

    def build(h_shape):
        if len(h_shape) == 1:  # no positions: exactly the flat model (same parameters)
            return flat(h_shape)
        return L.serial(*_dense_blocks(hidden, bn), _zero_dense(h_shape[-1]))

    return build


def _shape_dependent(build: Callable[[tuple], L.Layer], conditioned: bool,
                     description: str) -> Predictor:
    """A predictor whose layers depend on the activation shape (known at ``init``);
    they are built once per shape."""
    built: dict[tuple, L.Layer] = {}

    def layer_for(h_shape):
        if h_shape not in built:
            built[h_shape] = build(h_shape)
        return built[h_shape]

    def init(key, h_shape, num_classes):
        h_shape = tuple(h_shape)
        flat_in = h_shape[:-1] + (h_shape[-1] + (num_classes if conditioned else 0),)
        out_shape, variables = layer_for(h_shape).init(key, flat_in)
        if tuple(out_shape) != h_shape:
            raise ValueError(
                f"synthetic-gradient predictor {description} produces shape {out_shape} "
                f"but the activation has shape {h_shape}"
            )
        return variables

    def apply(variables, h, y=None, *, train=False):
        layer = layer_for(tuple(h.shape[1:]))
        return layer.apply(variables, _label_input(h, y, conditioned), train=train)

    return Predictor(init, apply, conditioned, description)


def mlp(hidden: Sequence[int] = (), *, conditioned: bool = False,
        batch_norm: bool = True, per_position: bool = False) -> Predictor:
    """Dense synthetic-gradient model: ``len(hidden)`` hidden layers of linear,
    batch norm and ReLU (A.1), then a zero-initialised linear output of the
    activation's size. ``hidden=()`` is the linear model ``φ_w h + φ_b``.

    Activations of any rank are flattened and the output reshaped back, unless
    ``per_position``: then activations ``(B, *P, D)`` (a sequence ``(B, T, D)``)
    are modelled position by position, one dense model ``D (+ C) → … → D``
    shared by every position, conditioned (cDNI) on the label of each position
    (labels ``(B, *P, C)``) or of the whole example (``(B, C)``). For rank-2
    activations both are the same model.
    """
    hidden = _widths(hidden, "mlp")
    name = ("c" if conditioned else "") + (f"mlp{list(hidden)}" if hidden else "linear")
    if per_position:
        return _shape_dependent(_per_position_dense_head(hidden, batch_norm), conditioned,
                                name + " per position")
    return _shape_dependent(_reshaped_dense_head(hidden, batch_norm), conditioned, name)


def linear(*, conditioned: bool = False, per_position: bool = False) -> Predictor:
    """The linear synthetic-gradient model ``M(h, y) = h A + y B + C`` (zero-initialised);
    ``per_position``: one such model shared by every position (see :func:`mlp`)."""
    return mlp((), conditioned=conditioned, per_position=per_position)


def conv(hidden: Sequence[int] = (64, 64), kernel_size: int = 5, *,
         conditioned: bool = False, batch_norm: bool = True) -> Predictor:
    """Convolutional synthetic-gradient model for ``(B, H, W, C)`` activations:
    resolution-preserving convolutions with ``hidden`` channels, batch norm and
    ReLU, then a zero-initialised convolution back to ``C`` channels (A.1)."""
    hidden = _widths(hidden, "conv")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"conv(kernel_size={kernel_size!r}): must be a positive integer")

    def build(h_shape):
        if len(h_shape) != 3:
            raise ValueError(
                f"conv predictor needs spatial activations (H, W, C); got shape {h_shape}. "
                "Use sgjax.predictors.mlp for dense activations."
            )
        blocks = []
        for n in hidden:
            blocks += [L.conv(n, kernel_size)] + ([L.batch_norm()] if batch_norm else [])
            blocks += [L.relu]
        zeros = jax.nn.initializers.zeros
        head = L.conv(h_shape[-1], kernel_size, kernel_init=zeros, bias_init=zeros)
        return L.serial(*blocks, head)

    name = ("c" if conditioned else "") + f"conv{list(hidden)}"
    return _shape_dependent(build, conditioned, name)
