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

A layer that draws random numbers while training (dropout) is *stochastic*:
``Layer.stochastic`` is true and its ``apply`` takes ``rng=`` (a PRNG key) with
``train=True``; at inference (``train=False``) it gets none and is deterministic.
:func:`apply_layer` passes ``rng`` only to stochastic layers, so a layer whose
``apply`` has no ``rng`` parameter keeps working.

Any flax model becomes a layer through :func:`from_flax`: a ``flax.linen``
module, or a ``flax.nnx`` module (split into its graph and state; the state is
held as the same variable dict, so the layer stays pure).

The DNI paper's blocks (Appendix A.1) are one line each, e.g. the MNIST FCN
hidden layer ``serial(dense(256), batch_norm(), relu)`` and the first CIFAR CNN
layer ``serial(conv(128, 5), batch_norm(), relu, max_pool(3))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax
import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

Shape = tuple[int, ...]
Variables = dict[str, Any]


class Layer(NamedTuple):
    """A pure layer: ``init(key, in_shape) -> (out_shape, variables)`` and
    ``apply(variables, x, *, train) -> (h, state)``.

    ``stochastic``: the layer draws random numbers while training (dropout), so
    its ``apply`` also takes ``rng=`` (a PRNG key, given with ``train=True``
    only). Call layers through :func:`apply_layer`, which passes ``rng`` only
    where it is wanted."""

    init: Callable[[jax.Array, Shape], tuple[Shape, Variables]]
    apply: Callable[..., tuple[jax.Array, Variables]]
    stochastic: bool = False


def apply_layer(layer: Layer, variables: Variables, x: jax.Array, *, train: bool = False,
                rng: jax.Array | None = None) -> tuple[jax.Array, Variables]:
    """``layer.apply(variables, x, train=train)``, with ``rng=rng`` added for a
    stochastic layer (a deterministic layer never sees it)."""
    if layer.stochastic:
        return layer.apply(variables, x, train=train, rng=rng)
    return layer.apply(variables, x, train=train)


def run(layers: Sequence[Layer], params: Sequence[Any], states: Sequence[Variables],
        x: jax.Array, *, train: bool = False, rngs: Sequence[jax.Array] | None = None
        ) -> tuple[jax.Array, tuple[Variables, ...]]:
    """Apply ``layers`` in order, layer ``i`` with trainable ``params[i]`` and state
    ``states[i]`` (and, if stochastic, the key ``rngs[i]``); returns the output and
    every layer's new state. The one chain runner behind :func:`serial` and
    :func:`sgjax.split_at`'s stages."""
    new_states = []
    for i, (layer, p, s) in enumerate(zip(layers, params, states)):
        rng = None if rngs is None else rngs[i]
        x, s = apply_layer(layer, with_params(s, p), x, train=train, rng=rng)
        new_states.append(s)
    return x, tuple(new_states)


def layer_rngs(rng: jax.Array | None, n: int) -> tuple[jax.Array, ...] | None:
    """One key per layer of a chain of ``n`` (``fold_in(rng, i)``), ``None`` without ``rng``."""
    if rng is None:
        return None
    return tuple(jax.random.fold_in(rng, i) for i in range(n))


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
    module: nn.Module | nnx.Module,
    call: Callable[[Any, jax.Array, bool], jax.Array] | None = None,
    *,
    rng_streams: Sequence[str] = ("dropout",),
    input_dtype: Any = jnp.float32,
) -> Layer:
    """Adapt a flax module, ``flax.linen`` or ``flax.nnx``, into a :class:`Layer`.

    ``call(module, x, train)`` says how to invoke the module (default
    ``module(x)``); batch norm uses it to map ``train`` to
    ``use_running_average``. ``input_dtype`` is the dtype of the example input
    ``init`` traces the module with (e.g. ``jnp.int32`` for a token embedding).

    *linen*: ``init`` initialises the module from the key; collections other
    than ``params`` are state, mutable while training. While training the
    module gets the rng streams ``rng_streams`` (each ``fold_in(rng, i)``), so
    ``nn.Dropout`` works; map ``train`` to its ``deterministic`` flag in
    ``call`` (e.g. ``lambda m, x, train: m(x, train=train)``) so inference
    needs none. ``rng_streams=()`` makes the layer deterministic
    (``Layer.stochastic`` false). The linen layer's variables are exactly
    ``module.init``'s.

    *nnx*: the module arrives initialised, so ``init`` ignores its key and
    returns the module's own values (to vary them across seeds, build the
    module with another ``nnx.Rngs``). It is split once into its graph and
    state (``nnx.split``); ``apply`` merges them again, in training mode
    (``deterministic=False``, ``use_running_average=False`` set through
    ``nnx.view``) or inference mode (both ``True``). The variable dict holds
    the ``nnx.Param`` values under ``"params"`` (trained) and every other
    variable under its linen collection name (``nnx.BatchStat`` under
    ``"batch_stats"``), as state. The module's rng streams (``nnx.Dropout``
    built with ``rngs=``) are not state: while training they are reseeded from
    ``rng`` (``Layer.stochastic`` is true), and at inference the module must
    not draw. The module passed in is never modified.
    """
    if isinstance(module, nnx.Module):
        if not hasattr(nnx, "view"):
            raise RuntimeError(
                f"from_flax({type(module).__name__}): flax.nnx modules need flax >= 0.12.4 "
                f"(nnx.view switches training/inference mode); this is flax "
                f"{flax.__version__}: upgrade it (pip install 'flax>=0.12.4') or pass "
                "nnx.bridge.to_linen(...) modules"
            )
        return _from_nnx(module, call or (lambda m, x, train: m(x)), input_dtype)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"from_flax needs a flax.linen or flax.nnx Module, got {module!r}: wrap a "
            "parameter-free function with sgjax.layers.elementwise(fn)"
        )
    if isinstance(rng_streams, str):
        raise TypeError(f"rng_streams={rng_streams!r} must be a sequence of stream names, "
                        f"e.g. ({rng_streams!r},)")
    streams = tuple(rng_streams)
    call = call or (lambda m, x, train: m(x))

    def named_rng_errors(fn, *args, train, **kwargs):
        try:
            return fn(*args, **kwargs)
        except flax.errors.InvalidRngError as e:
            where = ("while training without rng=: pass a key (split_at's stages do), and "
                     "list its stream in rng_streams=" if train else
                     "at inference (train=False): map train to its deterministic flag, e.g. "
                     "from_flax(module, lambda m, x, train: m(x, deterministic=not train))")
            raise ValueError(
                f"flax module {type(module).__name__} draws random numbers {where} ({e})"
            ) from e

    def init(key, in_shape):
        x = jnp.zeros((1, *in_shape), input_dtype)
        variables = module.init(key, x, False, method=call)
        variables = dict(variables)
        out = named_rng_errors(jax.eval_shape, lambda v, x: module.apply(
            v, x, False, method=call), variables, x, train=False)
        return tuple(out.shape[1:]), variables

    def apply(variables, x, *, train=False, rng=None):
        kwargs = {}
        if train and rng is not None and streams:
            kwargs["rngs"] = {name: jax.random.fold_in(rng, i) for i, name in enumerate(streams)}
        state = state_of(variables)
        if train and state:
            h, new_state = named_rng_errors(module.apply, variables, x, True, method=call,
                                            mutable=list(state), train=True, **kwargs)
            return h, dict(new_state)
        return named_rng_errors(module.apply, variables, x, train, method=call, train=train,
                                **kwargs), state

    return Layer(init, apply, stochastic=bool(streams))


def _collection(variable: nnx.Variable) -> str | None:
    """The linen collection an nnx variable belongs to (``None``: rng state)."""
    if isinstance(variable, nnx.RngState):
        return None
    try:
        return nnx.variablelib.variable_name_from_type(type(variable))
    except ValueError:
        return type(variable).__name__


def _typed_key(key: jax.Array) -> jax.Array:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def _from_nnx(module: nnx.Module, call: Callable, input_dtype: Any) -> Layer:
    """:func:`from_flax` for an ``nnx.Module``."""
    graphs = {}
    for train in (True, False):
        view = nnx.view(module, deterministic=not train, use_running_average=not train,
                        raise_if_not_found=False)
        graphs[train], state = nnx.split(view)
    flat = tuple(nnx.to_flat_state(state))
    paths = tuple(path for path, _ in flat)
    templates = tuple(variable for _, variable in flat)
    initial = tuple(variable.get_value() for variable in templates)  # a copy: the user's
    kinds = tuple(_collection(v) for v in templates)                 # module may change
    stochastic = any(isinstance(v, nnx.RngKey) for v in templates)
    name = type(module).__name__

    def variables_of(values, skip=()):
        groups: dict = {}
        for path, kind, value in zip(paths, kinds, values):
            if kind is not None and kind not in skip:
                groups.setdefault(kind, {})[path] = value
        return {kind: traverse_util.unflatten_dict(g) for kind, g in groups.items()}

    def rng_values(rng):
        """Fresh stream keys from ``rng`` (the j-th stream: ``fold_in(rng, j)``), counts 0."""
        rng, j, values = _typed_key(rng), 0, {}
        for path, variable, value in zip(paths, templates, initial):
            if isinstance(variable, nnx.RngKey):
                key = jax.random.fold_in(rng, j)
                values[path] = key if value.shape == () else jax.random.split(key, value.shape)
                j += 1
            elif isinstance(variable, nnx.RngCount):
                values[path] = jnp.zeros_like(value)
        return values

    def apply(variables, x, *, train=False, rng=None):
        if train and stochastic and rng is None:
            raise ValueError(
                f"nnx module {name} draws random numbers while training (it holds rng "
                "streams, e.g. nnx.Dropout): pass rng= a PRNG key with train=True"
            )
        given = {}
        for tree in variables.values():
            given.update(traverse_util.flatten_dict(tree))
        reseeded = rng_values(rng) if train and stochastic else {}
        values = []
        for path, kind, value in zip(paths, kinds, initial):
            if kind is None:
                values.append(reseeded.get(path, value))
            elif path in given:
                values.append(given[path])
            else:
                raise ValueError(
                    f"variables for nnx module {name} lack {kind} {'/'.join(map(str, path))}: "
                    "pass the variables its init returned"
                )
        merged = nnx.merge(graphs[train], nnx.from_flat_state(
            [(path, t.copy(v)) for path, t, v in zip(paths, templates, values)]))
        h = call(merged, x, train)
        new = tuple(v.get_value() for _, v in nnx.to_flat_state(nnx.split(merged)[1]))
        if not train:
            for path, kind, before, after in zip(paths, kinds, values, new):
                if kind is None and after is not before:
                    raise ValueError(
                        f"nnx module {name} draws random numbers at inference (its rng "
                        f"stream {'/'.join(map(str, path[:-1]))} advanced with train=False): "
                        "give the random layer a deterministic attribute (nnx.Dropout has "
                        "one) so that nnx.view can switch it off"
                    )
        return h, variables_of(new, skip=("params",))

    def init(key, in_shape):
        del key  # the module arrives initialised
        variables = variables_of(initial)
        x = jax.ShapeDtypeStruct((1, *in_shape), input_dtype)
        try:
            out = jax.eval_shape(lambda v, x: apply(v, x)[0], variables, x)
        except TypeError as e:
            raise ValueError(
                f"nnx module {name} cannot be applied to inputs of shape {tuple(in_shape)} "
                f"(one example, no batch axis): {e}"
            ) from e
        return tuple(out.shape[1:]), variables

    return Layer(init, apply, stochastic=stochastic)


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
    return from_flax(nn.Dense(features, use_bias=use_bias, **kwargs), rng_streams=())


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
    return from_flax(nn.Conv(features, tuple(kernel_size), padding="SAME", **kwargs),
                     rng_streams=())


def batch_norm(*, momentum: float = 0.99, epsilon: float = 1e-5) -> Layer:
    """Batch normalisation over all axes but the last: batch statistics while
    training (updating the running averages held as state), running averages
    at evaluation."""
    module = nn.BatchNorm(momentum=momentum, epsilon=epsilon)
    return from_flax(module, lambda m, x, train: m(x, use_running_average=not train),
                     rng_streams=())


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
    on a leaf layer. The composite is stochastic if a child is; child ``i``
    then gets the key ``fold_in(rng, i)``.
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

    def apply(variables, x, *, train=False, rng=None):
        x, states = run(layers, variables["params"], variables["state"], x, train=train,
                        rngs=layer_rngs(rng, len(layers)))
        return x, {"state": states}

    return Layer(init, apply, stochastic=any(layer.stochastic for layer in layers))
