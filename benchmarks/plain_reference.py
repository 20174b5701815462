"""Hand-written plain-JAX backprop and DNI steps on the benchmark's shape, the
yardstick for ``step_time.py``: how fast can *this* DNI step be written without
sgjax, on the same machine, in the same run?

The network is the one of ``step_time.network()``: ``DEPTH - 1`` hidden blocks
``dense(WIDTH) → batch norm (batch statistics) → relu`` and a ``dense(10)``
output, softmax cross-entropy averaged over the batch, one ``optax.adam`` over
every parameter. The DNI step puts a zero-initialised linear synthetic-gradient
model ``M_i(h) = h A_i + c_i`` after every hidden block (DNI §2, Fig. 2): each
block backpropagates ``M_i(h_i)`` instead of the true gradient, and ``M_i`` is
regressed (``½‖M_i(h_i) − δ_i‖²``, per example, summed) onto the gradient
``δ_i`` the block above sends down for the same batch — the arithmetic of one
DNI step (one prediction and one weight gradient per interface), with the
prediction reused by the fit and nothing else: no running batch-norm
averages, no messages, no per-stage optimiser states. It is a floor for the
time, not a second implementation to train with.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _block(p, h):
    z = h @ p["w"] + p["b"]
    mean = jnp.mean(z, axis=0)
    var = jnp.var(z, axis=0)
    z = (z - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]
    return jax.nn.relu(z)


def _head(p, h):
    return h @ p["w"] + p["b"]


def _loss(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def init(key, depth, width, n_in, n_out=10, *, synthetic):
    """Parameters ``{"blocks": [...], "head": ..., "sg": [...]}`` (``sg`` empty
    for backprop), He-initialised layers, zero synthetic-gradient models."""
    keys = jax.random.split(key, depth)
    blocks, fan_in = [], n_in
    for k in keys[:-1]:
        blocks.append({
            "w": jax.random.normal(k, (fan_in, width)) * jnp.sqrt(2.0 / fan_in),
            "b": jnp.zeros(width), "scale": jnp.ones(width), "bias": jnp.zeros(width),
        })
        fan_in = width
    head = {"w": jax.random.normal(keys[-1], (width, n_out)) * jnp.sqrt(1.0 / width),
            "b": jnp.zeros(n_out)}
    sg = [{"a": jnp.zeros((width, width)), "c": jnp.zeros(width)}
          for _ in blocks] if synthetic else []
    return {"blocks": blocks, "head": head, "sg": sg}


def backprop_grads(params, x, y):
    """``jax.grad`` of the whole network's loss."""
    def loss(p):
        h = x
        for b in p["blocks"]:
            h = _block(b, h)
        return _loss(_head(p["head"], h), y)

    return jax.grad(loss)(params)


def dni_grads(params, x, y):
    """One DNI step's gradients: every block updates from its synthetic model's
    prediction, and every synthetic model from the true one-block gradient."""
    hs, vjps = [x], []
    for b in params["blocks"]:
        h, vjp = jax.vjp(_block, b, hs[-1])
        hs.append(h)
        vjps.append(vjp)
    head_grad, delta = jax.grad(
        lambda p, h: _loss(_head(p, h), y), argnums=(0, 1))(params["head"], hs[-1])
    block_grads = [None] * len(vjps)
    sg_grads = [None] * len(vjps)
    for i in reversed(range(len(vjps))):
        sg = params["sg"][i]
        h = jax.lax.stop_gradient(hs[i + 1])
        predicted = h @ sg["a"] + sg["c"]
        error = predicted - delta  # δ_i: the true gradient from the block above
        sg_grads[i] = {"a": h.T @ error, "c": jnp.sum(error, axis=0)}
        block_grads[i], delta = vjps[i](predicted)
    return {"blocks": block_grads, "head": head_grad, "sg": sg_grads}


def fused_step(grads_fn, optimizer):
    """``(params, opt_state), (xs, ys) → ...``: a ``lax.scan`` over a chunk of
    batches, jitted with the carried state donated (as ``sgjax.fused``)."""
    def step(carry, batch):
        params, opt_state = carry
        grads = grads_fn(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    def run(carry, xs, ys):
        carry, _ = jax.lax.scan(step, carry, (xs, ys))
        return carry

    return jax.jit(run, donate_argnums=(0,))
