"""The pipelined schedule compiled as one program over a ``stage`` mesh axis.

:class:`sgjax.Runner` uses this engine when the stages of a pipelined split sit on more
than one device (or more than one process, after ``jax.distributed.initialize``). Stages
are grouped by device; group ``j`` lives on ``mesh.devices[j]``.

Why one SPMD program and not one program per device. Under the pipelined schedule
(:mod:`sgjax.train`) stage *k* reads on tick *t* what stages *k − 1* and *k + 1* sent on
tick *t − 1*: the two directions are both one tick stale, so no device can run a chunk of
ticks ahead of its neighbours, and per-device programs would need one dispatch per tick
and device (what made the Runner dispatch-bound). Inside one compiled program the
exchange is a ``lax.ppermute`` per crossing interface per tick, the compiler orders every
transfer (a transfer-order mismatch between processes cannot happen), and a chunk of
ticks is one dispatch (:func:`sgjax.fused`).

How stages of different shapes share one program. Every device runs the same program;
``lax.switch`` on the device's position on the ``stage`` axis picks its own group's
stage functions, so each device computes only its own stages. A group's stage states
are packed into one flat buffer per dtype (:class:`Layout`), padded to the largest
group, so that every device holds an array of the same shape: parameters and optimiser
states never leave their device. The messages (``Message`` up, ``Target`` down) are kept
per interface, each with its own shape, on every device (zeros where unused: they are
activation-sized). Only the messages of interfaces whose two stages sit on different
devices cross, and only the fields the feedback reads (``Target`` holds no others).
Per-stage info (the loss, synthetic-gradient statistics) is summed over the axis, so
every device (and every process) holds all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sgjax.train import PipeState, TrainState, merge_infos

STAGE_AXIS = "stage"


def shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (jax >= 0.6), or its
    ``jax.experimental`` predecessor on older jax."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    from jax.experimental.shard_map import shard_map as old  # jax < 0.6

    return old(f, mesh, in_specs, out_specs, check_rep=False)


# ------------------------------------------------------------------------- packing


class Slot(NamedTuple):
    """Where one leaf lives in its dtype's buffer: ``[offset, offset + size)``,
    reshaped to ``shape``; ``key_impl`` names the PRNG implementation of a typed key
    leaf (stored as its raw ``uint32`` key data), else ``None``."""

    buffer: str
    offset: int
    shape: tuple[int, ...]
    key_impl: str | None


class Layout(NamedTuple):
    """How a pytree is packed into one flat buffer per dtype (``sizes``: the length its
    own leaves need in each buffer)."""

    treedef: Any
    slots: tuple[Slot, ...]
    sizes: dict[str, int]


def layout_of(shapes: Any) -> Layout:
    """The packing of a pytree of ``jax.ShapeDtypeStruct`` (e.g. ``jax.eval_shape``'s)."""
    leaves, treedef = jax.tree.flatten(shapes)
    sizes: dict[str, int] = {}
    slots = []
    for leaf in leaves:
        dtype, shape, impl = leaf.dtype, tuple(leaf.shape), None
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            impl = dtype._impl.name
            data = jax.eval_shape(jax.random.key_data, leaf)
            dtype, shape = data.dtype, tuple(data.shape)
        name = np.dtype(dtype).name
        size = int(np.prod(shape, dtype=np.int64))
        slots.append(Slot(name, sizes.get(name, 0), shape, impl))
        sizes[name] = sizes.get(name, 0) + size
    return Layout(treedef, tuple(slots), sizes)


def pack(layout: Layout, tree: Any, sizes: dict[str, int]) -> dict[str, jax.Array]:
    """``tree`` as ``{dtype name: (sizes[name],)}`` buffers (zero padded)."""
    parts: dict[str, list] = {name: [] for name in sizes}
    for slot, leaf in zip(layout.slots, jax.tree.leaves(tree), strict=True):
        if slot.key_impl is not None:
            leaf = jax.random.key_data(leaf)
        parts[slot.buffer].append(jnp.ravel(leaf))
    out = {}
    for name, size in sizes.items():
        used = layout.sizes.get(name, 0)
        pad = [jnp.zeros((size - used,), name)] if size > used else []
        out[name] = jnp.concatenate(parts[name] + pad) if parts[name] or pad else (
            jnp.zeros((0,), name))
    return out


def unpack(layout: Layout, buffers: dict[str, Any]) -> Any:
    """The pytree :func:`pack` stored in ``buffers`` (static slices)."""
    leaves = []
    for slot in layout.slots:
        size = int(np.prod(slot.shape, dtype=np.int64))
        leaf = buffers[slot.buffer][slot.offset:slot.offset + size].reshape(slot.shape)
        if slot.key_impl is not None:
            leaf = jax.random.wrap_key_data(leaf, impl=slot.key_impl)
        leaves.append(leaf)
    return jax.tree.unflatten(layout.treedef, leaves)


def _zeros(shapes: Any, fill=0) -> Any:
    def zero(s):
        value = fill if jnp.issubdtype(s.dtype, jnp.inexact) else 0
        return jnp.full(s.shape, value, s.dtype)

    return jax.tree.map(zero, shapes)


def host(array: jax.Array) -> np.ndarray:
    """The whole value of ``array`` on this host (gathered from the other processes when
    some of its shards live there: every process must call this)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


# ------------------------------------------------------------------------- the engine


class MeshState(NamedTuple):
    """A pipelined split's state on a ``stage`` mesh axis of ``G`` devices.

    ``stages``: every group's stage states packed, ``{dtype name: (G, n)}``, row ``j`` on
    device ``j``. ``pending[k]`` / ``inbox[k]``: stage *k*'s pending target and next
    input message (as in :class:`sgjax.train.PipeState`), every leaf ``(G, *shape)``;
    only row ``group[k]`` is read.
    """

    stages: dict[str, jax.Array]
    pending: tuple
    inbox: tuple


class Pipeline:
    """The compiled pipelined tick of ``split`` with stage *k* on ``devices[k]``.

    ``tick(stages, state, message, pending) -> (state, up, down, info)`` is one stage's
    share of a tick (``sgjax.train._pipelined_stage``); ``shapes`` is the single-device
    ``PipeState`` as ``jax.ShapeDtypeStruct`` (it fixes every message's shape).
    """

    def __init__(self, split, devices: Sequence[jax.Device], stage_tick, shapes):
        self.split = split
        distinct = list(dict.fromkeys(devices))
        self.mesh = Mesh(np.array(distinct, dtype=object), (STAGE_AXIS,))
        self.group = tuple(distinct.index(d) for d in devices)
        self.members = tuple(tuple(k for k, g in enumerate(self.group) if g == j)
                             for j in range(len(distinct)))
        self.sharding = NamedSharding(self.mesh, PartitionSpec(STAGE_AXIS))
        self._stage_tick = stage_tick
        self._shapes = shapes
        stage_shapes = shapes.train.stages
        self.layouts = tuple(layout_of(tuple(stage_shapes[k] for k in members))
                             for members in self.members)
        names = sorted({n for lay in self.layouts for n in lay.sizes})
        self.sizes = {n: max(max(lay.sizes.get(n, 0) for lay in self.layouts), 1)
                      for n in names}
        self.step = jax.jit(self._step)
        self.apply = jax.jit(self._apply)

    # -- state

    def init(self, keys, batch_shapes) -> MeshState:
        """Each process initialises only the groups on its own devices, from the same
        per-stage keys as ``Split.init`` (``keys[k]`` for stage *k*)."""
        del batch_shapes
        local = set(jax.local_devices())
        G = len(self.members)
        rows: dict[str, list] = {n: [] for n in self.sizes}
        for j, members in enumerate(self.members):
            device = self.mesh.devices[j]
            if device not in local:
                continue
            with jax.default_device(device):
                states = tuple(self.split.stages[k].init(keys[k]) for k in members)
                packed = pack(self.layouts[j], states, self.sizes)
            for n, buf in packed.items():
                rows[n].append(jax.device_put(buf[None], device))
        stages = {n: jax.make_array_from_single_device_arrays(
            (G, self.sizes[n]), self.sharding, rows[n]) for n in self.sizes}
        zeros = jax.tree.map(self._stacked_zeros, (self._shapes.train.pending,
                                                   self._shapes.inbox))
        return MeshState(stages, *zeros)

    def _stacked_zeros(self, s) -> jax.Array:
        G = len(self.members)
        shape = (G, *s.shape)
        return jax.make_array_from_callback(
            shape, self.sharding, lambda index: np.zeros(
                tuple(len(range(*i.indices(n))) for i, n in zip(index, shape)), s.dtype))

    def gather(self, state: MeshState):
        """The state as the single-device ``PipeState`` on this host (every process must
        call this when stages live in several processes)."""
        rows = {n: host(buf) for n, buf in state.stages.items()}
        stages: list = [None] * len(self.group)
        for j, members in enumerate(self.members):
            unpacked = unpack(self.layouts[j], {n: jnp.asarray(r[j]) for n, r in rows.items()})
            for k, s in zip(members, unpacked):
                stages[k] = s

        def row(tree, k):
            return jax.tree.map(lambda a: jnp.asarray(host(a)[self.group[k]]), tree)

        pending = tuple(row(p, k) for k, p in enumerate(state.pending))
        inbox = tuple(row(m, k) for k, m in enumerate(state.inbox))
        return PipeState(TrainState(tuple(stages), pending), inbox)

    # -- the compiled tick

    def _step(self, state: MeshState, x, y):
        spec = PartitionSpec(STAGE_AXIS)
        body = shard_map(self._local_tick, self.mesh, in_specs=(spec, PartitionSpec(),
                                                                PartitionSpec()),
                         out_specs=(spec, PartitionSpec()))
        return body(state, x, y)

    def _local_tick(self, state: MeshState, x, y):
        K = len(self.group)
        local = jax.tree.map(lambda a: a[0], state)
        out_shapes = jax.eval_shape(self._all_stages, self._shapes.train.stages,
                                    self._shapes.inbox, self._shapes.train.pending,
                                    jax.ShapeDtypeStruct(x.shape, x.dtype),
                                    jax.ShapeDtypeStruct(y.shape, y.dtype))
        _, ups, downs, infos = out_shapes

        def branch(j):
            def run(buffers, inbox, pending):
                states = unpack(self.layouts[j], buffers)
                new, up, down, info = list(states), _zeros(ups), _zeros(downs), \
                    _zeros(infos)
                up, down, info = list(up), list(down), list(info)
                for i, k in enumerate(self.members[j]):
                    new[i], up[k], down[k], info[k] = self._stage_tick(
                        self.split.stages[k], states[i], inbox[k], pending[k], x, y)
                return pack(self.layouts[j], tuple(new), self.sizes), tuple(up), \
                    tuple(down), tuple(info)
            return run

        buffers, up, down, info = jax.lax.switch(
            jax.lax.axis_index(STAGE_AXIS), [branch(j) for j in range(len(self.members))],
            local.stages, local.inbox, local.pending)
        inbox = [None] * K
        pending = [None] * K
        for k in range(K):
            if k + 1 < K:
                inbox[k + 1] = self._route(up[k], self.group[k], self.group[k + 1])
            if k > 0:
                pending[k - 1] = self._route(down[k], self.group[k], self.group[k - 1])
        new = MeshState(buffers, tuple(pending), tuple(inbox))
        info = jax.tree.map(lambda a: jax.lax.psum(a, STAGE_AXIS), info)
        return jax.tree.map(lambda a: a[None], new), merge_infos(info)

    def _all_stages(self, stages, inbox, pending, x, y):
        """Every stage's share of a tick, on one device (only for its output shapes)."""
        out = [self._stage_tick(s, st, m, p, x, y) for s, st, m, p in
               zip(self.split.stages, stages, inbox, pending)]
        return tuple(zip(*out)) if out else ((), (), (), ())

    @staticmethod
    def _route(message, src: int, dst: int):
        if message is None or src == dst:
            return message
        return jax.tree.map(lambda a: jax.lax.ppermute(a, STAGE_AXIS, [(src, dst)]), message)

    # -- inference

    def _apply(self, stages: dict[str, jax.Array], x):
        spec = PartitionSpec(STAGE_AXIS)
        body = shard_map(self._local_apply, self.mesh, in_specs=(spec, PartitionSpec()),
                         out_specs=PartitionSpec())
        return body(stages, x)

    def _local_apply(self, stages, x):
        buffers = {n: b[0] for n, b in stages.items()}
        g = jax.lax.axis_index(STAGE_AXIS)
        h = x
        for k, stage in enumerate(self.split.stages):
            j = self.group[k]
            i = self.members[j].index(k)

            def run(buffers, h, stage=stage, j=j, i=i):
                return stage.apply(unpack(self.layouts[j], buffers)[i], h)

            shape = jax.eval_shape(run, buffers, h)
            h = jax.lax.cond(g == j, run, lambda b, h, s=shape: _zeros(s), buffers, h)
            if k + 1 < len(self.split.stages):
                h = self._route(h, j, self.group[k + 1])
        return jax.lax.psum(h, STAGE_AXIS)
