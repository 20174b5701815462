"""Pure ``(init, apply)`` layers built on flax.linen through one adapter.

A :class:`Layer` is a pair of pure functions, in the style of
``jax.example_libraries.stax``:

* ``init(key, in_shape) -> (out_shape, variables)`` needs only the shape of one
  example (no batch dimension), so every synthetic-gradient predictor can be
  sized without data;
* ``apply(variables, x, *, train) -> (h, state)`` maps a batch ``x`` of shape
  ``(B, *in_shape)`` to ``h`` of shape ``(B, *out_shape)`` and returns the
  layer's new non-trainable state (batch-norm running statistics).

``variables`` is the flax variable dict: ``{"params": ..., "batch_stats": ...}``
(either collection may be absent). Only ``variables["params"]`` is trained;
everything else is *state* and is returned by ``apply``. Nothing mutates.

The DNI paper's blocks (Appendix A.1) are one line each, e.g. the MNIST FCN
hidden layer ``serial(dense(256), batch_norm(), relu)`` and the first CIFAR CNN
layer ``serial(conv(128, 5), batch_norm(), relu, max_pool(3))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Shape = tuple[int, ...]
Variables = dict[str, Any]


class Layer(NamedTuple):
    """A pure layer: ``init(key, in_shape) -> (out_shape, variables)`` and
    ``apply(variables, x, *, train) -> (h, state)``."""

    init: Callable[[jax.Array, Shape], tuple[Shape, Variables]]
    apply: Callable[..., tuple[jax.Array, Variables]]


def params_of(variables: Variables) -> Any:
    """The trainable part of a variable dict (``{}`` for parameter-free layers)."""
    return variables.get("params", {})


def state_of(variables: Variables) -> Variables:
    """Everything in a variable dict that is not trained (e.g. batch statistics)."""
    return {k: v for k, v in variables.items() if k != "params"}


def with_params(variables: Variables, params: Any) -> Variables:
    """``variables`` with its trainable part replaced by ``params``."""
    if not params and "params" not in variables:
        return dict(variables)
    return {**variables, "params": params}


def from_flax(
    module: nn.Module,
    call: Callable[[nn.Module, jax.Array, bool], jax.Array] | None = None,
) -> Layer:
    """Adapt a flax.linen module into a :class:`Layer`.

    ``call(module, x, train)`` says how to invoke the module (default
    ``module(x)``); batch norm uses it to map ``train`` to
    ``use_running_average``. Collections other than ``params`` are treated as
    mutable state while training.
    """
    call = call or (lambda m, x, train: m(x))

    def init(key, in_shape):
        x = jnp.zeros((1, *in_shape), jnp.float32)
        variables = module.init(key, x, False, method=call)
        variables = dict(variables)
        out = jax.eval_shape(
            lambda v, x: module.apply(v, x, False, method=call), variables, x
        )
        return tuple(out.shape[1:]), variables

    def apply(variables, x, *, train=False):
        state = state_of(variables)
        if train and state:
            h, new_state = module.apply(
                variables, x, True, method=call, mutable=list(state)
            )
            return h, dict(new_state)
        return module.apply(variables, x, train, method=call), state

    return Layer(init, apply)


def elementwise(fn: Callable[[jax.Array], jax.Array]) -> Layer:
    """A parameter-free layer applying ``fn`` to its input."""

    def init(key, in_shape):
        del key
        return tuple(jax.eval_shape(fn, jnp.zeros((1, *in_shape))).shape[1:]), {}

    def apply(variables, x, *, train=False):
        del train
        return fn(x), variables

    return Layer(init, apply)


relu = elementwise(jax.nn.relu)
sigmoid = elementwise(jax.nn.sigmoid)
tanh = elementwise(jnp.tanh)
identity = elementwise(lambda x: x)
flatten = elementwise(lambda x: x.reshape(x.shape[0], -1))


def dense(
    features: int,
    *,
    kernel_init: Callable | None = None,
    bias_init: Callable | None = None,
    use_bias: bool = True,
) -> Layer:
    """Fully connected layer ``x W + b`` on the last axis."""
    kwargs = {}
    if kernel_init is not None:
        kwargs["kernel_init"] = kernel_init
    if bias_init is not None:
        kwargs["bias_init"] = bias_init
    return from_flax(nn.Dense(features, use_bias=use_bias, **kwargs))


def conv(
    features: int,
    kernel_size: int | Sequence[int] = 5,
    *,
    kernel_init: Callable | None = None,
    bias_init: Callable | None = None,
) -> Layer:
    """Resolution-preserving (``SAME`` zero padding, stride 1) 2-D convolution, NHWC."""
    if isinstance(kernel_size, int):
        kernel_size = (kernel_size, kernel_size)
    kwargs = {}
    if kernel_init is not None:
        kwargs["kernel_init"] = kernel_init
    if bias_init is not None:
        kwargs["bias_init"] = bias_init
    return from_flax(nn.Conv(features, tuple(kernel_size), padding="SAME", **kwargs))


def batch_norm(*, momentum: float = 0.99, epsilon: float = 1e-5) -> Layer:
    """Batch normalisation over all axes but the last: batch statistics while
    training (updating the running averages held as state), running averages
    at evaluation."""
    module = nn.BatchNorm(momentum=momentum, epsilon=epsilon)
    return from_flax(module, lambda m, x, train: m(x, use_running_average=not train))


def max_pool(window: int = 3, stride: int | None = None, padding: str = "SAME") -> Layer:
    """Spatial max pooling (NHWC); stride defaults to the window (as in A.1: 3×3)."""
    stride = stride or window
    return elementwise(
        lambda x: nn.max_pool(x, (window, window), (stride, stride), padding=padding)
    )


def avg_pool(window: int = 3, stride: int | None = None, padding: str = "SAME") -> Layer:
    """Spatial average pooling (NHWC); stride defaults to the window."""
    stride = stride or window
    return elementwise(
        lambda x: nn.avg_pool(x, (window, window), (stride, stride), padding=padding)
    )


def serial(*layers: Layer) -> Layer:
    """Compose layers left to right.

    Variables are ``{"params": (p_1, ...), "state": (s_1, ...)}``, one entry per
    child, so :func:`params_of` / :func:`state_of` work on a composite exactly as
    on a leaf layer.
    """
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: argument {i} is {layer!r}, not an sgjax Layer")

    def init(key, in_shape):
        keys = jax.random.split(key, max(len(layers), 1))
        params, states = [], []
        shape = tuple(in_shape)
        for k, layer in zip(keys, layers):
            shape, v = layer.init(k, shape)
            params.append(params_of(v))
            states.append(state_of(v))
        return shape, {"params": tuple(params), "state": tuple(states)}

    def apply(variables, x, *, train=False):
        new_states = []
        for layer, p, s in zip(layers, variables["params"], variables["state"]):
            x, s = layer.apply(with_params(s, p), x, train=train)
            new_states.append(s)
        return x, {"state": tuple(new_states)}

    return Layer(init, apply)
