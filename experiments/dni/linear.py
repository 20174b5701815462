"""DNI (Jaderberg et al. 2016) Fig. 12: linear synthetic gradient models for MNIST FCNs.

Every-layer DNI (a cut after every layer, Fig. 1 (d)) on A.1's 3- to 6-layer MNIST FCNs,
with *linear* synthetic gradient models ``δ̂ = M(h) = φ_w h + φ_b`` (A.1's "0 hidden
layers"), unconditioned (DNI) and conditioned on the one-hot label (cDNI, which for MNIST
FCNs is exactly Table 1's cDNI), beside Table 1's DNI with A.1's two-hidden-layer model.
Fig. 12 gives curves only; §3.1 adds that "the best results obtained with cDNI were with
*linear* synthetic gradient models".

The claims (:func:`claims`; verdicts computed into ``table.md`` and ``reports/README.md``,
the same verdicts in ``fig12.png``'s title): linear DNI trains every depth
(far below Table 1's No Bprop); conditioning on the label helps the linear model; for
unconditioned DNI, A.1's two-hidden-layer model (chosen by A.1's search over 0–2 hidden
layers) is at least as good as the linear one.

Budget cells (:data:`BUDGET_CELLS`, ids like ``mnist-fcn3-dni-linear-6000``) train the same
cell at a larger budget with the same schedule shape (÷10 at 60 % and 80 % of its own
steps); their ``steps`` live in their params, outside :class:`Config`, so the preset cells
keep their identity. Claims ``less(larger budget, preset budget)`` ask whether the
differing claims move with budget.

The paper column holds Table 1's numbers where the cell *is* a Table 1 cell (cDNI-linear,
DNI-MLP); linear DNI has no published number (Fig. 12 is a plot).

Reproduce with ``python -m experiments run linear --preset quick``
(``make reproduce-linear PRESET=quick``; presets ``smoke``, ``quick``, ``paper``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sgjax
from experiments.dni import fcn, table1
from experiments.framework import Cell, CellResult, Claim, Experiment
from experiments.framework import verdicts as V
from experiments.framework.reports import log_axis, mark_paper, paper_legend_entry

MODELS = ("dni-linear", "cdni-linear", "dni-mlp")
COLUMNS = {"dni-linear": "DNI, linear SG", "cdni-linear": "cDNI, linear SG",
           "dni-mlp": "DNI, A.1 SG (2 hidden)"}
NO_BPROP = {3: 9.3, 4: 12.6, 5: 16.2, 6: 21.4}
"""Table 1's No Bprop errors (%), the baseline of claim 1."""


@dataclasses.dataclass(frozen=True)
class Config:
    """``train`` (:class:`experiments.dni.table1.Config`), the FCN ``depths`` and the
    synthetic gradient ``models`` (a subset of :data:`MODELS`)."""

    train: table1.Config
    depths: tuple[int, ...] = (3, 4, 5, 6)
    models: tuple[str, ...] = MODELS


PRESETS = {
    "smoke": Config(train=table1.SMOKE, depths=(3,), models=("dni-linear",)),
    "quick": Config(train=table1.Config(steps=1_500, lr=3e-4, lr_boundaries=(900, 1_200),
                                        eval_every=250, chunk=250, sg_width_divisor=4),
                    depths=(3, 6)),
    "paper": Config(train=table1.PAPER_CONFIG),
}
PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: 4 steps, widths / 8, one cell",
    "quick": ("A.1's networks, batch 256, Adam 3e-4 (paper 3e-5) for 1.5k steps (paper 500k), "
              "÷10 at 60 %/80 %; DNI-MLP 4× narrower (2 × 256); depths 3 and 6 only (CPU "
              "time)"),
    "paper": "A.1's protocol (500k steps, Adam 3e-5 ÷10 at 300k and 400k)",
}


BUDGET_CELLS: dict[str, tuple[tuple[int, str, int], ...]] = {
    "smoke": ((3, "dni-linear", 8),),
    "quick": ((3, "dni-linear", 6_000), (6, "dni-linear", 6_000), (6, "dni-mlp", 6_000)),
    "paper": (),
}
"""Per preset, the ``(depth, model, steps)`` budget cells."""


def cell_id(depth: int, model: str, steps: int | None = None) -> str:
    return f"mnist-fcn{depth}-{model}" + ("" if steps is None else f"-{steps}")


def budget_config(cfg: table1.Config, steps: int) -> table1.Config:
    """``cfg`` at ``steps`` steps, ÷10 at 60 %/80 % of them, as many evaluations."""
    evals = max(cfg.steps // cfg.eval_every, 1)
    every = max(steps // evals, 1)
    return dataclasses.replace(cfg, steps=steps, lr_boundaries=(steps * 6 // 10, steps * 8 // 10),
                               eval_every=every, chunk=min(cfg.chunk, every))


def paper_value(depth: int, model: str) -> float | None:
    """Table 1's number for the cells that are Table 1 cells, else ``None``."""
    dni, cdni = table1.PAPER[("mnist", "fcn", depth)][2:]
    return {"cdni-linear": cdni, "dni-mlp": dni}.get(model)


def cells(preset: str) -> list[Cell]:
    cfg = PRESETS[preset]
    base = [Cell(cell_id(d, m), row=f"MNIST FCN {d}", column=COLUMNS[m],
                 params={"depth": d, "model": m}, paper=paper_value(d, m))
            for d in cfg.depths for m in cfg.models]
    budget = [Cell(cell_id(d, m, s), row=f"MNIST FCN {d}, {s:,} steps", column=COLUMNS[m],
                   params={"depth": d, "model": m, "steps": s}, paper=paper_value(d, m))
              for d, m, s in BUDGET_CELLS[preset]]
    return base + budget


def make_predictor(model: str, config: table1.Config) -> sgjax.Predictor:
    if model == "dni-linear":
        return sgjax.predictors.linear()
    if model == "cdni-linear":
        return sgjax.predictors.linear(conditioned=True)
    if model == "dni-mlp":
        return table1.make_predictor("mnist", "fcn", "dni", config)
    raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    cfg, p = config.train, cell.params
    if "steps" in p:
        cfg = budget_config(cfg, p["steps"])
    ds = table1.load_dataset("mnist", cfg.train_limit, cfg.test_limit)
    predictor = make_predictor(p["model"], cfg)
    split = fcn.fcn_split(p["depth"], "every", sgjax.feedback.synthetic(predictor), cfg,
                          ds.input_shape)
    _, final = fcn.train_fcn(ctx, split, ds, cfg, eval_train=True, log_info=True)
    return {"metric": final["test_error"], "train_error": final["train_error"],
            "sg_model": predictor.description}


_STYLE = {"dni-linear": dict(color="tab:blue", ls="--"),
          "cdni-linear": dict(color="tab:green", ls="--"),
          "dni-mlp": dict(color="tab:purple", ls="-")}
_BUDGET_MARKER = {"dni-linear": "s", "cdni-linear": "s", "dni-mlp": "o"}


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``fig12``: test error during training (log scale: the curves span 2-20 %), one panel
    per depth, one line per model (budget cells dotted with markers, their x axis their own
    steps); Table 1's number for the cell, where there is one, as a star."""
    from matplotlib.figure import Figure

    extra = [r for r in results if "steps" in r.cell.params]
    results = [r for r in results if "steps" not in r.cell.params]
    by = {(r.cell.params["depth"], r.cell.params["model"]): r for r in results}
    depths = sorted({d for d, _ in by})
    fig = Figure(figsize=(4.2 * max(len(depths), 1) + 0.4, 5.0), layout="constrained")
    axes = fig.subplots(1, max(len(depths), 1), squeeze=False, sharey=True)[0]
    for ax, d in zip(axes, depths):
        for m in MODELS:
            r = by.get((d, m))
            if r is not None and "test_error" in r.curves:
                steps, values = r.curves["test_error"]
                paper = "" if r.cell.paper is None else f", Table 1: {r.cell.paper:g} %"
                ax.plot(steps, values, label=f"{COLUMNS[m]} ({r.metric:.2f} %{paper})",
                        **_STYLE[m])
                mark_paper(ax, steps[-1], r.cell.paper, _STYLE[m]["color"])
        for r in extra:
            p = r.cell.params
            if p["depth"] == d and "test_error" in r.curves:
                ax.plot(*r.curves["test_error"], lw=1, markersize=3,
                        marker=_BUDGET_MARKER[p["model"]],
                        label=f"{COLUMNS[p['model']]}, {p['steps']:,} steps "
                              f"({r.metric:.2f} %)",
                        **{**_STYLE[p["model"]], "ls": ":"})
        log_axis(ax)
        ax.set_title(f"{d} layers", fontsize="small")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
        paper_legend_entry(ax, "paper, Table 1 (★)")
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.18))
    axes[0].set_ylabel("test error (%, log scale)")
    claims = V.title_line(V.judge(EXPERIMENT, results))  # the preset cells' claims
    fig.suptitle(f"DNI Fig. 12: linear synthetic gradient models, MNIST FCNs\n{claims}",
                 fontsize="small")
    return {"fig12": fig}


DNI_WORKS = ("Looking at the results in Table 1 we can see that DNI does indeed work, "
             "successfully update-decoupling all layers at a small cost in accuracy")
CONDITIONED = ("once we condition the synthetic gradients on the labels, we can successfully "
               "train deep models with very little degradation in accuracy.")
LINEAR_BEST = ("Interestingly, the best results obtained with cDNI were with *linear* "
               "synthetic gradient models. (A.1: \"The synthetic gradient models consists of "
               "two (DNI) or zero (cDNI) hidden layers\")")
BUDGET = ("not investigated yet (budget suspected): quick trains 1.5k steps at Adam 3e-4, "
          "paper 500k at 3e-5, and the paper protocol has not run (reports/linear/fig12.png)")
BUDGET_FOUND = ("budget: the same cell at {steps:,} steps with the same schedule shape "
                "({cell}) falls below the bound and below the preset cell (claims "
                "linear-dni-trains-fcn{depth}-{steps} and budget-dni-linear-fcn{depth}-{steps}, "
                "reports/linear/table.md, reports/linear/fig12.png)")
MLP_CAUSE = ("not budget: at 4× the steps (same schedule shape) the 6-layer DNI with A.1's "
             "model gets worse while the linear model improves, so the gap widens (claims "
             "budget-dni-mlp-fcn6-6000 and dni-mlp-no-worse-fcn6-6000, reports/linear/table.md); "
             "its test error is lowest near 1k steps and its train error is as high as its test "
             "error, so A.1's model destabilises every-layer training at quick's Adam 3e-4 (it "
             "is better at 1e-4, reports/table1-budget/table.md; deep unconditioned DNI also "
             "degrades with training at the paper protocol, issue 18 §2)")
MLP_BUDGET = ("measured, not budget: more steps make A.1's model worse at 6 layers (its train "
              "error rises with its test error) at quick's Adam 3e-4 (reports/linear/fig12.png)")


BUDGET_WORDS = ("(budget question, ours) the paper trains 500k steps; a larger budget with the "
                "same schedule shape should move the error toward its numbers")


def claims(preset: str) -> list[Claim]:
    """Fig. 12's orderings per depth. "Trains" is read as below half of Table 1's No Bprop
    error (a network whose lower layers got no useful gradient stays near No Bprop); "at
    least as good" allows 0.5 points (about three times one MNIST run's spread over seeds)."""
    cfg = PRESETS[preset]
    budget = {(d, m): s for d, m, s in BUDGET_CELLS[preset]}
    out = []
    for d in cfg.depths:
        cell = {m: f"mnist-fcn{d}-{m}" for m in MODELS}
        if "dni-linear" in cfg.models:
            s = budget.get((d, "dni-linear"))
            cause = BUDGET if s is None else BUDGET_FOUND.format(
                steps=s, cell=cell_id(d, "dni-linear", s), depth=d)
            out.append(Claim.at_most(f"linear-dni-trains-fcn{d}", DNI_WORKS,
                                     cell["dni-linear"], NO_BPROP[d] / 2, cause=cause))
        if {"dni-linear", "cdni-linear"} <= set(cfg.models):
            out.append(Claim.less(f"cdni-beats-dni-linear-fcn{d}", CONDITIONED,
                                  cell["cdni-linear"], cell["dni-linear"]))
        if {"dni-linear", "dni-mlp"} <= set(cfg.models):
            out.append(Claim.less(f"dni-mlp-no-worse-fcn{d}", LINEAR_BEST, cell["dni-mlp"],
                                  cell["dni-linear"], margin=-0.5, cause=MLP_CAUSE))
    for d, m, s in BUDGET_CELLS[preset]:
        out.append(Claim.less(f"budget-{m}-fcn{d}-{s}", BUDGET_WORDS, cell_id(d, m, s),
                              cell_id(d, m), cause=MLP_BUDGET if m == "dni-mlp" else ""))
        if m == "dni-linear":
            out.append(Claim.at_most(f"linear-dni-trains-fcn{d}-{s}", DNI_WORKS,
                                     cell_id(d, m, s), NO_BPROP[d] / 2))
    for d in cfg.depths:
        if (d, "dni-linear") in budget and (d, "dni-mlp") in budget:
            out.append(Claim.less(f"dni-mlp-no-worse-fcn{d}-{budget[(d, 'dni-mlp')]}",
                                  LINEAR_BEST, cell_id(d, "dni-mlp", budget[(d, "dni-mlp")]),
                                  cell_id(d, "dni-linear", budget[(d, "dni-linear")]),
                                  margin=-0.5, cause=MLP_CAUSE))
    return out


EXPERIMENT = Experiment(
    name="linear",
    paper="DNI (Jaderberg et al. 2016)",
    title="Fig. 12: linear synthetic gradient models for MNIST FCNs (every-layer DNI)",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("paper column = Table 1 where the cell is a Table 1 cell (cDNI is linear for "
           "MNIST FCNs in A.1; DNI-MLP is A.1's DNI); Fig. 12 itself gives curves only"),
    preset_notes=PRESET_NOTES,
    claims=claims,
)
