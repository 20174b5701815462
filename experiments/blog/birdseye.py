"""Greydanus, "A bird's eye view of synthetic gradients" (blog post): its MNIST experiment.

The post trains a small MLP on MNIST with plain SGD three ways and compares them:

* **backprop**: ordinary SGD;
* **synthetic**: each layer is updated with a synthetic gradient from a linear model of
  its activations, and "for every ten parameter updates of the MNIST model we perform a
  parameter update on ``smodel``" (the synthetic gradient model);
* **stale**: "compute the gradient with backprop once every ten steps and otherwise use it
  to perform a parameter update … both perform backprop at the same rate (just once every
  ten training steps)".

Its claims, checked by :func:`verdicts` (in the figures' titles; numbers in ``table.md``
and ``results.csv``):

1. "stale and synthetic gradients are evenly matched … the two methods converge at
   roughly the same rate": final test accuracies within :data:`EVEN` points;
2. the heatmaps of synthetic and actual gradients at a random step show "a definite
   correspondence": their cosine similarity at that step is positive (and the signs agree
   on more than half of the entries);
3. the runtime section ("normal backprop is 100–1000x faster") was *retracted* by its
   author: his synthetic gradient models predicted the gradients of the *parameters*, with
   ``n_i · n_i · n_{i+1}`` weights per layer. Ours predict the gradient of the
   *activations* (as DNI does, and as his correction says), ``n_i · (n_i + 1)`` weights.
   What we measure instead: the steady-state wall time per training step of each method
   (one compiled ``lax.scan`` of ``timing_steps`` steps, after compiling) and both
   parameter counts. The retracted claim "differs" when synthetic gradients cost less than
   100× backprop per step.

What is built. The post's network is a numpy MLP; ours is 784 → 100 → 100 → 10 (ReLU, no
batch norm) with mean softmax cross-entropy and SGD (``lr`` = 0.03), batch 32, uniform
batches; the linear synthetic gradient models use SGD at ``sg_lr`` = 1e-5.

Calibration (3k steps, seed 0, final test error %, measured with throw-away scripts that call
:func:`make_split` with these settings):
unconditioned linear DNI with plain SGD is unstable in this MLP — ReLU, lr 0.1: NaN for
SG learning rates 1e-2 … 1e-4 (SGD) and 1e-3, 1e-4 (Adam); ReLU, lr 0.03, SG Adam 1e-3 or
1e-4: NaN; ReLU, lr 0.03, SG SGD 1e-5: 38.6 (lr 0.01: 43.0); sigmoid or tanh hidden
layers (lr 0.1): 84–89, worse than no gradient at all (tanh: 16.7). Stale backprop: 7.5
(lr 0.03), 10.0 (0.01), 49.6 (0.1: each gradient is applied ten times). Backprop, lr 0.1:
3.6. The presets use the one stable synthetic setting (ReLU, lr 0.03, SG SGD 1e-5) for all
three methods. Even so, the synthetic network diverges when trained longer: a 6k-step
``quick`` run ended with a NaN loss at step 5000, so the presets stop at 3k steps.
"synthetic" cuts after both hidden layers (every layer, like the post) with
``sgjax.feedback.refit_every(sgjax.feedback.synthetic(sgjax.predictors.linear()), 10)``
and SGD (``sg_lr``) for the linear models; "stale" is one stage trained with
``optax.chain(sgjax.optim.stale_gradients(10), optax.sgd(lr))`` — as implemented here the
backward pass still runs on every step and the 9 gradients in 10 that the transformation
ignores are discarded, so its step time is backprop's (a caller can skip them with
:func:`sgjax.optim.needs_fresh_gradient`). Heatmaps: the synthetic and the true
per-example gradient at the first hidden layer for 16 training examples, at an evaluation
step drawn at random (seeded) from the second half of training.

Reproduce with ``python -m experiments run blog --preset quick``
(``make reproduce-blog PRESET=quick``; presets ``smoke``, ``quick``, ``paper``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgjax
import sgjax.optim
from experiments import data, training
from experiments.dni import fcn
from experiments.framework import Cell, CellResult, Experiment

METHODS = ("backprop", "stale", "synthetic")
COLUMNS = {"backprop": "backprop", "stale": "stale backprop (every 10)",
           "synthetic": "synthetic (refit every 10)"}
EVEN = 2.0
"""Claim 1 holds when stale and synthetic final accuracies differ by at most this (points)."""
HEATMAP_EXAMPLES = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """One preset: ``steps`` of SGD at ``lr`` (synthetic gradient models at ``sg_lr``),
    ``batch_size``, ``hidden`` widths, ``every`` (refit / recompute period),
    evaluation every ``eval_every`` steps (``chunk`` steps per compiled call),
    ``timing_steps`` steps timed (0: no timing), data limits."""

    steps: int
    lr: float
    sg_lr: float
    eval_every: int
    chunk: int
    batch_size: int = 32
    hidden: tuple[int, ...] = (100, 100)
    every: int = 10
    sg_optimizer: str = "sgd"
    activation: str = "relu"
    timing_steps: int = 500
    train_limit: int | None = None
    test_limit: int | None = None
    fast_compile: bool = False


PRESETS = {
    "smoke": Config(steps=20, lr=0.03, sg_lr=1e-5, eval_every=10, chunk=10, hidden=(16, 16),
                    timing_steps=0, train_limit=512, test_limit=256, fast_compile=True),
    "quick": Config(steps=3_000, lr=0.03, sg_lr=1e-5, eval_every=250, chunk=250),
    "paper": Config(steps=3_000, lr=0.03, sg_lr=1e-5, eval_every=100, chunk=100),
}
PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: 20 steps of a 16-16 MLP",
    "quick": ("3k SGD steps of batch 32 (≈ 1.6 epochs), MLP 784-100-100-10, refit/recompute "
              "every 10 (at 6k steps the synthetic run diverged: NaN loss at step 5000)"),
    "paper": ("the post gives no step count or rates: the quick setting with finer curves "
              "(longer runs diverge, see quick)"),
}


def cells(preset: str) -> list[Cell]:
    sizes = "-".join(map(str, (784, *PRESETS[preset].hidden, 10)))
    return [Cell(m, row=f"MNIST MLP {sizes}", column=COLUMNS[m], params={"method": m})
            for m in METHODS]


def make_layers(config: Config) -> list[sgjax.Layer]:
    """The post's MLP: hidden layers (``config.activation``, no batch norm) and a linear
    classifier."""
    activation = getattr(sgjax.layers, config.activation, None)
    if not isinstance(activation, sgjax.Layer):
        raise ValueError(f"activation={config.activation!r} is not a layer of sgjax.layers "
                         "(use 'sigmoid', 'relu' or 'tanh')")
    return training.mlp_layers(len(config.hidden) + 1, config.hidden[0], 10,
                               batch_norm=False, activation=activation)


def make_split(method: str, config: Config, input_shape) -> sgjax.Split:
    if len(set(config.hidden)) != 1:
        raise ValueError(f"hidden={config.hidden}: the MLP has equal hidden widths")
    table = _train_config(config)
    layers = make_layers(config)
    sgd = optax.sgd(config.lr)
    if method == "backprop":
        return fcn.fcn_split(0, (), None, table, input_shape, layers=layers, optimizer=sgd)
    if method == "stale":
        opt = optax.chain(sgjax.optim.stale_gradients(config.every), sgd)
        return fcn.fcn_split(0, (), None, table, input_shape, layers=layers, optimizer=opt)
    if method == "synthetic":
        feedback = sgjax.feedback.refit_every(
            sgjax.feedback.synthetic(sgjax.predictors.linear()), config.every)
        return sgjax.split_at(layers, "every", feedback=feedback,
                              loss=sgjax.losses.softmax_cross_entropy, optimizer=sgd,
                              predictor_optimizer=sg_optimizer(config),
                              input_shape=tuple(input_shape), batch_size=config.batch_size,
                              num_classes=10)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def sg_optimizer(config: Config) -> optax.GradientTransformation:
    """The synthetic gradient models' optimiser: ``"sgd"`` (the post's) or ``"adam"``,
    at ``sg_lr``."""
    if config.sg_optimizer == "sgd":
        return optax.sgd(config.sg_lr)
    if config.sg_optimizer == "adam":
        return optax.adam(config.sg_lr)
    raise ValueError(f"sg_optimizer={config.sg_optimizer!r}: use 'sgd' or 'adam'")


def _train_config(config: Config):
    from experiments.dni import table1

    return table1.Config(steps=config.steps, lr=config.lr, lr_boundaries=(),
                         eval_every=config.eval_every, chunk=config.chunk,
                         batch_size=config.batch_size, train_limit=config.train_limit,
                         test_limit=config.test_limit, fast_compile=config.fast_compile)


def parameter_counts(config: Config) -> dict[str, int]:
    """Weights of the network, of our activation-gradient linear models (one per cut:
    ``n_i·n_i + n_i``), and of the post's parameter-gradient regression (input ``n_i``,
    output the gradient of the next layer's ``n_i·n_{i+1} + n_{i+1}`` parameters)."""
    sizes = (784, *config.hidden, 10)
    net = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    ours = sum(n * n + n for n in config.hidden)
    post = sum(n * (n * m + m) for n, m in zip(sizes[1:-1], sizes[2:]))
    return {"network": net, "sg_ours_activation_grads": ours,
            "sg_post_parameter_grads": post}


def time_per_step(schedule: sgjax.Schedule, state, x, y, batch_size: int, steps: int,
                  key) -> float:
    """Microseconds per step of ``steps`` fused steps, after a compiling call."""
    batch = training.uniform_batches(batch_size)
    run = sgjax.fused(schedule.step, batch_fn=lambda d, t: batch(d, jax.random.fold_in(key, t)))
    ts = jnp.arange(steps)
    jax.block_until_ready(run(state, ts, data=(x, y)))
    t = time.perf_counter()
    jax.block_until_ready(run(state, ts, data=(x, y)))
    return 1e6 * (time.perf_counter() - t) / steps


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    method = cell.params["method"]
    ds = data.load("mnist", train_limit=config.train_limit, test_limit=config.test_limit)
    split = make_split(method, config, ds.input_shape)
    table = _train_config(config)
    x_train = jnp.asarray(ds.x_train.reshape(-1, *split.input_shape))
    y_train = jnp.asarray(ds.y_train)
    probe, snap = None, {}
    rng = np.random.default_rng(ctx.seed if hasattr(ctx, "seed") else 0)
    evals = training.stops(config.steps, config.eval_every)
    heat_step = int(rng.choice([s for s in evals if s >= config.steps // 2]))
    if method == "synthetic":
        predictor = sgjax.predictors.linear()
        b = config.batch_size
        xb, yb = x_train[:b], y_train[:b]
        pair = jax.jit(lambda stages: fcn.gradient_pair(split, stages, 0, predictor, xb, yb))

        def probe(ts, step):
            s, t = pair(ts.stages)
            if step == heat_step:
                snap["synthetic"] = np.asarray(s[:HEATMAP_EXAMPLES]).tolist()
                snap["true"] = np.asarray(t[:HEATMAP_EXAMPLES]).tolist()
            return {f"grad_{k}": v for k, v in sgjax.metrics.all_metrics(s, t).items()}

    trained, final = fcn.train_fcn(ctx, split, ds, table, probe=probe)
    out: dict[str, Any] = {"metric": 100.0 - final["test_error"],
                           "parameters": parameter_counts(config)}
    if snap:
        s, t = np.asarray(snap["synthetic"]), np.asarray(snap["true"])
        out.update(heatmap_step=heat_step, heatmap_synthetic=snap["synthetic"],
                   heatmap_true=snap["true"],
                   heatmap_cosine=float(sgjax.metrics.cosine_similarity(s, t)),
                   heatmap_sign_agreement=float(1 - sgjax.metrics.sign_error(s, t)))
    if method == "synthetic":
        out.update({f"final_grad_{k}": final[f"grad_{k}"]
                    for k in ("l2_error", "cosine", "sign_error")})
    if config.timing_steps:
        schedule = sgjax.sync(split)
        out["us_per_step"] = time_per_step(schedule, trained, x_train, y_train,
                                           config.batch_size, config.timing_steps,
                                           jax.random.fold_in(ctx.key(), 7))
    return out


def verdicts(results: Sequence[CellResult]) -> dict[str, str]:
    """"holds"/"differs" for each claim of the module docstring the results cover."""
    by = {r.cell.params["method"]: r for r in results}
    out = {}
    if "stale" in by and "synthetic" in by:
        gap = abs(by["stale"].metric - by["synthetic"].metric)
        out[f"stale ≈ synthetic (|Δacc| ≤ {EVEN:g})"] = "holds" if gap <= EVEN else "differs"
    syn = by.get("synthetic")
    if syn is not None and "heatmap_cosine" in syn.metrics:
        ok = syn.metrics["heatmap_cosine"] > 0 and syn.metrics["heatmap_sign_agreement"] > 0.5
        out["heatmaps correspond (cos > 0)"] = "holds" if ok else "differs"
    if syn is not None and "backprop" in by and "us_per_step" in syn.metrics:
        ratio = syn.metrics["us_per_step"] / by["backprop"].metrics["us_per_step"]
        out[f"retracted: SG ≥ 100× slower (ours {ratio:.1f}×)"] = (
            "holds" if ratio >= 100 else "differs")
    return out


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``blog-accuracy`` (test accuracy of the three methods during training),
    ``blog-heatmaps`` (synthetic vs true gradient side by side) and ``blog-runtime``
    (time per step and parameter counts)."""
    from matplotlib.figure import Figure

    by = {r.cell.params["method"]: r for r in results}
    judged = verdicts(results)
    figs = {}
    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for m, color in zip(METHODS, ("0.45", "tab:orange", "tab:blue")):
        r = by.get(m)
        if r is not None and "test_error" in r.curves:
            steps, err = r.curves["test_error"]
            ax.plot(steps, 100 - np.asarray(err), color=color,
                    label=f"{COLUMNS[m]} ({r.metric:.2f} %)")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("; ".join(f"{c}: {v}" for c, v in judged.items() if "stale" in c) or
                 "test accuracy", fontsize="small")
    figs["blog-accuracy"] = fig
    syn = by.get("synthetic")
    if syn is not None and "heatmap_synthetic" in syn.metrics:
        s, t = (np.asarray(syn.metrics[k]) for k in ("heatmap_synthetic", "heatmap_true"))
        fig = Figure(figsize=(9.0, 3.2), layout="constrained")
        axes = fig.subplots(1, 2)
        lim = float(np.max(np.abs(t))) or 1.0
        for ax, arr, title in ((axes[0], s, "synthetic"), (axes[1], t, "true")):
            im = ax.imshow(arr, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_title(f"{title} gradient, first hidden layer", fontsize="small")
            ax.set_xlabel("unit")
        axes[0].set_ylabel("example")
        fig.colorbar(im, ax=axes, shrink=0.8)
        fig.suptitle(f"step {syn.metrics['heatmap_step']}: cosine "
                     f"{syn.metrics['heatmap_cosine']:.2f}, signs agree on "
                     f"{100 * syn.metrics['heatmap_sign_agreement']:.0f} %", fontsize="small")
        figs["blog-heatmaps"] = fig
    timed = [(m, by[m].metrics["us_per_step"]) for m in METHODS
             if m in by and "us_per_step" in by[m].metrics]
    if timed:
        fig = Figure(figsize=(8.0, 3.2), layout="constrained")
        axes = fig.subplots(1, 2)
        axes[0].bar([COLUMNS[m] for m, _ in timed], [v for _, v in timed],
                    color=["0.45", "tab:orange", "tab:blue"][:len(timed)])
        axes[0].set_ylabel("µs per step (compiled scan)")
        axes[0].tick_params(axis="x", labelsize="x-small")
        counts = parameter_counts(config)
        axes[1].bar(["network", "our SG models\n(activation grads)",
                     "post's SG models\n(parameter grads)"],
                    [counts["network"], counts["sg_ours_activation_grads"],
                     counts["sg_post_parameter_grads"]], color=["0.45", "tab:blue", "tab:red"])
        axes[1].set_yscale("log")
        axes[1].set_ylabel("parameters")
        axes[1].tick_params(axis="x", labelsize="x-small")
        fig.suptitle("; ".join(f"{c}: {v}" for c, v in judged.items() if "retracted" in c),
                     fontsize="small")
        figs["blog-runtime"] = fig
    return figs


EXPERIMENT = Experiment(
    name="blog",
    paper="Greydanus, 'A bird's eye view of synthetic gradients' (blog post, 2017)",
    title="MNIST MLP: synthetic gradients (refit every 10) vs stale backprop (every 10)",
    metric="test accuracy (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("the post gives curves, not numbers: no paper column; claims and verdicts in "
           "the module docstring and the figures' titles; us_per_step and parameter counts "
           "in results.csv"),
    preset_notes=PRESET_NOTES,
)
