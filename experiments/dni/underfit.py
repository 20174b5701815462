"""DNI (Jaderberg et al. 2016) A.2.1 "Underfitting of synthetic gradient models", Fig. 13.

"If one takes a closer look at learning curves for DNI model (see Fig. 13 for training
error plot on CIFAR-10 with CNN model) it is easy to notice that the large test error (and
its degradation with depth) is actually an effect of underfitting and not lack of ability
to generalise … Once label information is introduced in the cDNI model, the network fits
the training data much better, however using synthetic gradients still acts like a
regulariser".

The claims (:func:`claims`, per network; verdicts computed from the final training errors
into ``table.md`` and ``reports/README.md``, the same verdicts in ``fig13.png``'s
title): DNI underfits (its training error is above Bprop's), and cDNI fits
the training data better than DNI.

What is built. The cells are Table 1's (:mod:`experiments.dni.table1`: same networks,
synthetic gradient models, optimiser and schedule) for the CIFAR-10 CNNs — the networks
of Fig. 13 — with Bprop, DNI and cDNI, logging training error (on the first
``train_eval_limit`` training examples) and test error during training. A CIFAR-10 CNN at
A.1's width takes seconds per step on a CPU, so ``quick`` shrinks it (widths ÷ 8, batch
32, 2k training examples, 200 steps) and adds the same comparison on Table 1's
6-layer MNIST FCN (A.1 sizes, DNI model 4× narrower at ``quick``), where the claim can
be tested at a CPU-feasible length.
The CIFAR-10 data is whatever :func:`experiments.data.load` finds (offline: a JPEG
re-encoding; the row label says so).

Reproduce with ``python -m experiments run underfit --preset quick``
(``make reproduce-underfit PRESET=quick``; presets ``smoke``, ``quick``, ``paper``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from experiments.dni import fcn, table1
from experiments.framework import Cell, CellResult, Claim, Experiment
from experiments.framework import verdicts as V
from experiments.framework.reports import log_if_spread

METHODS = ("bprop", "dni", "cdni")


@dataclasses.dataclass(frozen=True)
class Config:
    """``networks``: ``(dataset, kind, depth)`` triples; ``train`` the Table 1 training
    config per kind (``"cnn"``/``"fcn"``); ``train_eval_limit`` the number of training
    examples the training error is measured on."""

    networks: tuple[tuple[str, str, int], ...]
    cnn: table1.Config
    fcn: table1.Config
    train_eval_limit: int = 10_000


PRESETS = {
    "smoke": Config(networks=(("cifar10", "cnn", 3),), cnn=table1.SMOKE, fcn=table1.SMOKE,
                    train_eval_limit=256),
    "quick": Config(
        networks=(("cifar10", "cnn", 3), ("mnist", "fcn", 6)),
        cnn=table1.Config(steps=200, lr=1e-3, lr_boundaries=(), eval_every=50, chunk=50,
                          batch_size=32, width_divisor=8, train_limit=2_000,
                          test_limit=2_000),
        fcn=table1.Config(steps=1_500, lr=3e-4, lr_boundaries=(900, 1_200),
                          eval_every=250, chunk=250, sg_width_divisor=4),
        train_eval_limit=2_000),
    "paper": Config(networks=(("cifar10", "cnn", 3), ("cifar10", "cnn", 4)),
                    cnn=table1.PAPER_CONFIG, fcn=table1.PAPER_CONFIG),
}
PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: 4 steps of CIFAR-10 CNN 3 at widths / 8",
    "quick": ("CIFAR-10 CNN 3 at widths / 8 (16 channels), batch 32, Adam 1e-3, 200 steps on "
              "2k training examples (a CPU-sized stand-in for A.1's 500k steps); MNIST FCN 6 "
              "(DNI model 4× narrower), Adam 3e-4, 1.5k steps ÷10 at 60 %/80 %; training "
              "error on the first 2k training examples"),
    "paper": "Table 1's CIFAR-10 CNN cells at A.1's protocol (needs a GPU)",
}


def cells(preset: str) -> list[Cell]:
    out = []
    for dataset, kind, depth in PRESETS[preset].networks:
        paper = dict(zip(table1.METHODS, table1.PAPER[(dataset, kind, depth)]))
        for m in METHODS:
            out.append(Cell(table1.cell_id(dataset, kind, depth, m),
                            row=f"{table1.dataset_label(dataset)} {kind.upper()} {depth}",
                            column=table1.COLUMNS[m],
                            params={"dataset": dataset, "kind": kind, "depth": depth,
                                    "method": m},
                            paper=paper[m]))
    return out


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    p = cell.params
    cfg = config.cnn if p["kind"] == "cnn" else config.fcn
    ds = table1.load_dataset(p["dataset"], cfg.train_limit, cfg.test_limit)
    split = table1.make_split(p["dataset"], p["kind"], p["depth"], p["method"], cfg,
                              ds.input_shape)
    _, final = fcn.train_fcn(ctx, split, ds, cfg, eval_train=True,
                             train_eval_limit=config.train_eval_limit)
    return {"metric": final["test_error"], "train_error": final["train_error"],
            "gap": final["test_error"] - final["train_error"], "dataset": ds.label}


UNDERFIT = ("it is easy to notice that the large test error (and its degradation with depth) "
            "is actually an effect of underfitting and not lack of ability to generalise or "
            "lack of convergence of learning process.")
FITS = ("Once label information is introduced in the cDNI model, the network fits the "
        "training data much better, however using synthetic gradients still acts like a "
        "regulariser")
CNN_CAUSE = ("budget: quick's CIFAR-10 CNN (200 steps, widths ÷ 8, 2k training examples) is "
             "far from fitting its training data with any method, Bprop included "
             "(reports/underfit/fig13.png); the paper protocol needs a GPU and has not run")


def claims(preset: str) -> list[Claim]:
    """A.2.1 per network, on the final training error (``key="train_error"``): strict
    orderings, as the paper states them (no margin: the paper gives only curves)."""
    out = []
    for dataset, kind, depth in PRESETS[preset].networks:
        cell = {m: table1.cell_id(dataset, kind, depth, m) for m in METHODS}
        net = f"{dataset}-{kind}{depth}"
        cause = CNN_CAUSE if kind == "cnn" else ""
        out += [Claim.less(f"dni-underfits-{net}", UNDERFIT, cell["bprop"], cell["dni"],
                           key="train_error", cause=cause),
                Claim.less(f"cdni-fits-better-{net}", FITS, cell["cdni"], cell["dni"],
                           key="train_error", cause=cause)]
    return out


_STYLE = {"bprop": dict(color="0.45"), "dni": dict(color="tab:blue"),
          "cdni": dict(color="tab:green")}


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``fig13``: training error (solid) and test error (dotted) during training, one
    panel per network, Bprop grey, DNI blue, cDNI green."""
    from matplotlib.figure import Figure

    by = {(r.cell.params["dataset"], r.cell.params["kind"], r.cell.params["depth"],
           r.cell.params["method"]): r for r in results}
    nets = [n for n in config.networks if any(n + (m,) in by for m in METHODS)]
    fig = Figure(figsize=(4.8 * max(len(nets), 1), 4.4), layout="constrained")
    axes = fig.subplots(1, max(len(nets), 1), squeeze=False)[0]
    for ax, n in zip(axes, nets):
        for m in METHODS:
            r = by.get(n + (m,))
            if r is None:
                continue
            if "train_error" in r.curves:
                ax.plot(*r.curves["train_error"], label=f"{table1.COLUMNS[m]} train "
                        f"({r.metrics['train_error']:.1f} %)", **_STYLE[m])
            if "test_error" in r.curves:
                ax.plot(*r.curves["test_error"], ls=":", label=f"{table1.COLUMNS[m]} test",
                        **_STYLE[m])
        log = log_if_spread(ax)
        ax.set_title(f"{table1.dataset_label(n[0])} {n[1].upper()} {n[2]}"
                     + (" (log scale)" if log else ""), fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncols=3)
    axes[0].set_ylabel("error (%)")
    claims = V.title_line(V.judge(EXPERIMENT, results))
    fig.suptitle(f"DNI Fig. 13: training (solid) and test (dotted) error\n{claims}",
                 fontsize="small")
    return {"fig13": fig}


EXPERIMENT = Experiment(
    name="underfit",
    paper="DNI (Jaderberg et al. 2016)",
    title="Fig. 13 (A.2.1): training error of DNI, cDNI and Bprop networks (underfitting)",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("table = final test error with Table 1's numbers; the claim is about the final "
           "training error (results.csv column train_error; fig13.png)"),
    preset_notes=PRESET_NOTES,
    claims=claims,
)
