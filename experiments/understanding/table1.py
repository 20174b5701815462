"""Czarnecki et al. 2017, Table 1: the unified view of "conspiring" gradient methods.

Reproduce with ``make reproduce-understanding-table1 PRESET=quick`` or
``python -m experiments run understanding-table1 --preset quick`` (presets ``smoke``,
``quick``, ``paper``). ``python -m experiments.understanding.table1`` prints the rows.

The table's rows are read from the code: every method is an :class:`sgjax.Feedback`
whose Table 1 attributes (``sg_trains``, ``update_locked``, ``backwards_locked``,
``direct_error``) and formula strings (``table``: the substitute ``∂L/∂h^``, the SG
module, its target and its loss) are what :func:`rows` returns and what the experiment
writes to ``rows.md`` (next to ``table.md``), stores per cell in ``results.csv`` and
draws in ``table1.png``. :data:`PAPER_TABLE1` holds the paper's booleans and the tests
check the code against them, and check §6's claims through these rows: the gradient of
each method's SG-module loss ``L_SG(t, SG(h))`` w.r.t. ``h`` is its substitute, and
Kickback is DFA with ``A = 1``.

The paper gives no numbers for Table 1, so each cell trains one MNIST network with the
method and reports its test error (paper column empty). The network (supp. C's MNIST MLP,
narrower and shallower in ``quick``): ``depth`` hidden blocks ``dense → batch norm →
ReLU`` and a 10-way softmax layer, written as separate layers ``[flatten+dense,
bn+relu, dense, bn+relu, …, dense]`` and cut after every ``bn+relu``. So every hidden
layer is its own stage with the method at its output, and the first layer above every
cut is a plain dense layer: its output ``g`` is the pre-activation FA needs
(``∂L/∂g Aᵀ`` replaces ``∂L/∂g Wᵀ``). SG and SG + prop use the paper's linear,
label-conditioned, zero-initialised SG module; DFA/FA use fixed Gaussian matrices with
std ``1/√(fan)``; Adam for everything.

Kickback with a softmax output: its substitute is ``(∂L/∂p) 1ᵀ`` — every hidden unit
gets the *sum* of the output errors, and for softmax cross-entropy
``Σ_c ∂L/∂p_c = Σ_c (softmax_c − y_c) = 0``. So on this 10-class network Kickback's
learning signal is zero up to float32 round-off (Balduzzi et al. used it with a single
output). Adam normalises that round-off into steps of about a tenth of the learning
rate, so the lower layers still drift a little (a few % of their norm in 500 steps) and
the row ends close to the reference row "No Bprop" (:func:`sgjax.feedback.none`: only
the output layer learns). The extra row "Kickback (sigmoid)" trains the same network
with the per-class sigmoid log loss, whose errors do not sum to zero: then every unit of
a layer receives the same error, the units are pushed alike and the representation
collapses (chance-level error), which is why Kickback needs a single output.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

import optax

import sgjax
from experiments import training
from experiments.framework import Cell, Claim, Experiment
from experiments.understanding import PAPER, SG_EXAMPLE_SCALE

# method key -> (paper column name, feedback constructor, loss)
METHODS: dict[str, tuple[str, Callable[[], sgjax.Feedback]]] = {
    "sg": ("SG", lambda: sgjax.feedback.synthetic(sgjax.predictors.linear(conditioned=True))),
    "sg_prop": ("SG + prop",
                lambda: sgjax.feedback.synthetic_prop(sgjax.predictors.linear(conditioned=True))),
    "bprop": ("Bprop", sgjax.feedback.backprop),
    "dfa": ("DFA", sgjax.feedback.dfa),
    "fa": ("FA", sgjax.feedback.feedback_alignment),
    "kickback": ("Kickback", sgjax.feedback.kickback),
}
"""The six columns of Table 1, in the paper's order."""

REFERENCE: dict[str, tuple[str, Callable[[], sgjax.Feedback]]] = {
    "none": ("No Bprop (reference)", sgjax.feedback.none),
}
"""Not in Table 1: no gradient crosses any cut, so only the output layer learns — what
Kickback reduces to with a softmax output."""

PAPER_TABLE1: dict[str, dict[str, object]] = {
    "sg": dict(substitute="SG(h, y)", sg_module="SG(h, y)", sg_trains=True,
               sg_target="∂L/∂h", sg_loss="‖t − s‖²", update_locked=False,
               backwards_locked=False, direct_error=False),
    "sg_prop": dict(substitute="SG(h, y) + α ∂L_SG/∂h", sg_module="SG(h, y)", sg_trains=True,
                    sg_target="∂L/∂h", sg_loss="‖t − s‖²", update_locked=True,
                    backwards_locked=True, direct_error=False),
    "bprop": dict(substitute="∂L/∂h", sg_module="h", sg_trains=False, sg_target="−∂L/∂h",
                  sg_loss="−⟨t, s⟩", update_locked=True, backwards_locked=True,
                  direct_error=False),
    "dfa": dict(substitute="(∂L/∂p) Aᵀ", sg_module="hA", sg_trains=False, sg_target="−∂L/∂p",
                sg_loss="−⟨t, s⟩", update_locked=True, backwards_locked=False,
                direct_error=True),
    "fa": dict(substitute="(∂L/∂g) Aᵀ", sg_module="hA", sg_trains=False, sg_target="−∂L/∂g",
               sg_loss="−⟨t, s⟩", update_locked=True, backwards_locked=True,
               direct_error=False),
    "kickback": dict(substitute="(∂L/∂p) 1ᵀ", sg_module="h1", sg_trains=False,
                     sg_target="−∂L/∂p", sg_loss="−⟨t, s⟩", update_locked=True,
                     backwards_locked=False, direct_error=True),
}
"""The paper's Table 1 (SG + prop's locks are "yes*": locked with a single SG module)."""

FLAGS = ("sg_trains", "update_locked", "backwards_locked", "direct_error")
FORMULAS = ("substitute", "sg_module", "sg_target", "sg_loss")
HEADER = {"substitute": "∂L/∂h^ (replaces ∂L/∂h)", "sg_module": "SG(h, y)",
          "sg_trains": "SG trains", "sg_target": "SG target", "sg_loss": "L_SG(t, s)",
          "update_locked": "Update locked", "backwards_locked": "Backw. locked",
          "direct_error": "Direct error"}


@dataclasses.dataclass(frozen=True)
class Row:
    """One column of the paper's Table 1, read from an :class:`sgjax.Feedback`."""

    key: str
    method: str
    feedback: sgjax.Feedback
    values: dict

    def matches_paper(self) -> dict[str, bool]:
        """Each Table 1 flag of the code against the paper's."""
        return {f: self.values[f] == PAPER_TABLE1[self.key][f] for f in FLAGS}


def rows() -> list[Row]:
    """Table 1 from the code: one :class:`Row` per method, in the paper's order."""
    out = []
    for key, (method, make) in METHODS.items():
        fb = make()
        values = {f: fb.table.get(f, "—") for f in FORMULAS}
        values.update({f: bool(getattr(fb, f)) for f in FLAGS})
        out.append(Row(key, method, fb, values))
    return out


def _cell_text(value) -> str:
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def render_rows(test_errors: dict[str, float] | None = None) -> str:
    """Table 1 as Markdown, transposed like the paper (methods are columns), from the code.

    A flag that differs from the paper is marked ``(paper: …)``; ``test_errors`` (method
    key -> %) adds a row of MNIST test errors."""
    table = rows()
    lines = ["| | " + " | ".join(r.method for r in table) + " |",
             "| --- |" + " --- |" * len(table)]
    for f in (*FORMULAS[:2], "sg_trains", *FORMULAS[2:], *FLAGS[1:]):
        cells = []
        for r in table:
            text = _cell_text(r.values[f]).replace("|", "\\|")  # Markdown-safe
            if f in FLAGS and not r.matches_paper()[f]:
                text += f" (paper: {_cell_text(PAPER_TABLE1[r.key][f])})"
            cells.append(text)
        lines.append(f"| {HEADER[f]} | " + " | ".join(cells) + " |")
    if test_errors:
        lines.append("| MNIST test error (%) | " + " | ".join(
            "—" if r.key not in test_errors else f"{test_errors[r.key]:.2f}" for r in table)
            + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class Config:
    """The MNIST network trained with each method: ``depth`` hidden blocks of ``width``
    units (cut after each), Adam(``lr``) for the net and the SG modules, ``steps`` of
    batch ``batch_size``; ``train_limit``/``test_limit`` keep the first examples;
    ``fast_compile`` asks XLA for its cheapest optimisation (:data:`training.FAST_COMPILE`,
    for runs where compiling dominates)."""

    depth: int = 3
    width: int = 256
    steps: int = 3000
    batch_size: int = 128
    lr: float = 3e-4
    chunk: int = 250
    eval_every: int = 1000
    train_limit: int | None = None
    test_limit: int | None = None
    fast_compile: bool = False


PRESETS = {
    "smoke": Config(depth=2, width=32, steps=20, batch_size=32, chunk=10, eval_every=20,
                    train_limit=2000, test_limit=500, fast_compile=True),
    "quick": Config(),
    "paper": Config(depth=6, width=512, steps=100_000, batch_size=128, lr=3e-5, chunk=1000,
                    eval_every=10_000),
}
"""``python -m experiments run understanding-table1 --preset smoke|quick|paper`` (or
``make reproduce-understanding-table1 PRESET=…``). ``quick``: 3 hidden layers of 256,
3000 steps of Adam 3e-4 (a few minutes on a CPU); ``paper``: 6 hidden layers of 512
(supp. C's MNIST net; Table 1 names no depth), Adam 3e-5, 100k steps."""

LOSSES = {"softmax": sgjax.losses.softmax_cross_entropy,
          "sigmoid": sgjax.losses.sigmoid_log_loss}


def network(depth: int, width: int, num_classes: int = 10) -> tuple[list[sgjax.Layer],
                                                                    tuple[int, ...]]:
    """``[flatten+dense, bn+relu, (dense, bn+relu) × (depth − 1), dense]`` and the cuts
    after every ``bn+relu`` (so the layer above each cut is a plain dense layer)."""
    L = sgjax.layers
    layers = [L.serial(L.flatten, L.dense(width)), L.serial(L.batch_norm(), L.relu)]
    for _ in range(depth - 1):
        layers += [L.dense(width), L.serial(L.batch_norm(), L.relu)]
    layers.append(L.dense(num_classes))
    return layers, tuple(range(2, 2 * depth + 1, 2))


def make_split(method: str, config: Config, *, loss: str = "softmax",
               input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10) -> sgjax.Split:
    """The Table 1 MNIST network cut after every hidden layer, with ``method``'s feedback."""
    layers, cuts = network(config.depth, config.width, num_classes)
    make = {**METHODS, **REFERENCE}[method][1]
    return sgjax.split_at(layers, cuts, feedback=make(), loss=LOSSES[loss],
                          optimizer=optax.adam(config.lr), input_shape=tuple(input_shape),
                          batch_size=config.batch_size, num_classes=num_classes,
                          example_scale=SG_EXAMPLE_SCALE)


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    from experiments import data

    ds = data.load("mnist", train_limit=config.train_limit, test_limit=config.test_limit)
    method, loss = cell.params["method"], cell.params["loss"]
    split = make_split(method, config, loss=loss, input_shape=ds.input_shape,
                       num_classes=ds.num_classes)
    _, final = training.train_classifier(
        ctx, split, ds, steps=config.steps, batch_size=config.batch_size, chunk=config.chunk,
        eval_every=config.eval_every, eval_train=True,
        compiler_options=training.FAST_COMPILE if config.fast_compile else None)
    out = {"metric": final["test_error"], "train_error": final["train_error"]}
    row = next((r for r in rows() if r.key == method), None)
    if row is not None:
        out.update({f: _cell_text(v) for f, v in row.values.items()},
                   matches_paper=all(row.matches_paper().values()))
    return out


def rows_markdown(test_errors: dict[str, float] | None = None) -> str:
    """``rows.md``: Table 1 read from the code (:func:`render_rows`), as a page."""
    return ("# Czarnecki et al. 2017, Table 1, read from sgjax.feedback\n\n"
            + render_rows(test_errors)
            + "\nSG + prop: the paper's 'yes*' (locked with a single SG module).\n")


def figures(results: Sequence, config: Config) -> dict:
    """Table 1 (from the code) with the MNIST test error of each method, as a figure and as
    Markdown (``rows.md``)."""
    from matplotlib.figure import Figure

    table = rows()
    errs = {r.cell.params["method"]: r.metric for r in results
            if r.cell.params["loss"] == "softmax" and r.cell.params["method"] in METHODS}
    labels = [HEADER[f] for f in (*FORMULAS[:2], "sg_trains", *FORMULAS[2:], *FLAGS[1:])]
    text = [[_cell_text(r.values[f]) for r in table]
            for f in (*FORMULAS[:2], "sg_trains", *FORMULAS[2:], *FLAGS[1:])]
    text.append(["—" if r.key not in errs else f"{errs[r.key]:.2f}" for r in table])
    labels.append("MNIST test error (%)")
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.axis("off")
    t = ax.table(cellText=text, rowLabels=labels, colLabels=[r.method for r in table],
                 loc="center", cellLoc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(9)
    t.scale(1.0, 1.4)
    extra = [r for r in results if r.cell.params["method"] not in errs
             or r.cell.params["loss"] != "softmax"]
    note = "; ".join(f"{r.cell.row}: {r.metric:.2f} %" for r in extra)
    ax.set_title(f"Table 1 from sgjax.feedback; MNIST: {config.depth} hidden × {config.width}, "
                 f"cut after every hidden layer, {config.steps} steps, Adam {config.lr:g}"
                 + (f"\nother rows (test error): {note}" if note else ""), fontsize=9)
    from experiments.framework import plot_curves

    return {"rows": rows_markdown(errs),
            "table1": fig,
            "table1-test-error": plot_curves(results, "test_error", ylabel="test error (%)",
                                             label=lambda r: r.cell.row,
                                             title="MNIST test error per method", logy=True)}


def cells(preset: str) -> list[Cell]:
    out = [Cell(key, row=name, column="MNIST test error (%)",
                params={"method": key, "loss": "softmax"})
           for key, (name, _) in METHODS.items()]
    out.append(Cell("kickback-sigmoid", row="Kickback (sigmoid)", column="MNIST test error (%)",
                    params={"method": "kickback", "loss": "sigmoid"}))
    out += [Cell(key, row=name, column="MNIST test error (%)",
                 params={"method": key, "loss": "softmax"})
            for key, (name, _) in REFERENCE.items()]
    return out


TABLE1_WORDS = ("Our main observation in this section is that FA, DFA, and KB can be expressed "
                "in the language of “conspiring” networks (see Table 1), of two-network "
                "systems that use a SG module.")


def claims(preset: str) -> list[Claim]:
    """Each Table 1 column read from sgjax.feedback has the paper's flags (``matches_paper``
    is 1 when every flag equals :data:`PAPER_TABLE1`'s; tolerance 0: a yes/no)."""
    return [Claim.near(f"{key}-row", TABLE1_WORDS, key, 1.0, 0.0, key="matches_paper")
            for key in METHODS]


EXPERIMENT = Experiment(
    name="understanding-table1",
    paper=PAPER,
    title="Table 1: unified view of conspiring methods (rows from sgjax.feedback) + MNIST",
    metric="MNIST test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("the paper gives no numbers; the table's rows are read from sgjax.feedback into "
           "[rows.md](rows.md) and table1.png. Kickback with softmax: Σ_c ∂L/∂p_c = 0, so its "
           "substitute is float round-off (compare 'No Bprop (reference)': only the output "
           "layer learns); 'Kickback (sigmoid)' uses the per-class sigmoid log loss, where the "
           "shared error collapses each layer's units."),
    claims=claims,
)


if __name__ == "__main__":
    sys.stdout.write(render_rows())
