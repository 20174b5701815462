"""Czarnecki et al. 2017, Fig. 6 / supp. A: a critical point that SG introduces.

Reproduce with ``make reproduce-understanding-fig6 PRESET=quick`` or
``python -m experiments run understanding-fig6 --preset quick`` (presets ``smoke``,
``quick``, ``paper``: only the number of steps and of random starting points differ;
all run in seconds).

Setup (supp. A): data ``x ∈ {−2, −1, 1, 2}``, model ``p = f(x) = a x + b``, loss
``L(a, b) = Σ_i |a x_i + b|`` (unique minimum ``a = b = 0``). The SG module sits between
``f`` and ``L`` and outputs one trainable scalar ``c`` for every point (no input, no
label); it is fitted with the SG loss of the paper (supp. C), ``L_SG(c) = Σ_i (c −
∂L/∂p_i)²`` with ``∂L/∂p_i = sign(a x_i + b)``, and the model follows it:
``(a, b) ← (a, b) − μ Σ_i c ∂p_i/∂(a, b) = (a, b) − μ c (Σ x_i, 4)``.

Why new critical points appear: ``Σ x_i = 0``, so ``a`` never moves under SG training,
and ``c = 0`` is the best constant fit whenever the signs of ``a x_i + b`` are balanced.
So every ``(a, b, c = 0)`` with ``|b| < |a|`` (two points on each side) is a critical
point of the SG system (``∂L_SG/∂c = 0`` and zero model update), though only ``a = b =
0`` is one of ``L``. The paper names the line ``b = 0, c = 0`` ("regardless of the value of
a"); the full set is the double cone ``|b| < |a|`` around it, which the figure shades.

Implementation: the dynamics are written in plain JAX (``jax.grad`` of ``L`` and of
``L_SG``; synchronous updates in the DNI order: the model uses ``c``, then ``c`` is fitted
to this step's true gradient), vmapped over starting points. The same SG run is repeated
through :func:`sgjax.split_at` — the linear model with an identity layer on top so that
the cut sits at the output ``p``, and :func:`sgjax.feedback.synthetic` with a constant
predictor (:func:`constant_predictor`) — and the two trajectories must agree
(``sgjax_max_abs_diff``). Both ``μ`` (decaying as ``μ₀/√(1 + t/τ)``, so that backprop's
subgradient steps settle at 0) and ``ν`` are plain gradient-descent rates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sgjax
from experiments.framework import Cell, Claim, Experiment
from experiments.understanding import PAPER, SG_EXAMPLE_SCALE

X = np.array([-2.0, -1.0, 1.0, 2.0], np.float32)  # numpy: importing must not start a JAX backend
SHOWCASE = (1.0, 1.5)
"""The starting point drawn in the right-hand panels: outside the cone ``|b| < |a|``."""


@dataclasses.dataclass(frozen=True)
class Config:
    """``steps`` updates from ``n_starts`` random starting points ``(a, b)`` uniform in
    ``[−init_range, init_range]²`` (plus :data:`SHOWCASE`); model learning rate
    ``mu0 / sqrt(1 + t / tau)``, SG learning rate ``nu``; a run "stops at a new critical
    point" if at the end ``|c| < tol``, ``|b| < |a|`` and ``|a| > 10·tol``."""

    steps: int
    n_starts: int
    mu0: float = 0.05
    tau: float = 10.0
    nu: float = 0.05
    init_range: float = 2.0
    tol: float = 1e-3


PRESETS = {
    "smoke": Config(steps=200, n_starts=8),
    "quick": Config(steps=3000, n_starts=64),
    "paper": Config(steps=20000, n_starts=256),
}
"""``python -m experiments run understanding-fig6 --preset smoke|quick|paper`` (or
``make reproduce-understanding-fig6 PRESET=…``); the paper gives no step counts."""


# ----------------------------------------------------------------------------- plain JAX


def predict(ab: jax.Array) -> jax.Array:
    """``p_i = a x_i + b`` for the four data points."""
    return ab[0] * X + ab[1]


def true_loss(ab: jax.Array) -> jax.Array:
    """``L(a, b) = Σ_i |a x_i + b|``."""
    return jnp.sum(jnp.abs(predict(ab)))


def loss_of_p(p: jax.Array) -> jax.Array:
    return jnp.sum(jnp.abs(p))


def sg_loss(c: jax.Array, dl_dp: jax.Array) -> jax.Array:
    """``L_SG(c) = Σ_i (c − ∂L/∂p_i)²`` (the SG's MSE to the true gradients)."""
    return jnp.sum((c - dl_dp) ** 2)


def schedule(config: Config):
    return lambda t: config.mu0 / jnp.sqrt(1.0 + t / config.tau)


def run_backprop(ab0: jax.Array, config: Config) -> jax.Array:
    """Subgradient descent on ``L``; returns the trajectory ``(steps + 1, 2)`` of ``(a, b)``."""
    mu = schedule(config)

    def body(ab, t):
        ab = ab - mu(t) * jax.grad(true_loss)(ab)
        return ab, ab

    _, traj = jax.lax.scan(body, ab0, jnp.arange(config.steps, dtype=jnp.float32))
    return jnp.concatenate([ab0[None], traj])


def run_sg(ab0: jax.Array, config: Config) -> jax.Array:
    """SG-based training; returns the trajectory ``(steps + 1, 3)`` of ``(a, b, c)``.

    Each step: the model moves along ``c ∂p/∂(a, b)`` (the synthetic gradient
    backpropagated into ``f``), then ``c`` takes a gradient step on ``L_SG`` against the
    true ``∂L/∂p`` at the model's output before that move. ``c`` starts at 0 (supp. C).
    """
    mu = schedule(config)

    def body(carry, t):
        ab, c = carry
        p, vjp = jax.vjp(predict, ab)
        dl_dp = jax.grad(loss_of_p)(p)
        (g_ab,) = vjp(jnp.full_like(p, c))
        ab = ab - mu(t) * g_ab
        c = c - config.nu * jax.grad(sg_loss)(c, dl_dp)
        return (ab, c), jnp.append(ab, c)

    start = jnp.append(ab0, 0.0)
    _, traj = jax.lax.scan(body, (ab0, jnp.zeros(())),
                           jnp.arange(config.steps, dtype=jnp.float32))
    return jnp.concatenate([start[None], traj])


# ----------------------------------------------------------------------------- sgjax


def constant_predictor() -> sgjax.Predictor:
    """A synthetic-gradient model that outputs one trainable scalar ``c`` everywhere."""

    def init(key, in_shape):
        del key
        return tuple(in_shape), {"params": {"c": jnp.zeros((), jnp.float32)}}

    def apply(variables, h, *, train=False):
        del train
        return jnp.full(h.shape, variables["params"]["c"], h.dtype), {}

    return sgjax.predictors.from_layer(sgjax.Layer(init, apply), description="constant c")


def sgjax_split(config: Config) -> sgjax.Split:
    """``p = a x + b`` with an identity layer on top, cut at the output, constant SG."""
    L = sgjax.layers
    return sgjax.split_at(
        [L.dense(1), L.identity], (1,),
        feedback=sgjax.feedback.synthetic(constant_predictor()),
        loss=lambda p, y: loss_of_p(p[:, 0]),
        optimizer=optax.sgd(schedule(config)), predictor_optimizer=optax.sgd(config.nu),
        input_shape=(1,), batch_size=4, label_shape=(1,), example_scale=SG_EXAMPLE_SCALE)


def run_sg_sgjax(ab0: jax.Array, config: Config) -> tuple[jax.Array, jax.Array]:
    """The SG run of :func:`run_sg` through ``sgjax``.

    Returns ``(ab, c)``: ``ab (steps, 2)`` the model after each step and ``c (steps,)`` the
    SG output after each step. In ``sgjax``'s sync schedule step ``t`` uses ``c``, then
    fits it to the target of the same batch (DNI Fig. 2), so both ``ab[t]`` and ``c[t]``
    match :func:`run_sg`'s trajectory at ``t + 1``.
    """
    split = sgjax_split(config)
    sched = sgjax.sync(split)
    x, y = X[:, None], jnp.zeros((4, 1))
    ts = sched.init(jax.random.key(0), sgjax.Batch(x, y))
    bottom = ts.stages[0]
    params = ({"kernel": ab0[0].reshape(1, 1), "bias": ab0[1].reshape(1)}, *bottom.params[1:])
    ts = ts._replace(stages=(bottom._replace(params=params), *ts.stages[1:]))

    def recorded_step(ts, batch):
        ts, _ = sched.step(ts, batch)
        bottom = ts.stages[0]
        p = bottom.params[0]
        c = sgjax.feedback.synthetic_variables(bottom.feedback)["params"]["c"]
        return ts, (jnp.stack([p["kernel"][0, 0], p["bias"][0]]), c)

    # every step is recorded (a trajectory), so one scan over all steps, no batches
    run = sgjax.fused(recorded_step, batch_fn=lambda data, t: sgjax.Batch(x, y))
    _, (ab, c) = run(ts, jnp.arange(config.steps))
    return ab, c


# ----------------------------------------------------------------------------- experiment


def starting_points(key: jax.Array, config: Config) -> jax.Array:
    """``(n_starts + 1, 2)``: :data:`SHOWCASE` then uniform random ``(a, b)``."""
    r = config.init_range
    rand = jax.random.uniform(key, (config.n_starts, 2), minval=-r, maxval=r)
    return jnp.concatenate([jnp.array([SHOWCASE]), rand])


def at_new_critical_point(a, b, c, tol):
    """``|c| < tol``, ``|b| < |a|`` and ``a`` clearly non-zero."""
    return (np.abs(c) < tol) & (np.abs(b) < np.abs(a)) & (np.abs(a) > 10 * tol)


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    starts = starting_points(ctx.key(), config)
    method = cell.params["method"]
    if method == "backprop":
        traj = np.asarray(jax.jit(jax.vmap(lambda s: run_backprop(s, config)))(starts))
        a, b = traj[:, -1, 0], traj[:, -1, 1]
        c = np.full_like(a, np.nan)
        extra = {}
    else:
        traj = np.asarray(jax.jit(jax.vmap(lambda s: run_sg(s, config)))(starts))
        a, b, c = traj[:, -1, 0], traj[:, -1, 1], traj[:, -1, 2]
        # the same runs through sgjax (see run_sg_sgjax for how the steps line up)
        ab_s, c_s = jax.jit(jax.vmap(lambda s: run_sg_sgjax(s, config)))(starts)
        ab_s, c_s = np.asarray(ab_s), np.asarray(c_s)
        diff_ab = np.abs(ab_s - traj[:, 1:, :2]).max()
        diff_c = np.abs(c_s - traj[:, 1:, 2]).max()
        new_cp = at_new_critical_point(a, b, c, config.tol)
        extra = {"sgjax_max_abs_diff": float(max(diff_ab, diff_c)),
                 "frac_new_critical_point": float(new_cp.mean()),
                 "a_unchanged_max": float(np.abs(a - traj[:, 0, 0]).max()),
                 "max_abs_c": float(np.abs(c).max())}
    losses = np.abs(a[:, None] * np.asarray(X)[None] + b[:, None]).sum(-1)
    for t in np.unique(np.geomspace(1, config.steps, 40).astype(int)):
        ctx.log(int(t), loss=np.mean(np.abs(traj[:, t, :1] * np.asarray(X) + traj[:, t, 1:2])
                                     .sum(-1)))
    return {"metric": float(losses.mean()), "final_a": a.tolist(), "final_b": b.tolist(),
            "final_c": c.tolist(), "start_a": np.asarray(starts[:, 0]).tolist(),
            "start_b": np.asarray(starts[:, 1]).tolist(),
            "showcase_traj": traj[0].tolist(), "max_abs_a": float(np.abs(a).max()),
            "max_abs_b": float(np.abs(b).max()), **extra}


def figures(results: Sequence, config: Config) -> dict:
    from matplotlib.figure import Figure

    by = {r.cell.params["method"]: r for r in results}
    fig = Figure(figsize=(13.5, 4.4), layout="constrained")
    ax_s, ax_r, ax_t = fig.subplots(1, 3, width_ratios=(1.25, 1.0, 1.0))

    # left: loss surface, original critical point, SG critical points, where runs end
    lim = config.init_range + 0.5
    grid = np.linspace(-lim, lim, 301)
    A, B = np.meshgrid(grid, grid)
    Lg = np.abs(A[..., None] * np.asarray(X) + B[..., None]).sum(-1)
    cs = ax_s.contourf(A, B, Lg, levels=30, cmap="viridis")
    fig.colorbar(cs, ax=ax_s, label="L(a, b)")
    cone = np.where(np.abs(B) < np.abs(A), 1.0, np.nan)
    ax_s.contourf(A, B, cone, levels=[0.5, 1.5], colors="none", hatches=["//"])
    ax_s.contour(A, B, np.abs(B) - np.abs(A), levels=[0], colors="white", linewidths=0.6,
                 linestyles=":")
    ax_s.axhline(0.0, color="white", lw=2.0, label="SG critical points named in the paper "
                 "(b = 0, c = 0)")
    ax_s.plot([], [], " ", label="hatched: all SG critical points (|b| < |a|, c = 0)")
    for method, color, marker in (("backprop", "tab:red", "o"), ("sg", "tab:orange", "s")):
        r = by.get(method)
        if r is None:
            continue
        ax_s.scatter(r.metrics["final_a"], r.metrics["final_b"], s=14, color=color,
                     marker=marker, edgecolors="k", linewidths=0.3, zorder=4,
                     label=f"{'backprop' if method == 'backprop' else 'SG'} end points "
                           f"({len(r.metrics['final_a'])} starts)")
        tr = np.asarray(r.metrics["showcase_traj"])
        ax_s.plot(tr[:, 0], tr[:, 1], color=color, lw=1.5, zorder=3)
    ax_s.scatter([SHOWCASE[0]], [SHOWCASE[1]], marker="*", s=120, color="white",
                 edgecolors="k", zorder=5, label=f"start {SHOWCASE}")
    ax_s.scatter([0], [0], marker="X", s=140, color="white", edgecolors="k", zorder=6,
                 label="critical point of L (a = b = 0)")
    ax_s.set_xlim(-lim, lim)
    ax_s.set_ylim(-lim, lim)
    ax_s.set_xlabel("a")
    ax_s.set_ylabel("b")
    ax_s.set_title("Loss surface L(a, b) = Σ|a x + b| with the critical points\nof backprop "
                   "(X) and of SG training (white line, hatched cone)", fontsize=9)
    ax_s.legend(fontsize=6.5, loc="lower left", framealpha=0.9, facecolor="silver")

    # middle: where SG stopped, the true gradients and the SG's constant fit
    r = by.get("sg")
    if r is not None:
        tr = np.asarray(r.metrics["showcase_traj"])
        a, b, c = tr[-1]
        xs = np.linspace(-2.5, 2.5, 201)
        ax_r.plot(xs, np.abs(a * xs + b), color="tab:gray", lw=1,
                  label="|a x + b| (per-point loss)")
        g = np.sign(a * np.asarray(X) + b)
        ax_r.scatter(np.asarray(X), g, color="tab:blue", zorder=3, s=40,
                     label="true ∂L/∂p_i = sign(a x_i + b)")
        ax_r.axhline(c, color="tab:orange", lw=2, label=f"SG output c = {c:.1e}")
        ax_r.axhline(0, color="k", lw=0.5)
        ax_r.set_title(f"SG end point from {SHOWCASE}: a = {a:.3f}, b = {b:.3f}\n"
                       f"L = {np.abs(a * np.asarray(X) + b).sum():.2f}, yet the best constant "
                       "fit is c = 0: no update", fontsize=9)
        ax_r.set_xlabel("x")
        ax_r.legend(fontsize=7)

    # right: the showcase run over time
    for method, color in (("backprop", "tab:red"), ("sg", "tab:orange")):
        r = by.get(method)
        if r is None:
            continue
        tr = np.asarray(r.metrics["showcase_traj"])
        t = np.arange(len(tr))
        name = "backprop" if method == "backprop" else "SG"
        ax_t.plot(t, tr[:, 0], color=color, label=f"{name}: a")
        ax_t.plot(t, tr[:, 1], color=color, ls="--", label=f"{name}: b")
        if tr.shape[1] > 2:
            ax_t.plot(t, tr[:, 2], color=color, ls=":", label=f"{name}: c")
    ax_t.set_xscale("symlog", linthresh=10)
    ax_t.axhline(0, color="k", lw=0.5)
    ax_t.set_xlabel("step")
    ax_t.set_title(f"start {SHOWCASE}: backprop → (0, 0);\nSG stops with a ≠ 0, c = 0",
                   fontsize=9)
    ax_t.legend(fontsize=7, ncol=2)
    return {"fig6": fig}


FIG6_WORDS = ("However, SG can also introduce new critical points, leading to premature "
              "convergence and spurious additional solutions.")


def claims(preset: str) -> list[Claim]:
    """Backprop reaches the unique minimum (L = 0) while SG training stops at a new critical
    point: SG's final loss at least 1 above backprop's (a point with |b| < |a| and |a| of
    order 1 has L of order 1; backprop's subgradient steps end near 0)."""
    return [Claim.less("sg-new-critical-point", FIG6_WORDS, "backprop", "sg", margin=1.0)]


EXPERIMENT = Experiment(
    name="understanding-fig6",
    paper=PAPER,
    title="Fig. 6 / supp. A: SG introduces new critical points (a ≠ 0, c = 0)",
    metric="final loss L(a, b), mean over starting points",
    cells=[
        Cell("backprop", row="backprop", column="final L", params={"method": "backprop"},
             paper=0.0),
        Cell("sg", row="constant SG c", column="final L", params={"method": "sg"}),
    ],
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("paper: backprop reaches the unique minimum a = b = 0 (L = 0); SG training can stop "
           "at any a ≠ 0 with b inside |b| < |a| and c = 0 (no number given). See "
           "frac_new_critical_point and sgjax_max_abs_diff in results.csv."),
    claims=claims,
)
