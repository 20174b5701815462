"""Czarnecki et al. 2017, supp. Fig. 8: linear probes at every hidden layer.

The nets of Fig. 3 / Fig. 7 (20 hidden ReLU + batch-norm layers; backprop, one SG
between layers 11 and 12, a SG between every pair of layers, DFA; one cell per method,
trained exactly as in ``understanding-fig3``) are frozen, and at each hidden layer

* a linear classifier probe (softmax regression on the layer's activations, trained
  without touching the net) reports its **training accuracy** (Fig. 8 left), and
* a linear regression probe from the activations to the network's input reports its
  **MSE** (Fig. 8 right; "label agnostic ... measures how non-linear the
  transformations are up to the given hidden layer").

Probes are fitted on the first :attr:`Config.probe_points` training images. The
classifier probe is full-batch Adam on standardised activations; the regression probe
is closed-form least squares (with a tiny ridge term) on standardised activations plus a
bias, and its MSE is the mean over pixels and images of the squared error on the [0, 1]
inputs. The paper does not say how its probes were trained.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.framework import Cell, Claim, Experiment
from experiments.understanding import PAPER, nets


@dataclasses.dataclass(frozen=True)
class Config:
    """Fig. 8 settings. Reproduce with

    ``make reproduce-understanding-fig8 PRESET=smoke`` (seconds, wiring only),
    ``make reproduce-understanding-fig8 PRESET=quick`` (the nets of
    ``understanding-fig3 --preset quick``: reused if that ran first, else ~10 min) or
    ``make reproduce-understanding-fig8 PRESET=paper``,
    i.e. ``python -m experiments run understanding-fig8 --preset PRESET``.
    """

    net: nets.NetConfig = nets.NetConfig()
    methods: tuple[str, ...] = nets.METHODS
    probe_points: int = 60_000
    probe_steps: int = 1000
    probe_lr: float = 1e-2
    ridge: float = 1e-4


PRESETS = {
    "smoke": Config(net=nets.SMOKE, probe_points=256, probe_steps=20),
    "quick": Config(net=nets.QUICK, probe_points=10_000, probe_steps=500),
    "paper": Config(),
}


def cells(preset: str):
    return [Cell(m, row=nets.LABELS[m], column="test error", params={"method": m})
            for m in PRESETS[preset].methods]


def _standardise(h):
    h = np.asarray(h, np.float32)
    return (h - h.mean(0)) / (h.std(0) + 1e-6)


def make_classifier_probe(steps: int, lr: float, num_classes: int = 10):
    """``probe(h, y) -> train accuracy`` of a softmax regression fitted by full-batch Adam
    (one compiled program, reused for every layer of the same width)."""
    opt = optax.adam(lr)

    @jax.jit
    def probe(h, y):
        params = (jnp.zeros((h.shape[1], num_classes)), jnp.zeros((num_classes,)))

        def loss(p):
            logits = h @ p[0] + p[1]
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return jnp.mean(jnp.argmax(h @ p[0] + p[1], -1) == y)

    return lambda h, y: float(probe(jnp.asarray(_standardise(h)), jnp.asarray(y)))


def regression_probe_mse(h, x, ridge: float = 1e-4) -> float:
    """MSE of the least-squares linear map (plus bias) from activations ``h`` to inputs
    ``x`` (``ridge`` × mean eigenvalue added to the normal equations for stability)."""
    hs = np.concatenate([_standardise(h), np.ones((len(h), 1), np.float32)], 1)
    hs = hs.astype(np.float64)
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    gram = hs.T @ hs
    lam = ridge * np.trace(gram) / gram.shape[0]
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), hs.T @ x)
    return float(np.mean((hs @ w - x) ** 2))


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    method = cell.params["method"]
    ds = nets.load_mnist(config.net)
    split, states, final = nets.train(ctx, method, config.net, ds)
    n = min(config.probe_points, ds.num_train)
    x, y = ds.x_train[:n], ds.y_train[:n]
    acts = nets.hidden_activations(split, states, x)
    classify = make_classifier_probe(config.probe_steps, config.probe_lr, ds.num_classes)
    accuracy = [classify(a, y) for a in acts]
    mse = [regression_probe_mse(a, x, config.ridge) for a in acts]
    return {"metric": final["test_error"], "train_error": final["train_error"],
            "probe_accuracy": accuracy, "probe_mse": mse,
            "input_probe_mse": regression_probe_mse(x.reshape(n, -1), x, config.ridge),
            "interfaces": list(nets.interfaces(method, config.net.depth))}


def figures(results, config) -> dict:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    for r in sorted(results, key=lambda r: nets.METHODS.index(r.cell.params["method"])):
        m = r.cell.params["method"]
        acc = 100 * np.asarray(r.metrics["probe_accuracy"])
        mse = np.asarray(r.metrics["probe_mse"])
        layers = np.arange(1, len(acc) + 1)
        left.plot(layers, acc, marker="o", ms=3, color=nets.COLORS[m], label=nets.LABELS[m])
        right.plot(layers, mse, marker="o", ms=3, color=nets.COLORS[m], label=nets.LABELS[m])
    for ax in (left, right):
        ax.axvline(nets.middle_cut(config.net.depth) + 0.5, ls=":", color="tab:orange")
        ax.set_xlabel("hidden layer")
        if ax.lines:
            ax.legend(fontsize=7)
    left.set_ylabel("linear classifier probe: train accuracy (%)")
    right.set_ylabel("linear regression probe to the input: MSE")
    left.set_title("Fig. 8 (left): classifier probes", fontsize=9)
    right.set_title("Fig. 8 (right): regression probes to the input", fontsize=9)
    return {"fig8": fig}


SG_PROBES = ("such probes can achieve 100% training accuracy after the first two hidden-layers "
             "of the SG-based model, as shown in Supplementary Material's Figure 8.")
DFA_FIRST = ("notice that for DFA we can have 100% accuracy after the very first hidden layer, "
             "which is not true even for backpropagation.")
DFA_NONLINEAR = ("again show clearly that DFA performs lots of non-linear transformations very "
                 "early on compared to all other methods.")


def claims(preset: str) -> list[Claim]:
    """On the probes per hidden layer (``probe_accuracy``: training accuracy of the linear
    classifier probe; ``probe_mse``: the input-regression probe's MSE). "100 %" allows 2
    points (a probe fitted by Adam on a sample of the training set); the DFA comparisons
    are strict orderings at the first hidden layer."""
    ids = {c.id for c in cells(preset)}
    out = []
    if "sg_single" in ids:
        out.append(Claim.near("sg-probe-100-after-2", SG_PROBES, "sg_single", 1.0, 0.02,
                              key="probe_accuracy[1]"))
    if "dfa" in ids:
        out.append(Claim.near("dfa-probe-100-after-1", DFA_FIRST, "dfa", 1.0, 0.02,
                              key="probe_accuracy[0]"))
    for m in ("backprop", "sg_single", "sg_every"):
        if {m, "dfa"} <= ids:
            out.append(Claim.less(f"dfa-nonlinear-early-vs-{m}", DFA_NONLINEAR, m, "dfa",
                                  key="probe_mse[0]"))
    if {"backprop", "dfa"} <= ids:
        out.append(Claim.less("dfa-probe-beats-backprop-after-1", DFA_FIRST, "backprop", "dfa",
                              key="probe_accuracy[0]"))
    return out


EXPERIMENT = Experiment(
    name="understanding-fig8",
    paper=PAPER,
    title="supp. Fig. 8: linear classifier / regression probes per hidden layer",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes="the paper shows curves only; compare fig8.png",
    claims=claims,
)
