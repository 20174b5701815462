"""DNI Table 1's unconditioned DNI cells against their training budget: does the gap to
the paper close with training?

At ``quick`` (5k steps, Adam 3e-4) every-layer DNI on A.1's MNIST FCNs is the column of
Table 1 furthest from the paper (1.9 and 4.3 % after 500k steps at 3 and 6 layers). This
experiment trains the same cells — A.1's network, A.1's
synthetic gradient model (two hidden layers of 1024, batch norm, ReLU), batch 256, the
ordinary batch-mean loss — for several budgets ``S``, each with the paper's schedule
*shape* (learning rate divided by 10 at 60 % and 80 % of ``S``, as 300k/400k of 500k), and
at more than one initial learning rate where the preset asks. Cell ids look like
``mnist-fcn3-dni-20000-lr3e-04``; the paper column is Table 1's DNI number.

No Bprop cells (:data:`NOBPROP`, ids like ``mnist-fcn3-nobprop-20000-lr3e-04``; paper
column Table 1's No Bprop) train the same networks with a zero gradient at every cut, so
only the classifier on the frozen random features learns: they ask the same question of
Table 1's No Bprop column. They are listed outside :class:`Config`, so adding them leaves
the DNI cells' identity (params and preset config) unchanged.

The question: for every depth, does the test error at the largest budget fall below the
error at the smallest (``gap closes with budget``), and how much of the distance to the
paper's number is left? The claims (:func:`claims`) answer it from the cell records, with
the cause found where the answer is no; :func:`effects` gives the share of the gap closed
(the figure's title, with the claims' verdicts).

Reproduce with ``python -m experiments run table1-budget --preset quick``
(``make reproduce-table1-budget PRESET=quick``); ``--preset paper`` runs the full grid
{3, 6 layers} × {5k, 20k, 50k steps} × {Adam 3e-4, 1e-4}, and No Bprop at 3 to 6 layers ×
{5k, 20k, 50k steps} (hours on a GPU-less machine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sgjax
from experiments.dni import fcn, table1
from experiments.framework import Cell, CellResult, Claim, Experiment
from experiments.framework import verdicts as V
from experiments.framework.reports import log_axis


@dataclasses.dataclass(frozen=True)
class Config:
    """``base`` (:class:`experiments.dni.table1.Config`) gives widths, batch size and data
    limits; ``grid`` lists the ``(depth, steps)`` pairs to train, each at every learning
    rate of ``lrs``; ``lr_sweep`` adds single ``(depth, steps, lr)`` cells (a learning-rate
    comparison at one budget without paying for the whole grid at every rate). A cell's
    schedule divides its learning rate by 10 at 60 % and 80 % of its steps and measures the
    test error ``evals`` times."""

    base: table1.Config
    grid: tuple[tuple[int, int], ...]
    lrs: tuple[float, ...] = (3e-4,)
    lr_sweep: tuple[tuple[int, int, float], ...] = ()
    evals: int = 20

    def __post_init__(self):
        for depth, steps in (*self.grid, *((d, s) for d, s, _ in self.lr_sweep)):
            if depth not in table1.DEPTHS["fcn"] or steps < self.evals:
                raise ValueError(f"bad (depth, steps) {(depth, steps)} in grid: depth in "
                                 f"{table1.DEPTHS['fcn']}, steps >= evals ({self.evals})")

    def train(self, steps: int, lr: float) -> table1.Config:
        """The Table 1 training config of one cell."""
        every = steps // self.evals
        return dataclasses.replace(
            self.base, steps=steps, lr=lr,
            lr_boundaries=(steps * 6 // 10, steps * 8 // 10),
            eval_every=every, chunk=every, blocks={})

    def cells(self) -> tuple[tuple[int, int, float], ...]:
        """Every ``(depth, steps, lr)`` to train: ``grid`` × ``lrs``, then ``lr_sweep``."""
        grid = tuple((d, s, lr) for d, s in self.grid for lr in self.lrs)
        return grid + tuple(c for c in self.lr_sweep if c not in grid)


PRESETS = {
    "smoke": Config(base=table1.SMOKE, grid=((3, 4), (3, 8)), evals=2),
    "quick": Config(base=table1.QUICK,
                    grid=((3, 5_000), (3, 20_000), (6, 5_000), (6, 10_000)),
                    lr_sweep=((3, 5_000, 1e-4), (3, 5_000, 1e-3),
                              (6, 5_000, 1e-4), (6, 10_000, 1e-4))),
    "paper": Config(base=table1.QUICK,
                    grid=tuple((d, s) for d in (3, 6) for s in (5_000, 20_000, 50_000)),
                    lrs=(3e-4, 1e-4)),
}
PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: 4 and 8 steps at widths / 8",
    "quick": ("A.1's 3- and 6-layer MNIST FCNs and DNI model, batch 256, Adam 3e-4 ÷10 at "
              "60 %/80 % of the budget; 3 layers at 5k and 20k steps, 6 layers at 5k and 10k; "
              "the 3-layer 5k cell also at Adam 1e-4 and 1e-3, both 6-layer cells also at "
              "1e-4 (CPU time: a 6-layer DNI step with A.1's model takes ~85 ms here); No Bprop "
              "at 3 to 6 layers × 5k and 20k steps, Adam 3e-4"),
    "paper": ("the full grid: 3 and 6 layers × 5k, 20k, 50k steps × Adam 3e-4 and 1e-4 "
              "(still 10× fewer steps than A.1's 500k); No Bprop at 3 to 6 layers × the same "
              "budgets, Adam 3e-4"),
}


NOBPROP: dict[str, tuple[tuple[int, int], ...]] = {
    "smoke": ((3, 4), (3, 8)),
    "quick": tuple((d, s) for d in (3, 6, 4, 5) for s in (5_000, 20_000)),
    "paper": tuple((d, s) for d in (3, 6, 4, 5) for s in (5_000, 20_000, 50_000)),
}
"""Per preset, the ``(depth, steps)`` No Bprop cells, each at the preset's first learning
rate (a No Bprop step trains no synthetic gradient model, so larger budgets are cheap)."""


def cell_id(depth: int, steps: int, lr: float, method: str = "dni") -> str:
    return f"mnist-fcn{depth}-{method}-{steps}-lr{lr:.0e}"


LABELS = {"dni": "DNI", "nobprop": "No Bprop"}


def method_of(cell: Cell) -> str:
    """``"dni"`` or ``"nobprop"`` (DNI cells carry no ``method`` param: their identity
    predates the No Bprop cells)."""
    return cell.params.get("method", "dni")


def cells(preset: str) -> list[Cell]:
    cfg = PRESETS[preset]
    dni = [Cell(cell_id(d, s, lr), row=f"MNIST FCN {d}, DNI",
                column=f"{s:,} steps, Adam {lr:.0e}",
                params={"depth": d, "steps": s, "lr": lr},
                paper=table1.PAPER[("mnist", "fcn", d)][2])
           for d, s, lr in cfg.cells()]
    lr = cfg.lrs[0]
    nobprop = [Cell(cell_id(d, s, lr, "nobprop"), row=f"MNIST FCN {d}, No Bprop",
                    column=f"{s:,} steps, Adam {lr:.0e}",
                    params={"depth": d, "steps": s, "lr": lr, "method": "nobprop"},
                    paper=table1.PAPER[("mnist", "fcn", d)][0])
               for d, s in NOBPROP[preset]]
    return dni + nobprop


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    p = cell.params
    cfg = config.train(p["steps"], p["lr"])
    ds = table1.load_dataset("mnist", cfg.train_limit, cfg.test_limit)
    if method_of(cell) == "nobprop":
        split = fcn.fcn_split(p["depth"], "every", sgjax.feedback.none(), cfg,
                              ds.input_shape)
        _, final = fcn.train_fcn(ctx, split, ds, cfg, eval_train=True)
        return {"metric": final["test_error"], "train_error": final["train_error"]}
    predictor = table1.make_predictor("mnist", "fcn", "dni", cfg)
    split = fcn.fcn_split(p["depth"], "every", sgjax.feedback.synthetic(predictor), cfg,
                          ds.input_shape)
    _, final = fcn.train_fcn(ctx, split, ds, cfg, eval_train=True)
    return {"metric": final["test_error"], "train_error": final["train_error"],
            "sg_model": predictor.description}


def _grouped(results: Sequence[CellResult], keys: tuple[str, ...], within: str
             ) -> dict[tuple, dict[Any, CellResult]]:
    """``{(params[k] for k in keys): {params[within]: result}}`` (``method`` defaults to
    ``"dni"``)."""
    groups: dict[tuple, dict[Any, CellResult]] = {}
    for r in results:
        p = {"method": method_of(r.cell), **r.cell.params}
        groups.setdefault(tuple(p[k] for k in keys), {})[p[within]] = r
    return groups


def effects(results: Sequence[CellResult]) -> dict[str, str]:
    """What the budget did, in numbers (the verdicts are the declared claims'): per depth
    (and learning rate) with at least two budgets, the error at the smallest and largest
    budget and the share of the distance to the paper's number removed; per depth and
    budget with at least two learning rates, which rate gave the lowest error."""
    out = {}
    for (method, depth, steps), by in sorted(
            _grouped(results, ("method", "depth", "steps"), "lr").items()):
        if len(by) < 2:
            continue
        name = "" if method == "dni" else f"{LABELS[method]}, "
        best = min(by, key=lambda lr: by[lr].metric)
        errors = ", ".join(f"{lr:g}: {by[lr].metric:.2f} %" for lr in sorted(by))
        out[f"{name}{depth} layers, {steps // 1000}k steps: learning rate"] = (
            f"best Adam {best:g} ({errors}; paper {by[best].cell.paper} after 500k)")
    for (method, depth, lr), by in sorted(
            _grouped(results, ("method", "depth", "lr"), "steps").items()):
        if len(by) < 2:
            continue
        name = "" if method == "dni" else f"{LABELS[method]}, "
        lo, hi = by[min(by)], by[max(by)]
        gap = lo.metric - lo.cell.paper
        closed = (lo.metric - hi.metric) / gap if gap > 0 else float("nan")
        out[f"{name}{depth} layers, Adam {lr:g}: {min(by) // 1000}k→{max(by) // 1000}k steps"] = (
            f"{lo.metric:.2f} → {hi.metric:.2f} %, paper {lo.cell.paper}; "
            f"{100 * closed:.0f} % of the gap closed")
    return out


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``budget``: final test error against budget per depth (left), and the test-error
    curves of every cell (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    groups: dict[tuple[str, int, float], list[CellResult]] = {}
    for r in results:
        p = r.cell.params
        groups.setdefault((method_of(r.cell), p["depth"], p["lr"]), []).append(r)
    colors = {("dni", 3): "tab:blue", ("dni", 6): "tab:purple",
              ("nobprop", 3): "tab:red", ("nobprop", 4): "tab:orange",
              ("nobprop", 5): "tab:pink", ("nobprop", 6): "tab:brown"}
    for (method, depth, lr), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.cell.params["steps"])
        ls = "-" if lr == config.lrs[0] else ("--" if lr < config.lrs[0] else "-.")
        color = colors.get((method, depth), "k")
        left.plot([r.cell.params["steps"] for r in rs], [r.metric for r in rs], "o" + ls,
                  color=color, label=f"{LABELS[method]} {depth} layers, Adam {lr:g}")
        left.axhline(rs[0].cell.paper, color=color, lw=0.8, ls=":")
        for r in rs:
            if "test_error" in r.curves:
                right.plot(*r.curves["test_error"], ls, color=color, alpha=0.5 + 0.5 * (
                    r.cell.params["steps"] / max(x.cell.params["steps"] for x in rs)),
                    label=f"{LABELS[method]} {depth}L {r.cell.params['steps'] // 1000}k, "
                          f"{lr:g}")
    log_axis(left, "x")
    left.set_xlabel("training steps (budget, log scale)")
    left.set_ylabel("final test error (%)")
    left.set_title("DNI and No Bprop vs budget (dotted: paper, 500k)", fontsize="small")
    log_axis(right)
    right.set_xlabel("step")
    right.set_ylabel("test error (%, log scale)")
    right.set_title("test error during training", fontsize="small")
    for ax, ncols in ((left, 2), (right, 3)):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.16),
                  ncols=ncols)
    lines = [f"{c}: {v}" for c, v in effects(results).items()]
    closes = V.title_line(V.judge(EXPERIMENT, results, lambda c: "closes" in c.id), 160)
    fig.suptitle("\n".join(["Does the gap to the paper close with budget?", *lines,
                            *([closes] if closes else [])]), fontsize="small")
    return {"budget": fig}


CLOSES_WORDS = ("Table 1 ... Right: Test error during training of MNIST FCN models for "
                "regular backpropagation, DNI, and cDNI")
"""The paper's DNI curves fall with training (Table 1, right); the budget claims check
that more steps (with the same schedule shape) give a lower final error."""
SHALLOW_CAUSE = ("budget: these cells train 5k–20k steps (paper 500k) at Adam 1e-4–1e-3 "
                 "(paper 3e-5); the 3-layer error falls with steps toward the paper's "
                 "(reports/table1-budget/budget.png)")
DEEP_CAUSE = ("method at a constant learning rate, plus budget: 6-layer unconditioned DNI "
              "gets worse with training while the learning rate is constant "
              "(reports/degradation: {mechanism}); only the ÷10 drops at 60 %/80 % of each "
              "budget pull it back")


NOBPROP_CAUSE = {
    3: ("budget: only the classifier on the frozen random features learns, and at 5k steps "
        "it is still improving; with 20k steps (same schedule shape) the 3-layer error "
        "reaches the paper's within tolerance (fcn3-nobprop-lr3e-04-closes-with-budget, "
        "reports/table1-budget/budget.png)"),
    4: ("budget: with 20k steps (same schedule shape) the 4-layer error falls from 14.71 to "
        "13.0 % (3 seeds each), within the paper's tolerance of 12.6; the classifier fit has "
        "converged by ~11k steps (training error flat through both ÷10 drops; "
        "reports/table1-budget/budget.png)"),
    5: ("budget: with 20k steps (same schedule shape) the 5-layer error falls from 19.45 to "
        "17.7 % (3 seeds: 17.49–17.85), within the paper's tolerance of 16.2; the classifier "
        "fit has converged by ~11k steps (training error flat through both ÷10 drops), so "
        "what is left lies in the frozen random features (reports/table1-budget/budget.png)"),
    6: ("budget: 5k → 20k steps (same schedule shape) removes about 2 of the 3.8 points and "
        "brings the 6-layer error within the paper's tolerance (23.25 %, 3 seeds: "
        "22.72–23.76, paper 21.4); the convex classifier fit has converged by ~9k steps "
        "(training error flat at ~23 % to 20k, through both ÷10 drops), so the 1.85 points "
        "left lie in the frozen random features themselves, though not in their seed (5k "
        "steps with --seed 1 and 2: 24.34 and 24.55 %, runs outside this report) "
        "(reports/table1-budget/budget.png)"),
}
"""The cause of a No Bprop budget cell's "differs", per depth, from the quick records."""


def _cause(cell: Cell) -> str:
    depth = cell.params["depth"]
    if method_of(cell) == "nobprop":
        return NOBPROP_CAUSE[depth]
    return SHALLOW_CAUSE if depth <= 3 else DEEP_CAUSE.format(mechanism=table1.MECHANISM)


def claims(preset: str) -> list[Claim]:
    """Each cell near Table 1's number (DNI or No Bprop;
    :func:`experiments.dni.table1.tolerance`), and per method, depth and learning rate with
    several budgets, the largest budget's error below the smallest's."""
    out = []
    by: dict[tuple[str, int, float], list[Cell]] = {}
    for c in cells(preset):
        p = c.params
        out.append(Claim.near(c.id, table1.WORDS, c.id, c.paper, table1.tolerance(c.paper),
                              cause=_cause(c)))
        by.setdefault((method_of(c), p["depth"], p["lr"]), []).append(c)
    for (method, depth, lr), group in sorted(by.items()):
        if len(group) < 2:
            continue
        group = sorted(group, key=lambda c: c.params["steps"])
        lo, hi = group[0], group[-1]
        name = "" if method == "dni" else f"{method}-"
        cause = ("" if depth <= 3 or method != "dni"
                 else DEEP_CAUSE.format(mechanism=table1.MECHANISM))
        out.append(Claim.less(f"fcn{depth}-{name}lr{lr:.0e}-closes-with-budget",
                              CLOSES_WORDS, hi.id, lo.id, cause=cause))
    return out


EXPERIMENT = Experiment(
    name="table1-budget",
    paper="DNI (Jaderberg et al. 2016)",
    title=("Table 1's DNI and No Bprop cells against training budget (MNIST FCN: DNI at 3 "
           "and 6 layers, No Bprop at 3 to 6)"),
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("paper column = Table 1's DNI (No Bprop for the nobprop cells) after 500k steps "
           "of Adam 3e-5; each cell's learning rate is divided by 10 at 60 %/80 % of its "
           "own budget"),
    preset_notes=PRESET_NOTES,
    claims=claims,
)
