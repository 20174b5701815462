"""Czarnecki et al. 2017, Fig. 3 and supp. Fig. 7: representational dissimilarity matrices.

A 20-hidden-layer ReLU + batch-norm MNIST net (512 units; supp. C) is trained with
backpropagation, with one SG between layers 11 and 12, with a SG between every pair of
layers, and with DFA (:mod:`experiments.understanding.nets`, one cell per method). Then
400 MNIST test points, 40 per class sorted by label, are pushed through each net and,
at every hidden layer ``l``, ``RDM_ij = 1 − corr(h_i, h_j)`` (supp. C "Representational
Dissimilarity Matrices"). The right-hand panel is the L2 distance between the
within-class (diagonal-block) entries of layer ``l``'s RDM and those of the last hidden
layer's.

``fig3`` shows backprop, single SG and SG everywhere (Fig. 3); ``fig7`` adds DFA (Fig. 7).
Off-block-diagonal entries are drawn semi-transparent, as in the paper. The RDMs are
stored per cell in ``cells/<cell>.rdm.npz`` (float16) next to the cell's JSON.

Not given in the paper: batch size, number of steps and which test points were sampled
(we take the first 40 test images of each class).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from experiments.framework import Cell, Claim, Experiment
from experiments.understanding import PAPER, nets


@dataclasses.dataclass(frozen=True)
class Config:
    """Fig. 3 / Fig. 7 settings. Reproduce with

    ``make reproduce-understanding-fig3 PRESET=smoke`` (seconds, wiring only),
    ``make reproduce-understanding-fig3 PRESET=quick`` (~10 min on a CPU:
    :data:`~experiments.understanding.nets.QUICK`, 128 units, 8k steps at lr 1e-4) or
    ``make reproduce-understanding-fig3 PRESET=paper`` (512 units, lr 3e-5),
    i.e. ``python -m experiments run understanding-fig3 --preset PRESET``.
    The trained nets are kept for ``understanding-fig8`` (see ``nets.CACHE_DIR``).
    """

    net: nets.NetConfig = nets.NetConfig()
    per_class: int = 40
    methods: tuple[str, ...] = nets.METHODS


PRESETS = {
    "smoke": Config(net=nets.SMOKE, per_class=4),
    "quick": Config(net=nets.QUICK),
    "paper": Config(),
}


def cells(preset: str):
    return [Cell(m, row=nets.LABELS[m], column="test error", params={"method": m})
            for m in PRESETS[preset].methods]


def rdm(h: np.ndarray) -> np.ndarray:
    """``1 − corr(h_i, h_j)`` for the rows of ``h`` (a row with no variance correlates 0)."""
    h = np.asarray(h, np.float64)
    h = h - h.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(h, axis=1, keepdims=True)
    h = np.where(norm > 1e-12, h / np.maximum(norm, 1e-12), 0.0)
    return 1.0 - h @ h.T


def diagonal_block_distances(rdms: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``‖D_l − D_last‖₂`` over the within-class entries ``(i, j: y_i = y_j)`` of each RDM."""
    same = np.asarray(labels)[:, None] == np.asarray(labels)[None, :]
    blocks = rdms[:, same]
    return np.linalg.norm(blocks - blocks[-1], axis=1)


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    method = cell.params["method"]
    ds = nets.load_mnist(config.net)
    split, states, final = nets.train(ctx, method, config.net, ds)
    x, y = nets.label_sorted_sample(ds.x_test, ds.y_test, config.per_class, ds.num_classes)
    acts = nets.hidden_activations(split, states, x)
    rdms = np.stack([rdm(a) for a in acts])
    path = ctx.out_dir / "cells" / f"{cell.id}.rdm.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, rdm=rdms.astype(np.float16), labels=y)
    return {"metric": final["test_error"], "train_error": final["train_error"],
            "labels": np.asarray(y).tolist(),
            "block_distance": diagonal_block_distances(rdms, y).tolist(),
            "interfaces": list(nets.interfaces(method, config.net.depth)),
            "rdm_file": str(path.resolve()), "rdm_file_relative": f"cells/{path.name}"}


def load_rdms(result) -> np.ndarray | None:
    """The stored RDMs ``(layers, n, n)`` of a cell, or ``None`` if the file is gone."""
    path = Path(result.metrics.get("rdm_file", ""))
    if not path.is_file():
        return None
    with np.load(path) as f:
        return f["rdm"].astype(np.float32)


def _rgba(matrix, same, cmap, vmin, vmax, alpha_off=0.35):
    rgba = cmap(np.clip((matrix - vmin) / max(vmax - vmin, 1e-12), 0, 1))
    rgba[..., 3] = np.where(same, 1.0, alpha_off)
    return rgba


def _rdm_figure(results, config, methods, title):
    import matplotlib
    from matplotlib.figure import Figure

    by = {r.cell.params["method"]: r for r in results}
    methods = [m for m in methods if m in by]
    if not methods or any(load_rdms(by[m]) is None for m in methods):
        return None  # the RDM files are gone (not committed): no figure rather than blanks
    depth = config.net.depth
    cmap = matplotlib.colormaps["RdYlBu_r"]
    fig = Figure(figsize=(0.75 * depth + 4.5, 0.8 * len(methods) + 1.2),
                 layout="constrained")
    outer = fig.add_gridspec(1, 2, width_ratios=[depth * 0.75, 4.0])
    left = outer[0].subgridspec(len(methods), depth, wspace=0.05, hspace=0.05)
    for i, m in enumerate(methods):
        r = by[m]
        rdms = load_rdms(r)
        labels = np.asarray(r.metrics["labels"])
        same = labels[:, None] == labels[None, :]
        for layer in range(depth):
            ax = fig.add_subplot(left[i, layer])
            ax.set_xticks([])
            ax.set_yticks([])
            if rdms is not None and layer < len(rdms):
                ax.imshow(_rgba(rdms[layer], same, cmap, 0.0, 1.5), interpolation="nearest")
            if i == 0:
                ax.set_title(str(layer + 1), fontsize=7)
            if layer == 0:
                ax.set_ylabel(nets.LABELS[m], fontsize=7)
            if layer + 1 in r.metrics["interfaces"] and m == "sg_single":
                ax.spines["right"].set_color("tab:orange")
                ax.spines["right"].set_linewidth(2.5)
    ax = fig.add_subplot(outer[1])
    for m in methods:
        d = by[m].metrics["block_distance"]
        ax.plot(range(1, len(d) + 1), d, marker="o", ms=3, color=nets.COLORS[m],
                label=nets.LABELS[m])
    if "sg_single" in methods:
        ax.axvline(nets.middle_cut(depth) + 0.5, ls=":", color=nets.COLORS["sg_single"])
    ax.set_xlabel("hidden layer")
    ax.set_ylabel(f"L2 distance of diagonal blocks to layer {depth}")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def figures(results, config) -> dict:
    depth = config.net.depth
    out = {}
    fig3 = _rdm_figure(results, config, ("backprop", "sg_single", "sg_every"),
                       f"Fig. 3: RDMs (1 − corr) of 400 label-sorted MNIST test points at "
                       f"each of {depth} hidden layers; orange edge/dotted line: single SG "
                       f"(after layer {nets.middle_cut(depth)})")
    fig7 = _rdm_figure(results, config, nets.METHODS,
                       "Fig. 7: as Fig. 3, with DFA (bottom row)")
    if fig3 is not None:
        out["fig3"] = fig3
    if fig7 is not None:
        out["fig7"] = fig7
    return out


SCATTERED = ("With 20 SG modules (one between every pair of layers), the representation is "
             "scattered even more broadly: we see rather different learning dynamics, with "
             "each layer contributing a small amount to the final solution, and there is no "
             "longer a point in the progression of layers where the representation is more or "
             "less static in terms of correlation structure")


def claims(preset: str) -> list[Claim]:
    """On ``block_distance`` (per hidden layer, the L2 distance of its RDM's within-class
    blocks from the last hidden layer's): after 9 layers the SG-everywhere net is farther
    from its final representation than the backprop net (a strict ordering: the paper
    shows the matrices only)."""
    ids = {c.id for c in cells(preset)}
    if not {"backprop", "sg_every"} <= ids:
        return []
    return [Claim.less("sg-every-not-static-after-9", SCATTERED, "backprop", "sg_every",
                       key="block_distance[8]")]


EXPERIMENT = Experiment(
    name="understanding-fig3",
    paper=PAPER,
    title="Fig. 3 / supp. Fig. 7: RDMs of a 20-hidden-layer MNIST net per training method",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes="the paper reports no numbers for this figure; compare fig3.png/fig7.png",
    claims=claims,
)
