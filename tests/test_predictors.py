"""sgjax.predictors: zero-initialised outputs, shapes, label conditioning, errors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import layers as L
from sgjax import predictors as P

B, C = 4, 3


def labels(seed=0):
    return jax.nn.one_hot(jax.random.randint(jax.random.key(seed), (B,), 0, C), C)


@pytest.mark.parametrize(
    "predictor, h_shape",
    [
        (P.linear(), (8,)),
        (P.linear(conditioned=True), (8,)),
        (P.mlp((16,)), (8,)),
        (P.mlp((16, 16), conditioned=True), (8,)),
        (P.mlp((8,), batch_norm=False), (4, 4, 2)),  # flattened and reshaped back
        (P.conv((4,), 3), (6, 6, 2)),
        (P.conv((4,), 3, conditioned=True), (6, 6, 2)),
    ],
    ids=["linear", "clinear", "mlp1", "cmlp2", "mlp-spatial", "conv", "cconv"],
)
def test_zero_initialised_predictor_outputs_exactly_zero(predictor, h_shape):
    h = jax.random.normal(jax.random.key(1), (B, *h_shape))
    y = labels() if predictor.conditioned else None

    @jax.jit  # one compilation instead of many small eager ones
    def outputs(key, h, y):
        variables = predictor.init(key, h_shape, C)
        return variables, [predictor.apply(variables, h, y, train=t)[0] for t in (False, True)]

    variables, outs = outputs(jax.random.key(0), h, y)
    for s in outs:
        chex.assert_shape(s, (B, *h_shape))
        np.testing.assert_array_equal(s, jnp.zeros_like(h))
    # ... but it is trainable, and only its last layer is zero
    params = jax.tree.leaves(L.params_of(variables))
    assert params
    if len(params) > 2:
        assert any(float(jnp.abs(p).max()) > 0 for p in params)


def test_linear_predictor_is_affine_in_h_and_y():
    predictor = P.linear(conditioned=True)
    variables = predictor.init(jax.random.key(0), (5,), C)
    _, dense_params, _ = variables["params"]  # flatten, zero dense, unflatten
    chex.assert_shape(dense_params["kernel"], (5 + C, 5))
    k = jax.random.normal(jax.random.key(2), (5 + C, 5))
    b = jax.random.normal(jax.random.key(3), (5,))
    variables = {**variables, "params": ({}, {"kernel": k, "bias": b}, {})}
    h, y = jax.random.normal(jax.random.key(1), (B, 5)), labels()
    s, _ = predictor.apply(variables, h, y)
    np.testing.assert_allclose(s, h @ k[:5] + y @ k[5:] + b, rtol=1e-5, atol=1e-6)


def test_conditioned_conv_predictor_appends_one_hot_channel_masks():
    # A "predictor" that returns the label channels it was given (h has C channels too,
    # so the output shape check passes): the masks must be the one-hot label, everywhere.
    pick = L.elementwise(lambda x: x[..., C:])
    predictor = P.from_layer(pick, conditioned=True)
    predictor.init(jax.random.key(0), (5, 5, C), C)
    h = jax.random.normal(jax.random.key(1), (B, 5, 5, C))
    y = labels()
    masks, _ = predictor.apply({}, h, y)
    np.testing.assert_array_equal(masks, jnp.broadcast_to(y[:, None, None, :], (B, 5, 5, C)))
    # exactly one mask channel of ones per example, the others zero
    np.testing.assert_array_equal(masks.sum(-1), jnp.ones((B, 5, 5)))

    # The conv model's first convolution sees C extra input channels (shapes only).
    for conditioned, channels in [(True, 2 + C), (False, 2)]:
        predictor = P.conv((4,), 3, conditioned=conditioned)
        variables = jax.eval_shape(lambda k, p=predictor: p.init(k, (6, 6, 2), C),
                                   jax.random.key(0))
        chex.assert_shape(variables["params"][0]["kernel"], (3, 3, channels, 4))
        chex.assert_shape(variables["params"][-1]["kernel"], (3, 3, 4, 2))


def test_conditioned_dense_predictor_concatenates_the_label():
    pick = L.elementwise(lambda x: x[:, -C:])
    predictor = P.from_layer(pick, conditioned=True)
    predictor.init(jax.random.key(0), (C,), C)
    y = labels()
    out, _ = predictor.apply({}, jnp.zeros((B, C)), y)
    np.testing.assert_array_equal(out, y)


def test_from_fn_passes_h_and_y():
    predictor = P.from_fn(lambda h, y: h * y.sum(-1, keepdims=True), conditioned=True)
    assert predictor.init(jax.random.key(0), (3,), C) == {}
    h = jnp.ones((B, 3))
    out, _ = predictor.apply({}, h, labels())
    np.testing.assert_array_equal(out, h)


@pytest.mark.parametrize("wrong", [3, 9])
def test_from_layer_checks_output_shape(wrong):
    predictor = P.from_layer(L.dense(wrong), description="bad")
    with pytest.raises(ValueError, match=rf"bad produces shape \({wrong},\) .* shape \(8,\)"):
        jax.eval_shape(lambda k: predictor.init(k, (8,), C), jax.random.key(0))


@pytest.mark.parametrize(
    "predictor",
    [P.linear(conditioned=True), P.from_fn(lambda h, y: h, conditioned=True),
     P.from_layer(L.identity, conditioned=True)],
    ids=["linear", "from_fn", "from_layer"],
)
def test_conditioned_predictor_without_label(predictor):
    h_shape = (4,)
    variables = predictor.init(jax.random.key(0), h_shape, 0)
    with pytest.raises(ValueError, match="conditioned on the label.*no label was given"):
        predictor.apply(variables, jnp.zeros((B, *h_shape)), None)


def test_conv_predictor_needs_spatial_activations():
    with pytest.raises(ValueError, match=r"got shape \(8,\)"):
        P.conv((4,)).init(jax.random.key(0), (8,), C)


def test_descriptions():
    assert P.linear().description == "linear"
    assert P.linear(conditioned=True).description == "clinear"
    assert P.mlp((16, 8)).description == "mlp[16, 8]"
    assert P.conv((4,), conditioned=True).description == "cconv[4]"
    assert P.linear(conditioned=True).conditioned and not P.mlp((4,)).conditioned
