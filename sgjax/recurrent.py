"""Recurrent DNI: truncated BPTT with a synthetic gradient at the truncation boundary
(DNI §2.2, Fig. 3–4, Appendix A.3).

An LSTM core runs over a long stream in chunks of ``T`` steps; the state (the *carry*
``s = (h, c)``) crosses from chunk to chunk unchanged, gradients never do. What stands
in for the gradient from the future at the end of a chunk is an ordinary
:class:`sgjax.feedback.Feedback` placed at the cut, whose "activation" is the flattened
carry ``s = [h, c]`` of shape ``(B, 2n)``:

* ``feedback.none()`` — plain truncated BPTT (``δ_T = 0``, DNI eq. 3);
* ``feedback.scaled(feedback.synthetic(sg_model(n)), 0.1)`` — DNI as in A.3: a
  synthetic gradient ``M(s_T)`` for both ``h`` and ``c``, multiplied by 0.1 when consumed.

One training step on chunk ``k`` (Fig. 4), all in one pure, jittable function:

1. unroll the core ``T`` steps from ``s_{k-1}`` (a constant: gradients stop there),
   summing the task loss ``L_k``;
2. ask the feedback for ``δ̂_k = grad(s_k)`` and backpropagate ``L_k + <δ̂_k, s_k>``
   through the chunk (one ``jax.vjp``): the parameter gradient of DNI eq. (3), and
   ``δ_{k-1} = ∂(L_k + <δ̂_k, s_k>)/∂s_{k-1}``, the *bootstrapped* target for the
   synthetic gradient that was used at ``s_{k-1}`` at the end of the previous chunk;
3. update the parameters, and fit the feedback to ``Target(grad=δ_{k-1},
   inputs=s_{k-1})`` (invalid on the first chunk, where no synthetic gradient was used).

DNI + Aux (§2.2, Fig. 3 (b)): an extra linear head on the LSTM output predicts, at every
step ``t``, the synthetic gradient the predictor produces ``T`` steps later, per example
(zero when an episode reset lies in between, since no gradient crosses a reset): by
default the synthetic gradient as consumed, ``α M(s_{t+T})``, or with
``aux_target="model"`` the model's output ``M(s_{t+T})`` itself (§3.2: "predicts the output
of the synthetic gradient model ``T`` steps in the future"). Its target for the steps of
chunk ``k − 1`` exists only once chunk ``k`` has run, so step ``k`` re-runs chunk
``k − 1`` from its stored start carry (again a constant) and backpropagates the
auxiliary loss ``Σ_t mean_b ||â_t − target_t||²`` (weight 1, A.3) through it. The cost
is one extra forward/backward pass over one chunk per step (Fig. 4 keeps one extra core
in memory; we keep the previous chunk's inputs and start carry instead).

Optionally (``sg_into_core``; A.3 searched over it) the synthetic gradient model's
regression error at ``s_{k-1}`` is also backpropagated into the core, through the last
core step of the previous chunk (the extra core Fig. 4 keeps in memory).

Episode resets: a chunk's ``resets[t]`` sets the carry back to zeros before step ``t``
(a new Copy episode). The gradient through a reset is zero, so a bootstrapped target
whose chunk starts with a reset is zero, as it should be.

Units: the trainer's loss is the batch *mean* of the per-example losses summed over the
chunk's steps, and the interface is built with ``example_scale = B`` so synthetic
gradient models regress per-example gradients (see :class:`sgjax.feedback.InterfaceSpec`).

The LSTM is flax's ``OptimizedLSTMCell`` (no peephole connections, unlike Graves 2013's
form that the paper cites), adapted by :func:`sgjax.layers.from_flax` into a pure
``(init, apply)`` step on ``[h, c, x]``; the output head is a linear layer on ``h``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgjax import layers as L
from sgjax import predictors as P
from sgjax.feedback import Feedback, InterfaceSpec, Target

__all__ = [
    "Backward", "Chunk", "Core", "LSTMState", "Net", "RecurrentState", "TruncatedBPTT",
    "aux_targets", "chunked", "flatten_carry", "lstm", "net", "sg_model", "truncated_bptt",
    "unflatten_carry", "unroll",
]


class LSTMState(NamedTuple):
    """The carry of an LSTM: output ``h`` and cell ``c``, each ``(B, n)``."""

    h: jax.Array
    c: jax.Array


def flatten_carry(carry: LSTMState) -> jax.Array:
    """``(B, 2n)``: ``[h, c]``, the activation at the truncation cut."""
    return jnp.concatenate([carry.h, carry.c], axis=-1)


def unflatten_carry(s: jax.Array) -> LSTMState:
    """Inverse of :func:`flatten_carry`."""
    n = s.shape[-1] // 2
    return LSTMState(s[..., :n], s[..., n:])


class Core(NamedTuple):
    """A recurrent core as a pure pair: ``init(key, input_size) -> variables`` and
    ``apply(variables, carry, x) -> carry`` (``x`` ``(B, input_size)``); the output
    of a step is ``carry.h``."""

    init: Callable[[jax.Array, int], Any]
    apply: Callable[[Any, LSTMState, jax.Array], LSTMState]
    width: int

    def initial_carry(self, batch_size: int) -> LSTMState:
        shape = (batch_size, self.width)
        return LSTMState(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))


def lstm(width: int) -> Core:
    """An LSTM core of ``width`` units (flax ``OptimizedLSTMCell``) via
    :func:`sgjax.layers.from_flax`: the layer maps ``[h, c, x]`` to ``[h', c']``."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"lstm(width={width!r}): width must be a positive integer")

    def call(module, z, train):
        del train
        h, c, x = z[..., :width], z[..., width:2 * width], z[..., 2 * width:]
        (c, h), _ = module((c, h), x)
        return jnp.concatenate([h, c], axis=-1)

    layer = L.from_flax(nn.OptimizedLSTMCell(width), call)

    def init(key, input_size):
        _, variables = layer.init(key, (2 * width + int(input_size),))
        return variables

    def apply(variables, carry, x):
        z = jnp.concatenate([carry.h, carry.c, x.reshape(x.shape[0], -1)], axis=-1)
        s, _ = layer.apply(variables, z)
        return unflatten_carry(s)

    return Core(init, apply, width)


class Net(NamedTuple):
    """A core with a linear output head (and, for DNI + Aux, a linear head predicting
    the synthetic gradient ``T`` steps ahead): ``init(key) -> params`` with entries
    ``core``, ``head`` (and ``aux``)."""

    core: Core
    input_size: int
    num_outputs: int
    init: Callable[[jax.Array], dict]
    head: L.Layer
    aux: L.Layer | None


def net(core: Core, input_size: int, num_outputs: int, *, aux: bool = False) -> Net:
    """The A.3 model: ``core``, then a linear layer on its output ``h`` for the task;
    with ``aux`` a second linear layer ``h -> 2n`` for future synthetic gradient
    prediction (zero-initialised, like every synthetic-gradient output)."""
    for name, v in (("input_size", input_size), ("num_outputs", num_outputs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"net({name}={v!r}): must be a positive integer")
    head = L.dense(num_outputs)
    zeros = jax.nn.initializers.zeros
    aux_head = L.dense(2 * core.width, kernel_init=zeros, bias_init=zeros) if aux else None

    def init(key):
        k_core, k_head, k_aux = jax.random.split(key, 3)
        params = {"core": core.init(k_core, input_size),
                  "head": head.init(k_head, (core.width,))[1]}
        if aux_head is not None:
            params["aux"] = aux_head.init(k_aux, (core.width,))[1]
        return params

    return Net(core, int(input_size), int(num_outputs), init, head, aux_head)


def sg_model(width: int, hidden: int | None = None) -> P.Predictor:
    """A.3's synthetic gradient model for an LSTM of ``width`` units: it reads the
    LSTM's output ``h`` (the first half of the carry ``[h, c]``), has one hidden ReLU
    layer of ``hidden`` units (default ``width``) and a zero-initialised linear
    projection to ``2 width`` (the gradients for ``h`` and ``c``).

    (``predictors.mlp((width,), batch_norm=False)`` is the variant reading ``h`` and ``c``.)
    """
    hidden = width if hidden is None else hidden
    zeros = jax.nn.initializers.zeros
    layer = L.serial(L.elementwise(lambda s: s[:, :width]), L.dense(hidden), L.relu,
                     L.dense(2 * width, kernel_init=zeros, bias_init=zeros))
    return P.from_layer(layer, description=f"sg_model(h[{width}] -> {hidden} -> {2 * width})")


# --------------------------------------------------------------------------- unrolling


class Chunk(NamedTuple):
    """``T`` steps of ``B`` streams: ``inputs`` ``(T, B, input_size)``, ``targets`` any
    pytree with leading ``(T, B)`` (passed to the loss step by step) and ``resets``
    ``(T, B)`` bool (zero the carry before that step: a new episode)."""

    inputs: jax.Array
    targets: Any
    resets: jax.Array


def chunked(inputs: jax.Array, targets: Any, T: int, resets: jax.Array | None = None
            ) -> Chunk:
    """Cut a sequence with leading time axis ``(K·T, B, ...)`` into a :class:`Chunk`
    stacked over chunks, ``(K, T, B, ...)``, for :func:`sgjax.fused` / ``lax.scan``.

    Raises ``ValueError`` if the length is not a multiple of ``T``.
    """
    _check_T(T)
    n = inputs.shape[0]
    if n % T:
        raise ValueError(
            f"a sequence of {n} steps does not divide into chunks of T={T}: trim it to "
            f"{n - n % T} steps or pad it to {n + T - n % T}"
        )
    if resets is None:
        resets = jnp.zeros(inputs.shape[:2], bool)

    def cut(a):
        a = jnp.asarray(a)
        return a.reshape(n // T, T, *a.shape[1:])

    return Chunk(cut(inputs), jax.tree.map(cut, targets), cut(resets))


def unroll(net_: Net, loss: Callable, params, carry: LSTMState, chunk: Chunk):
    """Run the core over a chunk from ``carry``.

    Returns ``(per_step_loss (T, B), final carry, outputs h (T, B, n), carries
    (T, B, 2n))`` where ``carries[t]`` is the flattened carry after step ``t``.
    ``loss(logits (B, C), target_t) -> (B,)`` is the per-example loss of one step.
    """
    zero = net_.core.initial_carry(carry.h.shape[0])

    def body(carry, step):
        x, target, reset = step
        carry = jax.tree.map(lambda z, s: jnp.where(reset[:, None], z, s), zero, carry)
        carry = net_.core.apply(params["core"], carry, x)
        logits, _ = net_.head.apply(params["head"], carry.h)
        return carry, (loss(logits, target), carry.h, flatten_carry(carry))

    carry, (losses, hs, carries) = jax.lax.scan(
        body, carry, (chunk.inputs, chunk.targets, chunk.resets))
    return losses, carry, hs, carries


def aux_targets(future_sg: jax.Array, prev_resets: jax.Array, resets: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Targets for the DNI + Aux predictions made at the ``T`` steps of the previous
    chunk: step ``i`` of that chunk (time ``t``) predicts the synthetic gradient
    produced at step ``i`` of this chunk (time ``t + T``), ``future_sg[i]``.

    ``future_sg`` ``(T, B, D)``: the synthetic gradient at every step of this chunk;
    ``prev_resets``/``resets`` ``(T, B)``: the two chunks' resets. Returns
    ``(targets (T, B, D), valid (T, B))``: a pair is invalid (target zero) when an
    episode reset lies in ``(t, t + T]``.
    """
    T = future_sg.shape[0]
    both = jnp.concatenate([prev_resets, resets], axis=0).astype(jnp.int32)  # (2T, B)
    csum = jnp.cumsum(both, axis=0)
    crossed = csum[T:2 * T] - csum[:T] > 0  # resets at times (i, i + T]
    valid = ~crossed
    return jnp.where(valid[..., None], future_sg, 0.0), valid


# --------------------------------------------------------------------------- trainer


class RecurrentState(NamedTuple):
    """Everything a truncated-BPTT run carries from chunk to chunk.

    ``carry``: ``s_{k-1}``, where the next chunk starts; ``started``: whether a chunk
    has run (so a synthetic gradient was used at ``carry`` and its target is valid);
    ``prev_chunk``/``prev_carry``: the previous chunk and its start carry (DNI + Aux
    only, else ``None``); ``kept_chunk``/``kept_carry``: the last step of the previous
    chunk and the carry before it, Fig. 4's extra core (with ``sg_into_core`` only,
    else ``None``); ``step``: chunks done.
    """

    params: Any
    opt_state: Any
    fstate: Any
    carry: LSTMState
    started: jax.Array
    prev_chunk: Chunk | None
    prev_carry: LSTMState | None
    kept_chunk: Chunk | None
    kept_carry: LSTMState | None
    step: jax.Array


class Backward(NamedTuple):
    """One chunk's backward pass (before any update).

    ``grads``: parameter gradient (task loss + consumed synthetic gradient + Aux);
    ``sg``: the synthetic gradient consumed at the chunk's end ``(B, 2n)``;
    ``sg_target``: the bootstrapped target for the carry the chunk started from;
    ``losses`` ``(T, B)`` per-example task losses; ``carry``: the final carry;
    ``aux_loss``: the DNI + Aux loss (0 without Aux); ``carries`` ``(T, B, 2n)``;
    ``core_sg_loss``: the synthetic gradient model's regression error backpropagated
    into the core (``sg_into_core``; else 0); ``fstate``: the feedback state after the
    synthetic gradient at the chunk's end was consumed (wrappers that count uses, such
    as :func:`~sgjax.feedback.warmup`, have counted it).
    """

    grads: Any
    sg: jax.Array
    sg_target: jax.Array
    losses: jax.Array
    carry: LSTMState
    aux_loss: jax.Array
    carries: jax.Array
    core_sg_loss: jax.Array
    fstate: Any


class TruncatedBPTT(NamedTuple):
    """A trainer (:class:`sgjax.trainer.Trainer`) whose batch is a :class:`Chunk`.

    * ``init(key, chunk=None) -> RecurrentState`` (``chunk``, if given, is checked: the
      shapes are fixed by ``T`` and ``batch_size``);
    * ``step(state, chunk) -> (state, info)``: pure, jit once, fusable with
      :func:`sgjax.fused`; ``info``: ``loss`` (the chunk's task loss, summed over its
      steps, mean over the batch), ``losses`` ``(T, B)``, ``aux_loss``,
      ``core_sg_loss``, ``sg_loss`` (the feedback's fit), ``sg_norm`` (of the
      synthetic gradient consumed at the chunk's end);
    * ``apply(state, x) -> logits``: inference, ``(L, B, num_outputs)`` for inputs
      ``(L, B, input_size)`` (or a :class:`Chunk`, whose resets are honoured) from the
      zero carry;
    * ``backward(state, chunk) -> Backward`` and ``update(state, chunk, backward) ->
      (state, info)`` are the two halves of ``step``; ``interface`` is the feedback bound
      to the cut."""

    init: Callable[..., RecurrentState]
    step: Callable[[RecurrentState, Chunk], tuple[RecurrentState, dict]]
    apply: Callable[[RecurrentState, Any], jax.Array]
    backward: Callable[[RecurrentState, Chunk], Backward]
    update: Callable[..., tuple[RecurrentState, dict]]
    interface: Any
    net: Net
    T: int
    batch_size: int


def _check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T={T!r}: the truncation length must be an integer >= 1")


def truncated_bptt(
    net_: Net,
    loss: Callable[[jax.Array, Any], jax.Array],
    feedback: Feedback,
    optimizer: optax.GradientTransformation,
    *,
    T: int,
    batch_size: int,
    aux_weight: float = 1.0,
    sg_into_core: bool = False,
    sg_optimizer: optax.GradientTransformation | None = None,
    bootstrap: str = "consumed",
    aux_target: str = "consumed",
) -> TruncatedBPTT:
    """Truncated BPTT over chunks of ``T`` steps with ``feedback`` at every boundary.

    ``loss(logits (B, C), target_t) -> (B,)`` is one step's per-example loss (masked
    steps return 0); the chunk's loss is their sum over steps, averaged over the batch.
    ``optimizer`` trains the network; ``sg_optimizer`` (default: the same) trains the
    feedback's gradient model. DNI + Aux is on when ``net_`` has an ``aux`` head
    (:func:`net` with ``aux=True``), with the auxiliary loss weighted by ``aux_weight``.

    ``sg_into_core`` (A.3 searched over it; default off) also backpropagates the
    synthetic gradient model's regression error into the core: the loss
    ``mean_b ||M(s_{k-1}) - δ_{k-1}||²`` (per-example units, the loss the feedback's
    ``fit`` reports as ``sg_loss``) is differentiated with respect to ``s_{k-1}`` and
    through the last core step of the previous chunk, recomputed with the current
    parameters (Fig. 4 keeps that core in memory). Needs a feedback whose ``fit``
    reports ``sg_loss`` (``synthetic``, optionally ``scaled``).

    ``bootstrap`` says which synthetic gradient at ``s_k`` enters the bootstrapped
    target ``δ_{k-1}`` (Fig. 4):

    * ``"consumed"`` (default): the one the parameter update consumed, ``α M(s_k)`` for
      ``scaled(synthetic(...), α)``. Then ``M`` regresses
      ``∂L_k/∂s_{k-1} + α J_k^T M(s_k)``: its fixed point discounts the gradient from
      ``j`` chunks ahead by ``α^j``, a horizon of about one chunk for A.3's ``α = 0.1``.
    * ``"unscaled"``: the model's own prediction ``M(s_k)`` (``feedback.scale`` divided
      out), so that ``M`` regresses ``∂L_k/∂s_{k-1} + J_k^T M(s_k)``, whose fixed point is
      eq. (3)'s undiscounted ``δ_T = Σ_{τ>T} ∂L_τ/∂h_T``; only the parameter update uses
      ``α M`` (A.3: the synthetic gradient "is scaled by a factor of 0.1 when consumed by
      the model"). One extra backward pass of the carry's cotangent through the chunk
      (the parameter cotangents of that pass are unused).

    ``aux_target`` says what the DNI + Aux head regresses at step ``t`` (Fig. 3 (b)):

    * ``"consumed"`` (default): ``α M(s_{t+T})``, the synthetic gradient as consumed;
    * ``"model"``: the synthetic gradient model's output ``M(s_{t+T})``, as §3.2 words it
      ("an auxiliary task which predicts the output of the synthetic gradient model ``T``
      steps in the future"); at A.3's Aux weight of 1 this auxiliary loss is ``1/α²``
      (100×) larger than ``"consumed"``'s.

    Why these defaults, although ``"unscaled"`` and ``"model"`` are the paper's words
    (eq. 3's ``δ_T`` is undiscounted, A.3 scales by 0.1 "when consumed", §3.2's Aux task
    predicts the model's output): in DNI Table 2's ``quick`` runs on Copy and Penn Treebank
    the paper's reading did worse than the consumed one in every cell where both ran, and
    ``"model"`` alone (with the consumed bootstrap) did worse on Copy and no better on PTB
    (``experiments/dni/table2.py``'s ``-paper`` and ``-aux-model`` cells, beside the Table 2
    cells in ``reports/table2/table.md``). ×0.1 per chunk in the bootstrapped target is a
    discount (a horizon of about one chunk); without it, on PTB's unending stream, the
    synthetic gradient blew up in the first hundred iterations and the LSTM did not recover
    within the run. The paper's own numbers may rest on either reading.
    """
    _check_T(T)
    if not callable(loss):
        raise TypeError(f"loss={loss!r}: truncated_bptt needs loss(logits (B, C), "
                        "target_t) -> (B,) per-example losses")
    if bootstrap not in ("consumed", "unscaled"):
        raise ValueError(f"bootstrap={bootstrap!r}: use 'unscaled' or 'consumed'")
    if aux_target not in ("model", "consumed"):
        raise ValueError(f"aux_target={aux_target!r}: use 'model' or 'consumed'")
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback must be an sgjax.feedback.Feedback, got {feedback!r}")
    if bootstrap == "unscaled" and feedback.scale == 0:
        raise ValueError(f"bootstrap='unscaled' divides by {feedback!r}'s scale, which is 0; "
                         "pass bootstrap='consumed'")
    use_aux = net_.aux is not None
    if use_aux and aux_target == "model" and feedback.scale == 0:
        raise ValueError(f"aux_target='model' divides by {feedback!r}'s scale, which is 0; "
                         "pass aux_target='consumed'")
    if feedback.update_locked:
        raise ValueError(
            f"{feedback!r} is update locked: it needs the gradient from the next chunk "
            "before this one can update, which truncated BPTT cannot give. Use "
            "feedback.none() (truncated BPTT) or feedback.synthetic(...) (DNI)."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    width = net_.core.width
    spec = InterfaceSpec(
        h_shape=(2 * width,), label_shape=(), out_shape=(net_.num_outputs,),
        next_shape=(2 * width,), batch_size=batch_size,
        optimizer=sg_optimizer or optimizer, example_scale=float(batch_size),
    )
    interface = feedback.build(spec)

    def check_chunk(chunk: Chunk) -> None:
        shape = tuple(chunk.inputs.shape)
        if shape != (T, batch_size, net_.input_size):
            raise ValueError(
                f"chunk inputs have shape {shape}; this trainer needs (T, B, input_size) = "
                f"{(T, batch_size, net_.input_size)}"
            )
        if tuple(chunk.resets.shape) != (T, batch_size):
            raise ValueError(f"chunk resets have shape {tuple(chunk.resets.shape)}; "
                             f"expected (T, B) = {(T, batch_size)}")
        for path, leaf in jax.tree_util.tree_leaves_with_path(chunk.targets):
            name = "targets" + jax.tree_util.keystr(path)
            if tuple(jnp.shape(leaf)[:2]) != (T, batch_size):
                raise ValueError(
                    f"chunk {name} has shape {tuple(jnp.shape(leaf))}; every target needs "
                    f"leading (T, B) = {(T, batch_size)}, like the inputs"
                )
            if (not isinstance(leaf, jax.core.Tracer)
                    and jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer)
                    and np.asarray(leaf).size):
                lo, hi = int(np.min(leaf)), int(np.max(leaf))
                if lo < 0 or hi >= net_.num_outputs:
                    raise ValueError(
                        f"chunk {name} holds class id {lo if lo < 0 else hi}, outside "
                        f"[0, {net_.num_outputs}): the network has {net_.num_outputs} "
                        "outputs (check the labels or num_outputs in recurrent.net)"
                    )

    def init(key, chunk: Chunk | None = None):
        if chunk is not None:
            check_chunk(chunk)
        k_net, k_fb = jax.random.split(key)
        params = net_.init(k_net)
        fstate = interface.init(k_fb)
        carry = net_.core.initial_carry(batch_size)
        prev_chunk = prev_carry = kept_chunk = kept_carry = None
        if use_aux:
            prev_chunk = Chunk(jnp.zeros((T, batch_size, net_.input_size), jnp.float32), None,
                               jnp.zeros((T, batch_size), bool))
            prev_carry = net_.core.initial_carry(batch_size)
        if sg_into_core:
            kept_chunk = Chunk(jnp.zeros((1, batch_size, net_.input_size), jnp.float32), None,
                               jnp.zeros((1, batch_size), bool))
            kept_carry = net_.core.initial_carry(batch_size)
        return RecurrentState(params, optimizer.init(params), fstate, carry,
                              jnp.zeros((), bool), prev_chunk, prev_carry, kept_chunk,
                              kept_carry, jnp.zeros((), jnp.int32))

    def consumed_sg(fstate, s):
        """The substitute at ``s`` and the feedback state after producing it (a wrapper
        such as :func:`~sgjax.feedback.warmup` counts its uses there)."""
        sub, fstate, _ = interface.grad(fstate, s, None, None)
        if sub.shape != s.shape:
            raise ValueError(f"the feedback's substitute has shape {sub.shape}, but the "
                             f"carry it stands in for has shape {s.shape}")
        return jax.lax.stop_gradient(sub), fstate

    def backward(state: RecurrentState, chunk: Chunk) -> Backward:
        check_chunk(chunk)
        s0 = jax.lax.stop_gradient(flatten_carry(state.carry))

        def forward(params, s0):
            losses, carry, hs, carries = unroll(net_, loss, params, unflatten_carry(s0), chunk)
            total = jnp.sum(losses) / batch_size
            return (total, flatten_carry(carry)), (losses, carry, carries)

        (_, sT), vjp_fn, (losses, carry, carries) = jax.vjp(forward, state.params, s0,
                                                            has_aux=True)
        sg, fstate = consumed_sg(state.fstate, sT)
        grads, sg_target = vjp_fn((jnp.ones((), sT.dtype), sg))
        if bootstrap == "unscaled" and feedback.scale != 1:
            _, sg_target = vjp_fn((jnp.ones((), sT.dtype), sg / feedback.scale))
        aux_loss = jnp.zeros((), jnp.float32)
        if use_aux:
            # the Aux targets read the model at every step of the chunk; they are not
            # consumed by an update, so the state after them is not kept
            future = jax.vmap(lambda s: consumed_sg(state.fstate, s)[0])(carries) * batch_size
            if aux_target == "model" and feedback.scale != 1:
                future = future / feedback.scale
            targets, valid = aux_targets(future, state.prev_chunk.resets, chunk.resets)
            valid = valid & state.started

            def aux_fn(params):
                prev = state.prev_chunk
                zero = net_.core.initial_carry(batch_size)

                def body(c, step):
                    x, reset = step
                    c = jax.tree.map(lambda z, s: jnp.where(reset[:, None], z, s), zero, c)
                    c = net_.core.apply(params["core"], c, x)
                    pred, _ = net_.aux.apply(params["aux"], c.h)
                    return c, pred

                c0 = jax.tree.map(jax.lax.stop_gradient, state.prev_carry)
                _, preds = jax.lax.scan(body, c0, (prev.inputs, prev.resets))
                err = jnp.sum((preds - targets) ** 2, axis=-1) * valid
                return aux_weight * jnp.sum(err) / batch_size

            aux_loss, aux_grads = jax.value_and_grad(aux_fn)(state.params)
            grads = jax.tree.map(jnp.add, grads, aux_grads)
        core_sg_loss = jnp.zeros((), jnp.float32)
        if sg_into_core:
            core_sg_loss, sg_grads = core_sg_error(state, sg_target)
            grads = jax.tree.map(jnp.add, grads, sg_grads)
        return Backward(grads, sg, sg_target, losses, carry, aux_loss, carries, core_sg_loss,
                        fstate)

    def regression_error(fstate, s, target):
        """``Σ_b ||M(s) - example_scale · target||²`` as the feedback's fit reports it."""
        _, info = interface.fit(fstate, Target(grad=target, inputs=s, valid=True))
        if "sg_loss" not in info:
            raise ValueError(
                "sg_into_core=True needs a feedback whose fit reports its regression loss "
                f"'sg_loss' (feedback.synthetic); {feedback!r} reports {sorted(info)}")
        return info["sg_loss"]

    def core_sg_error(state, sg_target):
        def loss_fn(params):
            c0 = jax.tree.map(jax.lax.stop_gradient, state.kept_carry)
            zero = net_.core.initial_carry(batch_size)
            reset = state.kept_chunk.resets[0]
            c0 = jax.tree.map(lambda z, s: jnp.where(reset[:, None], z, s), zero, c0)
            s = flatten_carry(net_.core.apply(params["core"], c0, state.kept_chunk.inputs[0]))
            err = regression_error(state.fstate, s, jax.lax.stop_gradient(sg_target))
            return jnp.where(state.started, err, 0.0) / batch_size

        return jax.value_and_grad(loss_fn)(state.params)

    def update(state: RecurrentState, chunk: Chunk, bw: Backward):
        updates, opt_state = optimizer.update(bw.grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        s0 = flatten_carry(state.carry)
        fstate, fit_info = interface.fit(
            bw.fstate, Target(grad=bw.sg_target, inputs=s0, valid=state.started))
        carry = jax.tree.map(jax.lax.stop_gradient, bw.carry)
        prev_chunk = prev_carry = kept_chunk = kept_carry = None
        if use_aux:
            prev_chunk = Chunk(chunk.inputs, None, chunk.resets)
            prev_carry = state.carry
        if sg_into_core:
            kept_chunk = Chunk(chunk.inputs[-1:], None, chunk.resets[-1:])
            before_last = bw.carries[-2] if T > 1 else flatten_carry(state.carry)
            kept_carry = unflatten_carry(jax.lax.stop_gradient(before_last))
        new = RecurrentState(params, opt_state, fstate, carry, jnp.ones((), bool),
                             prev_chunk, prev_carry, kept_chunk, kept_carry, state.step + 1)
        info = {"loss": jnp.sum(bw.losses) / batch_size, "losses": bw.losses,
                "aux_loss": bw.aux_loss, "core_sg_loss": bw.core_sg_loss,
                "sg_loss": jnp.asarray(fit_info.get("sg_loss", 0.0), jnp.float32),
                "sg_norm": jnp.sqrt(jnp.sum(bw.sg ** 2))}
        return new, info

    def step(state, chunk):
        return update(state, chunk, backward(state, chunk))

    def apply(state: RecurrentState, x):
        chunk = x if isinstance(x, Chunk) else Chunk(x, None, None)
        inputs = jnp.asarray(chunk.inputs)
        if inputs.ndim != 3 or inputs.shape[-1] != net_.input_size:
            raise ValueError(f"inputs of shape {tuple(inputs.shape)}: apply needs "
                             f"(L, B, input_size={net_.input_size})")
        resets = (jnp.zeros(inputs.shape[:2], bool) if chunk.resets is None
                  else chunk.resets)
        zero = net_.core.initial_carry(inputs.shape[1])

        def body(carry, step):
            x_t, reset = step
            carry = jax.tree.map(lambda z, s: jnp.where(reset[:, None], z, s), zero, carry)
            carry = net_.core.apply(state.params["core"], carry, x_t)
            return carry, net_.head.apply(state.params["head"], carry.h)[0]

        return jax.lax.scan(body, zero, (inputs, resets))[1]

    return TruncatedBPTT(init, step, apply, backward, update, interface, net_, T, batch_size)
