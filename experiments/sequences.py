"""Sequence data for recurrent DNI (DNI §3.2, Appendix A.3): the Copy and Repeat Copy
tasks with A.3's curriculum, and Penn Treebank at the character level.

Copy / Repeat Copy (Graves et al. 2014, as DNI §3.2 describes them)
---------------------------------------------------------------------
An episode with sequence length ``N`` and repeat count ``R`` (Copy is ``R = 1``) lasts
``N (R + 1) + 3`` steps. Inputs (``input_size = alphabet + 2``: a one-hot data symbol,
a stop flag, a repeat-count channel):

====================  =========================================  ===================
step (1-based)        input                                      target
====================  =========================================  ===================
``1 … N``             the ``N`` random symbols                   none (masked)
``N + 1``             the stop character                         none
``N + 2``             the number ``R`` (channel value ``R/10``)  none
``N + 3 … N + 2 + NR``  nothing                                  the symbols, ``R`` times
``N + 3 + NR``        nothing                                    the stop character
====================  =========================================  ===================

The paper's ``T_task = N R + 3`` (``N + 3`` for Copy) is the step at which the first
symbol's last copy is output, i.e. the time dependency the network must bridge; every
value in DNI Table 2 is of this form for the A.3 curriculum (e.g. Repeat Copy 59 =
``N 8, R 7``). Targets are ``alphabet + 1`` classes (the symbols and stop); the error is
the softmax cross-entropy in bits averaged over the target steps ("bits error").

The streams are generated on device, one step at a time (:func:`copy_step`), so a whole
run of chunks is one compiled program; the level ``(N, R)`` is a traced argument, so the
curriculum changes without recompiling. A new episode starts with the current level and
resets the LSTM state (``reset = True`` at its first step); an episode in flight keeps
the level it started with, and only episodes at the current level count towards the
curriculum (``current``).

Curriculum (A.3): once the model averages below 0.15 bits error on the current level the
task is made harder: Copy ``N += 1``; Repeat Copy alternately ``N += 1`` and ``R += 1``
(:func:`next_level`; from ``(1, 1)`` this gives exactly Table 2's values).

Penn Treebank, character level
------------------------------
:func:`load_ptb` reads Mikolov's character-level PTB (one sentence per line, its characters,
``_`` between words, then an end-of-line symbol), derived from the word files
``ptb.{train,valid,test}.txt`` that :func:`experiments.data.fetch` downloads and checks on first
use. :func:`ptb_streams` cuts a split into ``B`` contiguous streams, read ``T`` characters at
a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.data import fetch

__all__ = [
    "BITS_THRESHOLD", "CopyTask", "Level", "PTB", "PTB_FILES", "StreamState",
    "copy_chunk", "copy_step", "episode_length", "init_stream", "load_ptb", "next_level",
    "ptb_streams", "read_ptb", "t_task",
]

BITS_THRESHOLD = 0.15
"""A.3: a level is solved once the model averages below 0.15 bits error."""

R_SCALE = 10.0
"""The repeat-count channel carries ``R / R_SCALE``."""


# --------------------------------------------------------------------------- Copy tasks


class Level(NamedTuple):
    """A curriculum level: sequence length ``n`` and repeat count ``r`` (1 for Copy)."""

    n: int
    r: int


class CopyTask(NamedTuple):
    """Static facts of a Copy (``repeat=False``) or Repeat Copy task.

    ``alphabet`` data symbols; ``max_n`` bounds ``N`` (the symbol buffer's size).
    """

    repeat: bool
    alphabet: int = 8
    max_n: int = 64

    @property
    def input_size(self) -> int:
        return self.alphabet + 2

    @property
    def num_outputs(self) -> int:
        return self.alphabet + 1

    @property
    def first_level(self) -> Level:
        return Level(1, 1)


class StreamState(NamedTuple):
    """``B`` independent task streams: the symbols of each stream's current episode
    ``(B, max_n)``, its level ``n, r`` ``(B,)``, the position in it ``pos`` ``(B,)``
    (``pos == episode_length`` means the episode is over) and the sampling key."""

    symbols: jax.Array
    n: jax.Array
    r: jax.Array
    pos: jax.Array
    key: jax.Array


def episode_length(n, r):
    """Steps in one episode: ``N`` symbols, stop, ``R``, ``N R`` outputs, stop."""
    return n * (r + 1) + 3


def t_task(level: Level) -> int:
    """The paper's ``T_task = N R + 3`` (``N + 3`` for Copy)."""
    return int(level.n) * int(level.r) + 3


def next_level(level: Level, repeat: bool) -> Level:
    """A.3's curriculum step: Copy ``N += 1``; Repeat Copy alternately ``N += 1`` (when
    ``N == R``) and ``R += 1``."""
    n, r = int(level.n), int(level.r)
    if not repeat:
        return Level(n + 1, 1)
    return Level(n + 1, r) if n == r else Level(n, r + 1)


def _check_level(task: CopyTask, level: Level) -> None:
    n, r = int(level.n), int(level.r)
    if not 1 <= n <= task.max_n:
        raise ValueError(f"level N={n} must be in [1, max_n={task.max_n}]; raise CopyTask.max_n")
    if r < 1 or (not task.repeat and r != 1):
        raise ValueError(f"level R={r} must be >= 1 (and 1 for the Copy task)")


def init_stream(task: CopyTask, key: jax.Array, batch_size: int, level: Level) -> StreamState:
    """Streams whose first step starts a new episode at ``level``."""
    _check_level(task, level)
    n = jnp.full((batch_size,), level.n, jnp.int32)
    r = jnp.full((batch_size,), level.r, jnp.int32)
    return StreamState(jnp.zeros((batch_size, task.max_n), jnp.int32), n, r,
                       episode_length(n, r), key)


def copy_step(task: CopyTask, state: StreamState, level: jax.Array):
    """One time step of ``B`` streams at curriculum ``level`` (an int array ``[N, R]``).

    Returns ``(state, (x, (labels, mask), reset, current))``: inputs ``x``
    ``(B, input_size)``, class labels ``(B,)`` and a float mask ``(B,)`` (1 where there is
    a target), ``reset`` ``(B,)`` (a new episode starts here: reset the recurrent state
    before this step) and ``current`` ``(B,)`` (the episode is at ``level``).
    """
    key, k_sym = jax.random.split(state.key)
    B = state.n.shape[0]
    reset = state.pos >= episode_length(state.n, state.r)
    fresh = jax.random.randint(k_sym, (B, task.max_n), 0, task.alphabet, jnp.int32)
    symbols = jnp.where(reset[:, None], fresh, state.symbols)
    n = jnp.where(reset, level[0], state.n)
    r = jnp.where(reset, level[1], state.r)
    p = jnp.where(reset, 0, state.pos)

    reading = p < n
    out = p - (n + 2)  # index into the output phase
    copying = (out >= 0) & (out < n * r)
    final = out == n * r
    sym_in = jnp.take_along_axis(symbols, jnp.clip(p, 0, task.max_n - 1)[:, None], 1)[:, 0]
    sym_out = jnp.take_along_axis(symbols, jnp.clip(out % jnp.maximum(n, 1), 0,
                                                    task.max_n - 1)[:, None], 1)[:, 0]
    x = jnp.concatenate([
        jax.nn.one_hot(sym_in, task.alphabet) * reading[:, None],
        (p == n).astype(jnp.float32)[:, None],
        jnp.where(p == n + 1, r / R_SCALE, 0.0).astype(jnp.float32)[:, None],
    ], axis=-1)
    labels = jnp.where(final, task.alphabet, jnp.where(copying, sym_out, 0)).astype(jnp.int32)
    mask = (copying | final).astype(jnp.float32)
    current = (n == level[0]) & (r == level[1])
    state = StreamState(symbols, n, r, p + 1, key)
    return state, (x, (labels, mask), reset, current)


def copy_chunk(task: CopyTask, state: StreamState, level: jax.Array, T: int):
    """``T`` steps of :func:`copy_step` stacked on a leading time axis (one ``lax.scan``)."""
    return jax.lax.scan(lambda s, _: copy_step(task, s, level), state, None, length=T)


# --------------------------------------------------------------------------- Penn Treebank

PTB_SUBDIR = "ptb"
PTB_FILES = {split: f"ptb.{split}.txt" for split in ("train", "valid", "test")}
EOS = "<eos>"
WORD_BOUNDARY = "_"


class PTB(NamedTuple):
    """Character-level Penn Treebank as int32 symbol streams and the vocabulary."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: tuple[str, ...]
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def _read_chars(path: Path) -> list[str]:
    """The character-level symbols of one PTB word file, exactly those of Mikolov's
    ``ptb.char.*.txt``: every non-empty line's words spelled out with ``_`` between them,
    then ``<eos>``."""
    symbols = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if words:
                symbols += [*WORD_BOUNDARY.join(words), EOS]
    return symbols


def load_ptb(data_dir: str | os.PathLike | None = None, *, limit: int | None = None,
             download: bool = True) -> PTB:
    """Character-level Penn Treebank from ``<data_dir>/ptb/ptb.{train,valid,test}.txt``
    (default data directory: ``$SGJAX_DATA_DIR``, else ``~/.cache/sgjax/data``), downloaded
    and checked by :func:`experiments.data.fetch` on first use.

    Mikolov's character-level set is these word files spelled out (``_`` between words), so
    the symbols are the same as those of his ``ptb.char.*.txt`` (:func:`read_ptb`).
    ``download=False`` never uses the network. Raises
    :class:`~experiments.data.DatasetNotFoundError` naming the files and where to put them.
    """
    paths = fetch("ptb", data_dir=data_dir, download=download)
    return read_ptb({split: paths[f] for split, f in PTB_FILES.items()}, limit=limit)


def read_ptb(files: dict[str, Path] | str | os.PathLike, *, limit: int | None = None) -> PTB:
    """Read PTB word files into character-level symbol streams (no checksum: see
    :func:`load_ptb`).

    Args:
        files: ``{"train": path, "valid": path, "test": path}``, or a directory holding
            ``ptb.{train,valid,test}.txt``.
        limit: keep only the first ``limit`` symbols of every split.

    Returns:
        A :class:`PTB`; the vocabulary is the sorted set of training symbols (``<eos>`` and
        ``_`` included; 50 for the real files), each split an int32 array of indices into it.
    """
    if not isinstance(files, dict):
        base = Path(files)
        files = {split: base / f for split, f in PTB_FILES.items()}
    splits = {k: _read_chars(Path(files[k])) for k in PTB_FILES}
    vocab = tuple(sorted(set(splits["train"])))
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(splits["valid"] + splits["test"]) - set(vocab))
    if unknown:
        raise ValueError(f"PTB valid/test contain symbols not in train: {unknown[:10]}")
    arrays = {k: np.fromiter((index[c] for c in v), np.int32, len(v))[:limit]
              for k, v in splits.items()}
    return PTB(arrays["train"], arrays["valid"], arrays["test"], vocab,
               str(Path(files["train"]).parent))


def ptb_streams(symbols: np.ndarray, batch_size: int, T: int) -> np.ndarray:
    """Cut ``symbols`` into ``batch_size`` contiguous streams of equal length and return
    ``(num_chunks, T + 1, batch_size)``-shaped windows: chunk ``k`` holds symbols
    ``kT … kT + T`` of every stream (inputs are ``[:-1]``, next-character targets ``[1:]``;
    consecutive chunks overlap by one symbol, so the streams are read without a gap).
    The tail that does not fill a whole chunk is dropped."""
    if T < 1 or batch_size < 1:
        raise ValueError(f"ptb_streams: T={T} and batch_size={batch_size} must be >= 1")
    per = (len(symbols) - 1) // batch_size
    chunks = per // T
    if chunks < 1:
        raise ValueError(f"{len(symbols)} symbols cannot fill one chunk of T={T} for "
                         f"{batch_size} streams; use fewer streams or a shorter T")
    streams = np.asarray(symbols[: batch_size * per + 1])
    idx = np.arange(batch_size)[None, :] * per + np.arange(chunks * T + 1)[:, None]
    seq = streams[idx]  # (chunks*T + 1, B)
    windows = np.lib.stride_tricks.sliding_window_view(seq, T + 1, axis=0)[::T]
    return np.ascontiguousarray(np.moveaxis(windows, -1, 1))


def iterate_ptb(symbols: np.ndarray, batch_size: int, T: int) -> Iterator[np.ndarray]:
    """The chunks of :func:`ptb_streams` forever (wrapping to the start)."""
    windows = ptb_streams(symbols, batch_size, T)
    while True:
        yield from windows
