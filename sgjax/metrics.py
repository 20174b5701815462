"""Quality of a synthetic gradient against the true gradient (DNI Fig. 10).

All functions take ``synthetic`` and ``true`` of the same shape ``(B, ...)``
and return a scalar averaged over the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _flat(x):
    return x.reshape(x.shape[0], -1)


def l2_error(synthetic: jax.Array, true: jax.Array) -> jax.Array:
    """Mean over examples of the squared L2 distance ``‖ĝ − g‖²``."""
    return jnp.mean(jnp.sum((_flat(synthetic) - _flat(true)) ** 2, axis=-1))


def cosine_similarity(synthetic: jax.Array, true: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Mean over examples of ``<ĝ, g> / (‖ĝ‖ ‖g‖)`` (0 where either is zero)."""
    s, t = _flat(synthetic), _flat(true)
    num = jnp.sum(s * t, axis=-1)
    den = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
    return jnp.mean(jnp.where(den > eps, num / jnp.maximum(den, eps), 0.0))


def sign_error(synthetic: jax.Array, true: jax.Array) -> jax.Array:
    """Mean fraction of dimensions whose sign differs between ``ĝ`` and ``g``."""
    return jnp.mean(jnp.sign(synthetic) != jnp.sign(true))


def all_metrics(synthetic: jax.Array, true: jax.Array) -> dict[str, jax.Array]:
    """``{"l2_error", "cosine", "sign_error"}`` in one call."""
    return {
        "l2_error": l2_error(synthetic, true),
        "cosine": cosine_similarity(synthetic, true),
        "sign_error": sign_error(synthetic, true),
    }


__all__ = ["l2_error", "cosine_similarity", "sign_error", "all_metrics"]
