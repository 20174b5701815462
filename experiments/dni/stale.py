"""DNI (Jaderberg et al. 2016) §3.1: the stale-gradient baseline on MNIST FCNs.

"As another baseline, we tried using historical, stale gradients with respect to
activations, rather than synthetic gradients. We took an exponential average historical
gradient, searching over the entire spectrum of decay rates and the best results attained
on MNIST classification were 9.1%, 11.8%, 15.4%, 19.0% for 3 to 6 layer FCNs respectively
– marginally better than using zero gradients (no backpropagation) and far worse than the
associated cDNI results of 2.2%, 1.9%, 1.7%, 1.6%."

The claims (:func:`claims`; verdicts computed into ``table.md`` and ``reports/README.md``,
and per depth the same verdicts in the panels' titles of ``stale-sweep.png``): the
published best stale errors, and at every depth the best stale-gradient network is at most
marginally better than No Bprop and far worse than cDNI (``cDNI + 3 < Stale ≤ No Bprop + 1``,
percentage points).

What is built. The networks, optimiser, loss and synthetic gradient models are those of
:mod:`experiments.dni.table1` (A.1; its ``Config`` and builders). Every interface (a cut
after every layer) uses :func:`sgjax.feedback.stale` with decay ``d``: the substitute for
``∂L/∂h`` at batch ``t`` is the exponential average ``m ← d·m + (1−d)·δ`` of the gradients
the layer above sent back for the previous batches, position by position in the batch — so
it belongs to *other* examples, as the paper notes. The Stale cell of each depth trains one
network per decay of :attr:`Config.decays` (the "entire spectrum", from 0 — the previous
batch's gradient — to 0.999) and reports the best final test error; every decay's error
is in its ``metrics`` and in ``stale-sweep.png``. No Bprop (zero gradient at every cut)
and cDNI (linear, label-conditioned synthetic gradients) are trained in the same way for
the comparison.

Optimizer probes (:data:`PROBES`, ``quick`` only; ids like
``mnist-fcn3-stale-sgd1e-01``): why is stale worse than No Bprop at ``quick``? Adam takes
steps of about the learning rate whatever a gradient's size, so a small but wrong stale
gradient (other examples' gradients) moves the lower layers as fast as a true one would;
under plain SGD its step is as small as it is. Each probe trains No Bprop, Stale (decay 0,
:data:`experiments.dni.table1.STALE_DECAY`) and, under SGD, Bprop (to show SGD's rate does
move the lower layers when the gradient is true) with one optimizer and initial learning
rate, the preset's steps and schedule shape; one 3-layer pair trains Adam 3e-5 for 10× the
steps (the same learning rate × steps as the main cells, with the paper's rate). They are
listed outside :class:`Config`, so the main cells keep their identity.

Reproduce with ``python -m experiments run stale --preset quick``
(``make reproduce-stale PRESET=quick``; presets ``smoke``, ``quick``, ``paper``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import sgjax
from experiments import training
from experiments.dni import fcn, table1
from experiments.framework import Cell, CellResult, Claim, Experiment
from experiments.framework import verdicts as V

PAPER: Mapping[int, tuple[float, float, float]] = {
    # layers: (No Bprop, best Stale, cDNI) final test error (%), §3.1 and Table 1.
    3: (9.3, 9.1, 2.2),
    4: (12.6, 11.8, 1.9),
    5: (16.2, 15.4, 1.7),
    6: (21.4, 19.0, 1.6),
}
METHODS = ("nobprop", "stale", "cdni")
COLUMNS = {"nobprop": "No Bprop", "stale": "Stale (best decay)", "cdni": "cDNI"}
MARGIN_ABOVE_NOBPROP = 1.0
"""The claim "marginally better than zero gradients": Stale ≤ No Bprop + this (points)."""
MARGIN_ABOVE_CDNI = 3.0
"""The claim "far worse than cDNI": Stale > cDNI + this (points)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """One preset: ``train`` is a :class:`experiments.dni.table1.Config` (steps, learning
    rate, widths, data limits); ``decays`` the decay rates searched; ``depths`` the FCN
    depths (layers, as in Table 1)."""

    train: table1.Config
    decays: tuple[float, ...]
    depths: tuple[int, ...] = (3, 4, 5, 6)


PRESETS = {
    "smoke": Config(
        train=table1.SMOKE, decays=(0.9,), depths=(3,)),
    "quick": Config(
        train=table1.Config(
            steps=2_000, lr=3e-4, lr_boundaries=(1_200, 1_600), eval_every=500, chunk=250),
        decays=(0.0, 0.5, 0.9, 0.99, 0.999)),
    "paper": Config(train=table1.PAPER_CONFIG,
                    decays=(0.0, 0.5, 0.9, 0.95, 0.99, 0.995, 0.999)),
}


PROBES: dict[str, tuple[tuple[int, str, str, float, int | None], ...]] = {
    "smoke": ((3, "stale", "sgd", 0.1, None),),
    "quick": tuple((d, m, opt, lr, None) for d in (3, 6) for opt, lr, methods in (
        ("adam", 3e-5, ("nobprop", "stale")), ("sgd", 0.1, ("nobprop", "stale", "bprop")))
        for m in methods) + tuple((3, m, "adam", 3e-5, 20_000) for m in ("nobprop", "stale")),
    "paper": (),
}
"""Per preset, the optimizer probes ``(depth, method, optimizer, initial lr, steps)``: Adam
at the paper's 3e-5 (10× below quick's) and plain SGD at 0.1, for the main cells' steps
(``None``) or, at 3e-5, for 10× more (the same learning rate × steps as the main cells;
the schedule shape is kept); Stale uses decay :data:`PROBE_DECAY`."""
PROBE_DECAY = 0.0
OPTIMIZERS = {"adam": "Adam", "sgd": "SGD"}


def cells(preset: str) -> list[Cell]:
    out = []
    for depth in PRESETS[preset].depths:
        for method, paper in zip(METHODS, PAPER[depth], strict=True):
            out.append(Cell(f"mnist-fcn{depth}-{method}", row=f"MNIST FCN {depth}",
                            column=COLUMNS[method], params={"depth": depth, "method": method},
                            paper=paper))
    for depth, method, opt, lr, steps in PROBES[preset]:
        label = (f"Stale (decay {PROBE_DECAY:g})" if method == "stale"
                 else {"nobprop": "No Bprop", "bprop": "Bprop"}[method])
        paper = (table1.PAPER[("mnist", "fcn", depth)][1] if method == "bprop"
                 else PAPER[depth][METHODS.index(method)])
        # "steps" only where it departs from the preset's, so the other probes' params
        # (their identity) do not carry it
        params = {"depth": depth, "method": method, "optimizer": opt, "lr": lr,
                  **({} if steps is None else {"steps": steps})}
        out.append(Cell(probe_id(depth, method, opt, lr, steps), row=f"MNIST FCN {depth}",
                        column=f"{label}, {OPTIMIZERS[opt]} {lr:g}"
                               + ("" if steps is None else f", {steps:,} steps"),
                        params=params, paper=paper))
    return out


def probe_id(depth: int, method: str, optimizer: str, lr: float,
             steps: int | None = None) -> str:
    return (f"mnist-fcn{depth}-{method}-{optimizer}{lr:.0e}"
            + ("" if steps is None else f"-{steps // 1000}k"))


def probe_config(params: Mapping[str, Any], cfg: table1.Config) -> table1.Config:
    """The preset's training config, or with ``params["steps"]`` steps, the ÷10 points
    kept at the same fractions of the run and the same number of evaluations."""
    if "steps" not in params:
        return cfg
    k = params["steps"] / cfg.steps
    return dataclasses.replace(
        cfg, steps=params["steps"], lr_boundaries=tuple(int(b * k) for b in cfg.lr_boundaries),
        eval_every=int(cfg.eval_every * k), chunk=int(cfg.chunk * k))


def is_probe(cell: Cell) -> bool:
    return "optimizer" in cell.params


def _train(ctx, split, ds, cfg: table1.Config) -> float:
    _, final = training.train_classifier(
        ctx, split, ds, steps=cfg.steps, batch_size=cfg.batch_size, chunk=cfg.chunk,
        eval_every=cfg.eval_every,
        compiler_options=training.FAST_COMPILE if cfg.fast_compile else None)
    return float(final["test_error"])


def probe_split(params: Mapping[str, Any], cfg: table1.Config, input_shape) -> sgjax.Split:
    """A probe's network: No Bprop, Stale (decay :data:`PROBE_DECAY`) or Bprop, trained by
    Adam or plain SGD from ``params["lr"]``, divided by 10 at the preset's boundaries."""
    import optax

    schedule = optax.piecewise_constant_schedule(
        params["lr"], {int(b): cfg.lr_factor for b in cfg.lr_boundaries})
    optimizer = {"adam": optax.adam, "sgd": optax.sgd}[params["optimizer"]](schedule)
    feedback = {"nobprop": sgjax.feedback.none(), "stale": sgjax.feedback.stale(PROBE_DECAY),
                "bprop": None}[params["method"]]
    return fcn.fcn_split(params["depth"], () if feedback is None else "every", feedback, cfg,
                         input_shape, optimizer=optimizer)


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    p, cfg = cell.params, config.train
    ds = table1.load_dataset("mnist", cfg.train_limit, cfg.test_limit)
    if is_probe(cell):
        cfg = probe_config(p, cfg)
        return {"metric": _train(ctx, probe_split(p, cfg, ds.input_shape), ds, cfg)}
    if p["method"] != "stale":
        split = table1.make_split("mnist", "fcn", p["depth"], p["method"], cfg, ds.input_shape)
        return {"metric": _train(ctx, split, ds, cfg)}
    errors = []
    for i, decay in enumerate(config.decays):
        split = fcn.fcn_split(p["depth"], "every", sgjax.feedback.stale(decay), cfg,
                              ds.input_shape)
        errors.append(_train(fcn.SubContext(ctx, i, f"decay{decay:g}"), split, ds, cfg))
    best = int(np.argmin(errors))
    return {"metric": errors[best], "best_decay": config.decays[best],
            "decays": list(config.decays), "errors": errors}


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``stale-sweep``: final test error against the decay rate, one panel per depth, with
    our No Bprop and cDNI as lines and the paper's three numbers as dotted lines."""
    from matplotlib.figure import Figure

    by = {(r.cell.params["depth"], r.cell.params["method"]): r for r in results
          if not is_probe(r.cell)}
    depths = sorted({d for d, _ in by})
    judged = V.judge(EXPERIMENT, [r for r in results if not is_probe(r.cell)])
    fig = Figure(figsize=(3.3 * max(len(depths), 1), 3.8), layout="constrained")
    axes = fig.subplots(1, max(len(depths), 1), squeeze=False)[0]
    for ax, depth in zip(axes, depths):
        stale = by.get((depth, "stale"))
        if stale is not None:
            x = np.arange(len(stale.metrics["decays"]))
            ax.plot(x, stale.metrics["errors"], "o-", color="tab:orange", label="Stale (ours)")
            ax.set_xticks(x, [f"{d:g}" for d in stale.metrics["decays"]], fontsize="x-small")
        for m, color in (("nobprop", "tab:red"), ("cdni", "tab:green")):
            r = by.get((depth, m))
            if r is not None:
                ax.axhline(r.metric, color=color, label=f"{COLUMNS[m]} (ours)")
        for color, v, name in zip(("tab:red", "tab:orange", "tab:green"), PAPER[depth],
                                  ("No Bprop", "Stale", "cDNI")):
            ax.axhline(v, color=color, ls=":", lw=1.2, label=f"{name} (paper)")
        verdicts = "\n".join(f"{v.claim.id.removesuffix(f'-fcn{depth}')}: {v.text}"
                             for v in judged if v.claim.id.endswith(f"-fcn{depth}"))
        ax.set_title(f"{depth} layers" + (f"\n{verdicts}" if verdicts else ""),
                     fontsize="x-small")
        ax.set_xlabel("decay rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test error (%)")
    if axes[0].lines:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=6,
                   fontsize="x-small")
    fig.suptitle("DNI §3.1: stale activation gradients (EMA) vs No Bprop and cDNI "
                 "(dotted: paper)", fontsize="medium")
    out = {"stale-sweep": fig}
    if any(is_probe(r.cell) for r in results):
        out["stale-optimizers"] = _optimizer_figure(results, by)
    return out


def _optimizer_figure(results: Sequence[CellResult], main: Mapping[tuple[int, str], Any]):
    """``stale-optimizers``: per depth, final test error of No Bprop, Stale (decay
    :data:`PROBE_DECAY`) and Bprop under each optimizer: the main cells' Adam (decay 0's
    error from the sweep) and the probes."""
    from matplotlib.figure import Figure

    errors: dict[int, dict[str, dict[str, float]]] = {}
    for (depth, method), r in main.items():
        arm = errors.setdefault(depth, {}).setdefault("Adam 3e-4 (main)", {})
        if method == "nobprop":
            arm["nobprop"] = r.metric
        elif method == "stale" and PROBE_DECAY in r.metrics.get("decays", []):
            arm["stale"] = r.metrics["errors"][r.metrics["decays"].index(PROBE_DECAY)]
    for r in results:
        if is_probe(r.cell):
            p = r.cell.params
            name = f"{OPTIMIZERS[p['optimizer']]} {p['lr']:g}" + (
                f", {p['steps'] // 1000}k" if "steps" in p else "")
            errors.setdefault(p["depth"], {}).setdefault(name, {})[p["method"]] = r.metric
    depths = sorted({r.cell.params["depth"] for r in results if is_probe(r.cell)})
    fig = Figure(figsize=(4 * max(len(depths), 1), 3.4), layout="constrained")
    axes = fig.subplots(1, max(len(depths), 1), squeeze=False)[0]
    colors = {"nobprop": "tab:red", "stale": "tab:orange", "bprop": "tab:blue"}
    for ax, depth in zip(axes, depths):
        arms = [a for a in errors[depth] if len(errors[depth][a]) > 1]
        for j, method in enumerate(("nobprop", "stale", "bprop")):
            x = [i + (j - 1) * 0.27 for i, a in enumerate(arms) if method in errors[depth][a]]
            y = [errors[depth][a][method] for a in arms if method in errors[depth][a]]
            ax.bar(x, y, width=0.27, color=colors[method],
                   label={"nobprop": "No Bprop", "stale": f"Stale ({PROBE_DECAY:g})",
                          "bprop": "Bprop"}[method])
            for xi, yi in zip(x, y):
                ax.text(xi, yi, f"{yi:.1f}", ha="center", va="bottom", fontsize="xx-small")
        ax.set_xticks(range(len(arms)), arms, fontsize="x-small")
        ax.set_title(f"{depth} layers", fontsize="small")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("final test error (%)")
    if axes[0].lines:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=6,
                   fontsize="x-small")
    fig.suptitle("Stale vs No Bprop under each optimizer (preset steps unless marked; "
                 "÷10 at 60 %/80 %)",
                 fontsize="medium")
    return fig


STALE_WORDS = ("We took an exponential average historical gradient, searching over the entire "
               "spectrum of decay rates and the best results attained on MNIST classification "
               "were 9.1%, 11.8%, 15.4%, 19.0% for 3 to 6 layer FCNs respectively – marginally "
               "better than using zero gradients (no backpropagation) and far worse than the "
               "associated cDNI results of 2.2%, 1.9%, 1.7%, 1.6%.")
STALE_CAUSE = (
    "step size (protocol), plus No Bprop's own budget: at 3 layers, with the same learning "
    "rate × steps, Adam 3e-5 for 20k steps leaves Stale (decay 0) 0.6 points above No Bprop "
    "(13.31 vs 12.69 %, within 'marginally') where quick's Adam 3e-4 for 2k leaves 4.8 "
    "(18.31 vs 13.48 %), and under plain SGD 0.1 Stale beats No Bprop at 6 layers (20.63 vs "
    "24.68 %), so quick's large steps, not the stale gradients as such, put Stale below No "
    "Bprop (measured at 3 and 6 layers; 4–5 layers and 500k steps not run), while No Bprop "
    "itself is still above the paper at these budgets (reports/table1-budget); evidence: "
    "reports/stale/stale-optimizers.png and the stale-marginal-fcn*-adam3e-05-20k / -sgd1e-01 "
    "claims")
"""The cause of the main cells' "differs", from the optimizer probes' records."""
PROBE_CAUSE = {
    "adam": "",
    "sgd": ("step size, partly: SGD 0.1 also takes large steps (its No Bprop learns faster "
            "than under Adam 3e-4) and does not remove the 3-layer gap, so Adam's "
            "normalisation is not the whole cause; the gap shrinks with the step size: "
            "0.6 points at Adam 3e-5 with 10× the steps "
            "(stale-marginal-fcn3-adam3e-05-20k; reports/stale/stale-optimizers.png)"),
}
"""Per optimizer, the cause found where a probe's "marginally better" claim differs."""


def claims(preset: str) -> list[Claim]:
    """§3.1 per depth. Tolerance of the published stale errors: ±10 % of the error (about
    three times one run's spread over seeds at these 9–19 % errors); "marginally better"
    allows Stale up to 1 point above No Bprop and "far worse" needs 3 points above cDNI
    (:data:`MARGIN_ABOVE_NOBPROP`, :data:`MARGIN_ABOVE_CDNI`)."""
    out = []
    for d in PRESETS[preset].depths:
        cell = {m: f"mnist-fcn{d}-{m}" for m in METHODS}
        stale = PAPER[d][1]
        out += [
            Claim.near(f"stale-fcn{d}", STALE_WORDS, cell["stale"], stale, round(0.1 * stale, 2),
                       cause=STALE_CAUSE),
            Claim.less(f"stale-marginal-fcn{d}", STALE_WORDS, cell["stale"], cell["nobprop"],
                       margin=-MARGIN_ABOVE_NOBPROP, cause=STALE_CAUSE),
            Claim.less(f"stale-far-worse-than-cdni-fcn{d}", STALE_WORDS, cell["cdni"],
                       cell["stale"], margin=MARGIN_ABOVE_CDNI),
        ]
    probes = set(PROBES[preset])
    for d, opt, lr, steps in sorted({(d, opt, lr, steps) for d, _, opt, lr, steps in probes},
                                    key=str):
        if {(d, m, opt, lr, steps) for m in ("nobprop", "stale")} <= probes:
            out.append(Claim.less(
                f"stale-marginal-fcn{d}-{opt}{lr:.0e}"
                + ("" if steps is None else f"-{steps // 1000}k"), STALE_WORDS,
                probe_id(d, "stale", opt, lr, steps), probe_id(d, "nobprop", opt, lr, steps),
                margin=-MARGIN_ABOVE_NOBPROP, cause=PROBE_CAUSE.get(opt, "")))
    return out


PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: table1's smoke training, one decay, depth 3",
    "quick": ("A.1's networks, batch 256, Adam 3e-4 (paper 3e-5) for 2k steps (paper 500k), "
              "divided by 10 at 60 %/80 % (paper's points); decays 0, 0.5, 0.9, 0.99, 0.999; "
              "optimizer probes at 3 and 6 layers (Adam 3e-5 and SGD 0.1 for 2k steps, "
              "and at 3 layers Adam 3e-5 for 20k)"),
    "paper": "A.1's protocol (table1's paper preset) for every network, seven decays",
}

EXPERIMENT = Experiment(
    name="stale",
    paper="DNI (Jaderberg et al. 2016)",
    title="§3.1: stale (exponentially averaged) activation gradients on MNIST FCNs",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes="Stale = the best final error over the decays (every decay's error: "
          "stale-sweep.png and the cell's metrics)",
    preset_notes=PRESET_NOTES,
    claims=claims,
)
