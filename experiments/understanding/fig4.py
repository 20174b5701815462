"""Czarnecki et al. 2017, Fig. 4: MNIST learning curves, backprop vs a single SG.

Deep MNIST nets (supp. C: hidden layers of 512 units, each followed by batch norm; a
10-way softmax output) with 3 to 50 hidden layers and ReLU or sigmoid activations, trained
with backpropagation and with one linear, label-conditioned SG in the middle of the
hidden stack (:func:`experiments.understanding.nets.middle_cut`). The curves are the
training loss (mean over each logged chunk of steps) and the test error.

The paper names only the extremes of the depth range (3 and 50); ``paper`` uses
(3, 5, 10, 20, 50). Also not given: batch size and run length (we use 256 and 100k
steps at the paper's Adam learning rate 3e-5).
"""

from __future__ import annotations

import dataclasses

from experiments.framework import Cell, Claim, Experiment
from experiments.framework.reports import log_axis
from experiments.understanding import PAPER, nets

METHODS = ("backprop", "sg_single")


@dataclasses.dataclass(frozen=True)
class Config:
    """Fig. 4 settings. Reproduce with

    ``make reproduce-understanding-fig4 PRESET=smoke`` (seconds, wiring only),
    ``make reproduce-understanding-fig4 PRESET=quick`` (CPU minutes: depths 3, 10, 20 of
    128 units, 8k steps at lr 1e-4) or ``make reproduce-understanding-fig4 PRESET=paper``,
    i.e. ``python -m experiments run understanding-fig4 --preset PRESET``.

    ``net`` is the template; its ``depth`` and ``activation`` are replaced per cell.
    """

    net: nets.NetConfig = nets.NetConfig()
    depths: tuple[int, ...] = (3, 5, 10, 20, 50)
    activations: tuple[str, ...] = ("relu", "sigmoid")


PRESETS = {
    "smoke": Config(net=nets.SMOKE, depths=(3,), activations=("relu", "sigmoid")),
    "quick": Config(net=nets.QUICK, depths=(3, 10, 20)),
    "paper": Config(),
}


def cells(preset: str):
    cfg = PRESETS[preset]
    return [Cell(f"{act}-d{d}-{m}", row=f"{act}, {d} hidden layers", column=nets.LABELS[m],
                 params={"activation": act, "depth": d, "method": m})
            for act in cfg.activations for d in cfg.depths for m in METHODS]


def net_config(config: Config, params) -> nets.NetConfig:
    return dataclasses.replace(config.net, depth=params["depth"],
                               activation=params["activation"])


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    cfg = net_config(config, cell.params)
    ds = nets.load_mnist(cfg)
    _, _, final = nets.train(ctx, cell.params["method"], cfg, ds)
    return {"metric": final["test_error"], "train_error": final["train_error"]}


def _curves_figure(results, config, curve, ylabel, title):
    from matplotlib.figure import Figure

    acts, depths = config.activations, config.depths
    fig = Figure(figsize=(max(2.8 * len(depths) + 0.6, 6.0), 2.4 * len(acts) + 0.8),
                 layout="constrained")
    axes = fig.subplots(len(acts), len(depths), squeeze=False, sharex=True)
    for r in results:
        p = r.cell.params
        if p["activation"] not in acts or p["depth"] not in depths or curve not in r.curves:
            continue
        ax = axes[acts.index(p["activation"]), depths.index(p["depth"])]
        ax.plot(*r.curves[curve], color=nets.COLORS[p["method"]], marker=".", ms=3,
                label=nets.LABELS[p["method"]])
    for i, act in enumerate(acts):
        for j, d in enumerate(depths):
            ax = axes[i, j]
            log_axis(ax)
            ax.set_title(f"{act}, {d} hidden layers", fontsize=9)
            if i == len(acts) - 1:
                ax.set_xlabel("step")
            if j == 0:
                ax.set_ylabel(ylabel)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def figures(results, config) -> dict:
    return {
        "fig4": _curves_figure(results, config, "loss", "training loss",
                               "Fig. 4: MNIST learning curves, backprop vs a single SG in the "
                               "middle of the hidden stack"),
        "fig4-test-error": _curves_figure(results, config, "test_error", "test error (%)",
                                          "Fig. 4 (companion): MNIST test error"),
    }


FIG4_WORDS = ("Figure 4 shows, that SG-based architectures converge well even if there are "
              "many hidden layers both below and above the module.")
FIG4_CAUSE = ("budget: quick trains far shorter than the paper's 100k steps and the deepest "
              "nets have not converged with either method (reports/understanding-fig4/fig4.png)")


def claims(preset: str) -> list[Claim]:
    """Per activation and depth: the single-SG net's final test error at most 1 point above
    backprop's ("converge well"; 1 point is several times one MNIST run's spread)."""
    cfg = PRESETS[preset]
    return [Claim.less(f"{act}-d{d}-sg-converges", FIG4_WORDS, f"{act}-d{d}-sg_single",
                       f"{act}-d{d}-backprop", margin=-1.0, cause=FIG4_CAUSE)
            for act in cfg.activations for d in cfg.depths]


EXPERIMENT = Experiment(
    name="understanding-fig4",
    paper=PAPER,
    title="Fig. 4: MNIST learning curves, 3-50 hidden layers, ReLU/sigmoid, backprop vs "
          "single SG",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes="the paper shows curves only; compare fig4.png",
    claims=claims,
)
