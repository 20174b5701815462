"""Shared builders for the deep MNIST nets of Czarnecki et al. 2017 §5 (Figs. 3-5, 7, 8).

Supp. C: "simple feed forward networks with h layers of 512 hidden relu units followed
by batch normalisation layers. The final layer is a regular 10-class softmax layer.
Inputs were scaled to [0, 1]"; every SG is linear, conditioned on the label and
zero-initialised; Adam with learning rate 3e-5 for the net and the SG modules.

One net per training method (:data:`METHODS`):

* ``backprop``  — plain backpropagation (no cut);
* ``sg_single`` — one linear cDNI module in the middle of the hidden stack
  (:func:`middle_cut`: between hidden layers 11 and 12 for 20 hidden layers, as in Fig. 3);
* ``sg_every``  — a linear cDNI module between every pair of layers (``cuts="every"``:
  after each hidden layer, the last one included);
* ``dfa``       — direct feedback alignment into every hidden layer (``cuts="every"``
  with :func:`sgjax.feedback.dfa`).

Hidden layer ``l`` (1-based) is the ``l``-th block ``dense → batch norm → activation``;
its activation is the block's output. :func:`hidden_activations` and
:func:`hidden_kernels` read them from the trained stage states.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgjax
from experiments import training
from experiments.understanding import SG_EXAMPLE_SCALE

METHODS = ("backprop", "sg_single", "sg_every", "dfa")
LABELS = {"backprop": "Backprop", "sg_single": "Single SG", "sg_every": "SG every layer",
          "dfa": "DFA"}
COLORS = {"backprop": "tab:blue", "sg_single": "tab:orange", "sg_every": "tab:green",
          "dfa": "tab:red"}
ACTIVATIONS = {"relu": sgjax.layers.relu, "sigmoid": sgjax.layers.sigmoid}


@dataclasses.dataclass(frozen=True)
class NetConfig:
    """How one deep MNIST net is built and trained.

    ``depth`` hidden layers of ``width`` units (dense, batch norm, ``activation``) and a
    10-way softmax layer; Adam(``lr``) for the net and the SG modules (paper: 3e-5);
    ``weight_decay`` > 0 adds the L2 penalty ``½·wd·‖W‖²`` on the hidden and output
    *kernels* (not biases, not batch-norm parameters, not SG modules) through
    ``optax.add_decayed_weights`` ahead of Adam, i.e. the gradient of an explicit penalty
    added to each stage's objective (Fig. 5, footnote 4). ``train_limit``/``test_limit``
    keep the first examples of MNIST (``None``: all); ``fast_compile`` asks XLA for its
    cheapest optimisation level (:data:`experiments.training.FAST_COMPILE`, for smoke runs).
    """

    depth: int = 20
    width: int = 512
    activation: str = "relu"
    steps: int = 100_000
    batch_size: int = 256
    lr: float = 3e-5
    weight_decay: float = 0.0
    chunk: int = 500
    eval_every: int = 5000
    train_limit: int | None = None
    test_limit: int | None = None
    fast_compile: bool = False


SMOKE = NetConfig(depth=3, width=16, steps=20, batch_size=32, lr=1e-3, chunk=10,
                  eval_every=10, train_limit=512, test_limit=512, fast_compile=True)
"""A net that trains in seconds (wiring checks only)."""

QUICK = NetConfig(depth=20, width=128, steps=8000, batch_size=128, lr=1e-4, chunk=250,
                  eval_every=1000)
"""The CPU-sized stand-in for the paper's net: 20 hidden layers of 128 units (paper:
512), 8k steps of batch 128 at lr 1e-4 (paper: 3e-5 and, our guess, 100k steps of 256).
(At 3e-4 the net with a SG between every pair of layers learns about half as fast.)"""


def middle_cut(depth: int) -> int:
    """Layer index of the single SG: hidden layers ``1..middle_cut`` lie below it.

    ``depth // 2 + 1``: the middle of the ``depth + 1`` layers (20 hidden layers: between
    layers 11 and 12, as in Fig. 3)."""
    return min(depth // 2 + 1, depth)


def interfaces(method: str, depth: int) -> tuple[int, ...]:
    """Hidden layers ``l`` after which a SG / DFA interface sits (for dotted lines)."""
    if method == "backprop":
        return ()
    if method == "sg_single":
        return (middle_cut(depth),)
    if method in ("sg_every", "dfa"):
        return tuple(range(1, depth + 1))
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def sg_predictor() -> sgjax.Predictor:
    """The paper's SG module: linear, label-conditioned, zero-initialised."""
    return sgjax.predictors.linear(conditioned=True)


def optimizer(cfg: NetConfig) -> optax.GradientTransformation:
    """Adam(lr), with the kernels' L2 penalty in front when ``cfg.weight_decay > 0``."""
    adam = optax.adam(cfg.lr)
    if cfg.weight_decay <= 0:
        return adam
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=kernel_mask), adam)


def kernel_mask(params):
    """``True`` at every dense kernel of a parameter tree (the weights the L2 penalty hits)."""

    def is_kernel(path, _):
        last = path[-1] if path else None
        return getattr(last, "key", None) == "kernel"

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_split(method: str, cfg: NetConfig, *, input_shape: Sequence[int] = (28, 28, 1),
               num_classes: int = 10) -> sgjax.Split:
    """The ``method`` net of :data:`METHODS` as an ``sgjax`` split."""
    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"activation {cfg.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    layers = training.mlp_layers(cfg.depth + 1, cfg.width, num_classes,
                                 activation=ACTIVATIONS[cfg.activation])
    common = dict(loss=sgjax.losses.softmax_cross_entropy, optimizer=optimizer(cfg),
                  predictor_optimizer=optax.adam(cfg.lr), input_shape=tuple(input_shape),
                  batch_size=cfg.batch_size, num_classes=num_classes,
                  example_scale=SG_EXAMPLE_SCALE)
    if method == "backprop":
        return sgjax.split_at(layers, (), **common)
    if method == "sg_single":
        return sgjax.split_at(layers, (middle_cut(cfg.depth),),
                              feedback=sgjax.feedback.synthetic(sg_predictor()), **common)
    if method == "sg_every":
        return sgjax.split_at(layers, "every",
                              feedback=sgjax.feedback.synthetic(sg_predictor()), **common)
    if method == "dfa":
        return sgjax.split_at(layers, "every", feedback=sgjax.feedback.dfa(), **common)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def _layers_and_variables(split: sgjax.Split, states):
    """``[(layer, variables)]`` for every layer of the net, in order, from stage states."""
    out = []
    for stage, state in zip(split.stages, states):
        for layer, p, s in zip(stage.layers, state.params, state.layer_state):
            out.append((layer, sgjax.layers.with_params(s, p)))
    return out


def hidden_activations(split: sgjax.Split, states, x, *, batch: int = 1000) -> list[np.ndarray]:
    """Inference-mode output of each hidden layer on ``x``: a list of ``(N, width)``."""
    pairs = _layers_and_variables(split, states)[:-1]  # drop the output layer

    @jax.jit
    def run(variables, xb):
        outs = []
        for (layer, _), v in zip(pairs, variables):
            xb, _ = layer.apply(v, xb, train=False)
            outs.append(xb)
        return outs

    variables = [v for _, v in pairs]
    chunks = [run(variables, jnp.asarray(x[i:i + batch])) for i in range(0, len(x), batch)]
    return [np.concatenate([np.asarray(c[k]) for c in chunks]) for k in range(len(pairs))]


def _find_kernel(tree):
    found = []

    def visit(path, leaf):
        if getattr(path[-1], "key", None) == "kernel":
            found.append(leaf)

    jax.tree_util.tree_map_with_path(visit, tree)
    if len(found) != 1:
        raise ValueError(f"expected one dense kernel in a hidden block, found {len(found)}")
    return np.asarray(found[0])


def hidden_kernels(split: sgjax.Split, states) -> list[np.ndarray]:
    """The dense kernel of each hidden layer (``(in, width)``), in order."""
    params = [p for state in states for p in state.params][:-1]
    return [_find_kernel(p) for p in params]


def load_mnist(cfg: NetConfig):
    """MNIST (first ``train_limit``/``test_limit`` examples), images in [0, 1]; read once
    per process and limits."""
    return _load_mnist(cfg.train_limit, cfg.test_limit)


@functools.lru_cache(maxsize=2)
def _load_mnist(train_limit, test_limit):
    from experiments import data

    return data.load("mnist", train_limit=train_limit, test_limit=test_limit)


CACHE_DIR = "understanding-nets"
"""Trained nets are kept under ``<out>/understanding-nets/`` (next to the experiments'
result folders) so that experiments training the same net reuse it (Figs. 3, 7 and 8
probe the same four nets, as in the paper; Fig. 4's 20-layer ReLU nets are Fig. 3's).
Delete the folder to force retraining after changing the training code."""


def _cache_key(method: str, cfg: NetConfig, ds, seed: int) -> dict:
    return {"method": method, "net": dataclasses.asdict(cfg), "seed": int(seed),
            "data": [ds.name, ds.num_train, ds.num_test]}


def _cache_dir(ctx, key: dict):
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return ctx.out_dir.parent.parent / CACHE_DIR / f"{key['method']}-{digest}"


def train(ctx, method: str, cfg: NetConfig, ds, *, reuse: bool = True):
    """Train the ``method`` net on ``ds`` with the shared scan-fused loop, or reuse the
    identical net (same method, config, data and seed) another experiment trained.

    Logs ``loss``, ``test_error`` and ``train_error`` (%) every ``cfg.eval_every`` steps
    (a reused net brings its curves); returns ``(split, stage_states, {"test_error": …,
    "train_error": …})``."""
    from experiments.framework import Checkpointer

    split = make_split(method, cfg, input_shape=ds.input_shape, num_classes=ds.num_classes)
    key = _cache_key(method, cfg, ds, ctx.seed)
    store = Checkpointer(_cache_dir(ctx, key), fingerprint=key)
    if reuse and store.exists():
        like = split.init(jax.random.key(0))
        step, states, extra = store.restore(like)
        if step == cfg.steps:
            for name, points in extra.get("curves", {}).items():
                for st, value in points:
                    ctx.log(int(st), **{name: value})
            return split, states, dict(extra["final"])
    ts, final = training.train_classifier(
        ctx, split, ds, steps=cfg.steps, batch_size=cfg.batch_size, chunk=cfg.chunk,
        eval_every=cfg.eval_every, eval_train=True,
        compiler_options=training.FAST_COMPILE if cfg.fast_compile else None)
    final = {k: float(v) for k, v in final.items()}
    store.save(cfg.steps, ts.stages, extra={"final": final, "curves": dict(ctx.curves)})
    return split, ts.stages, final


def label_sorted_sample(x, y, per_class: int, num_classes: int = 10):
    """The first ``per_class`` examples of each class, sorted by label (Fig. 3's 400 points)."""
    idx = np.concatenate([np.flatnonzero(np.asarray(y) == c)[:per_class]
                          for c in range(num_classes)])
    return np.asarray(x)[idx], np.asarray(y)[idx]
