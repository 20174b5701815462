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

import functools
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


def _to_bytes(trees) -> jax.Array:
    """Every leaf of ``trees`` as its raw bytes, concatenated: ``(n,)`` uint8."""
    parts = []
    for leaf in jax.tree.leaves(trees):
        if leaf.dtype == jnp.bool_ or leaf.dtype.itemsize == 1:
            parts.append(jnp.ravel(leaf.astype(jnp.uint8) if leaf.dtype == jnp.bool_ else
                                   jax.lax.bitcast_convert_type(leaf, jnp.uint8)))
        else:
            parts.append(jnp.ravel(jax.lax.bitcast_convert_type(leaf, jnp.uint8)))
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.uint8)


def _from_bytes(data: jax.Array, like):
    """The pytree ``like`` read back from the front of :func:`_to_bytes`'s ``data``."""
    leaves, treedef = jax.tree.flatten(like)
    out, offset = [], 0
    for leaf in leaves:
        n = int(np.prod(leaf.shape, dtype=np.int64))
        width = 1 if leaf.dtype == jnp.bool_ else leaf.dtype.itemsize
        chunk = data[offset:offset + n * width]
        offset += n * width
        if leaf.dtype == jnp.bool_:
            out.append(chunk.reshape(leaf.shape) != 0)
        elif width == 1:
            out.append(jax.lax.bitcast_convert_type(chunk, leaf.dtype).reshape(leaf.shape))
        else:
            out.append(jax.lax.bitcast_convert_type(chunk.reshape(*leaf.shape, width),
                                                    leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def _permutation_rounds(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """``pairs`` split greedily into rounds in which no device sends or receives twice
    (each round is one ``ppermute``)."""
    rounds: list[list[tuple[int, int]]] = []
    for pair in pairs:
        for r in rounds:
            if all(pair[0] != s and pair[1] != d for s, d in r):
                r.append(pair)
                break
        else:
            rounds.append([pair])
    return rounds


def _sum_over_stages(info):
    """``info`` (every device has zeros where another device owns the entry) summed over
    the ``stage`` axis in one all-reduce, so that every device holds all of it."""
    leaves, treedef = jax.tree.flatten(info)
    if not leaves:
        return info
    flat = jnp.concatenate([jnp.ravel(a).astype(jnp.float32) for a in leaves])
    flat = jax.lax.psum(flat, STAGE_AXIS)
    out, offset = [], 0
    for a in leaves:
        n = int(np.prod(a.shape, dtype=np.int64))
        out.append(flat[offset:offset + n].reshape(a.shape).astype(a.dtype))
        offset += n
    return jax.tree.unflatten(treedef, out)


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

    ``share(stages, states, inbox, pending, x, y)`` gives, per stage of a device, its
    share of a tick ``(state, up, down, info)`` (:func:`sgjax.train.pipelined_share`);
    ``shapes`` is the single-device
    ``PipeState`` as ``jax.ShapeDtypeStruct`` (it fixes every message's shape).
    """

    def __init__(self, split, devices: Sequence[jax.Device], share, shapes):
        self.split = split
        distinct = list(dict.fromkeys(devices))
        self.mesh = Mesh(np.array(distinct, dtype=object), (STAGE_AXIS,))
        self.group = tuple(distinct.index(d) for d in devices)
        self.members = tuple(tuple(k for k, g in enumerate(self.group) if g == j)
                             for j in range(len(distinct)))
        self.sharding = NamedSharding(self.mesh, PartitionSpec(STAGE_AXIS))
        self._share = share
        self._shapes = shapes
        stage_shapes = shapes.train.stages
        self.layouts = tuple(layout_of(tuple(stage_shapes[k] for k in members))
                             for members in self.members)
        names = sorted({n for lay in self.layouts for n in lay.sizes})
        self.sizes = {n: max(max(lay.sizes.get(n, 0) for lay in self.layouts), 1)
                      for n in names}
        self.step = jax.jit(self._step)
        self.steady_step = jax.jit(functools.partial(self._step, steady=True))
        self.apply = jax.jit(self._apply)

    # -- state

    def init(self, keys) -> MeshState:
        """Each process initialises only the groups on its own devices, from the same
        per-stage keys as ``Split.init`` (``keys[k]`` for stage *k*)."""
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

    def _step(self, state: MeshState, x, y, steady: bool = False):
        spec = PartitionSpec(STAGE_AXIS)
        body = shard_map(functools.partial(self._local_tick, steady=steady), self.mesh,
                         in_specs=(spec, PartitionSpec(), PartitionSpec()),
                         out_specs=(spec, PartitionSpec()))
        return body(state, x, y)

    def _local_tick(self, state: MeshState, x, y, steady: bool = False):
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
                members = self.members[j]
                shares = self._share([self.split.stages[k] for k in members], states,
                                     [inbox[k] for k in members],
                                     [pending[k] for k in members], x, y, steady=steady)
                for i, (k, out) in enumerate(zip(members, shares)):
                    new[i], up[k], down[k], info[k] = out
                return pack(self.layouts[j], tuple(new), self.sizes), tuple(up), \
                    tuple(down), tuple(info)
            return run

        buffers, up, down, info = jax.lax.switch(
            jax.lax.axis_index(STAGE_AXIS), [branch(j) for j in range(len(self.members))],
            local.stages, local.inbox, local.pending)
        inbox, pending = self._exchange(up, down)
        new = MeshState(buffers, pending, inbox)
        return jax.tree.map(lambda a: a[None], new), merge_infos(_sum_over_stages(info))

    def _exchange(self, up, down) -> tuple[tuple, tuple]:
        """Move every message one interface: ``up[k]`` into stage *k + 1*'s inbox and
        ``down[k]`` into stage *k − 1*'s pending target. Messages between stages on one
        device stay there; the others are byte-packed per (source, destination) pair and
        sent in as few ``ppermute`` rounds as a permutation allows (one each way for a
        chain of devices, both ways at once for two)."""
        K = len(self.group)
        inbox: list = [None] * K
        pending: list = [None] * K
        routes: dict[tuple[int, int], list] = {}  # (src, dst) -> [(kind, k, message)]
        for k in range(K):
            if k + 1 < K:
                src, dst = self.group[k], self.group[k + 1]
                if src == dst:
                    inbox[k + 1] = up[k]
                else:
                    routes.setdefault((src, dst), []).append(("up", k + 1, up[k]))
            if k > 0:
                src, dst = self.group[k], self.group[k - 1]
                if src == dst:
                    pending[k - 1] = down[k]
                else:
                    routes.setdefault((src, dst), []).append(("down", k - 1, down[k]))
        g = jax.lax.axis_index(STAGE_AXIS)
        for pairs in _permutation_rounds(list(routes)):
            payloads = {pair: _to_bytes([m for _, _, m in routes[pair]]) for pair in pairs}
            size = max(p.shape[0] for p in payloads.values())
            send = jnp.zeros((size,), jnp.uint8)
            for (src, _), p in payloads.items():
                padded = jnp.pad(p, (0, size - p.shape[0]))
                send = jnp.where(g == src, padded, send)
            received = jax.lax.ppermute(send, STAGE_AXIS, pairs)
            for pair in pairs:
                messages = _from_bytes(received, [m for _, _, m in routes[pair]])
                for (kind, k, _), message in zip(routes[pair], messages):
                    (inbox if kind == "up" else pending)[k] = message
        return tuple(inbox), tuple(pending)

    def _all_stages(self, stages, inbox, pending, x, y):
        """Every stage's share of a tick, on one device (only for its output shapes)."""
        return tuple(zip(*self._share(self.split.stages, stages, inbox, pending, x, y)))

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
