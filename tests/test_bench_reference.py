"""The benchmark's hand-written plain-JAX DNI step (``benchmarks/plain_reference``)
is the yardstick ``make bench`` measures sgjax against, so it must do exactly
DNI's arithmetic: each block backpropagates its synthetic model's prediction,
each synthetic model is regressed onto the true one-block gradient from above,
and its cost (XLA FLOPs) equals sgjax's DNI step's."""

from __future__ import annotations

import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgjax
from sgjax import feedback as F
from sgjax import layers as L
from sgjax import predictors as P

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "plain_reference.py"
_spec = importlib.util.spec_from_file_location("plain_reference", _PATH)
plain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain)

DEPTH, WIDTH, N_IN, BATCH = 4, 16, 12, 8


# The network the benchmark documents, written here independently of its module (whose
# helpers are private): dense, batch norm on the batch's statistics, ReLU; a linear head;
# the batch-mean softmax cross-entropy.
def block(p, h):
    z = h @ p["w"] + p["b"]
    z = (z - jnp.mean(z, axis=0)) * jax.lax.rsqrt(jnp.var(z, axis=0) + 1e-5)
    return jax.nn.relu(z * p["scale"] + p["bias"])


def head(p, h):
    return h @ p["w"] + p["b"]


def task_loss(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _random_params():
    params = plain.init(jax.random.key(0), DEPTH, WIDTH, N_IN, synthetic=True)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    # non-zero synthetic models, so the blocks' gradients are not trivially zero
    return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)


def _batch():
    x = jax.random.normal(jax.random.key(2), (BATCH, N_IN))
    y = jax.random.randint(jax.random.key(3), (BATCH,), 0, 10)
    return x, y


def test_dni_grads_are_dni_fig2_arithmetic():
    params, (x, y) = _random_params(), _batch()
    grads = plain.dni_grads(params, x, y)
    hs = [x]
    for b in params["blocks"]:
        hs.append(block(b, hs[-1]))

    def head_loss(p, h):
        return task_loss(head(p, h), y)

    np.testing.assert_allclose(grads["head"]["w"],
                               jax.grad(head_loss)(params["head"], hs[-1])["w"], atol=1e-6)
    delta = jax.grad(head_loss, argnums=1)(params["head"], hs[-1])
    for i in reversed(range(DEPTH - 1)):
        sg = params["sg"][i]

        def sg_loss(a, c, h=hs[i + 1], delta=delta):
            return 0.5 * jnp.sum((h @ a + c - delta) ** 2)

        da, dc = jax.grad(sg_loss, argnums=(0, 1))(sg["a"], sg["c"])
        np.testing.assert_allclose(grads["sg"][i]["a"], da, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grads["sg"][i]["c"], dc, rtol=1e-5, atol=1e-6)
        predicted = hs[i + 1] @ sg["a"] + sg["c"]
        _, vjp = jax.vjp(block, params["blocks"][i], hs[i])
        block_grad, delta = vjp(predicted)
        for name in ("w", "b", "scale", "bias"):
            np.testing.assert_allclose(grads["blocks"][i][name], block_grad[name],
                                       rtol=1e-5, atol=1e-6)


def test_backprop_grads_equal_jax_grad_of_the_network():
    params, (x, y) = {**_random_params(), "sg": []}, _batch()

    def loss(p):
        h = x
        for b in p["blocks"]:
            h = block(b, h)
        return task_loss(head(p["head"], h), y)

    chex.assert_trees_all_close(plain.backprop_grads(params, x, y), jax.grad(loss)(params),
                                atol=1e-6)


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


@pytest.mark.parametrize("synthetic", [False, True], ids=["Bprop", "DNI"])
def test_plain_step_does_sgjax_steps_arithmetic(synthetic):
    """Same network, same batch: the hand-written step's FLOPs are within 2 % of
    sgjax's (so the benchmark compares equal work)."""
    optimizer = optax.adam(1e-3)
    x, y = jnp.ones((64, 784)), jnp.zeros((64,), jnp.int32)
    params = plain.init(jax.random.key(0), 4, 128, 784, synthetic=synthetic)
    grads_fn = plain.dni_grads if synthetic else plain.backprop_grads

    def plain_step(params, opt_state, x, y):
        return optimizer.update(grads_fn(params, x, y), opt_state, params)

    net = [L.serial(L.dense(128), L.batch_norm(), L.relu) for _ in range(3)] + [L.dense(10)]
    split = sgjax.split_at(
        net, "every" if synthetic else (), feedback=F.synthetic(P.linear()) if synthetic
        else None, loss=sgjax.losses.softmax_cross_entropy, optimizer=optimizer,
        input_shape=(784,), batch_size=64, num_classes=10)
    schedule = sgjax.sync(split)
    ours = _flops(schedule.step, schedule.init(jax.random.key(0), (x, y)), (x, y))
    theirs = _flops(plain_step, params, optimizer.init(params), x, y)
    assert abs(ours / theirs - 1) < 0.02, (ours, theirs)
