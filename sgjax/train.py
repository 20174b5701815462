"""Schedules that run the stages of a :class:`~sgjax.split.Split`.

Every schedule is a trainer of :mod:`sgjax.trainer`'s contract: ``init(key, batch)``,
``step(state, batch) -> (state, info)``, ``apply(state, x)``, with ``batch`` a
:class:`~sgjax.trainer.Batch`.

* :func:`sync` — every stage processes batch *t* in order (the papers'
  protocol, used by the reproduction tables). Its ``step`` is pure and
  jittable; :func:`fused` wraps it in ``jax.lax.scan`` so a chunk of steps is
  one compiled program, and it can be ``jax.vmap``-ed over seeds
  (:func:`sgjax.trainer.vmap_seeds`).
* :func:`stochastic` — like ``sync`` but each stage updates only with
  probability ``p_update`` (DNI §3.1 "Sparse updates", Fig. 5 left); a stage
  that skips still runs forward but sends no target down. Pure and fusable.
* :class:`Runner` — runs ``sync`` or ``pipelined`` with every stage's state on
  its own device (``jax.device_put``; computation follows the data). Each stage
  function is jitted once.

How targets flow. Each interface keeps its own protocol, so feedbacks can be
mixed in one split. A stage whose feedback is not update locked (DNI, cDNI,
No Bprop, stale) updates as soon as its input arrives, from its predictor's
synthetic gradient for batch *t*; once the stage above has sent the target for
batch *t*, the predictor is fitted to it, and the fitted predictor is used on
batch *t + 1*: exactly DNI Fig. 2 (use on *t*, fit on *t*, use on *t + 1*).
A stage whose feedback is update locked (Bprop, SG + prop, FA, DFA, Kickback)
runs its forward pass, keeps the residual, and finishes its backward pass when
this batch's target comes down. Every forward pass runs once per step.

``pipelined`` (Runner only): on tick *t* stage *k* processes batch *t − k*,
and every stage of a tick is dispatched before any result is awaited, so on *K*
devices they run at the same time. The target a stage receives on tick *t* was
computed by the stage above on tick *t − 1*, for batch *t − k − 2*, so it is
kept as a pending target and fitted at the start of the next tick, before the
prediction for batch *t − k* (``TrainState.pending``). Update-locked feedbacks
cannot be pipelined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sgjax.feedback import Target
from sgjax.optim import advance_schedules
from sgjax.split import Split, Stage, StageState
from sgjax.trainer import Batch, as_batch, check_trainer


class TrainState(NamedTuple):
    """All stages' states and, for the pipelined schedule, per stage the target
    received but not yet fitted (``None`` everywhere under ``sync`` and
    ``stochastic``, which fit each target in the step it arrives)."""

    stages: tuple[StageState, ...]
    pending: tuple[Target | None, ...]


class Schedule(NamedTuple):
    """A trainer (:class:`sgjax.trainer.Trainer`) of a split: ``init(key, batch) ->
    TrainState``, a pure ``step(state, batch) -> (state, info)`` and ``apply(state, x)``,
    inference through every stage. ``info``: ``loss`` (the top stage's task loss) and
    per-stage entries ``<name>/<stage>`` (``sg_loss``, ``sg_norm``, ``target_norm``,
    ``sg_cosine`` for synthetic gradients; ``active`` under :func:`stochastic`)."""

    init: Callable[..., TrainState]
    step: Callable[..., tuple[TrainState, dict]]
    apply: Callable[[TrainState, jax.Array], jax.Array]


def _placeholders(split: Split, stages: Sequence[StageState], x, y) -> tuple:
    """``valid=False`` zero targets with the exact structure each stage that
    does not wait will receive (``None`` for the top stage and for stages whose
    feedback is update locked: they never keep a target between steps)."""
    inputs = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    for stage, state in zip(split.stages[:-1], stages):
        inputs.append(jax.eval_shape(stage.forward, state, inputs[-1]))
    pending: list = [None] * len(split.stages)
    target = None
    for k in reversed(range(len(split.stages))):
        if not split.stages[k].waits:
            pending[k] = target
        if k == 0:
            break
        out = jax.eval_shape(split.stages[k].update, stages[k], inputs[k], y, target)
        target = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out[2])
    return tuple(pending)


def _init(split: Split, key, batch, *, pending: bool = False) -> TrainState:
    """Initial state; ``pending`` adds the ``valid=False`` placeholder targets a
    pipelined schedule keeps between ticks (``sync``/``stochastic`` keep none)."""
    x, y = as_batch(batch, "init").x, as_batch(batch, "init").y
    split.check_batch(x, y)
    stages = split.init(key)
    if not pending:
        return TrainState(stages, (None,) * len(stages))
    return TrainState(stages, _placeholders(split, stages, x, y))


def merge_infos(infos: Sequence[dict]) -> dict:
    """One info dict from per-stage ones: the loss keeps its name, every other entry
    ``name`` of stage ``k`` becomes ``name/k``."""
    merged = {}
    for k, info in enumerate(infos):
        for name, value in info.items():
            merged[name if name == "loss" else f"{name}/{k}"] = value
    return merged


def _sync_tick(stages: Sequence[Stage], ts: TrainState, x, y):
    """One step of every stage on batch ``(x, y)``, each with its own protocol.

    1. Bottom-up: a stage whose feedback is not update locked updates at once
       from its synthetic (or zero, or stale) gradient; a stage that waits
       (update-locked feedback) runs only its forward pass and keeps the residual.
    2. Top-down: each waiting stage finishes its backward pass with the target
       the stage above has just sent for this batch.
    3. Every other interface's gradient source is fitted to the target that
       arrived for this batch (DNI Fig. 2: use on t, fit on t, use on t + 1).
       Inside one compiled step the fit reuses the prediction's forward pass.

    Every forward pass runs once; nothing is kept between steps. ``stages`` are the
    split's stages, or the same functions placed on devices (:class:`Runner`).
    """
    K = len(stages)
    new: list = [None] * K
    infos: list = [None] * K
    sent: list = [None] * (K + 1)  # sent[k]: the target stage k sent below, this step
    residuals: dict = {}
    h = x
    for k, stage in enumerate(stages):
        if stage.waits:
            h_next, residuals[k] = stage.forward_pass(ts.stages[k], h)
        else:
            new[k], h_next, sent[k], infos[k] = stage.update(ts.stages[k], h, y, None)
        h = h_next
    for k in reversed(sorted(residuals)):
        new[k], sent[k], infos[k] = stages[k].backward_pass(
            ts.stages[k], residuals[k], y, sent[k + 1])
    for k in range(K - 1):
        if not stages[k].waits:
            new[k], fit_info = stages[k].fit(new[k], sent[k + 1])
            infos[k] = {**infos[k], **fit_info}
    return TrainState(tuple(new), ts.pending), merge_infos(infos)


def check_batch(split: Split, x, y) -> None:
    """``split.check_batch(x, y)`` when the batch is concrete (inside a traced step the
    shapes were already checked by the schedule's ``init`` and by tracing itself)."""
    if not isinstance(x, jax.core.Tracer) and not isinstance(y, jax.core.Tracer):
        split.check_batch(x, y)


def _check_split(split, where: str) -> None:
    if not isinstance(split, Split):
        raise TypeError(f"{where} needs an sgjax.Split (from sgjax.split_at), got {split!r}")


def sync(split: Split) -> Schedule:
    """The papers' synchronous protocol: a trainer whose pure ``step(state, batch)``
    runs every stage on ``batch = Batch(x, y)``."""
    _check_split(split, "sync")

    def step(ts, batch):
        b = as_batch(batch, "sync step")
        check_batch(split, b.x, b.y)
        return _sync_tick(split.stages, ts, b.x, b.y)

    return Schedule(lambda key, batch: _init(split, key, batch), step, _apply(split))


def _apply(split: Split):
    def apply(ts: TrainState, x):
        return split.apply(ts.stages, x)

    return apply


def stochastic(split: Split, p_update: float | None) -> Schedule:
    """Sparse updates (DNI §3.1, Fig. 5 left): a trainer whose pure
    ``step(state, Batch(x, y, key))`` draws from ``key`` which stages update.

    "After every forward pass, each layer does its backward pass only with
    probability ``p_update``." A stage that skips still runs forward (the stage
    above needs ``h``) but does not update its parameters and sends no target
    down. A target that has reached it is not lost: the synthetic-gradient
    model at its output is still fitted to it (training the model belongs to
    the arrival of the message, DNI Fig. 2), so its predictor keeps learning
    from every backward pass the stage above makes.

    Learning-rate schedules count global steps: a stage that skips (or a predictor whose
    target did not arrive) still moves its optimiser's schedule on by one step
    (:func:`sgjax.optim.advance_schedules`), so ``piecewise_adam(3e-5, (300_000,
    400_000))`` drops at global steps 300k and 400k whatever ``p_update`` is; Adam's
    moments and bias correction count the module's own updates.

    ``p_update=None`` makes it part of the batch, ``Batch(x, y, key, p_update)``,
    so a population of runs can be ``jax.vmap``-ed over ``p_update`` too.
    """
    _check_split(split, "stochastic")
    if p_update is not None and not 0.0 < p_update <= 1.0:
        raise ValueError(f"p_update={p_update!r} must be in (0, 1]")
    if split.update_locked:
        raise ValueError(
            "stochastic updates need feedbacks that are not update locked (DNI, cDNI, "
            "none, stale); this split uses an update-locked feedback"
        )
    fixed_p = p_update

    def step(ts, batch):
        x, y, key, p_update = as_batch(batch, "stochastic step")
        p = fixed_p if fixed_p is not None else p_update
        if p is None:
            raise ValueError("stochastic(split, None) needs p_update in the batch: "
                             "Batch(x, y, key, p_update)")
        if key is None:
            raise ValueError("stochastic updates draw which stages update: pass this step's "
                             "key in the batch, Batch(x, y, key)")
        check_batch(split, x, y)
        K = len(split.stages)
        active = jax.random.bernoulli(key, p, (K,))
        new, infos, sent = [None] * K, [None] * K, [None] * (K + 1)
        h = x
        for k, stage in enumerate(split.stages):
            shapes = jax.eval_shape(stage.update, ts.stages[k], h, y, None)

            def skip(state, h, stage=stage, shapes=shapes):
                below = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2])
                info = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[3])
                return state, stage.forward(state, h), below, info

            def run(state, h, stage=stage):
                return stage.update(state, h, y, None)

            new[k], h, sent[k], info = jax.lax.cond(active[k], run, skip, ts.stages[k], h)
            new[k] = skipped_schedules(new[k], active[k])
            infos[k] = {**info, "active": active[k]}
        for k in range(K - 1):  # a skipped stage above sent an invalid target: no fit
            new[k], fit_info = split.stages[k].fit(new[k], sent[k + 1])
            new[k] = unfitted_schedules(new[k], sent[k + 1])
            infos[k] = {**infos[k], **fit_info}
        return TrainState(tuple(new), ts.pending), merge_infos(infos)

    return Schedule(lambda key, batch: _init(split, key, batch), step, _apply(split))


def skipped_schedules(state: StageState, updated) -> StageState:
    """``state`` with its parameter optimiser's schedules moved on one step if the stage
    skipped this step (``updated`` false): learning-rate schedules count global steps, as
    in DNI §3.1 ("after every forward pass, each layer does its backward pass only with
    probability p_update" — the decay points are global steps), while Adam's moments and
    bias correction count the stage's own updates."""
    return state._replace(opt_state=advance_schedules(
        state.opt_state, 1 - jnp.asarray(updated, jnp.int32)))


def unfitted_schedules(state: StageState, target: Target | None) -> StageState:
    """``state`` with the schedules inside its feedback state (the predictor's optimiser)
    moved on one step if ``target`` did not arrive (``valid`` false): the predictor's
    learning-rate schedule counts global steps too."""
    if target is None:
        return state
    return state._replace(feedback=advance_schedules(
        state.feedback, 1 - jnp.asarray(target.valid, jnp.int32)))


class NonFiniteError(FloatingPointError):
    """A training quantity became NaN or infinite."""


def check_finite(tree: Any, *, where: str = "training") -> Any:
    """Raise :class:`NonFiniteError` naming the first NaN/inf leaf of ``tree``
    (e.g. a step's info dict or a train state); return ``tree`` otherwise.

    Opt-in and host-side: call it on what a (fused) step returned, every step
    or every chunk. It waits for the values.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = jnp.asarray(leaf)
        if jnp.issubdtype(arr.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(arr))):
            name = jax.tree_util.keystr(path) or "value"
            raise NonFiniteError(
                f"{where}: {name} is not finite (NaN or inf): lower the learning rate, "
                "check the inputs, or clip gradients"
            )
    return tree


def fused(trainer: Any, *, batch_fn: Callable | None = None, donate: bool = False
          ) -> Callable:
    """Compile a chunk of steps into one program.

    ``trainer`` is a trainer (:class:`sgjax.trainer.Trainer`; its ``step`` is used) or a
    pure ``step(state, batch) -> (state, info)``. Returns
    ``run(state, batches, data=None) -> (state, infos)``: one jitted ``jax.lax.scan`` of
    the step over the leading axis of every leaf of ``batches``, with the per-step infos
    stacked. Without ``batch_fn`` the body calls ``step(state, batches[t])`` (e.g.
    ``batches = Batch(xs, ys)`` with ``xs`` of shape ``(chunk, B, ...)``). With
    ``batch_fn`` it calls ``step(state, batch_fn(data, batches[t]))``, so the dataset
    ``data`` stays device-resident and each batch is gathered inside the compiled
    program, e.g. ``batch_fn=lambda d, t: Batch(d.x[t.idx], d.y[t.idx], t.key)``
    scanned over ``(chunk, B)`` indices and ``chunk`` keys.

    A trainer with ``steady_step`` and ``fill_ticks`` (:mod:`sgjax.trainer`; the
    pipelined :class:`Runner`) runs the first ``fill_ticks`` steps of each chunk with
    ``step`` and the rest with ``steady_step``: the same numbers, without the masking
    that only the pipeline's first ticks need.
    """
    step = trainer.step if hasattr(trainer, "step") else trainer
    if not callable(step):
        raise TypeError(f"fused needs a trainer or a step function, got {trainer!r}")
    steady = getattr(trainer, "steady_step", None)
    fill = getattr(trainer, "fill_ticks", None)

    def run(state, batches, data=None):
        lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
                   for leaf in jax.tree.leaves(batches)}
        if len(lengths) > 1 or None in lengths:
            raise ValueError(
                f"fused run: every scanned input needs the same leading (step) axis, got "
                f"lengths {sorted(str(n) for n in lengths)}"
            )

        def body(step):
            def scanned(state, b_t):
                return step(state, batch_fn(data, b_t) if batch_fn is not None else b_t)
            return scanned

        n = lengths.pop()
        if steady is None or fill is None or fill >= n:
            return jax.lax.scan(body(step), state, batches)
        # From any state, the first fill_ticks steps make steady_step exact.
        first, rest = (jax.tree.map(lambda a, s=s: a[s], batches)
                       for s in (slice(None, fill), slice(fill, None)))
        state, infos = jax.lax.scan(body(step), state, first) if fill else (state, None)
        state, more = jax.lax.scan(body(steady), state, rest)
        if infos is None:
            return state, more
        return state, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), infos, more)

    return jax.jit(run, donate_argnums=(0,) if donate else ())


class Message(NamedTuple):
    """What stage *k* sends up to stage *k + 1* on a pipelined tick: its output ``h``
    ``(B, *out_shape)``, the labels ``y`` of the same batch, and ``valid`` (false while
    the pipeline fills: no batch has reached stage *k* yet)."""

    h: jax.Array
    y: Any
    valid: jax.Array


class PipeState(NamedTuple):
    """Pipelined state, one structure from tick 0: ``inbox[k]`` is the
    :class:`Message` stage ``k`` processes next (``None`` for stage 0, which reads the
    batch; ``valid=False`` zeros while the pipeline fills)."""

    train: TrainState
    inbox: tuple[Message | None, ...]


def _pipelined_stage(stage: Stage, state: StageState, message: Message | None,
                     pending: Target | None, x, y, *, filling: bool = True):
    """Stage *k*'s share of a pipelined tick: ``(state, up, down, info)``.

    It reads only what it owns and what reached it on the previous tick: its input
    ``message`` (the batch ``(x, y)`` for stage 0) and its ``pending`` target. It fits the
    target, predicts for its input and updates (``Stage.update``); ``up`` is the
    :class:`Message` for stage *k + 1* (``None`` at the top), ``down`` the target for
    stage *k − 1* (``None`` at the bottom). A stage whose input is not valid yet (the
    pipeline is filling) stays unchanged and sends invalid messages both ways; its
    float info entries (the top stage's ``loss``) are NaN. ``filling=False`` promises a
    valid input (the pipeline is full) and skips those selects."""
    if message is None:
        new, h, down, info = stage.update(state, x, y, pending)
        return new, Message(h, y, jnp.ones((), bool)), down, info
    new, h, down, info = stage.update(state, message.h, message.y, pending)
    if filling:
        # Computed whatever the input, kept only where it was valid: a select, not a
        # lax.cond, so that the stage still fuses with the rest of the tick.
        valid = message.valid
        new = jax.tree.map(lambda a, b: b if _is_key(b) else jnp.where(valid, a, b),
                           new, state)
        h = jnp.where(valid, h, jnp.zeros_like(h))
        if down is not None:
            down = jax.tree.map(lambda a: jnp.where(valid, a, jnp.zeros_like(a)), down)
        info = jax.tree.map(lambda a: jnp.where(valid, a, jnp.full_like(a, jnp.nan) if (
            jnp.issubdtype(a.dtype, jnp.inexact)) else jnp.zeros_like(a)), info)
    return new, Message(h, message.y, message.valid), down, info


def _is_key(a) -> bool:
    return jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def pipelined_share(stages: Sequence[Stage], states, inbox, pending, x, y, *,
                    steady: bool = False):
    """The share of a pipelined tick of ``stages`` (those on one device): per stage
    ``(state, up, down, info)`` (:func:`_pipelined_stage`). Once the highest of them has a
    valid input every one has (the pipeline fills bottom-up) and the tick runs without
    the filling selects (one ``lax.cond`` per tick, not per stage). ``steady=True``
    promises a full pipeline (every input valid: ``K − 1`` ticks have run) and leaves
    out the cond and the selects."""
    def share(filling):
        def run(states, inbox, pending):
            return tuple(_pipelined_stage(s, st, m, p, x, y, filling=filling)
                         for s, st, m, p in zip(stages, states, inbox, pending))
        return run

    last = inbox[-1]
    if steady or last is None:  # (stage 0 alone: its input, the batch, is always valid)
        return share(False)(states, inbox, pending)
    return jax.lax.cond(last.valid, share(False), share(True), states, inbox, pending)


def _pipelined_tick(stages: Sequence[Stage], ps: PipeState, x, y, *, steady: bool = False):
    """One pipelined tick of every stage on one device (pure, jittable): each stage's
    share (:func:`_pipelined_stage`) reads only the previous tick's messages, then the
    messages move one interface (``up`` into the inbox above, ``down`` into the pending
    target below). ``steady``: see :func:`pipelined_share`."""
    out = pipelined_share(stages, ps.train.stages, ps.inbox, ps.train.pending, x, y,
                          steady=steady)
    new, ups, downs, infos = zip(*out)
    inbox = (None, *ups[:-1])
    pending = (*downs[1:], None)
    return PipeState(TrainState(tuple(new), pending), inbox), merge_infos(infos)


def _placed(fn: Callable, device) -> Callable:
    """``fn`` jitted once, its arguments moved to ``device`` before each call
    (computation follows the data)."""
    jitted = jax.jit(fn)

    def call(*args):
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
            raise ValueError(
                "a sync Runner with stages on several devices dispatches one stage at a "
                "time and cannot be traced (fused, jit, vmap): put its stages on one "
                "device, or use schedule='pipelined', whose tick compiles across devices"
            )
        return jitted(*jax.device_put(args, device))

    return call


def _spread(K: int, devices: Sequence) -> list:
    """``K`` stages over ``devices`` in contiguous, balanced groups (stage *k* on
    ``devices[k * D // K]``)."""
    D = len(devices)
    return [devices[k * D // K] for k in range(K)]


def _check_devices(devices, K: int) -> list:
    if devices is None:
        if jax.process_count() > 1:  # launched as several processes: spread over all
            return _check_devices(jax.devices(), K)
        return [jax.devices()[0]] * K
    devices = list(devices)
    bad = [d for d in devices if not isinstance(d, jax.Device)]
    if bad:
        raise TypeError(
            f"devices={devices!r}: {bad[0]!r} is not a jax.Device; pass devices from "
            "jax.devices() (e.g. jax.devices()[:2])"
        )
    if not devices:
        raise ValueError("devices=[]: give at least one jax.Device, or None")
    if len(devices) < K:
        return _spread(K, devices)
    return devices[:K]


class Runner:
    """Run a split with stage *k*'s state on ``devices[k]``; a trainer
    (:class:`sgjax.trainer.Trainer`): ``init(key, batch)``, ``step(state, batch)``,
    ``apply(state, x)``.

    ``devices``: one per stage (a device may repeat); fewer devices than stages are
    shared in contiguous, balanced groups (``devices=jax.devices()`` spreads the stages
    over every device there is); more are cut to the first ``K``. ``None``: every stage
    on the default device, or, in a program launched as several processes
    (:mod:`sgjax.launch`), spread over every process's devices.

    ``schedule="pipelined"`` overlaps the stages (see the module docstring for its
    staleness). Its ``step`` is one compiled program whatever the devices, and its state
    keeps one structure from tick 0, so :func:`fused` compiles a chunk of ticks into one
    dispatch. On one device that program is the plain tick (:func:`_pipelined_tick`); on
    several it is :class:`sgjax.mesh.Pipeline`: one SPMD program over a ``stage`` mesh
    axis in which each device runs only its own stages and the messages cross with
    ``ppermute``. Launched as several processes, each process initialises and keeps only
    the stages on its own devices; ``gather(state)`` brings every stage's state to every
    process (for checkpoints), ``apply`` runs inference in place.

    ``schedule="sync"`` gives the same numbers as :func:`sync`. On one device its step
    is the jitted sync tick; on several, the stages run one after the other (every step
    waits for the previous stage: there is nothing to overlap), dispatched one stage
    function at a time (``Runner.stages``: the split's stages with placed functions).
    """

    def __init__(self, split: Split, *, schedule: str = "sync",
                 devices: Sequence[jax.Device] | None = None):
        _check_split(split, "Runner")
        K = len(split.stages)
        if schedule not in ("sync", "pipelined"):
            raise ValueError(f"schedule={schedule!r}: Runner supports 'sync' and 'pipelined'")
        if schedule == "pipelined" and split.update_locked:
            raise ValueError(
                "a pipelined schedule needs feedbacks that are not update locked; "
                "Bprop, SG + prop, FA, DFA and Kickback wait for this batch's target"
            )
        devices = _check_devices(devices, K)
        self.split, self.schedule, self.devices = split, schedule, devices
        self.stages: tuple[Stage, ...] = tuple(
            s._replace(**{name: _placed(getattr(s, name), d) for name in (
                "update", "forward", "apply", "forward_pass", "backward_pass", "fit")})
            for s, d in zip(split.stages, devices)
        )
        self._one_device = len(set(devices)) == 1
        self._mesh = None
        if jax.process_count() > 1:
            owners = {d.process_index for d in devices}
            if len(owners) < jax.process_count() or schedule != "pipelined":
                raise ValueError(
                    f"this program runs as {jax.process_count()} processes, but "
                    + ("only the pipelined schedule spans processes: use "
                       "Runner(split, schedule='pipelined')" if schedule != "pipelined" else
                       f"the {K} stages are placed on devices of processes {sorted(owners)} "
                       "only: every process must own at least one stage (use more cuts, "
                       "or devices=None)")
                )
        if schedule == "pipelined":
            tick = jax.jit(lambda ps, x, y: _pipelined_tick(split.stages, ps, x, y))
            self._steady = jax.jit(lambda ps, x, y: _pipelined_tick(split.stages, ps, x, y,
                                                                     steady=True))
            self.fill_ticks = K - 1
        else:
            tick = jax.jit(lambda ts, x, y: _sync_tick(split.stages, ts, x, y))
        self._tick = tick
        self._apply = jax.jit(split.apply)

    def init(self, key, batch):
        b = as_batch(batch, "init")
        if self.schedule == "pipelined" and not self._one_device:
            from sgjax.mesh import Pipeline

            self.split.check_batch(b.x, b.y)
            shapes = jax.eval_shape(lambda k: self._local_init(k, b.x, b.y), key)
            if self._mesh is None:
                self._mesh = Pipeline(self.split, self.devices, pipelined_share, shapes)
            keys = jax.random.split(key, len(self.split.stages))
            return self._mesh.init(keys)
        ts = _init(self.split, key, b, pending=self.schedule == "pipelined")
        stages = tuple(jax.device_put(s, d) for s, d in zip(ts.stages, self.devices))
        pending = tuple(jax.device_put(p, d) for p, d in zip(ts.pending, self.devices))
        ts = TrainState(stages, pending)
        if self.schedule == "pipelined":
            return PipeState(ts, jax.device_put(_empty_inbox(self.split, ts, b.x, b.y),
                                                self.devices[0]))
        return ts

    def _local_init(self, key, x, y) -> PipeState:
        ts = _init(self.split, key, Batch(x, y), pending=True)
        return PipeState(ts, _empty_inbox(self.split, ts, x, y))

    def step(self, state, batch):
        """One tick on ``batch = Batch(x, y)``. Returns the new state and the info of every
        stage (arrays are not awaited: dispatch is asynchronous). While a pipelined Runner
        fills (its first ``K − 1`` ticks) the stages no batch has reached yet stay
        unchanged and report NaN (``info["loss"]`` is NaN)."""
        b = as_batch(batch, "Runner step")
        check_batch(self.split, b.x, b.y)
        if self.schedule == "sync" and not self._one_device:
            return _sync_tick(self.stages, state, b.x, b.y)
        if self._mesh is not None and self.schedule == "pipelined":
            from sgjax.mesh import MeshState

            if not isinstance(state, MeshState):
                raise TypeError("this Runner's state comes from its own init(key, batch)")
            return self._mesh.step(state, b.x, b.y)
        return self._tick(state, b.x, b.y)

    def steady_step(self, state, batch):
        """``step`` for a full pipeline (``fill_ticks = K − 1`` ticks have run since
        ``init``): the same numbers without the masking of the stages that have no input
        yet. :func:`fused` uses it after a chunk's first ``fill_ticks`` ticks."""
        if self.schedule != "pipelined":
            return self.step(state, batch)
        b = as_batch(batch, "Runner steady_step")
        check_batch(self.split, b.x, b.y)
        if self._mesh is not None:
            return self._mesh.steady_step(state, b.x, b.y)
        return self._steady(state, b.x, b.y)

    def gather(self, state):
        """Every stage's state as one device's :class:`PipeState` / :class:`TrainState`
        (from every process, for checkpoints and evaluation; with stages in several
        processes every process must call it)."""
        if self._mesh is not None and self.schedule == "pipelined":
            return self._mesh.gather(state)
        return jax.device_get(state)

    def apply(self, state, x):
        """Inference through all stages, each on its own device."""
        if self._mesh is not None and self.schedule == "pipelined":
            return self._mesh.apply(state.stages, x)
        ts = state.train if isinstance(state, PipeState) else state
        if self._one_device:
            return self._apply(ts.stages, x)
        for k in range(len(self.split.stages)):
            x = self.stages[k].apply(ts.stages[k], x)
        return x


def _empty_inbox(split: Split, ts: TrainState, x, y) -> tuple:
    """``valid=False`` zero messages with the exact structure each stage above the
    bottom will receive."""
    inbox: list = [None]
    h = jax.ShapeDtypeStruct(x.shape, x.dtype)
    for stage, state in zip(split.stages[:-1], ts.stages):
        h = jax.eval_shape(stage.forward, state, h)
        inbox.append(Message(jnp.zeros(h.shape, h.dtype), jnp.zeros_like(y),
                             jnp.zeros((), bool)))
    return tuple(inbox)


__all__ = [
    "Batch", "Message", "NonFiniteError", "PipeState", "Runner", "Schedule", "TrainState",
    "check_batch", "check_finite", "check_trainer", "fused", "merge_infos",
    "skipped_schedules", "stochastic", "sync", "unfitted_schedules",
]
