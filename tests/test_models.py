"""Any flax model, split (issue 19 §3): a flax.linen CNN, a flax.nnx MLP with dropout and
a flax.nnx transformer encoder on token sequences with cDNI per position.

Each trains a few steps with DNI through :func:`sgjax.sync`, and with every cut
``feedback.backprop()`` one update equals ``jax.grad`` of the unsplit model (dropout
included: both sides use the masks of the keys documented in :class:`sgjax.split.StageState`).
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sgjax
from sgjax import feedback as F
from sgjax import layers as L
from sgjax import losses
from sgjax import predictors as P
from sgjax.split import stage_rngs

needs_nnx_view = pytest.mark.skipif(
    not hasattr(nnx, "view"), reason="flax.nnx modules need flax >= 0.12.4 (nnx.view)")

B, C = 8, 4


# ------------------------------------------------------------------- models --


class ConvBlock(nn.Module):
    """linen: convolution, batch norm (batch statistics while training), ReLU."""

    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.features, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.relu(x)


class ConvHead(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.max_pool(x, (2, 2), (2, 2))
        return nn.Dense(C)(x.reshape(x.shape[0], -1))


def linen_cnn():
    block = lambda m, x, train: m(x, train)  # noqa: E731
    layers = [L.from_flax(ConvBlock(4), block), L.from_flax(ConvBlock(4), block),
              L.from_flax(ConvHead())]
    return layers, (6, 6, 1), jnp.float32, F.synthetic(P.conv((4,), 3))


class DropoutBlock(nnx.Module):
    """nnx: linear, ReLU, dropout (its own rng stream)."""

    def __init__(self, din, dout, *, rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)

    def __call__(self, x):
        return self.dropout(nnx.relu(self.linear(x)))


def nnx_mlp():
    rngs = nnx.Rngs(0)
    layers = [L.from_flax(DropoutBlock(6, 16, rngs=rngs)),
              L.from_flax(DropoutBlock(16, 16, rngs=rngs)),
              L.from_flax(nnx.Linear(16, C, rngs=rngs))]
    return layers, (6,), jnp.float32, F.synthetic(P.mlp((16,)))


VOCAB, T, D, HEADS, BLOCKS = 16, 8, 32, 2, 4


class Embed(nnx.Module):
    """Token and learned position embeddings: ``(B, T)`` ints → ``(B, T, D)``."""

    def __init__(self, *, rngs):
        self.tokens = nnx.Embed(VOCAB, D, rngs=rngs)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (T, D)))

    def __call__(self, tokens):
        return self.tokens(tokens) + self.positions[...]


class EncoderBlock(nnx.Module):
    """Pre-norm transformer encoder block: self-attention and an MLP, both residual."""

    def __init__(self, *, rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.hidden = nnx.Linear(D, 2 * D, rngs=rngs)
        self.out = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.out(nnx.gelu(self.hidden(self.norm2(x))))


def transformer():
    rngs = nnx.Rngs(0)
    layers = [L.from_flax(Embed(rngs=rngs), input_dtype=jnp.int32)]
    layers += [L.from_flax(EncoderBlock(rngs=rngs)) for _ in range(BLOCKS)]
    layers += [L.from_flax(nnx.Linear(D, C, rngs=rngs))]  # one class per token
    return layers, (T,), jnp.int32, F.synthetic(P.linear(conditioned=True, per_position=True))


MODELS = {"linen-cnn": linen_cnn, "nnx-mlp-dropout": nnx_mlp, "nnx-transformer": transformer}
# the transformer's six-stage programs take ~10-25 s to compile on a loaded 2-core machine
NAMES = ["linen-cnn", pytest.param("nnx-mlp-dropout", marks=needs_nnx_view),
         pytest.param("nnx-transformer", marks=[pytest.mark.slow, needs_nnx_view])]


@functools.cache
def model(name):
    return MODELS[name]()


@functools.cache
def batch(name):
    _, input_shape, dtype, _ = model(name)
    kx, ky = jax.random.split(jax.random.key(1))
    if dtype == jnp.int32:  # tokens; the label of a token is a function of it and its left
        x = jax.random.randint(kx, (B, *input_shape), 0, VOCAB)
        y = (x + jnp.roll(x, 1, axis=1)) % C
    else:
        x = jax.random.normal(kx, (B, *input_shape))
        y = jax.random.randint(ky, (B,), 0, C)
    return x, y


def split(name, feedback, optimizer):
    layers, input_shape, _, _ = model(name)
    return sgjax.split_at(layers, "every", feedback=feedback, optimizer=optimizer,
                          loss=losses.softmax_cross_entropy, input_shape=input_shape,
                          batch_size=B, num_classes=C)


# -------------------------------------------------------------------- tests --


@pytest.mark.parametrize("name", NAMES)
def test_backprop_everywhere_is_one_jax_grad_step(name):
    """Every cut ``backprop()`` and SGD(1): the update of every stage is exactly minus
    ``jax.grad`` of the unsplit model's loss (train mode, same dropout masks)."""
    s = split(name, F.backprop(), optax.sgd(1.0))
    x, y = batch(name)
    trainer = sgjax.sync(s)
    state = trainer.init(jax.random.key(0), (x, y))
    new, info = jax.jit(trainer.step)(state, (x, y))

    stages = state.stages
    layers = [layer for stage in s.stages for layer in stage.layers]
    layer_state = [ls for st in stages for ls in st.layer_state]
    rngs = []
    for stage, st in zip(s.stages, stages):
        keys = stage_rngs(st, len(stage.layers))
        rngs += list(keys) if keys is not None else [None] * len(stage.layers)

    @jax.jit
    def loss_and_grad(params):
        def loss(params):
            out, _ = L.run(layers, params, layer_state, x, train=True, rngs=rngs)
            return losses.softmax_cross_entropy(out, y)

        return jax.value_and_grad(loss)(params)

    params = [p for st in stages for p in st.params]
    value, grads = loss_and_grad(params)
    np.testing.assert_allclose(info["loss"], value, rtol=1e-6)
    steps = jax.tree.map(jnp.subtract, params, [p for st in new.stages for p in st.params])
    chex.assert_trees_all_close(steps, grads, rtol=1e-4, atol=1e-6)
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", NAMES)
def test_dni_trains_a_few_steps(name):
    """Loss finite and every stage updated: a stage's synthetic gradient is non-zero once
    the predictors above it have been fitted, so K stages need K steps."""
    _, _, _, feedback = model(name)
    s = split(name, feedback, optax.adam(1e-2))
    x, y = batch(name)
    trainer = sgjax.sync(s)
    state = trainer.init(jax.random.key(0), (x, y))
    steps = len(s.stages) + 1
    runs, infos = sgjax.fused(trainer)(state, jax.tree.map(lambda a: jnp.stack([a] * steps),
                                                           (x, y)))
    assert np.all(np.isfinite(infos["loss"]))
    for before, after in zip(state.stages, runs.stages):
        assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                            jax.tree.leaves(after.params)))
    assert np.all(np.asarray(infos["sg_loss/0"][-1]) > 0)  # the predictors are fitted
    out = trainer.apply(runs, x)  # inference: deterministic, any batch size
    chex.assert_shape(out, (B, *s.stages[-1].out_shape))
    np.testing.assert_allclose(out[:2], trainer.apply(runs, x[:2]), rtol=1e-6, atol=1e-6)


@needs_nnx_view
def test_transformer_cdni_predictor_reads_each_tokens_label():
    s = split("nnx-transformer", model("nnx-transformer")[3], optax.adam(1e-2))
    assert s.stages[0].feedback.name == "cDNI"
    state = s.init(jax.random.key(0))
    kernel = L.params_of(state[0].feedback.variables)[0]["kernel"]
    chex.assert_shape(kernel, (D + C, D))  # one model for all T positions, label appended
    x, y = batch("nnx-transformer")
    chex.assert_shape(s.label_fn(y), (B, T, C))


@needs_nnx_view
def test_dropout_masks_change_every_step_and_inference_is_deterministic():
    s = split("nnx-mlp-dropout", model("nnx-mlp-dropout")[3], optax.adam(1e-2))
    x, _ = batch("nnx-mlp-dropout")
    states = s.init(jax.random.key(0))
    forward = jax.jit(s.stages[0].forward)
    h0 = forward(states[0], x)
    h1 = forward(states[0]._replace(step=states[0].step + 1), x)  # the next update's masks
    assert 0 < float(jnp.mean(h0 == 0)) < 1
    assert not np.array_equal(h0 == 0, h1 == 0)
    np.testing.assert_array_equal(forward(states[0], x), h0)
    apply = jax.jit(s.apply)
    np.testing.assert_array_equal(apply(states, x), apply(states, x))
    linear = states[0].params[0]["linear"]  # inference: no mask, no 1/(1 - rate) scaling
    np.testing.assert_allclose(jax.jit(s.stages[0].apply)(states[0], x),
                               jax.nn.relu(x @ linear["kernel"] + linear["bias"]), rtol=1e-5,
                               atol=1e-6)
