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


# --------------------------------------------------- per position, sequences --

T, D = 5, 6


@pytest.mark.parametrize("conditioned", [False, True])
def test_per_position_mlp_is_one_dense_model_applied_at_every_position(conditioned):
    predictor = P.mlp((7,), conditioned=conditioned, per_position=True, batch_norm=False)
    variables = predictor.init(jax.random.key(0), (T, D), C)
    first, _, last = L.params_of(variables)  # dense, relu, zero dense: no T anywhere
    chex.assert_shape([first["kernel"], last["kernel"]], [(D + C * conditioned, 7), (7, D)])
    last = {"kernel": jax.random.normal(jax.random.key(3), (7, D)), "bias": jnp.ones(D)}
    variables = {**variables, "params": (first, {}, last)}
    h = jax.random.normal(jax.random.key(1), (B, T, D))
    y = jax.nn.one_hot(jax.random.randint(jax.random.key(2), (B, T), 0, C), C)
    s, _ = predictor.apply(variables, h, y if conditioned else None)
    chex.assert_shape(s, (B, T, D))
    for t in range(T):  # position t alone, through the same model
        z = jnp.concatenate([h[:, t], y[:, t]], -1) if conditioned else h[:, t]
        ref = jax.nn.relu(z @ first["kernel"] + first["bias"]) @ last["kernel"] + last["bias"]
        np.testing.assert_allclose(s[:, t], ref, rtol=1e-5, atol=1e-5)


def test_per_position_and_flat_agree_on_dense_activations():
    h, y = jax.random.normal(jax.random.key(1), (B, D)), labels()
    outs = []
    for per_position in (False, True):
        predictor = P.mlp((7,), conditioned=True, per_position=per_position)
        variables = predictor.init(jax.random.key(0), (D,), C)
        outs.append(jax.tree.leaves(L.params_of(variables)))
        params = jax.tree.map(lambda p: p + 0.1, L.params_of(variables))
        outs.append(predictor.apply(L.with_params(variables, params), h, y, train=True)[0])
    chex.assert_trees_all_equal(outs[0], outs[2])  # the same model, from the same key
    np.testing.assert_array_equal(outs[1], outs[3])


def test_example_labels_condition_every_position_of_a_sequence():
    pick = L.elementwise(lambda x: x[..., -C:])
    predictor = P.from_layer(pick, conditioned=True)
    predictor.init(jax.random.key(0), (T, C), C)
    y = labels()
    out, _ = predictor.apply({}, jnp.zeros((B, T, C)), y)  # a raw broadcast error before
    np.testing.assert_array_equal(out, jnp.broadcast_to(y[:, None], (B, T, C)))
    per_token = jax.nn.one_hot(jnp.arange(B * T).reshape(B, T) % C, C)
    out, _ = predictor.apply({}, jnp.zeros((B, T, C)), per_token)
    np.testing.assert_array_equal(out, per_token)
    with pytest.raises(ValueError, match=rf"activations of shape \({B}, {T}, {C}\) on labels "
                                         rf"of shape \({B}, {T + 1}, {C}\)"):
        predictor.apply({}, jnp.zeros((B, T, C)), jnp.zeros((B, T + 1, C)))


def test_a_model_of_sequence_activations_stays_small():
    """T = 512, D = 768, 1024 hidden units: a flattening model would hold ~1.5e11 weights."""
    predictor = P.mlp((1024,), conditioned=True, per_position=True)
    variables = jax.eval_shape(lambda k: predictor.init(k, (512, 768), 10), jax.random.key(0))
    size = sum(p.size for p in jax.tree.leaves(L.params_of(variables)))
    assert size == (768 + 10) * 1024 + 1024 + 2 * 1024 + 1024 * 768 + 768


def test_mlp_layers_are_built_once_per_activation_shape(monkeypatch):
    built = []
    serial = L.serial
    monkeypatch.setattr(L, "serial", lambda *layers: built.append(1) or serial(*layers))
    predictor = P.mlp((4,))
    variables = predictor.init(jax.random.key(0), (3,), C)
    for _ in range(3):
        predictor.apply(variables, jnp.ones((B, 3)), train=True)
    assert len(built) == 1
    predictor.init(jax.random.key(0), (5,), C)
    assert len(built) == 2


@pytest.mark.parametrize("hidden", [(-4,), (0,), (16, 0), (4.5,), ("8",), (True,), 16, "16"])
@pytest.mark.parametrize("make", [P.mlp, P.conv], ids=["mlp", "conv"])
def test_non_positive_widths_are_rejected_at_construction(make, hidden):
    with pytest.raises(ValueError, match=r"(width .* is not a positive integer|sequence of "
                                         r"layer widths)"):
        make(hidden)


def test_conv_kernel_size_must_be_positive():
    with pytest.raises(ValueError, match=r"kernel_size=0"):
        P.conv((4,), 0)
