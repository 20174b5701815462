"""Networks that run at different rates and talk through a feedback (DNI §3.3, Fig. 8, A.4).

Two separately updated recurrent networks. Network A reads one input per step; every
``T`` steps (a *tick*) its LSTM output ``h`` goes through a head (A's own task) and
through a message layer; the message ``m_k`` is network B's input at its tick ``k``.
B therefore runs once per ``T`` steps of A, and its loss depends on A only through the
messages. What A receives for ``∂L_B/∂m_k`` is decided by an ordinary
:class:`sgjax.feedback.Feedback` placed at the message, exactly as at a cut of
:func:`sgjax.split_at`:

* ``feedback.scaled(feedback.synthetic(message_sg_model(256)), 10.0)`` — DNI (A.4: a
  synthetic gradient model with one hidden layer, its output ×10 before entering A);
* ``feedback.none()`` — decoupled without DNI (Fig. 8 red: A gets nothing from B);
* ``feedback.backprop()`` — the *oracle*: B's true gradient for each message. It is
  update locked: A must wait until B has run over its window, so A can only update as
  often as B (``a_every = T``), and the system then computes exactly the end-to-end
  gradient.

The messages, both ways: A sends ``m_k`` (a stop-gradient array) up to B at every tick;
B sends back, once per window of ``T`` ticks, the :class:`~sgjax.feedback.Target`
``(grad=∂L_B/∂m_k, inputs=m_k)`` for every message of the window, on which the
synthetic gradient model (owned by A's side of the interface) is fitted. Nothing else
crosses.

Update times (one call of ``step`` is one *window* of ``T`` ticks = ``T²`` steps of A):

* :func:`decoupled` — A updates every ``a_every`` ticks (default 1: every ``T`` steps),
  backpropagating its own loss plus ``<δ̂_k, m_k>`` through the ``a_every·T`` steps since
  its last update (its LSTM state crosses updates without gradient, as in truncated
  BPTT); B updates once per window, by BPTT over its ``T`` ticks, then sends its targets.
  Within a window: use the synthetic gradient on ``m_k``, fit it on ``m_k``'s target at
  the window's end, use the fitted model in the next window (DNI Fig. 2's order).
* :func:`end_to_end` — the two networks as one graph (Fig. 8 grey): one loss
  ``L_A + L_B`` over the window, one ``jax.grad``, both networks update once per
  ``T²`` steps.

Units: every loss is the batch mean of per-example losses, summed over the ticks it
covers; the interface is built with ``example_scale = B`` so the synthetic gradient
model regresses per-example gradients.

Networks are built from :mod:`sgjax.layers` and the LSTM core of
:mod:`sgjax.recurrent` (:func:`network`); batch norm (in A's FCN and message layer, as
in A.4) keeps its running statistics as state. The LSTM itself has no recurrent batch
norm (A.4 uses Cooijmans et al.'s; a deviation).

Every function is pure; ``step`` jits once and scans with :func:`sgjax.fused`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sgjax import layers as L
from sgjax import predictors as P
from sgjax.feedback import Feedback, InterfaceSpec, Target
from sgjax.recurrent import Core, LSTMState

__all__ = [
    "MultiRateState", "NetState", "Network", "System", "Window", "cross_entropy",
    "decoupled", "end_to_end", "message_sg_model", "network", "run_a", "run_b",
]


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy, ``(B, C)`` logits and ``(B,)`` int labels -> ``(B,)``."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None].astype(jnp.int32),
                                axis=1)[:, 0]


# --------------------------------------------------------------------------- networks


class Network(NamedTuple):
    """A recurrent network: ``encoder`` (per step, input -> core input), an LSTM
    ``core``, a ``head`` on the core output ``h`` and, for a sender, a ``message``
    layer on ``h``. ``init(key) -> variables`` with one flax variable dict per part."""

    encoder: L.Layer
    core: Core
    head: L.Layer
    message: L.Layer | None
    input_shape: tuple[int, ...]
    num_outputs: int
    message_shape: tuple[int, ...] | None
    init: Callable[[jax.Array], dict]


def network(core: Core, input_shape, num_outputs: int, *, encoder: L.Layer = L.identity,
            message: L.Layer | None = None) -> Network:
    """A network for :func:`decoupled` / :func:`end_to_end`.

    ``core``: :func:`sgjax.recurrent.lstm`; ``input_shape``: one step's input (no batch
    axis); ``encoder``: e.g. A.4's FCN ``serial(dense(256), batch_norm(), relu, ...)``;
    ``message``: the layer producing the message for the slower network (A.4:
    ``serial(dense(256), batch_norm())``), ``None`` for a network that sends none.
    """
    input_shape = tuple(int(s) for s in (input_shape if isinstance(input_shape, tuple | list)
                                         else (input_shape,)))
    if not input_shape or min(input_shape) < 1:
        raise ValueError(f"network(input_shape={input_shape!r}): needs positive sizes")
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"network(num_outputs={num_outputs!r}): must be a positive integer")
    if not isinstance(core, Core):
        raise TypeError(f"network(core={core!r}): use sgjax.recurrent.lstm(width)")
    head = L.dense(num_outputs)
    enc_shape = tuple(encoder.init(jax.random.key(0), input_shape)[0])
    message_shape = None
    if message is not None:
        message_shape = tuple(message.init(jax.random.key(0), (core.width,))[0])

    def init(key):
        k_enc, k_core, k_head, k_msg = jax.random.split(key, 4)
        variables = {
            "encoder": encoder.init(k_enc, input_shape)[1],
            "core": core.init(k_core, enc_shape[-1]),
            "head": head.init(k_head, (core.width,))[1],
        }
        if message is not None:
            variables["message"] = message.init(k_msg, (core.width,))[1]
        return variables

    return Network(encoder, core, head, message, input_shape, num_outputs, message_shape, init)


def message_sg_model(hidden: int = 256) -> P.Predictor:
    """A.4's synthetic gradient model for A's message: one hidden ReLU layer of
    ``hidden`` units and a zero-initialised linear layer of the message's size."""
    return P.mlp((int(hidden),), batch_norm=False)


def _split_vars(variables: dict) -> tuple[dict, dict]:
    return ({k: L.params_of(v) for k, v in variables.items()},
            {k: L.state_of(v) for k, v in variables.items()})


def _join_vars(params: dict, state: dict) -> dict:
    return {k: L.with_params(state[k], params[k]) for k in params}


# --------------------------------------------------------------------------- forward passes


class AOut(NamedTuple):
    """Network A over ``K`` ticks: ``logits`` ``(K, B, C_A)``, ``messages`` ``(K, B, *m)``,
    the final ``carry``, the new batch-norm ``state`` and ``emitted_at`` ``(K,)``: A's
    step count after the step whose output became each message."""

    logits: jax.Array
    messages: jax.Array
    carry: LSTMState
    state: dict
    emitted_at: jax.Array


def _unroll(net: Network, variables: dict, carry: LSTMState, xs: jax.Array,
            count0: jax.Array, *, train: bool):
    """The encoder on every element of ``xs`` ``(N, B, ...)``, then the core step by step
    from ``carry``. Returns ``(hs (N, B, n), counts (N,), final carry, encoder state)``;
    ``counts`` numbers the core steps from ``count0 + 1``."""
    n, b = xs.shape[0], xs.shape[1]
    z, enc_state = net.encoder.apply(variables["encoder"], xs.reshape(n * b, *xs.shape[2:]),
                                     train=train)

    def body(c, x):
        c, count = c
        c = net.core.apply(variables["core"], c, x)
        return (c, count + 1), (c.h, count + 1)

    (carry, _), (hs, counts) = jax.lax.scan(body, (carry, count0), z.reshape(n, b, -1))
    return hs, counts, carry, enc_state


def run_a(net: Network, T: int, params: dict, state: dict, carry: LSTMState,
          inputs: jax.Array, step0: jax.Array, *, train: bool) -> AOut:
    """Run network A over ``inputs`` ``(K·T, B, *input_shape)`` from ``carry``: the
    encoder on every step, the core step by step, the head and the message layer on the
    core output at the last step of each tick. ``step0``: A's steps before these."""
    b = inputs.shape[1]
    variables = _join_vars(params, state)
    hs, counts, carry, enc_state = _unroll(net, variables, carry, inputs, step0, train=train)
    h_ticks = hs[T - 1::T]  # (K, B, n): the output at each tick's last step
    k = h_ticks.shape[0]
    flat = h_ticks.reshape(k * b, -1)
    logits, _ = net.head.apply(variables["head"], flat, train=train)
    new_state = {**state, "encoder": L.state_of(enc_state)}
    messages = jnp.zeros((k, b, 0), flat.dtype)
    if net.message is not None:
        messages, msg_state = net.message.apply(variables["message"], flat, train=train)
        messages = messages.reshape(k, b, *messages.shape[1:])
        new_state["message"] = L.state_of(msg_state)
    return AOut(logits.reshape(k, b, -1), messages, carry, new_state, counts[T - 1::T])


def run_b(net: Network, params: dict, state: dict, carry: LSTMState, messages: jax.Array,
          *, train: bool) -> tuple[jax.Array, LSTMState, dict, jax.Array]:
    """Run network B over ``messages`` ``(K, B, *m)``, one core step per message (one
    tick). Returns ``(logits (K, B, C_B), final carry, new state, ticks (K,))`` where
    ``ticks`` counts the core steps run (``1..K``)."""
    k, b = messages.shape[0], messages.shape[1]
    variables = _join_vars(params, state)
    hs, ticks, carry, enc_state = _unroll(net, variables, carry, messages,
                                          jnp.zeros((), jnp.int32), train=train)
    logits, _ = net.head.apply(variables["head"], hs.reshape(k * b, -1), train=train)
    return logits.reshape(k, b, -1), carry, {**state, "encoder": L.state_of(enc_state)}, ticks


# --------------------------------------------------------------------------- systems


class Window(NamedTuple):
    """One window of ``T`` ticks: ``inputs`` ``(T², B, *input_shape)`` (A's stream),
    ``a_targets`` and ``b_targets`` ``(T, B)`` (A's and B's labels at each tick)."""

    inputs: jax.Array
    a_targets: Any
    b_targets: Any


class NetState(NamedTuple):
    """One network's trainable ``params``, batch-norm ``state``, optimiser state and the
    LSTM ``carry`` where its stream continues."""

    params: dict
    state: dict
    opt_state: Any
    carry: LSTMState


class MultiRateState(NamedTuple):
    """Both networks, the message feedback's state (``()`` end to end), and counters:
    ``a_steps`` (A's core steps), ``b_steps`` (B's core steps), ``a_updates``,
    ``b_updates``."""

    a: NetState
    b: NetState
    fstate: Any
    a_steps: jax.Array
    b_steps: jax.Array
    a_updates: jax.Array
    b_updates: jax.Array


class System(NamedTuple):
    """A trainer (:class:`sgjax.trainer.Trainer`) whose batch is a :class:`Window`.

    * ``init(key, window=None) -> MultiRateState`` (``window``, if given, is checked);
    * ``step(state, window) -> (state, info)``: pure, one window of ``T²`` steps;
      fusable with :func:`sgjax.fused`. ``info``: ``loss`` (``a_loss + b_loss``),
      ``a_loss``, ``b_loss`` (each summed over the window's ticks, mean over the
      batch), ``sg_loss``, ``sg_norm`` (the message feedback's), ``b_ticks_at``;
    * ``apply(state, inputs (W·T², B, ...)) -> (a_logits (W·T, B, C_A), b_logits
      (W·T, B, C_B))``: both networks connected, in inference mode, from zero carries.
    """

    init: Callable[..., MultiRateState]
    step: Callable[[MultiRateState, Window], tuple[MultiRateState, dict]]
    apply: Callable[[MultiRateState, jax.Array], tuple[jax.Array, jax.Array]]
    interface: Any
    T: int
    a_every: int
    batch_size: int


def _check_int(name: str, value, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def _check_pair(a: Network, b: Network, T, batch_size) -> None:
    _check_int("T", T)
    _check_int("batch_size", batch_size)
    for name, n in (("a", a), ("b", b)):
        if not isinstance(n, Network):
            raise TypeError(f"{name}={n!r}: build networks with sgjax.multirate.network(...)")
    if a.message is None:
        raise ValueError("network A sends no message: build it with network(..., message=layer)")
    if tuple(a.message_shape) != tuple(b.input_shape):
        raise ValueError(
            f"network A's message has shape {tuple(a.message_shape)} but network B reads "
            f"inputs of shape {tuple(b.input_shape)}: make A's message layer output "
            f"{tuple(b.input_shape)} or build B with input_shape={tuple(a.message_shape)}"
        )


def _counters() -> tuple[jax.Array, ...]:
    """Four zero counters, distinct buffers (a state may be donated to a compiled step)."""
    return tuple(jnp.zeros((), jnp.int32) for _ in range(4))


def _init_net(net: Network, key, optimizer, batch_size) -> NetState:
    params, state = _split_vars(net.init(key))
    return NetState(params, state, optimizer.init(params), net.core.initial_carry(batch_size))


def _check_window(window: Window, a: Network, T: int, batch_size: int) -> None:
    shape = tuple(window.inputs.shape)
    want = (T * T, batch_size, *a.input_shape)
    if shape != want:
        raise ValueError(f"window inputs have shape {shape}; this system needs (T², B, "
                         f"*input_shape) = {want}")
    for name in ("a_targets", "b_targets"):
        for leaf in jax.tree.leaves(getattr(window, name)):
            if tuple(leaf.shape[:2]) != (T, batch_size):
                raise ValueError(f"window {name} have leading shape {tuple(leaf.shape[:2])}; "
                                 f"expected (T, B) = {(T, batch_size)}: one label per tick")


def _tick_loss(loss, logits, targets, batch_size):
    """``Σ_ticks mean_batch loss``: logits ``(K, B, C)``, targets ``(K, B, ...)``."""
    return jnp.sum(jax.vmap(loss)(logits, targets)) / batch_size


def _apply_fn(a: Network, b: Network, T: int):
    def apply(state: MultiRateState, inputs):
        bsz = inputs.shape[1]
        out = run_a(a, T, state.a.params, state.a.state, a.core.initial_carry(bsz), inputs,
                    jnp.zeros((), jnp.int32), train=False)
        b_logits, _, _, _ = run_b(b, state.b.params, state.b.state, b.core.initial_carry(bsz),
                                  out.messages, train=False)
        return out.logits, b_logits

    return apply


def _update(optimizer, net_state: NetState, grads, new_state, carry) -> NetState:
    updates, opt_state = optimizer.update(grads, net_state.opt_state, net_state.params)
    return NetState(optax.apply_updates(net_state.params, updates), new_state, opt_state,
                    jax.tree.map(jax.lax.stop_gradient, carry))


def end_to_end(a: Network, b: Network, optimizer: optax.GradientTransformation, *, T: int,
               batch_size: int, a_loss: Callable = cross_entropy,
               b_loss: Callable = cross_entropy) -> System:
    """Fig. 8 grey: A and B as one graph, unrolled over a window of ``T`` ticks (``T²``
    steps of A), one gradient of ``L_A + L_B`` for both networks, one update per window.
    Both LSTM states cross windows without gradient."""
    _check_pair(a, b, T, batch_size)

    def init(key, window: Window | None = None):
        if window is not None:
            _check_window(window, a, T, batch_size)
        ka, kb = jax.random.split(key)
        return MultiRateState(_init_net(a, ka, optimizer, batch_size),
                              _init_net(b, kb, optimizer, batch_size), (), *_counters())

    def step(state: MultiRateState, window: Window):
        _check_window(window, a, T, batch_size)

        def total(params):
            pa, pb = params
            out = run_a(a, T, pa, state.a.state, state.a.carry, window.inputs, state.a_steps,
                        train=True)
            b_logits, b_carry, b_state, ticks = run_b(b, pb, state.b.state, state.b.carry,
                                                      out.messages, train=True)
            la = _tick_loss(a_loss, out.logits, window.a_targets, batch_size)
            lb = _tick_loss(b_loss, b_logits, window.b_targets, batch_size)
            return la + lb, (la, lb, out, b_carry, b_state, ticks)

        (_, (la, lb, out, b_carry, b_state, ticks)), (ga, gb) = jax.value_and_grad(
            total, has_aux=True)((state.a.params, state.b.params))
        new = MultiRateState(
            _update(optimizer, state.a, ga, out.state, out.carry),
            _update(optimizer, state.b, gb, b_state, b_carry), (),
            out.emitted_at[-1], state.b_steps + ticks[-1], state.a_updates + 1,
            state.b_updates + 1)
        info = {"loss": la + lb, "a_loss": la, "b_loss": lb,
                "sg_loss": jnp.zeros((), jnp.float32),
                "sg_norm": jnp.zeros((), jnp.float32), "b_ticks_at": out.emitted_at}
        return new, info

    return System(init, step, _apply_fn(a, b, T), None, T, T, batch_size)


def decoupled(a: Network, b: Network, feedback: Feedback,
              optimizer: optax.GradientTransformation, *, T: int, batch_size: int,
              a_every: int = 1, sg_optimizer: optax.GradientTransformation | None = None,
              a_loss: Callable = cross_entropy, b_loss: Callable = cross_entropy) -> System:
    """A and B updated separately, with ``feedback`` standing in for ``∂L_B/∂m`` at A's
    message (Fig. 8 blue: ``synthetic``; red: ``none``; the oracle: ``backprop``).

    A updates every ``a_every`` ticks (``1 <= a_every <= T``, dividing ``T``); B once per
    window of ``T`` ticks, after which it sends the targets ``(∂L_B/∂m_k, m_k)`` that fit
    the feedback. An update-locked feedback (``backprop``) needs the targets of the
    messages it stands in for, so it requires ``a_every = T``. ``sg_optimizer`` (default:
    ``optimizer``) trains the feedback's model.
    """
    _check_pair(a, b, T, batch_size)
    _check_int("a_every", a_every)
    if not isinstance(feedback, Feedback):
        raise TypeError(f"feedback={feedback!r}: use an sgjax.feedback.Feedback, e.g. "
                        "feedback.synthetic(multirate.message_sg_model())")
    if a_every > T or T % a_every:
        raise ValueError(f"a_every={a_every}: network A must update a whole number of times "
                         f"per window of T={T} ticks (a divisor of {T})")
    if feedback.update_locked and a_every != T:
        raise ValueError(
            f"{feedback!r} is update locked: A needs B's gradient for its messages before it "
            f"can update, and B runs once per window of T={T} ticks, so a_every must be "
            f"{T} (got {a_every}); use feedback.synthetic(...) to unlock A"
        )
    m_shape = tuple(a.message_shape)
    spec = InterfaceSpec(h_shape=m_shape, label_shape=(), out_shape=(a.num_outputs,),
                         next_shape=m_shape, batch_size=batch_size,
                         optimizer=sg_optimizer or optimizer, example_scale=float(batch_size))
    interface = feedback.build(spec)
    chunks = T // a_every

    def init(key, window: Window | None = None):
        if window is not None:
            _check_window(window, a, T, batch_size)
        ka, kb, kf = jax.random.split(key, 3)
        return MultiRateState(_init_net(a, ka, optimizer, batch_size),
                              _init_net(b, kb, optimizer, batch_size), interface.init(kf),
                              *_counters())

    def substitute(fstate, messages, target):
        """The feedback's substitute for ``messages`` and its state after producing it
        (a wrapper such as :func:`~sgjax.feedback.warmup` counts its uses there)."""
        flat = messages.reshape(-1, *m_shape)
        sub, fstate, _ = interface.grad(fstate, flat, None, target)
        if tuple(sub.shape) != tuple(flat.shape):
            raise ValueError(f"the feedback {feedback!r} returned a gradient of shape "
                             f"{tuple(sub.shape)} for messages of shape {tuple(flat.shape)}: "
                             "its predictor must output exactly the message shape")
        return jax.lax.stop_gradient(sub.reshape(messages.shape)), fstate

    def b_backward(b_state: NetState, messages, targets):
        def f(params, messages):
            logits, carry, state, ticks = run_b(b, params, b_state.state, b_state.carry,
                                                messages, train=True)
            return _tick_loss(b_loss, logits, targets, batch_size), (carry, state, ticks)

        (lb, aux), (gb, dm) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            b_state.params, messages)
        return lb, gb, dm, aux

    def a_grads(a_state, inputs, targets, step0, fstate, target_for):
        """A's forward pass over one chunk, the feedback's substitute for its messages,
        and one backward pass of ``L_A + <δ̂, m>``."""

        def f(params):
            out = run_a(a, T, params, a_state.state, a_state.carry, inputs, step0, train=True)
            la = _tick_loss(a_loss, out.logits, targets, batch_size)
            return (la, out.messages), out

        (la, messages), vjp_fn, out = jax.vjp(f, a_state.params, has_aux=True)
        target = target_for(messages) if target_for is not None else None
        sub, fstate = substitute(fstate, messages, target)
        (grads,) = vjp_fn((jnp.ones((), la.dtype), sub))
        return la, grads, out, sub, target, fstate

    def step(state: MultiRateState, window: Window):
        _check_window(window, a, T, batch_size)
        xs = window.inputs.reshape(chunks, a_every * T, *window.inputs.shape[1:])
        a_tg = jax.tree.map(lambda t: t.reshape(chunks, a_every, *t.shape[1:]),
                            window.a_targets)

        if feedback.update_locked:  # a_every == T: one chunk; B's true gradient first
            holder = {}

            def target_for(messages):
                lb, gb, dm, aux = b_backward(state.b, jax.lax.stop_gradient(messages),
                                             window.b_targets)
                holder.update(lb=lb, gb=gb, aux=aux)
                flat = lambda v: v.reshape(-1, *m_shape)  # noqa: E731
                return Target(grad=flat(dm), inputs=flat(jax.lax.stop_gradient(messages)),
                              valid=True)

            la, ga, out, sub, target, fstate = a_grads(state.a, xs[0], jax.tree.map(
                lambda t: t[0], a_tg), state.a_steps, state.fstate, target_for)
            a_new = _update(optimizer, state.a, ga, out.state, out.carry)
            lb, gb, (b_carry, b_state, ticks) = holder["lb"], holder["gb"], holder["aux"]
            b_new = _update(optimizer, state.b, gb, b_state, b_carry)
            fstate, fit_info = interface.fit(fstate, target)
            new = MultiRateState(a_new, b_new, fstate, out.emitted_at[-1],
                                 state.b_steps + ticks[-1], state.a_updates + 1,
                                 state.b_updates + 1)
            info = {"loss": la + lb, "a_loss": la, "b_loss": lb,
                    "sg_loss": jnp.asarray(fit_info.get("sg_loss", 0.0), jnp.float32),
                    "sg_norm": jnp.sqrt(jnp.sum(sub ** 2)), "b_ticks_at": out.emitted_at}
            return new, info

        def a_chunk(carry, chunk):
            a_state, a_steps, updates, fstate = carry
            inputs, targets = chunk
            la, ga, out, sub, _, fstate = a_grads(a_state, inputs, targets, a_steps, fstate,
                                                  None)
            a_state = _update(optimizer, a_state, ga, out.state, out.carry)
            return (a_state, out.emitted_at[-1], updates + 1, fstate), (
                la, jax.lax.stop_gradient(out.messages), out.emitted_at,
                jnp.sqrt(jnp.sum(sub ** 2)))

        (a_new, a_steps, a_updates, fstate), (las, messages, emitted, sg_norms) = (
            jax.lax.scan(a_chunk, (state.a, state.a_steps, state.a_updates, state.fstate),
                         (xs, a_tg)))
        messages = messages.reshape(T, *messages.shape[2:])  # (T, B, *m)
        lb, gb, dm, (b_carry, b_state, ticks) = b_backward(state.b, messages,
                                                           window.b_targets)
        b_new = _update(optimizer, state.b, gb, b_state, b_carry)
        flat = lambda v: v.reshape(-1, *m_shape)  # noqa: E731
        fstate, fit_info = interface.fit(
            fstate, Target(grad=flat(dm), inputs=flat(messages), valid=True))
        new = MultiRateState(a_new, b_new, fstate, a_steps, state.b_steps + ticks[-1],
                             a_updates, state.b_updates + 1)
        info = {"loss": jnp.sum(las) + lb, "a_loss": jnp.sum(las), "b_loss": lb,
                "sg_loss": jnp.asarray(fit_info.get("sg_loss", 0.0), jnp.float32),
                "sg_norm": jnp.mean(sg_norms), "b_ticks_at": emitted.reshape(T)}
        return new, info

    return System(init, step, _apply_fn(a, b, T), interface, T, a_every, batch_size)
