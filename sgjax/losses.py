"""Losses ``loss(output, y) -> scalar``, averaged over the batch.

Integer ``y`` are class indices; float ``y`` are targets of the output's shape
(one-hot or real-valued), as in Czarnecki et al. supp. C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _one_hot_like(y, logits):
    if jnp.issubdtype(y.dtype, jnp.integer):
        return jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
    return y.astype(logits.dtype)


def softmax_cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; ``logits (B, C)``, ``y (B,)`` ints or ``(B, C)``."""
    return jnp.mean(optax.softmax_cross_entropy(logits, _one_hot_like(y, logits)))


def sigmoid_log_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over the batch of the summed per-output sigmoid log loss (binary
    cross-entropy); ``y`` one-hot/binary ``(B, C)`` or class indices."""
    per = optax.sigmoid_binary_cross_entropy(logits, _one_hot_like(y, logits))
    return jnp.mean(jnp.sum(per.reshape(per.shape[0], -1), axis=-1))


def mse(output: jax.Array, y: jax.Array) -> jax.Array:
    """Mean over the batch of ``½‖output − y‖²`` (``y`` ints become one-hot)."""
    diff = output - _one_hot_like(y, output)
    return 0.5 * jnp.mean(jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=-1))


def error_rate(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max class differs from the label."""
    labels = y if jnp.issubdtype(y.dtype, jnp.integer) else jnp.argmax(y, axis=-1)
    return jnp.mean(jnp.argmax(logits, axis=-1) != labels)
