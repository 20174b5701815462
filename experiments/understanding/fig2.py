"""Czarnecki et al. 2017, Fig. 2 and supp. Fig. 9: the loss a linear SG module implies.

A linear SG ``SG(h, y) = hA + yB + C`` is the gradient of the quadratic
``L̂(h) = ½ hAhᵀ + (yB + C)hᵀ (+ const)`` (§4). The data are points arranged on a 2-D
grid, so both the true loss of each point, ``L(p(x), y)``, and the SG-implied loss of its
activation at the SG's layer, ``L̂(h(x))``, can be drawn as images over the input grid
(the h space itself is 64-dimensional; like the paper we plot L as a function of the
input point). Every image has its own colour range: the SG loss is known only up to an
additive constant and a scale (the paper's caption).

Setup (§4, Fig. 2 caption, supp. C): a 6-layer ReLU net (5 hidden layers of
:attr:`Config.width` units, no batch norm) on a ``grid × grid`` lattice in [-1, 1]²
labelled by a random origin-crossing line with 10 % of labels flipped (``noisy``) or by
coin flips (``random``); binary labels one-hot; MSE or softmax log loss; full-batch
Adam (paper: 3e-5, for the net and the SG modules); SG modules linear and zero-initialised.
Two placements: a single SG between the last hidden layer and the output layer (after
hidden layer 5; :attr:`Config.single_after` moves it) and a SG between every two layers
(after hidden layers 1-5). The paper does not say where its single SG sits; we put it on
top because the paper's explanation of Fig. 2 needs it there: "there is no such problem
for MSE loss (Fig. 2 (a) left)" holds because, with only the affine output layer above
it, ``∂L/∂h = (hW + b − y)Wᵀ`` is exactly linear in ``(h, y)`` for MSE (so a linear SG
can represent it), whereas for log loss ``∂L/∂h = (softmax(hW + b) − y)Wᵀ`` approaches a
step function on separable data. With a middle SG neither loss is exactly representable
(``single_after=3`` shows that variant). Three SG conditionings:
``cond`` = SG(h, y) (Fig. 2), ``nolabel`` = SG(h) (Fig. 9 a-d) and ``labelonly`` =
SG(y) = yB + C, a module that ignores h (Fig. 9 e-h; built with
``predictors.from_layer`` on a layer that reads only the label part of its input).

Snapshots of both surfaces are taken at the steps ``Config.snapshots`` (fractions of the
run); ``fidelity`` is the Pearson correlation over the grid between the true and the
implied loss (scale- and shift-invariant, like the independently scaled images). A
label-conditioned SG determines ``L̂`` only up to a constant *per label* (``c(y)`` has
zero gradient in h; for the exact SG of the top layer's MSE, ``L̂ = L − ½‖b − y‖²``), so
for ``cond`` and ``labelonly`` the correlation is taken within each label (both losses
less their per-label means, pooled); ``pooled_fidelity`` is the plain correlation over
all points.

Not given in the paper (our choices): grid size, hidden width, snapshot times, the
number of steps (we use 100k at lr 3e-5, the run length quoted for Fig. 9), and the
single SG's position.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgjax
from experiments import training
from experiments.framework import Cell, Claim, Experiment
from experiments.framework.reports import compact_ticks, log_axis, log_if_spread
from experiments.understanding import PAPER, SG_EXAMPLE_SCALE

CONDITIONINGS = ("cond", "nolabel", "labelonly")
COND_LABELS = {"cond": "SG(h, y)", "nolabel": "SG(h) (no label)",
               "labelonly": "SG(y) (label only)"}
LOSSES = ("mse", "log")
LOSS_LABELS = {"mse": "MSE", "log": "log loss"}
DATASETS = ("noisy", "random")
DATASET_LABELS = {"noisy": "90% separable + 10% random labels", "random": "random labels"}
PLACEMENTS = ("single", "every")
PLACEMENT_LABELS = {"single": "single SG", "every": "SG every layer"}
NUM_CLASSES = 2


@dataclasses.dataclass(frozen=True)
class Config:
    """Fig. 2 / Fig. 9 settings. Reproduce with

    ``make reproduce-understanding-fig2 PRESET=smoke`` (seconds, wiring only),
    ``make reproduce-understanding-fig2 PRESET=quick`` (minutes on a CPU) or
    ``make reproduce-understanding-fig2 PRESET=paper`` (lr 3e-5, 100k full-batch steps),
    i.e. ``python -m experiments run understanding-fig2 --preset PRESET``.

    ``snapshots`` are fractions of ``steps`` at which both loss surfaces are recorded;
    ``log_every`` is how often the training loss curve is sampled; ``conditionings``,
    ``losses`` and ``datasets`` choose the cells (both placements are always run);
    ``single_after`` is the hidden layer below the single SG (``None``: the last one);
    ``fast_compile`` asks XLA for its cheapest optimisation (smoke runs).
    """

    steps: int = 100_000
    lr: float = 3e-5
    grid: int = 20
    width: int = 64
    hidden: int = 5
    snapshots: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)
    log_every: int = 1000
    label_noise: float = 0.1
    conditionings: tuple[str, ...] = CONDITIONINGS
    losses: tuple[str, ...] = LOSSES
    datasets: tuple[str, ...] = DATASETS
    single_after: int | None = None
    fast_compile: bool = False


PRESETS = {
    "smoke": Config(steps=40, lr=1e-3, grid=6, width=8, snapshots=(0.5, 1.0), log_every=20,
                    conditionings=("cond", "labelonly"), losses=("mse",),
                    datasets=("noisy",), fast_compile=True),
    "quick": Config(steps=10_000, lr=3e-4, log_every=250),
    "paper": Config(),
}


# ----------------------------------------------------------------------------- data


def grid_dataset(kind: str, side: int, *, seed: int = 0, noise: float = 0.1):
    """``side²`` points on a regular grid in [-1, 1]² (row-major, y varying slowest) and
    their binary labels: ``linear`` (a random origin-crossing line), ``noisy`` (linear with
    a fraction ``noise`` of the labels flipped) or ``random`` (fair coin flips)."""
    if kind not in ("linear", "noisy", "random"):
        raise ValueError(f"unknown grid dataset {kind!r}")
    rng = np.random.default_rng([seed, 7])  # the line: shared by linear and noisy
    ticks = np.linspace(-1.0, 1.0, side, dtype=np.float32)
    gx, gy = np.meshgrid(ticks, ticks)
    x = np.stack([gx.ravel(), gy.ravel()], axis=1)
    w = rng.standard_normal(2)
    if kind == "random":
        y = rng.integers(0, 2, size=len(x))
    else:
        y = (x @ w > 0).astype(np.int64)
        if kind == "noisy":
            flip = rng.choice(len(x), size=int(round(noise * len(x))), replace=False)
            y[flip] = 1 - y[flip]
    return x.astype(np.float32), y.astype(np.int32)


# ----------------------------------------------------------------------------- model


def make_predictor(conditioning: str, width: int) -> sgjax.Predictor:
    """The linear SG module of a conditioning (all zero-initialised)."""
    if conditioning == "cond":
        return sgjax.predictors.linear(conditioned=True)
    if conditioning == "nolabel":
        return sgjax.predictors.linear(conditioned=False)
    if conditioning == "labelonly":
        zeros = jax.nn.initializers.zeros
        take_label = sgjax.layers.elementwise(lambda z: z[..., -NUM_CLASSES:])
        layer = sgjax.layers.serial(take_label, sgjax.layers.dense(
            width, kernel_init=zeros, bias_init=zeros))
        return sgjax.predictors.from_layer(layer, conditioned=True, description="SG(y)")
    raise ValueError(f"unknown conditioning {conditioning!r}; valid: {CONDITIONINGS}")


def loss_fn(name: str):
    return {"mse": sgjax.losses.mse, "log": sgjax.losses.softmax_cross_entropy}[name]


def single_cut(config: Config) -> int:
    """The hidden layer after which the single SG sits (default: the last one)."""
    return config.hidden if config.single_after is None else config.single_after


def make_split(placement: str, conditioning: str, loss: str, config: Config,
               batch_size: int) -> sgjax.Split:
    layers = training.mlp_layers(config.hidden + 1, config.width, NUM_CLASSES,
                                 batch_norm=False)
    cuts = (single_cut(config),) if placement == "single" else "every"
    return sgjax.split_at(
        layers, cuts, feedback=sgjax.feedback.synthetic(make_predictor(conditioning,
                                                                       config.width)),
        loss=loss_fn(loss), optimizer=optax.adam(config.lr), input_shape=(2,),
        batch_size=batch_size, num_classes=NUM_CLASSES, example_scale=SG_EXAMPLE_SCALE)


def affine_coefficients(predictor: sgjax.Predictor, variables, width: int):
    """``(A, B, C)`` of an affine predictor ``SG(h, y) = hA + yB + C``, read off by
    probing it at ``h = 0, y = 0``, the unit vectors ``e_i`` of h and the one-hot labels
    (``B = 0`` for a predictor that ignores the label)."""

    def sg(h, y):
        return predictor.apply(variables, h, y if predictor.conditioned else None,
                               train=False)[0]

    zeros_y = jnp.zeros((1, NUM_CLASSES))
    c = sg(jnp.zeros((1, width)), zeros_y)[0]
    a = sg(jnp.eye(width), jnp.zeros((width, NUM_CLASSES))) - c
    if predictor.conditioned:
        b = sg(jnp.zeros((NUM_CLASSES, width)), jnp.eye(NUM_CLASSES)) - c
    else:
        b = jnp.zeros((NUM_CLASSES, width))
    return a, b, c


def implied_loss(a, b, c, h, y_onehot):
    """``L̂(h) = ½ hAhᵀ + (yB + C)hᵀ`` per row of ``h`` (§4)."""
    return 0.5 * jnp.einsum("ni,ij,nj->n", h, a, h) + jnp.sum((y_onehot @ b + c) * h, -1)


def pearson(u, v, groups=None) -> float:
    """Pearson correlation of ``u`` and ``v``; with ``groups``, of their deviations from
    each group's mean (the pooled within-group correlation: a constant added to ``v`` in
    one group leaves it unchanged)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if groups is not None:
        groups = np.asarray(groups)
        u, v = u.copy(), v.copy()
        for g in np.unique(groups):
            u[groups == g] -= u[groups == g].mean()
            v[groups == g] -= v[groups == g].mean()
    su, sv = u.std(), v.std()
    if su < 1e-12 or sv < 1e-12:
        return 0.0
    return float(np.mean((u - u.mean()) * (v - v.mean())) / (su * sv))


# ----------------------------------------------------------------------------- cells


def cells(preset: str):
    cfg = PRESETS[preset]
    out = []
    for cond in cfg.conditionings:
        for loss in cfg.losses:
            for ds in cfg.datasets:
                for placement in PLACEMENTS:
                    out.append(Cell(
                        f"{cond}-{loss}-{ds}-{placement}",
                        row=f"{COND_LABELS[cond]}, {LOSS_LABELS[loss]}, {ds}",
                        column=PLACEMENT_LABELS[placement],
                        params={"conditioning": cond, "loss": loss, "dataset": ds,
                                "placement": placement}))
    return out


def snapshot_steps(config: Config) -> list[int]:
    return sorted({max(1, int(round(f * config.steps))) for f in config.snapshots})


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    p = cell.params
    x, y = grid_dataset(p["dataset"], config.grid, seed=ctx.seed, noise=config.label_noise)
    X, Y = jnp.asarray(x), jnp.asarray(y)
    Y1 = jax.nn.one_hot(Y, NUM_CLASSES)
    split = make_split(p["placement"], p["conditioning"], p["loss"], config, len(x))
    predictor = make_predictor(p["conditioning"], config.width)
    schedule = sgjax.sync(split)
    loss = loss_fn(p["loss"])
    options = training.FAST_COMPILE if config.fast_compile else None

    @functools.partial(jax.jit, compiler_options=options)
    def measure(states):
        hs, h = [], X
        for stage, st in zip(split.stages, states):
            h = stage.apply(st, h)
            hs.append(h)
        out = hs[-1]
        true = jax.vmap(lambda o, t: loss(o[None], t[None]))(out, Y)
        implied = []
        for k in range(len(split.stages) - 1):
            variables = sgjax.feedback.synthetic_variables(states[k].feedback)
            a, b, c = affine_coefficients(predictor, variables, config.width)
            implied.append(implied_loss(a, b, c, hs[k], Y1))
        acc = jnp.mean(jnp.argmax(out, -1) == Y)
        return jnp.mean(true), acc, true, jnp.stack(implied)

    snaps = snapshot_steps(config)
    layers = [int(c) for c in split.cuts]  # hidden layer below each SG, bottom first

    def evaluate(ts, step):
        mean_loss, acc, true, implied = measure(ts.stages)
        out = {"loss": mean_loss, "train_accuracy": acc}
        taken = ctx.memo.setdefault("snapshots", [])  # kept with the checkpoints
        if step in snaps and not any(s["step"] == step for s in taken):
            true, implied = np.asarray(true), np.asarray(implied)
            # SG(h, y) = ∂L̂/∂h fixes L̂ only up to a constant per label (any c(y)
            # vanishes under ∂/∂h): an exact SG of the top layer's MSE gives
            # L̂ = L − ½‖b − y‖², so a pooled correlation would score the label offsets.
            groups = y if predictor.conditioned else None
            fidelity = [pearson(true, imp, groups) for imp in implied]
            pooled = [pearson(true, imp) for imp in implied]
            out.update({f"fidelity/{layer}": f for layer, f in zip(layers, fidelity)})
            taken.append(
                {"step": step, "loss": float(mean_loss), "true": true.tolist(),
                 "implied": implied.tolist(), "fidelity": fidelity,
                 "pooled_fidelity": pooled})
        return out

    # full batch: every step's batch is the whole grid; every stop is a multiple of the chunk
    marks = sorted(set(snaps) | set(range(config.log_every, config.steps + 1,
                                          config.log_every)))
    ts, final = training.train_and_evaluate(
        ctx, schedule, schedule.init(ctx.key(), sgjax.Batch(X, Y)), steps=config.steps,
        chunk=math.gcd(*marks), eval_at=marks, batch_fn=lambda grid, key: sgjax.Batch(*grid),
        data=(X, Y),
        evaluate=evaluate, metrics=(), compiler_options=options)
    return {"metric": final["loss"], "train_accuracy": final["train_accuracy"],
            "sg_layers": layers, "labels": y.tolist(), "grid": config.grid,
            "snapshots": ctx.memo.get("snapshots", [])}


# ----------------------------------------------------------------------------- figures


def _surface_figure(results, config, cond, loss):
    """One Fig. 2 block: rows = (dataset, snapshot), columns = labels, then the single SG
    model's true and implied losses, then the every-layer model's (top SG first)."""
    from matplotlib.figure import Figure

    by = {(r.cell.params["dataset"], r.cell.params["placement"]): r for r in results
          if r.cell.params["conditioning"] == cond and r.cell.params["loss"] == loss}
    datasets = [d for d in config.datasets if (d, "single") in by or (d, "every") in by]
    if not datasets:
        return None
    every = any(p == "every" for _, p in by)  # columns only for the placements that ran
    n_every = config.hidden if every else 0
    # labels | single: true, SG | spacer | every: true, SGs
    ncols = 1 + 2 + ((1 + 1 + n_every) if every else 0)
    n_snap = len(snapshot_steps(config))
    nrows = len(datasets) * n_snap
    fig = Figure(figsize=(1.15 * ncols + 1.0, 1.2 * nrows + 1.0), layout="constrained")
    ratios = [1, 1, 1] + ([0.25] + [1] * (1 + n_every) if every else [])
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw={"width_ratios": ratios})
    side = config.grid
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)

    def show(ax, values, title=None, cmap="viridis"):
        ax.imshow(np.asarray(values).reshape(side, side), origin="lower", cmap=cmap,
                  interpolation="nearest")
        for s in ax.spines.values():
            s.set_visible(True)
        if title:
            ax.set_title(title, fontsize=7)

    for di, ds in enumerate(datasets):
        for si in range(n_snap):
            row = di * n_snap + si
            if si == 0:
                any_r = by.get((ds, "single")) or by.get((ds, "every"))
                show(axes[row, 0], any_r.metrics["labels"], "labels", cmap="coolwarm")
                axes[row, 0].set_ylabel(DATASET_LABELS[ds].replace(" + ", "\n+ "),
                                        fontsize=7)
            for placement, col0 in (("single", 1), ("every", 4)):
                r = by.get((ds, placement))
                if r is None or si >= len(r.metrics["snapshots"]):
                    continue
                snap = r.metrics["snapshots"][si]
                layers = r.metrics["sg_layers"]
                tag = "single" if placement == "single" else "every"
                show(axes[row, col0], snap["true"],
                     f"{tag}: true L\nstep {snap['step']}, L={snap['loss']:.3g}")
                order = list(range(len(layers)))[::-1]  # top-most SG first
                for j, k in enumerate(order):
                    show(axes[row, col0 + 1 + j], snap["implied"][k],
                         f"SG after h{layers[k]}\nr={snap['fidelity'][k]:+.2f}")
    where = ("left: single SG; right: SG between every two layers" if every
             else "single SG")
    fig.suptitle(f"{COND_LABELS[cond]}, {LOSS_LABELS[loss]}: true loss vs loss implied by "
                 f"the linear SG over the 2-D input grid\n({where}; each image independently "
                 "colour-scaled; r = Pearson correlation with the true loss)", fontsize=9)
    return fig


def _combos(results, config) -> list[tuple[str, str]]:
    """The (loss, dataset) panels that have a cell among ``results`` (a preset that ran
    only some of them draws no empty panels)."""
    ran = {(r.cell.params["loss"], r.cell.params["dataset"]) for r in results}
    return [(lo, ds) for lo in config.losses for ds in config.datasets if (lo, ds) in ran]


def _fidelity_figure(results, config):
    from matplotlib.figure import Figure

    conds = [c for c in config.conditionings
             if any(r.cell.params["conditioning"] == c for r in results)]
    combos = _combos(results, config)
    fig = Figure(figsize=(3.2 * len(combos), 2.6 * max(len(conds), 1) + 0.5),
                 layout="constrained")
    axes = fig.subplots(max(len(conds), 1), len(combos), squeeze=False, sharey=True)
    for i, cond in enumerate(conds):
        for j, (lo, ds) in enumerate(combos):
            ax = axes[i, j]
            for r in results:
                p = r.cell.params
                if (p["conditioning"], p["loss"], p["dataset"]) != (cond, lo, ds):
                    continue
                snaps = r.metrics["snapshots"]
                steps = [s["step"] for s in snaps]
                layers = r.metrics["sg_layers"]
                for k, layer in enumerate(layers):
                    style = "-" if p["placement"] == "single" else "--"
                    ax.plot(steps, [s["fidelity"][k] for s in snaps], style, marker="o",
                            ms=3, label=f"{p['placement']}: SG after h{layer}")
            log_axis(ax, "x")
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{COND_LABELS[cond]}\n{LOSS_LABELS[lo]}, {ds}", fontsize=8)
            if i == len(conds) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel("corr(true L, SG-implied L)")
    first = next((ax for ax in axes.ravel() if ax.lines), None)
    if first is not None:
        fig.legend(*first.get_legend_handles_labels(), loc="outside lower center",
                   ncols=len(first.lines), fontsize="small")
    return fig


def _loss_figure(results, config):
    from matplotlib.figure import Figure

    conds = [c for c in config.conditionings
             if any(r.cell.params["conditioning"] == c for r in results)]
    combos = _combos(results, config)
    fig = Figure(figsize=(3.2 * len(combos), 2.6 * len(conds) + 0.5), layout="constrained")
    axes = fig.subplots(max(len(conds), 1), len(combos), squeeze=False)
    for i, cond in enumerate(conds):
        for j, (lo, ds) in enumerate(combos):
            ax = axes[i, j]
            for r in results:
                p = r.cell.params
                if (p["conditioning"], p["loss"], p["dataset"]) == (cond, lo, ds) \
                        and "loss" in r.curves:
                    ax.plot(*r.curves["loss"], label=PLACEMENT_LABELS[p["placement"]])
            log = log_if_spread(ax, 3.0)
            compact_ticks(ax)
            ax.set_title(f"{COND_LABELS[cond]}\n{LOSS_LABELS[lo]}, {ds}"
                         + (" (log scale)" if log else ""), fontsize=8)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3, which="both")
            if j == 0:
                ax.set_ylabel("training loss")
    first = next((ax for ax in axes.ravel() if ax.lines), None)
    if first is not None:
        fig.legend(*first.get_legend_handles_labels(), loc="outside lower center",
                   ncols=len(first.lines), fontsize="small")
    return fig


def figures(results, config) -> dict:
    out = {}
    names = {"cond": "fig2", "nolabel": "fig9-nolabel", "labelonly": "fig9-labelonly"}
    for cond in config.conditionings:
        for loss in config.losses:
            suffix = "a-mse" if loss == "mse" else "b-logloss"
            fig = _surface_figure(results, config, cond, loss)
            if fig is not None:
                out[f"{names[cond]}{suffix if cond == 'cond' else '-' + suffix[2:]}"] = fig
    out["fig2-fidelity"] = _fidelity_figure(results, config)
    out["fig2-loss-curves"] = _loss_figure(results, config)
    return out


TOP_BETTER = ("First, it is better in layers closer to the true loss (*i.e.* the top-most "
              "layers), which matches observations from Jaderberg et al. (2016)")
DEGRADES = ("Second, the loss is better approximated at the very beginning of the training and "
            "the quality of the approximation degrades slowly towards the end.")
MSE_FINE = ("with log loss and data that can be separated, linear SGs will have problems "
            "modeling this relation close to the end of training (Figure 2 (b) left), while "
            "there is no such problem for MSE loss (Figure 2 (a) left).")
MSE_CAUSE = (
    "protocol, and the paper's own caveat: the single SG's within-label fidelity is 0.78 at "
    "quick's end (Adam 3e-4, loss 0.0063; pooled over labels, the old measure, 0.31), but "
    "at the paper's rate (Adam 3e-5, 100k steps) it is 1.00 to 10k steps and 0.97 at 30k "
    "(loss 0.008), falling to 0.62 only at the end, at loss 6.5e-4, where the paper says "
    "the approximation 'dropped significantly when the true loss was around 0.001'; log "
    "loss stays far below MSE (0.25 vs 0.78 at quick) "
    "(reports/understanding-fig2/fig2-fidelity.png, reports/understanding-fig2/paper/)")
FINAL, FIRST = "snapshots[-1].fidelity", "snapshots[0].fidelity"


def claims(preset: str) -> list[Claim]:
    """Fig. 2 (label-conditioned SG) on ``fidelity``, the Pearson correlation over the grid
    of the true and the SG-implied loss per SG (bottom to top; within each label, since
    the SG leaves a constant per label undetermined), at the first and the last
    snapshot. "Better" and "degrades" are strict orderings; "no such problem" is read as a
    final correlation of at least 0.9 (the figure's MSE surfaces match by eye) — stricter
    than the paper's text where the run ends below a loss of about 0.001, at which §4 says
    every SG's approximation "dropped significantly"."""
    ids = {c.id for c in cells(preset)}
    out = []
    for loss in ("mse", "log"):
        for ds in ("noisy", "random"):
            every, single = f"cond-{loss}-{ds}-every", f"cond-{loss}-{ds}-single"
            if every in ids:
                out.append(Claim.less(f"top-sg-better-{loss}-{ds}", TOP_BETTER, every, every,
                                      key=(f"{FINAL}[0]", f"{FINAL}[-1]")))
            if single in ids:
                out.append(Claim.less(f"degrades-{loss}-{ds}", DEGRADES, single, single,
                                      key=(f"{FINAL}[0]", f"{FIRST}[0]")))
    if {"cond-mse-noisy-single", "cond-log-noisy-single"} <= ids:
        out += [Claim.less("log-loss-worse-than-mse", MSE_FINE, "cond-log-noisy-single",
                           "cond-mse-noisy-single", key=f"{FINAL}[0]"),
                Claim.near("mse-no-problem", MSE_FINE, "cond-mse-noisy-single", 1.0, 0.1,
                           key=f"{FINAL}[0]", cause=MSE_CAUSE)]
    return out


EXPERIMENT = Experiment(
    name="understanding-fig2",
    paper=PAPER,
    title="Fig. 2 / supp. Fig. 9: true loss vs the loss implied by a linear SG on 2-D grid data",
    metric="final training loss",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes="the paper reports no numbers for this figure; compare the PNGs "
          "(fig2a-mse, fig2b-logloss, fig9-*) and fig2-fidelity",
    claims=claims,
)
