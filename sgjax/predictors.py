"""Synthetic-gradient models ``M(h, y) ≈ ∂L/∂h`` (DNI §2.1, Appendix A.1).

A :class:`Predictor` is a pure pair:

* ``init(key, h_shape, num_classes) -> variables`` sized from the shape of one
  activation ``h`` (no batch axis) and the number of classes;
* ``apply(variables, h, y, *, train) -> (synthetic, state)`` maps activations
  ``h`` of shape ``(B, *h_shape)`` (and one-hot labels ``y`` of shape
  ``(B, num_classes)`` when ``conditioned``) to a synthetic gradient of exactly
  the shape of ``h``.

The final layer of every model is zero-initialised, so the first synthetic
gradient is exactly zero (A.1). Conditioning on the label (cDNI) concatenates
the one-hot label to the input of a dense model, and ten one-hot *channel
masks* to the input of a convolutional one (A.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sgjax import layers as L


class Predictor(NamedTuple):
    """A synthetic-gradient model; ``conditioned`` says whether it reads the label."""

    init: Callable
    apply: Callable
    conditioned: bool
    description: str = ""


def _label_input(h: jax.Array, y: jax.Array | None, conditioned: bool) -> jax.Array:
    """The predictor's input: ``h``, with the one-hot label appended when conditioned.

    Dense activations ``(B, d)`` get ``(B, d + C)``; spatial ones ``(B, H, W, ch)``
    get ``C`` extra channels, the channel of the true class filled with ones.
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
    if h.ndim == 2:
        return jnp.concatenate([h, y], axis=-1)
    masks = jnp.broadcast_to(y[:, None, None, :], (*h.shape[:-1], y.shape[-1]))
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
        return layer.apply(variables, _label_input(h, y, conditioned), train=train)

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


def _reshaped_dense_head(hidden: Sequence[int], bn: bool) -> Callable[[tuple], L.Layer]:
    """MLP on the flattened activation, reshaped back to the activation's shape."""

    def build(h_shape):
        size = 1
        for s in h_shape:
            size *= s
        blocks = []
        for n in hidden:
            blocks += [L.dense(n)] + ([L.batch_norm()] if bn else []) + [L.relu]
        unflatten = L.elementwise(lambda g: g.reshape(g.shape[0], *h_shape))
        return L.serial(L.flatten, *blocks, _zero_dense(size), unflatten)

    return build


def _shape_dependent(build: Callable[[tuple], L.Layer], conditioned: bool,
                     description: str) -> Predictor:
    """A predictor whose layers depend on the activation shape (known at ``init``)."""

    def init(key, h_shape, num_classes):
        h_shape = tuple(h_shape)
        flat_in = h_shape[:-1] + (h_shape[-1] + (num_classes if conditioned else 0),)
        layer = build(h_shape)
        out_shape, variables = layer.init(key, flat_in)
        if tuple(out_shape) != h_shape:
            raise ValueError(
                f"synthetic-gradient predictor {description} produces shape {out_shape} "
                f"but the activation has shape {h_shape}"
            )
        return variables

    def apply(variables, h, y=None, *, train=False):
        layer = build(tuple(h.shape[1:]))
        return layer.apply(variables, _label_input(h, y, conditioned), train=train)

    return Predictor(init, apply, conditioned, description)


def mlp(hidden: Sequence[int] = (), *, conditioned: bool = False,
        batch_norm: bool = True) -> Predictor:
    """Dense synthetic-gradient model: ``len(hidden)`` hidden layers of linear,
    batch norm and ReLU (A.1), then a zero-initialised linear output of the
    activation's size. ``hidden=()`` is the linear model ``φ_w h + φ_b``.

    Activations of any rank are flattened and the output reshaped back.
    """
    hidden = tuple(int(n) for n in hidden)
    name = ("c" if conditioned else "") + (f"mlp{list(hidden)}" if hidden else "linear")
    return _shape_dependent(_reshaped_dense_head(hidden, batch_norm), conditioned, name)


def linear(*, conditioned: bool = False) -> Predictor:
    """The linear synthetic-gradient model ``M(h, y) = h A + y B + C`` (zero-initialised)."""
    return mlp((), conditioned=conditioned)


def conv(hidden: Sequence[int] = (64, 64), kernel_size: int = 5, *,
         conditioned: bool = False, batch_norm: bool = True) -> Predictor:
    """Convolutional synthetic-gradient model for ``(B, H, W, C)`` activations:
    resolution-preserving convolutions with ``hidden`` channels, batch norm and
    ReLU, then a zero-initialised convolution back to ``C`` channels (A.1)."""
    hidden = tuple(int(n) for n in hidden)

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
