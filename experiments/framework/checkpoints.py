"""Checkpoints: one pytree and a step in one ``.npz`` file, written atomically."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from experiments.framework.declare import canonical, to_jsonable


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the state this code builds;
    the message names the file and says how to recover (delete it, or rerun with
    ``--fresh``)."""


def atomic_write(path: Path, write: Callable[[io.IOBase], None], binary: bool = False, *,
                 sync: bool = True) -> None:
    """Write ``path`` through a temporary file and ``os.replace`` (never half-written).

    ``sync=False`` skips the ``fsync``: the file still survives the writing process being
    killed (the page cache outlives it), only not a machine crash; for files rewritten often
    (a cell's progressive record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_prng_key(x: Any) -> bool:
    """Whether ``x`` is a typed JAX PRNG key array (``jax.random.key``)."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class Checkpointer:
    """Saves one pytree plus a step in ``directory/state.npz``, atomically.

    Leaves are stored as numpy arrays; the tree structure comes from the template passed to
    :meth:`restore` (so no pickling of classes), and restored leaves take the template's
    dtype, type and device placement (sharding). PRNG key arrays are supported. Only the
    latest checkpoint is kept. ``fingerprint`` (any JSON data) guards against resuming under
    a different config: a checkpoint written with another fingerprint is ignored.
    """

    FILENAME = "state.npz"

    def __init__(self, directory: str | os.PathLike, *, fingerprint: Any = None):
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME
        self.fingerprint = canonical(fingerprint)

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, step: int, state: Any, *, extra: Mapping[str, Any] | None = None) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(state)
        arrays = {f"leaf_{i}": _leaf_to_numpy(leaf) for i, leaf in enumerate(leaves)}
        meta = {
            "step": int(step),
            "treedef": str(treedef),
            "num_leaves": len(leaves),
            "fingerprint": self.fingerprint,
            "extra": to_jsonable(dict(extra or {})),
        }
        arrays["__meta__"] = np.array(json.dumps(meta))
        atomic_write(self.path, lambda f: np.savez(f, **arrays), binary=True)

    def restore(self, like: Any) -> tuple[int, Any, dict[str, Any]]:
        """``(step, state, extra)`` from the checkpoint, or ``(0, like, {})`` if none applies.

        Raises :class:`CheckpointError` if the file is corrupt or its tree does not fit
        ``like`` (the code changed).
        """
        if not self.path.exists():
            return 0, like, {}
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["__meta__"]))
                if meta["fingerprint"] != self.fingerprint:
                    return 0, like, {}
                stored = [data[f"leaf_{i}"] for i in range(meta["num_leaves"])]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(
                f"checkpoint {self.path} is corrupt or truncated ({type(e).__name__}: {e}); "
                "delete it or rerun with --fresh to start this cell over"
            ) from e
        leaves, treedef = jax.tree_util.tree_flatten(like)
        if str(treedef) != meta["treedef"] or len(leaves) != len(stored):
            raise CheckpointError(
                f"checkpoint {self.path} holds a differently structured state than this code "
                "builds; delete it or rerun with --fresh"
            )
        restored = [_leaf_from_numpy(a, t, self.path) for a, t in zip(stored, leaves, strict=True)]
        return meta["step"], jax.tree_util.tree_unflatten(treedef, restored), meta["extra"]


def _leaf_to_numpy(leaf: Any) -> np.ndarray:
    if is_prng_key(leaf):
        leaf = jax.random.key_data(leaf)
    arr = np.asarray(jax.device_get(leaf))
    if arr.dtype.kind == "V" or type(arr.dtype).__module__.startswith("ml_dtypes"):
        arr = arr.view(f"u{arr.dtype.itemsize}")  # bfloat16 etc.: store the raw bits
    return arr


def _leaf_from_numpy(arr: np.ndarray, like: Any, path: Path) -> Any:
    if is_prng_key(like):
        data = jax.random.key_data(like)
        if arr.shape != data.shape:
            raise CheckpointError(
                f"checkpoint {path}: PRNG key shape {arr.shape} != {data.shape}; "
                "delete it or rerun with --fresh")
        out = jax.random.wrap_key_data(arr.astype(data.dtype), impl=jax.random.key_impl(like))
        return jax.device_put(out, like.sharding)
    if isinstance(like, bool | int | float | complex):
        return type(like)(arr.item())
    like_arr = np.asarray(like) if not isinstance(like, jax.Array) else like
    if arr.shape != like_arr.shape:
        raise CheckpointError(
            f"checkpoint {path}: leaf shape {arr.shape} != {like_arr.shape}; "
            "delete it or rerun with --fresh")
    dtype = np.dtype(like_arr.dtype)
    arr = arr.view(dtype) if arr.dtype != dtype and arr.dtype.itemsize == dtype.itemsize else arr
    arr = arr.astype(dtype, copy=False)
    if isinstance(like, jax.Array):
        return jax.device_put(arr, like.sharding)
    return arr if isinstance(like, np.ndarray) else type(like)(arr)
