"""Quality of a synthetic gradient against the true gradient (DNI Fig. 10).

All functions take ``synthetic`` and ``true`` of the same shape ``(B, ...)``
and return a scalar averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pair(synthetic, true):
    """Both as ``(B, -1)``; a ``ValueError`` if their shapes differ (broadcasting
    would silently compare the wrong numbers)."""
    if jnp.shape(synthetic) != jnp.shape(true):
        raise ValueError(
            f"synthetic gradient of shape {jnp.shape(synthetic)} compared with a true "
            f"gradient of shape {jnp.shape(true)}: they must have the same shape (B, ...)"
        )
    if jnp.ndim(true) < 1:
        raise ValueError("gradients need a batch axis: shape (B, ...)")
    return (jnp.reshape(synthetic, (jnp.shape(synthetic)[0], -1)),
            jnp.reshape(true, (jnp.shape(true)[0], -1)))


def l2_error(synthetic: jax.Array, true: jax.Array) -> jax.Array:
    """Mean over examples of the squared L2 distance ``‖ĝ − g‖²``."""
    s, t = _pair(synthetic, true)
    return jnp.mean(jnp.sum((s - t) ** 2, axis=-1))


def cosine_similarity(synthetic: jax.Array, true: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Mean over examples of ``<ĝ, g> / (‖ĝ‖ ‖g‖)`` (0 where either is zero)."""
    s, t = _pair(synthetic, true)
    num = jnp.sum(s * t, axis=-1)
    den = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return jnp.mean(jnp.where(den > eps, num / jnp.maximum(den, eps), 0.0))


def sign_error(synthetic: jax.Array, true: jax.Array) -> jax.Array:
    """Mean fraction of dimensions whose sign differs between ``ĝ`` and ``g``."""
    s, t = _pair(synthetic, true)
    return jnp.mean(jnp.sign(s) != jnp.sign(t))


def all_metrics(synthetic: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
    """``{"l2_error", "cosine", "sign_error"}`` in one call."""
    return {
        "l2_error": l2_error(synthetic, true),
        "cosine": cosine_similarity(synthetic, true),
        "sign_error": sign_error(synthetic, true),
    }


__all__ = ["l2_error", "cosine_similarity", "sign_error", "all_metrics"]
