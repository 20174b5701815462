"""Why deep unconditioned DNI degrades with training at a constant learning rate (DNI
§3.1, Table 1; issue 18).

Table 1's 6-layer MNIST FCN with DNI between every layer reaches a minimum test error and
then gets worse with more training while its training loss rises, at a constant learning
rate; Bprop and cDNI do not. This experiment trains that network (A.1's FCN, batch 256,
the batch-mean loss, Adam at a constant learning rate) once per *arm*: the baseline DNI,
two references, and ablations that each change one candidate cause:

* ``bprop``, ``cdni`` (linear SG model in ``[h, one-hot label]``): the references;
* ``dni``: the baseline, A.1's unconditioned SG model (hidden layers of linear, batch
  norm, ReLU; zero-initialised output), fitted to per-example targets
  (``example_scale = B``) bootstrapped through the SG of the layer above (DNI Fig. 2),
  with the layers' Adam;
* ``dni-mean-units``: targets in the batch-mean loss's own units (``example_scale = 1``,
  i.e. ×1/B): the per-example scale against Adam's epsilon and the zero-initialised
  output layer;
* ``dni-sg-no-bn``: the SG models without batch norm;
* ``dni-true-target``: every SG model regresses the true backpropagated gradient of its
  interface (an oracle: no bootstrapping through the SG above; :func:`true_target_sync`);
* ``dni-sg-lr``: the SG models' Adam at ``sg_lr_factor`` × the layers' learning rate;
* ``dni-lr-decay``: the paper's schedule shape (÷10 at 60 % and 80 % of the steps).

Every SG arm logs per interface ``k`` (0 = the cut after the first layer), averaged over
each evaluation interval: ``sg_loss_k``, ``sg_norm_k`` and ``target_norm_k`` (mean
per-example norms of the synthetic gradient used and of the target it is then fitted to),
``sg_cosine_k`` and the SG model's batch-norm running statistics ``sg_bn_var_k``
(:func:`sgjax.feedback.fit_diagnostics`); at every evaluation a fixed batch of training
examples gives ``true_cosine_k`` and ``true_norm_k`` (the synthetic gradient against the
gradient backprop would give there) and ``param_cosine_k`` (the cosine between the
parameter gradients of the stage below that the two give). A cell's metric is its final
test error; its ``metrics`` add ``err_rise`` (the test error averaged over the last
``window`` evaluations minus the lowest such average: how much it degraded) and
``loss_rise`` (the same for the training loss).

Checked against A.1 (no deviation found that an arm does not test): the SG models' final
layer is zero-initialised (weights and biases), their hidden layers are linear, batch norm,
ReLU, they are trained with the layers' Adam and schedule, and their L2 loss has weight 1
(ours sums over the batch, the peer koz4k/dni-pytorch averages: the same Adam steps up to
epsilon). A.1 does not say in which units the targets are regressed: sgjax's per-example
targets and the batch-mean units are the ``dni`` and ``dni-mean-units`` arms.
``experiments/dni/peer/dni_pytorch_fcn6.py`` runs the baseline on that peer
(``reports/degradation-peer/``).

Reproduce with ``python -m experiments run degradation --preset quick``
(``make reproduce-degradation PRESET=quick``); ``--preset paper`` runs A.1's SG model at
the paper's learning rate 3e-5 (constant) for 250k steps (accelerator).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sgjax
from experiments import training
from experiments.dni import fcn, table1
from experiments.framework import Cell, CellResult, Claim, Experiment
from experiments.framework.reports import log_axis


class Arm(NamedTuple):
    """One training run: ``method`` (``bprop``, ``dni``, ``cdni``) and the single change
    from the baseline DNI it makes."""

    label: str
    method: str = "dni"
    sg_batch_norm: bool = True
    mean_units: bool = False
    true_target: bool = False
    sg_lr_factor: float = 1.0
    lr_decay: bool = False


ARMS: Mapping[str, Arm] = {
    "bprop": Arm("Bprop (reference)", method="bprop"),
    "cdni": Arm("cDNI, linear SG (reference)", method="cdni"),
    "dni": Arm("DNI, A.1 SG model (baseline)"),
    "dni-mean-units": Arm("DNI, targets in batch-mean units (×1/B)", mean_units=True),
    "dni-sg-no-bn": Arm("DNI, SG model without batch norm", sg_batch_norm=False),
    "dni-true-target": Arm("DNI, SG fitted to the true gradient", true_target=True),
    "dni-sg-lr": Arm("DNI, SG models at 1/10 of the learning rate", sg_lr_factor=0.1),
    "dni-lr-decay": Arm("DNI, learning rate ÷10 at 60 %/80 %", lr_decay=True),
}
"""Every arm, by cell id."""


@dataclasses.dataclass(frozen=True)
class Config:
    """``depth``-layer FCN of A.1 (hidden widths ``256 // width_divisor``), SG models with
    hidden layers ``sg_hidden`` (A.1: ``(1024, 1024)``), ``steps`` steps of Adam at ``lr``
    (constant unless the arm decays it), test error every ``eval_every`` steps; ``window``
    evaluations are averaged for ``err_rise``/``loss_rise``; ``arms`` lists the cells."""

    depth: int
    steps: int
    lr: float
    sg_hidden: tuple[int, ...]
    eval_every: int
    batch_size: int = 256
    width_divisor: int = 1
    window: int = 3
    train_limit: int | None = None
    test_limit: int | None = None
    fast_compile: bool = False
    arms: tuple[str, ...] = tuple(ARMS)

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; valid: {', '.join(ARMS)}")
        if self.steps < self.eval_every:
            raise ValueError(f"steps={self.steps} < eval_every={self.eval_every}")

    def train(self, arm: Arm) -> table1.Config:
        """The :class:`experiments.dni.table1.Config` one arm trains with."""
        bounds = (self.steps * 6 // 10, self.steps * 8 // 10) if arm.lr_decay else ()
        return table1.Config(
            steps=self.steps, lr=self.lr, lr_boundaries=bounds, eval_every=self.eval_every,
            chunk=self.eval_every, batch_size=self.batch_size,
            width_divisor=self.width_divisor, train_limit=self.train_limit,
            test_limit=self.test_limit, fast_compile=self.fast_compile)


PRESETS: Mapping[str, Config] = {
    "smoke": Config(depth=3, steps=4, lr=1e-3, sg_hidden=(16, 16), eval_every=2,
                    batch_size=32, width_divisor=8, window=1, train_limit=512,
                    test_limit=256, fast_compile=True),
    "quick": Config(depth=6, steps=3_000, lr=3e-4, sg_hidden=(256, 256), eval_every=250),
    "paper": Config(depth=6, steps=250_000, lr=3e-5, sg_hidden=(1024, 1024),
                    eval_every=5_000, window=5),
}
PRESET_NOTES: Mapping[str, str] = {
    "smoke": "wiring only, numbers mean nothing: 3 layers, 4 steps of batch 32 at widths / 8",
    "quick": ("A.1's 6-layer MNIST FCN, batch 256, Adam 3e-4 constant (paper 3e-5 ÷10 at "
              "300k/400k) for 3k steps; SG models 2 × 256 hidden units (A.1: 2 × 1024; 4× "
              "cheaper on this CPU); the calibration runs showed the same rise with both"),
    "paper": ("A.1's network and SG model (2 × 1024), Adam 3e-5 constant (A.1's rate before "
              "its first drop) for 250k steps: where the H200 run degraded (80k → 245k)"),
}


# --------------------------------------------------------------------------- the oracle


def true_gradients(split: sgjax.Split, states: Sequence[sgjax.StageState], x: jax.Array,
                   y: jax.Array, loss=sgjax.losses.softmax_cross_entropy
                   ) -> tuple[list[jax.Array], list[jax.Array]]:
    """The inputs ``h_k`` of every stage (``h_0 = x``) in training mode and the gradient
    backprop would give for each, ``∂loss/∂h_k`` through every stage above with their
    current parameters (``None`` for ``k = 0``). Both lists have one entry per stage."""
    hs = [x]
    for stage, state in zip(split.stages[:-1], states[:-1]):
        hs.append(stage.forward(state, hs[-1]))
    top = len(split.stages) - 1
    g = jax.grad(lambda h: loss(split.stages[top].forward(states[top], h), y))(hs[top])
    grads: list = [None] * len(split.stages)
    grads[top] = g
    for k in reversed(range(1, top)):
        _, vjp = jax.vjp(lambda h, k=k: split.stages[k].forward(states[k], h), hs[k])
        (g,) = vjp(g)
        grads[k] = g
    return hs, grads


def true_target_sync(split: sgjax.Split, loss=sgjax.losses.softmax_cross_entropy
                     ) -> sgjax.Schedule:
    """:func:`sgjax.sync`, except that every interface's gradient source is fitted to the
    *true* gradient of its activations (backpropagated from the loss through the stages
    above with their pre-update parameters) instead of the target the stage above sends
    (its own synthetic gradient backpropagated through it). The stages still update from
    the synthetic gradients. An oracle that removes bootstrapping, for diagnosis only: it
    costs a full backward pass per step."""
    base = sgjax.sync(split)

    def step(ts, batch):
        x, y = sgjax.trainer.as_batch(batch, "true_target_sync")[:2]
        hs, true = true_gradients(split, ts.stages, x, y, loss)
        labels = split.label_fn(y)
        new, info, h = [None] * len(split.stages), {}, x
        for k, stage in enumerate(split.stages):
            new[k], h, _, stage_info = stage.update(ts.stages[k], h, y, None)
            if k + 1 < len(split.stages):
                target = sgjax.feedback.Target(grad=true[k + 1], inputs=hs[k + 1],
                                               labels=labels)
                new[k], fit_info = stage.fit(new[k], target)
                stage_info = {**stage_info, **fit_info}
            info.update(sgjax.train.merge_infos([{}] * k + [stage_info]))
        return sgjax.train.TrainState(tuple(new), ts.pending), info

    return sgjax.Schedule(base.init, step, base.apply)


def gradient_probe(split: sgjax.Split, predictor: sgjax.Predictor, x: jax.Array,
                   y: jax.Array):
    """A jitted ``probe(train_state, step) -> {true_cosine_k, true_norm_k, param_cosine_k}``:
    on the fixed batch ``(x, y)``, each interface's synthetic gradient against the true
    gradient (both per example: the true one ×B), with
    :func:`sgjax.metrics.cosine_similarity`; and the cosine between the parameter
    gradients of the stage below the interface that the two give (what its update
    follows: batch norm's backward pass discards the parts of an activation gradient that
    are constant over the batch, so two activation gradients can disagree per example and
    still move the parameters alike)."""

    def flat(tree):
        return jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])

    @jax.jit
    def measure(stages):
        hs, true = true_gradients(split, stages, x, y)
        labels = split.label_fn(y)
        out = {}
        for k in range(len(split.stages) - 1):
            variables = sgjax.feedback.synthetic_variables(stages[k].feedback)
            s, _ = predictor.apply(variables, hs[k + 1],
                                   labels if predictor.conditioned else None, train=True)
            t = x.shape[0] * true[k + 1]
            out[f"true_cosine_{k}"] = sgjax.metrics.cosine_similarity(s, t)
            out[f"true_norm_{k}"] = jnp.mean(jnp.linalg.norm(t.reshape(t.shape[0], -1), axis=-1))
            _, vjp = jax.vjp(lambda p, k=k: split.stages[k].forward(
                stages[k]._replace(params=p), hs[k]), stages[k].params)
            g_s, g_t = flat(vjp(s)), flat(vjp(t))
            out[f"param_cosine_{k}"] = jnp.vdot(g_s, g_t) / jnp.maximum(
                jnp.linalg.norm(g_s) * jnp.linalg.norm(g_t), 1e-30)
        return out

    return lambda ts, step: measure(ts.stages)


# --------------------------------------------------------------------------- cells


def cells(preset: str) -> list[Cell]:
    cfg = PRESETS[preset]
    return [Cell(arm, row=ARMS[arm].label, column=f"{cfg.depth} layers, final test error",
                 params={"arm": arm, **ARMS[arm]._asdict()}) for arm in cfg.arms]


def make_predictor(arm: Arm, config: Config) -> sgjax.Predictor | None:
    """The arm's SG model: ``None`` for Bprop, linear in ``[h, label]`` for cDNI, else an
    MLP with ``config.sg_hidden`` (batch norm unless the arm removes it)."""
    if arm.method == "bprop":
        return None
    if arm.method == "cdni":
        return sgjax.predictors.linear(conditioned=True)
    return sgjax.predictors.mlp(config.sg_hidden, batch_norm=arm.sg_batch_norm)


def rise(curve: Sequence[tuple[int, float]], window: int) -> tuple[float, float, float]:
    """``(lowest, last, last − lowest)`` of the moving average over ``window`` points of a
    curve's values: how far it climbed back from its best."""
    v = np.asarray([val for _, val in curve], np.float64)
    window = max(1, min(window, len(v)))
    avg = np.convolve(v, np.ones(window) / window, mode="valid")
    return float(avg.min()), float(avg[-1]), float(avg[-1] - avg.min())


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    arm = ARMS[cell.params["arm"]]
    cfg = config.train(arm)
    ds = table1.load_dataset("mnist", cfg.train_limit, cfg.test_limit)
    predictor = make_predictor(arm, config)
    optimizer = training.piecewise_adam(cfg.lr, cfg.lr_boundaries)
    split = fcn.fcn_split(
        config.depth, () if predictor is None else "every",
        None if predictor is None else sgjax.feedback.synthetic(predictor), cfg,
        ds.input_shape, optimizer=optimizer,
        predictor_optimizer=(training.piecewise_adam(cfg.lr * arm.sg_lr_factor,
                                                     cfg.lr_boundaries)
                             if arm.sg_lr_factor != 1.0 else None),
        example_scale=1.0 if arm.mean_units else None)
    schedule = true_target_sync(split) if arm.true_target else None
    probe = None
    if predictor is not None:
        n = cfg.batch_size
        x = jnp.asarray(ds.x_train[:n].reshape(n, *split.input_shape))
        probe = gradient_probe(split, predictor, x, jnp.asarray(ds.y_train[:n]))
    _, final = fcn.train_fcn(ctx, split, ds, cfg, schedule=schedule, probe=probe,
                             eval_train=True, log_info=predictor is not None)
    err_min, err_end, err_rise = rise(ctx.curves["test_error"], config.window)
    loss_min, loss_end, loss_rise = rise(ctx.curves["loss"], config.window)
    return {"metric": final["test_error"], "train_error": final["train_error"],
            "test_error_min": err_min, "test_error_end": err_end, "err_rise": err_rise,
            "loss_min": loss_min, "loss_end": loss_end, "loss_rise": loss_rise,
            "sg_model": None if predictor is None else predictor.description}


# --------------------------------------------------------------------------- claims

STABLE_WORDS = ("Surprisingly, this does not cause errors to compound and learning remains "
                "stable even with many layers, as shown in Sect. 3.1.")
RISE_BOUND = 1.0
"""Test-error points a run may climb back from its best (both averaged over ``window``
evaluations) and still count as not degrading."""
LOSS_RISE_BOUND = 0.03
"""The same for the training loss (nats)."""

MECHANISM = (
    "method: bootstrapping compounds the unconditioned SG models' errors: each SG tracks "
    "its bootstrapped target, but within three interfaces those targets lose all alignment "
    "with the true gradient, so Adam keeps moving the lowest layers at full step along a "
    "persistent direction that does not descend the loss, and the loss climbs; fitting "
    "every SG to the true gradient instead removes the rise")
"""The mechanism in one clause (quoted by the Table 1 and budget claims' causes)."""

CAUSES: Mapping[str, str] = {
    "dni": (
        "{mechanism} (quick, 6 layers, Adam 3e-4 constant: the loss climbs 0.527 → 0.605 "
        "and the test error 17.16 → 18.36 %; over the second half of training the "
        "parameter-gradient cosine between what the SG and the true gradient give the "
        "stage below averages −0.11, −0.11, −0.05 at the three lowest stages, +0.10 and "
        "+0.47 above, while each SG matches its own bootstrapped target with cosine "
        "0.56–0.16 and the lowest target has 5 % of the true gradient's norm; "
        "dni-true-target: +0.16…+0.02 at every stage, no rise, best 4.98 %; cDNI: "
        "+0.18…+0.59, no rise; the ÷10 drops stop the rise but not the negative "
        "cosines; koz4k/dni-pytorch with its batch-norm-free synthesizers is inconclusive: "
        "reports/degradation-peer/; reports/degradation/)"),
    "dni-sg-lr": (
        "method: SG models at a tenth of the layers' rate track their bootstrapped targets "
        "as closely, but the lowest stages' parameter gradients still point against the "
        "true ones and the whole run is far worse (reports/degradation/)"),
    "dni-lr-decay": (
        "{mechanism}; dividing the learning rate by 10 at 60 %/80 % shortens the steps "
        "along that direction, so the rise stops, but the lowest stages' cosines stay "
        "negative (reports/degradation/)"),
    "dni-sg-no-bn": (
        "method: without batch norm the lower SG models collapse to zero output, so the "
        "lower layers stop learning (No-Bprop-like) rather than degrade "
        "(reports/degradation/)"),
    "dni-mean-units": (
        "method: in batch-mean units the targets are B× smaller than Adam's steps on the "
        "zero-initialised SG output, so the SGs stay noise uncorrelated with the true "
        "gradient and the lower layers only diffuse (reports/degradation/)"),
    "dni-true-target": "the oracle itself (reports/degradation/)",
}
"""Per DNI arm, what it showed (shown where its claim does not hold)."""


def claims(preset: str) -> list[Claim]:
    """DNI §2.1's stability sentence, per arm: the test error at the end is at most
    :data:`RISE_BOUND` points above its best (``err_rise``), and the training loss at most
    :data:`LOSS_RISE_BOUND` above its lowest (``loss_rise``), both averaged over
    ``window`` evaluations (a run's test error jitters by about a point between
    evaluations at these budgets, its interval-averaged loss by a few hundredths)."""
    out = []
    for arm in PRESETS[preset].arms:
        cause = CAUSES.get(arm, "").format(mechanism=MECHANISM)
        out += [Claim.at_most(f"{arm}-error-stable", STABLE_WORDS, arm, RISE_BOUND,
                              key="err_rise", cause=cause),
                Claim.at_most(f"{arm}-loss-stable", STABLE_WORDS, arm, LOSS_RISE_BOUND,
                              key="loss_rise", cause=cause)]
    return out


# --------------------------------------------------------------------------- figure

_COLORS = {"bprop": "0.45", "cdni": "tab:green", "dni": "tab:blue",
           "dni-mean-units": "tab:orange", "dni-sg-no-bn": "tab:purple",
           "dni-true-target": "tab:red", "dni-sg-lr": "tab:brown",
           "dni-lr-decay": "tab:cyan"}


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``degradation``: test error and training loss of every arm (top), and per
    interface of the baseline DNI the synthetic gradient's norm against its target's,
    its cosine with the target and with the true gradient (bottom)."""
    from matplotlib.figure import Figure

    by = {r.cell.id: r for r in results}
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3)
    for arm, r in by.items():
        color = _COLORS.get(arm, "k")
        label = f"{arm} ({r.metrics.get('err_rise', float('nan')):+.1f} pt)"
        for ax, name in ((axes[0, 0], "test_error"), (axes[0, 1], "loss")):
            if name in r.curves:
                ax.plot(*r.curves[name], color=color, label=label, lw=1.2)
    axes[0, 0].set_ylabel("test error (%, log scale)")
    axes[0, 1].set_ylabel("training loss (interval mean, log scale)")
    for ax in axes[0, :2]:
        log_axis(ax)
    if axes[0, 0].lines:
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside right upper",
                   fontsize="x-small", title="arm (err_rise)", title_fontsize="x-small")
    arms = [a for a in ARMS if a in by]
    axes[0, 2].barh(range(len(arms)), [by[a].metrics.get("err_rise", np.nan) for a in arms],
                    color=[_COLORS.get(a, "k") for a in arms])
    axes[0, 2].set_yticks(range(len(arms)), arms, fontsize="x-small")
    axes[0, 2].axvline(RISE_BOUND, color="k", ls=":", lw=0.8)
    axes[0, 2].set_xlabel("err_rise: end − best test error (points)")
    base = by.get("dni")
    if base is not None:
        k_max = config.depth - 1
        cmap = [f"C{k}" for k in range(k_max)]
        for k in range(k_max):
            s, t = base.curves.get(f"sg_norm_{k}"), base.curves.get(f"target_norm_{k}")
            if s is not None and t is not None:
                axes[1, 0].plot(s.step, s.value / np.maximum(t.value, 1e-30), color=cmap[k],
                                label=f"interface {k}")
            true = base.curves.get(f"true_norm_{k}")
            if t is not None and true is not None:
                n = min(len(t.step), len(true.step))
                axes[1, 0].plot(true.step[:n], t.value[:n] / np.maximum(true.value[:n], 1e-30),
                                color=cmap[k], ls="--", lw=0.9)
            for ax, name, ls in ((axes[1, 1], "sg_cosine", "-"), (axes[1, 1], "true_cosine", "--"),
                                 (axes[1, 2], "param_cosine", "-")):
                c = base.curves.get(f"{name}_{k}")
                if c is not None:
                    ax.plot(*c, color=cmap[k], ls=ls, label=f"interface {k}" if ls == "-" else None)
        for other, ls in (("dni-true-target", ":"), ("cdni", "-.")):
            r = by.get(other)
            for k in range(k_max if r is not None else 0):
                c = r.curves.get(f"param_cosine_{k}")
                if c is not None:
                    axes[1, 2].plot(*c, color=cmap[k], ls=ls, lw=0.9)
        axes[1, 0].set_ylabel("‖SG‖ / ‖target‖ (solid),\n‖target‖ / ‖true gradient‖ (dashed)")
        axes[1, 0].axhline(1.0, color="k", lw=0.6)
        log_axis(axes[1, 0])
        axes[1, 1].set_ylabel("cos(SG, bootstrapped target) (solid),\n"
                              "cos(SG, true gradient) (dashed)")
        axes[1, 1].axhline(0.0, color="k", lw=0.6)
        axes[1, 2].set_ylabel("cos of the stage's parameter gradients, SG vs true\n"
                              "(solid: dni, dotted: dni-true-target, dash-dot: cdni)")
        axes[1, 2].axhline(0.0, color="k", lw=0.6)
        for ax in axes[1]:
            ax.legend(fontsize="x-small")
    for ax in axes.ravel():
        ax.grid(alpha=0.3)
    for ax in (*axes[0, :2], *axes[1]):
        ax.set_xlabel("step")
    fig.suptitle(f"{config.depth}-layer MNIST FCN, every-layer DNI at a constant learning "
                 f"rate {config.lr:g}: which change stops the degradation?",
                 fontsize="medium")
    return {"degradation": fig}


EXPERIMENT = Experiment(
    name="degradation",
    paper="DNI (Jaderberg et al. 2016)",
    title="Why deep unconditioned DNI degrades with training (ablations, 6-layer MNIST FCN)",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("one change per arm from the baseline DNI; err_rise / loss_rise: how far the "
           "test error / training loss climbed back from its best (moving averages over "
           "the last evaluations); the paper gives no number, only §2.1's stability "
           "sentence"),
    preset_notes=PRESET_NOTES,
    claims=claims,
)
