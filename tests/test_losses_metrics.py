"""sgjax.losses and sgjax.metrics against their formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import losses, metrics

B, C = 6, 4
LOGITS = jax.random.normal(jax.random.key(0), (B, C))
Y = jnp.array([0, 3, 1, 2, 2, 0])
ONE_HOT = jax.nn.one_hot(Y, C)


def test_softmax_cross_entropy():
    expected = -jnp.mean(jnp.sum(ONE_HOT * jax.nn.log_softmax(LOGITS), -1))
    np.testing.assert_allclose(losses.softmax_cross_entropy(LOGITS, Y), expected, rtol=1e-6)
    np.testing.assert_allclose(losses.softmax_cross_entropy(LOGITS, ONE_HOT), expected,
                               rtol=1e-6)


def test_sigmoid_log_loss():
    p = jax.nn.sigmoid(LOGITS)
    expected = -jnp.mean(jnp.sum(ONE_HOT * jnp.log(p) + (1 - ONE_HOT) * jnp.log(1 - p), -1))
    np.testing.assert_allclose(losses.sigmoid_log_loss(LOGITS, Y), expected, rtol=1e-5)
    np.testing.assert_allclose(losses.sigmoid_log_loss(LOGITS, ONE_HOT), expected, rtol=1e-5)


def test_mse():
    np.testing.assert_allclose(losses.mse(LOGITS, ONE_HOT),
                               0.5 * jnp.mean(jnp.sum((LOGITS - ONE_HOT) ** 2, -1)), rtol=1e-6)
    np.testing.assert_allclose(losses.mse(LOGITS, Y), losses.mse(LOGITS, ONE_HOT), rtol=1e-6)
    assert float(losses.mse(ONE_HOT, ONE_HOT)) == 0.0
    x = jnp.ones((2, 3, 3, 1))  # any rank: summed per example
    np.testing.assert_allclose(losses.mse(x, jnp.zeros_like(x)), 4.5)


def test_error_rate():
    assert float(losses.error_rate(10.0 * ONE_HOT, Y)) == 0.0
    assert float(losses.error_rate(10.0 * ONE_HOT, ONE_HOT)) == 0.0
    wrong = jnp.roll(ONE_HOT, 1, axis=-1)
    assert float(losses.error_rate(wrong, Y)) == 1.0
    np.testing.assert_allclose(losses.error_rate(LOGITS, Y),
                               jnp.mean(jnp.argmax(LOGITS, -1) != Y))


@pytest.mark.parametrize("shape", [(B, 5), (B, 3, 3, 2)])
def test_metrics_identities(shape):
    g = jax.random.normal(jax.random.key(1), shape)
    np.testing.assert_allclose(metrics.cosine_similarity(g, g), 1.0, rtol=1e-6)
    np.testing.assert_allclose(metrics.cosine_similarity(-g, g), -1.0, rtol=1e-6)
    assert float(metrics.sign_error(-g, g)) == 1.0
    assert float(metrics.sign_error(g, g)) == 0.0
    assert float(metrics.l2_error(g, g)) == 0.0
    np.testing.assert_allclose(metrics.l2_error(2 * g, g),
                               jnp.mean(jnp.sum(g.reshape(B, -1) ** 2, -1)), rtol=1e-6)
    out = metrics.all_metrics(-g, g)
    assert set(out) == {"l2_error", "cosine", "sign_error"}
    assert float(out["sign_error"]) == 1.0


def test_cosine_is_zero_where_a_gradient_is_zero():
    g = jnp.ones((2, 3))
    z = jnp.zeros((2, 3))
    assert float(metrics.cosine_similarity(z, g)) == 0.0
    assert float(metrics.cosine_similarity(g, z)) == 0.0
    orth = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    assert float(metrics.cosine_similarity(orth, orth[::-1])) == 0.0
