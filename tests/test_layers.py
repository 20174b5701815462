"""sgjax.layers: shapes, variable structure, batch norm train vs eval, flax.nnx modules and
the rng path of stochastic layers."""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgjax import layers as L

needs_nnx_view = pytest.mark.skipif(
    not hasattr(nnx, "view"), reason="flax.nnx modules need flax >= 0.12.4 (nnx.view)")

B = 4


def abstract_init(layer, in_shape):
    """``layer.init`` evaluated abstractly: ``(out_shape, variables as ShapeDtypeStructs)``."""
    box = {}

    def init(key):
        box["shape"], variables = layer.init(key, in_shape)
        return variables

    variables = jax.eval_shape(init, jax.random.key(0))
    return box["shape"], variables


@pytest.mark.parametrize(
    "layer, in_shape, out_shape",
    [
        (L.dense(16), (8,), (16,)),
        (L.dense(3, use_bias=False), (5,), (3,)),
        (L.conv(6, 3), (8, 8, 2), (8, 8, 6)),  # resolution preserving
        (L.conv(4, (3, 5)), (7, 9, 1), (7, 9, 4)),
        (L.max_pool(3), (9, 9, 2), (3, 3, 2)),
        (L.max_pool(2, 1, "VALID"), (5, 5, 2), (4, 4, 2)),
        (L.avg_pool(2), (8, 8, 3), (4, 4, 3)),
        (L.flatten, (4, 4, 3), (48,)),
        (L.relu, (5,), (5,)),
        (L.tanh, (2, 3), (2, 3)),
        (L.identity, (7,), (7,)),
        (L.batch_norm(), (6,), (6,)),
        (L.batch_norm(), (4, 4, 3), (4, 4, 3)),
        (L.serial(L.conv(4, 3), L.batch_norm(), L.relu, L.max_pool(2), L.flatten, L.dense(5)),
         (8, 8, 1), (5,)),
    ],
)
def test_init_shape_matches_apply(layer, in_shape, out_shape):
    # Abstract evaluation only (no compilation): shapes are all this test is about.
    shape, variables = abstract_init(layer, in_shape)
    assert shape == out_shape
    x = jax.ShapeDtypeStruct((B, *in_shape), jnp.float32)
    for train in (False, True):
        h, state = jax.eval_shape(lambda v, x, t=train: layer.apply(v, x, train=t), variables, x)
        chex.assert_shape(h, (B, *out_shape))
        chex.assert_trees_all_equal_shapes(state, L.state_of(variables))


def test_dense_and_conv_param_shapes():
    _, v = abstract_init(L.dense(16), (8,))
    chex.assert_shape(v["params"]["kernel"], (8, 16))
    chex.assert_shape(v["params"]["bias"], (16,))
    _, v = abstract_init(L.dense(16, use_bias=False), (8,))
    assert set(v["params"]) == {"kernel"}
    _, v = abstract_init(L.conv(6, (3, 5)), (8, 8, 2))
    chex.assert_shape(v["params"]["kernel"], (3, 5, 2, 6))
    _, v = abstract_init(L.batch_norm(), (4, 4, 3))
    chex.assert_shape([v["params"]["scale"], v["batch_stats"]["mean"]], [(3,), (3,)])


def test_dense_matches_formula_and_custom_init():
    ones = jax.nn.initializers.ones
    layer = L.dense(3, kernel_init=ones, bias_init=ones)
    _, v = layer.init(jax.random.key(0), (2,))
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
    h, _ = layer.apply(v, x)
    np.testing.assert_array_equal(h, x @ jnp.ones((2, 3)) + 1.0)


def test_pools_and_flatten_values():
    x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    h, _ = L.max_pool(2).apply({}, x)
    np.testing.assert_array_equal(h[0, :, :, 0], jnp.array([[5.0, 7.0], [13.0, 15.0]]))
    h, _ = L.avg_pool(2).apply({}, x)
    np.testing.assert_array_equal(h[0, :, :, 0], jnp.array([[2.5, 4.5], [10.5, 12.5]]))
    h, _ = L.flatten.apply({}, x)
    np.testing.assert_array_equal(h, x.reshape(2, 16))
    np.testing.assert_array_equal(L.relu.apply({}, jnp.array([-1.0, 2.0]))[0], [0.0, 2.0])


def test_parameter_free_layers_have_no_variables():
    for layer in (L.relu, L.sigmoid, L.tanh, L.identity, L.flatten, L.max_pool(2)):
        _, v = abstract_init(layer, (4, 4, 2))
        assert v == {}
        assert L.params_of(v) == {}
        assert L.state_of(v) == {}


def test_params_state_helpers():
    _, v = L.batch_norm().init(jax.random.key(0), (3,))
    assert set(L.state_of(v)) == {"batch_stats"}
    assert set(L.params_of(v)) == {"scale", "bias"}
    new = L.with_params(L.state_of(v), {"scale": jnp.zeros(3), "bias": jnp.ones(3)})
    np.testing.assert_array_equal(new["params"]["bias"], jnp.ones(3))
    assert new["batch_stats"] is v["batch_stats"]
    assert L.with_params({}, {}) == {}


def test_serial_structure_and_equivalence():
    a, b = L.dense(5), L.serial(L.batch_norm(), L.relu)
    net = L.serial(a, b, L.dense(2))
    shape, v = net.init(jax.random.key(0), (3,))
    assert shape == (2,)
    assert set(v) == {"params", "state"}
    assert len(v["params"]) == len(v["state"]) == 3
    x = jax.random.normal(jax.random.key(1), (B, 3))
    h, state = net.apply(v, x, train=True)
    # Same computation done by hand, child by child.
    ref = x
    for layer, p, s in zip((a, b, L.dense(2)), v["params"], v["state"]):
        ref, _ = layer.apply(L.with_params(s, p), ref, train=True)
    np.testing.assert_allclose(h, ref, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal_shapes(state, L.state_of(v))


def test_serial_rejects_non_layers():
    with pytest.raises(TypeError, match="argument 1 is 'relu'"):
        L.serial(L.dense(3), "relu")


def test_batch_norm_train_vs_eval():
    layer = L.batch_norm(momentum=0.9, epsilon=1e-5)
    _, v = layer.init(jax.random.key(0), (3,))
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (64, 3))

    # Training: normalised with the batch's own statistics, running averages move.
    h, new_state = layer.apply(v, x, train=True)
    np.testing.assert_allclose(jnp.mean(h, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(h, 0), 1.0, atol=1e-3)
    stats = new_state["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.1 * jnp.mean(x, 0), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * jnp.var(x, 0), rtol=1e-5)

    # Evaluation: running averages (initially mean 0, var 1), state unchanged.
    h_eval, same = layer.apply(v, x, train=False)
    np.testing.assert_allclose(h_eval, x / jnp.sqrt(1.0 + 1e-5), rtol=1e-6)
    chex.assert_trees_all_equal(same, L.state_of(v))

    # Evaluation with the updated statistics uses them, not the batch's.
    h_eval2, _ = layer.apply({**v, **new_state}, x, train=False)
    expected = (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
    np.testing.assert_allclose(h_eval2, expected, rtol=1e-5, atol=1e-5)


def test_layers_are_pure():
    layer = L.serial(L.dense(4), L.batch_norm())
    _, v = layer.init(jax.random.key(0), (3,))
    before = jax.tree.map(jnp.copy, v)
    x = jax.random.normal(jax.random.key(1), (B, 3))
    h1, _ = layer.apply(v, x, train=True)
    h2, _ = layer.apply(v, x, train=True)
    np.testing.assert_array_equal(h1, h2)
    chex.assert_trees_all_equal(v, before)


# ------------------------------------------------------------ flax.nnx, rng --


class NnxBlock(nnx.Module):
    """Linear → BatchNorm → Dropout: parameters, batch statistics and an rng stream."""

    def __init__(self, din, dout, rate, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.norm = nnx.BatchNorm(dout, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(rate, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.norm(self.linear(x)))


@needs_nnx_view
def test_nnx_linear_is_a_pure_layer():
    module = nnx.Linear(3, 5, rngs=nnx.Rngs(0))
    layer = L.from_flax(module)
    assert not layer.stochastic
    shape, v = layer.init(jax.random.key(1), (3,))
    assert shape == (5,)
    assert set(v) == {"params"}
    np.testing.assert_array_equal(v["params"]["kernel"], module.kernel.get_value())
    x = jax.random.normal(jax.random.key(2), (B, 3))
    h, state = jax.jit(lambda v, x: layer.apply(v, x, train=True))(v, x)
    np.testing.assert_allclose(h, module(x), rtol=1e-6)
    assert state == {}
    # trainable through the variables dict
    g = jax.grad(lambda p: jnp.sum(layer.apply(L.with_params(v, p), x)[0]))(v["params"])
    np.testing.assert_allclose(g["kernel"], jnp.broadcast_to(jnp.sum(x, 0)[:, None], (3, 5)),
                               rtol=1e-5)


@needs_nnx_view
def test_nnx_batch_norm_train_vs_eval_and_module_untouched():
    module = NnxBlock(3, 4, 0.0, rngs=nnx.Rngs(0))
    layer = L.from_flax(module)
    _, v = layer.init(jax.random.key(0), (3,))
    assert set(v) == {"params", "batch_stats"}
    assert set(v["params"]) == {"linear", "norm"}
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (64, 3))
    h, new_state = layer.apply(v, x, train=True, rng=jax.random.key(5))
    np.testing.assert_allclose(jnp.mean(h, 0), 0.0, atol=1e-4)  # batch statistics
    a = module.linear(x)
    np.testing.assert_allclose(new_state["batch_stats"]["norm"]["mean"], 0.1 * jnp.mean(a, 0),
                               rtol=1e-4, atol=1e-6)
    h_eval, same = layer.apply(v, x)  # running averages (0, 1): unchanged state
    np.testing.assert_allclose(h_eval, a / jnp.sqrt(1.0 + 1e-5), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(same, L.state_of(v))
    # the user's module is neither put in a mode nor updated
    assert module.dropout.deterministic is False and module.norm.use_running_average is False
    np.testing.assert_array_equal(module.norm.mean.get_value(), jnp.zeros(4))


@needs_nnx_view
def test_nnx_dropout_gets_its_rng_while_training_and_none_at_inference():
    module = NnxBlock(3, 64, 0.5, rngs=nnx.Rngs(0))
    layer = L.from_flax(module)
    assert layer.stochastic
    _, v = layer.init(jax.random.key(0), (3,))
    assert "rngs" not in v and "RngKey" not in str(jax.tree.structure(v))
    x = jax.random.normal(jax.random.key(1), (8, 3))
    train = jax.jit(lambda v, x, key: layer.apply(v, x, train=True, rng=key)[0])
    h1, h1_again, h2 = train(v, x, jax.random.key(3)), train(v, x, jax.random.key(3)), \
        train(v, x, jax.random.key(4))
    np.testing.assert_array_equal(h1, h1_again)  # a function of the key
    assert not np.array_equal(np.asarray(h1) == 0, np.asarray(h2) == 0)  # other masks
    assert 0.3 < float(jnp.mean(h1 == 0)) < 0.7
    raw = train(v, x, jax.random.PRNGKey(3))  # raw uint32 keys work too
    chex.assert_shape(raw, h1.shape)
    h_eval, _ = layer.apply(v, x)  # deterministic: no rng, no mask
    np.testing.assert_array_equal(h_eval, layer.apply(v, x)[0])
    assert not np.any(np.asarray(h_eval) == 0)
    with pytest.raises(ValueError, match="pass rng="):
        layer.apply(v, x, train=True)


class AlwaysNoisy(nnx.Module):
    """Draws from its stream in every mode (no ``deterministic`` attribute)."""

    def __init__(self, rngs):
        self.rngs = rngs

    def __call__(self, x):
        return x + jax.random.normal(self.rngs.noise(), x.shape)


@needs_nnx_view
def test_nnx_module_that_draws_at_inference_is_rejected():
    layer = L.from_flax(AlwaysNoisy(nnx.Rngs(noise=0)))
    with pytest.raises(ValueError, match="at inference"):
        layer.init(jax.random.key(0), (3,))


@needs_nnx_view
def test_nnx_wrong_input_shape_is_named():
    layer = L.from_flax(nnx.Linear(3, 5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"inputs of shape \(4,\)"):
        layer.init(jax.random.key(0), (4,))


class LinenDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dropout(0.5, deterministic=not train)(nn.Dense(32)(x))


def test_linen_dropout_gets_the_dropout_stream():
    layer = L.from_flax(LinenDropout(), lambda m, x, train: m(x, train))
    assert layer.stochastic
    _, v = layer.init(jax.random.key(0), (3,))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    h1, _ = layer.apply(v, x, train=True, rng=jax.random.key(7))
    h2, _ = layer.apply(v, x, train=True, rng=jax.random.key(8))
    ref = LinenDropout().apply(v, x, True, rngs={"dropout": jax.random.fold_in(
        jax.random.key(7), 0)})
    np.testing.assert_array_equal(h1, ref)
    assert not np.array_equal(h1, h2)
    h_eval, _ = layer.apply(v, x)
    np.testing.assert_array_equal(h_eval, LinenDropout().apply(v, x, False))
    with pytest.raises(ValueError, match="while training without rng="):
        layer.apply(v, x, train=True)


def test_linen_dropout_that_ignores_train_is_named_at_inference():
    layer = L.from_flax(nn.Dropout(0.5, deterministic=False))
    with pytest.raises(ValueError, match="deterministic=not train"):  # found at init
        layer.init(jax.random.key(0), (3,))


def test_built_in_layers_are_deterministic_and_serial_passes_rng_to_stochastic_children():
    for layer in (L.dense(3), L.conv(2, 3), L.batch_norm(), L.relu, L.serial(L.dense(2))):
        assert not layer.stochastic

    seen = {}

    def plain_apply(variables, x, *, train=False):  # a user layer without rng
        return x + 1.0, variables

    def noisy_apply(variables, x, *, train=False, rng=None):
        seen[len(seen)] = rng
        return x, variables

    plain = L.Layer(lambda key, s: (tuple(s), {}), plain_apply)
    noisy = L.Layer(lambda key, s: (tuple(s), {}), noisy_apply, stochastic=True)
    net = L.serial(plain, noisy, plain, noisy)
    assert net.stochastic
    _, v = net.init(jax.random.key(0), (2,))
    h, _ = L.apply_layer(net, v, jnp.zeros((1, 2)), train=True, rng=jax.random.key(9))
    np.testing.assert_array_equal(h, 2.0)
    for i, child in ((0, 1), (1, 3)):
        np.testing.assert_array_equal(jax.random.key_data(seen[i]), jax.random.key_data(
            jax.random.fold_in(jax.random.key(9), child)))


@pytest.mark.parametrize("bad", [nnx.Rngs(0), "dense", lambda x: x])
def test_from_flax_rejects_non_modules(bad):
    with pytest.raises(TypeError, match="flax.linen or flax.nnx Module"):
        L.from_flax(bad)


@pytest.mark.parametrize("module", [
    nn.Embed(10, 4),
    pytest.param(nnx.Embed(10, 4, rngs=nnx.Rngs(0)), marks=needs_nnx_view)], ids=["linen", "nnx"])
def test_input_dtype_lets_init_trace_a_token_embedding(module):
    layer = L.from_flax(module, input_dtype=jnp.int32)
    shape, v = layer.init(jax.random.key(0), (7,))
    assert shape == (7, 4)
    h, _ = layer.apply(v, jnp.arange(14).reshape(2, 7) % 10)
    chex.assert_shape(h, (2, 7, 4))


def test_nnx_on_a_flax_without_nnx_view_is_one_clear_error(monkeypatch):
    monkeypatch.delattr(nnx, "view", raising=False)
    with pytest.raises(RuntimeError, match=r"need flax >= 0\.12\.4"):
        L.from_flax(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
