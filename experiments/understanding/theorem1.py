"""Czarnecki et al. 2017, Theorem 1 (supp. B) checked numerically.

Reproduce with ``make reproduce-understanding-theorem1 PRESET=quick`` or
``python -m experiments run understanding-theorem1 --preset quick`` (presets ``smoke``,
``quick``, ``paper``; seconds to a minute on a CPU).

Theorem 1: linear regression trained with a linear SG module between its output and the
loss converges to the global solution if the SG's learning rate is chosen by line search
and the model's learning rate is small enough. We follow supp. B's notation exactly:

* data ``X̄ ∈ R^{(d+1)×S}`` (bias row of ones), labels ``y ∈ R^{1×S}``, weights
  ``W ∈ R^{1×(d+1)}``, output ``p = W X̄``, loss ``L = ½ Σ_s (y^s − p^s)²`` (a sum);
* the SG ``∇̃L = (α + 1) p − (β + 1) y + γ 1`` — the linear, label-conditioned module
  ``SG(p, y) = pA + yB + C`` of ``sgjax.predictors.linear(conditioned=True)`` with
  ``A = α + 1``, ``B = −(β + 1)``, ``C = γ``; starting "from the synthetic gradient being
  equal to zero" means ``(α₀, β₀, γ₀) = (−1, −1, 0)`` (``sgjax`` zero-initialises too);
* updates ``W ← W − μ ∇̃L X̄ᵀ`` and ``ω ← ω − ν A_kᵀ A_k ω`` with ``ω = (α, β, γ)``,
  ``A_k = [p_kᵀ | −yᵀ | 1ᵀ]`` and ``ξ_k = A_k ω_k = ∇̃L − ∂L/∂p`` (the SG error);
* line search for the SG: ``ν_k = ‖A_kᵀ ξ_k‖² / ‖A_k A_kᵀ ξ_k‖²``, the exact minimiser
  of ``‖ξ_k − ν A_k A_kᵀ ξ_k‖²`` (the proof's choice);
* the model's rate: the proof needs ``μ < b / ‖B‖²`` (``B = X̄ᵀX̄``, ``b`` its smallest
  non-zero eigenvalue) so that ``‖f_{k+1}‖ ≤ ρ ‖f_k‖ + μ‖B‖ ‖ξ_k‖`` with ``ρ < 1``, and a
  second bound so that ``‖f‖ + ‖ξ‖`` decreases. Written out, that bound is
  ``μ ‖B‖ < ½ r_k`` with ``r_k = ‖A_kᵀξ_k‖⁴ / (‖A_k A_kᵀ ξ_k‖² ‖ξ_k‖²)``; the paper's last
  display drops the factor ``‖B‖`` (``… + μ)‖ξ_k‖``). We use
  ``μ_k = mu_factor · min(b/‖B‖², r_k / (2‖B‖))`` (the first term alone once ``ξ = 0``).

Tracked: ``‖W − W*‖`` (``W*`` the least-squares solution), ``L − L*``, ``α, β, γ``, the
SG error ``‖ξ‖``, ``‖f‖ = ‖p − p*‖`` and the proof's Lyapunov function ``‖f‖ + ‖ξ‖``
(computed with the *current* ``A``: the proof bounds ``ξ_{k+1}`` with ``A_k`` although
``p`` has moved, so we also report how often the function actually went up). Labels carry
noise, so the residual ``y − p*`` is non-zero and ``p*, y, 1`` are linearly independent:
then ``ξ → 0`` forces ``(α, β, γ) → 0`` (with a zero residual the SG could converge to the
true gradient with ``α = β ≠ 0``). Computed in float64 (``jax.enable_x64``), vmapped
over random problems. Backprop with ``μ = mu_factor · b/‖B‖²`` is drawn for reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.framework import Cell, Claim, Experiment
from experiments.understanding import PAPER


@dataclasses.dataclass(frozen=True)
class Config:
    """``steps`` iterations on ``n_problems`` random problems per cell; model learning rate
    ``mu_factor`` times the proof's bound; labels ``y = w·x + b + noise·N(0, 1)``;
    ``record`` curve points (log-spaced); a run has converged if its final
    ``max(‖W − W*‖∞, |α|, |β|, |γ|) < tol``; cells are the ``(d, S)`` problem ``sizes``
    times the model-rate rules ``mu_rules`` (see :func:`theorem_step`).
    """

    steps: int
    n_problems: int = 10
    mu_factor: float = 0.5
    noise: float = 0.5
    record: int = 60
    tol: float = 1e-6
    sizes: tuple[tuple[int, int], ...] = ((2, 20), (5, 50), (20, 200))
    mu_rules: tuple[str, ...] = ("paper", "corrected")


PRESETS = {
    "smoke": Config(steps=300, n_problems=2, sizes=((2, 20),), mu_rules=("paper",)),
    "quick": Config(steps=20_000),
    "paper": Config(steps=200_000, n_problems=50),
}
"""``python -m experiments run understanding-theorem1 --preset smoke|quick|paper`` (or
``make reproduce-understanding-theorem1 PRESET=…``). The theorem has no step count;
``quick`` takes well under a minute on a CPU."""


def cells(preset: str) -> list[Cell]:
    return [Cell(f"d{d}-S{s}-{rule}", row=f"d = {d}, S = {s}", column=f"μ rule: {rule}",
                 params={"d": d, "S": s, "mu_rule": rule}, paper=0.0)
            for d, s in PRESETS[preset].sizes for rule in PRESETS[preset].mu_rules]


# ----------------------------------------------------------------------------- dynamics


def make_problem(key: jax.Array, d: int, S: int, noise: float):
    """``X̄ (d+1, S)`` with a row of ones, ``y (S,)`` linear in ``x`` plus noise."""
    kx, kw, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (d, S))
    xbar = jnp.concatenate([x, jnp.ones((1, S))])
    w = jax.random.normal(kw, (d + 1,))
    y = w @ xbar + noise * jax.random.normal(kn, (S,))
    return xbar, y


def solve(xbar: jax.Array, y: jax.Array):
    """Least squares ``W*``, ``p* = W* X̄``, and the spectrum bounds ``b``, ``‖B‖``."""
    gram = xbar @ xbar.T  # non-zero eigenvalues of B = X̄ᵀX̄
    w_star = jnp.linalg.solve(gram, xbar @ y)
    eig = jnp.linalg.eigvalsh(gram)
    return w_star, w_star @ xbar, eig[0], eig[-1]


def sg_matrix(p, y):
    """``A_k = [pᵀ | −yᵀ | 1ᵀ]`` of shape ``(S, 3)``."""
    return jnp.stack([p, -y, jnp.ones_like(p)], axis=1)


def synthetic_gradient(p, y, omega):
    """``∇̃L = (α + 1) p − (β + 1) y + γ 1``."""
    alpha, beta, gamma = omega
    return (alpha + 1) * p - (beta + 1) * y + gamma


def theorem_step(W, omega, xbar, y, b, big_b, mu_factor, mu_rule="paper"):
    """One iteration of supp. B with the line-search ``ν`` and the proof's ``μ``.

    ``mu_rule="paper"``: ``μ = mu_factor · min(b/‖B‖², 1 − ½ r)`` as printed (the second
    term is ≥ ½ and never binds); ``"corrected"``: ``μ = mu_factor · min(b/‖B‖², r/(2‖B‖))``,
    the bound the proof's last step needs once the factor ``‖B‖`` is kept. ``ν`` and ``r``
    do not depend on the scale of ``ξ``, so both are computed from ``ξ/‖ξ‖`` (no underflow
    as ``ξ → 0``). Returns ``(W, omega, mu, nu)``.
    """
    p = W @ xbar
    A = sg_matrix(p, y)
    xi = A @ omega
    g_raw = A.T @ xi  # ∂E/∂ω with E = ½‖ξ‖²
    norm = jnp.linalg.norm(xi)
    u = xi / jnp.where(norm > 0, norm, 1.0)
    g = A.T @ u
    Ag = A @ g
    gg, AgAg = g @ g, Ag @ Ag
    safe = (norm > 0) & (AgAg > 0)
    nu = jnp.where(safe, gg / jnp.where(safe, AgAg, 1.0), 0.0)
    r = jnp.where(safe, gg ** 2 / jnp.where(safe, AgAg, 1.0), 1.0)  # ≤ 1 (Cauchy–Schwarz)
    if mu_rule == "paper":
        second = 1.0 - 0.5 * r
    elif mu_rule == "corrected":
        second = jnp.where(safe, r / (2 * big_b), jnp.inf)
    else:
        raise ValueError(f"mu_rule={mu_rule!r}: use 'paper' or 'corrected'")
    mu = mu_factor * jnp.minimum(b / big_b ** 2, second)
    W = W - mu * synthetic_gradient(p, y, omega) @ xbar.T
    omega = omega - nu * g_raw
    return W, omega, mu, nu


def measures(W, omega, xbar, y, w_star, p_star):
    p = W @ xbar
    xi = sg_matrix(p, y) @ omega
    f = jnp.linalg.norm(p - p_star)
    loss = 0.5 * jnp.sum((y - p) ** 2)
    loss_star = 0.5 * jnp.sum((y - p_star) ** 2)
    return {"w_err": jnp.max(jnp.abs(W - w_star)), "loss_gap": loss - loss_star,
            "alpha": omega[0], "beta": omega[1], "gamma": omega[2],
            "xi": jnp.linalg.norm(xi), "f": f, "lyapunov": f + jnp.linalg.norm(xi)}


def run_problem(key, d: int, S: int, config: Config, record_at: jax.Array,
                mu_rule: str = "paper"):
    """Theorem 1's iteration on one random problem, plus backprop for reference.

    Returns ``(curves, final, lyapunov_increases)``: every measure at the steps
    ``record_at``, the final measures, and the number of steps where ``‖f‖ + ‖ξ‖`` rose.
    """
    xbar, y = make_problem(key, d, S, config.noise)
    w_star, p_star, b, big_b = solve(xbar, y)
    W0 = jnp.zeros((d + 1,), xbar.dtype)
    omega0 = jnp.array([-1.0, -1.0, 0.0], xbar.dtype)
    mu_bp = config.mu_factor * b / big_b ** 2

    def body(carry, _):
        W, omega, W_bp, lyap = carry
        W, omega, mu, nu = theorem_step(W, omega, xbar, y, b, big_b, config.mu_factor,
                                        mu_rule)
        W_bp = W_bp - mu_bp * (W_bp @ xbar - y) @ xbar.T
        m = measures(W, omega, xbar, y, w_star, p_star)
        m_bp = measures(W_bp, jnp.zeros(3, xbar.dtype), xbar, y, w_star, p_star)
        up = m["lyapunov"] > lyap * (1 + 1e-12)
        out = {**m, "mu": mu, "nu": nu, "bp_w_err": m_bp["w_err"],
               "bp_loss_gap": m_bp["loss_gap"], "lyap_up": up}
        return (W, omega, W_bp, m["lyapunov"]), out

    m0 = measures(W0, omega0, xbar, y, w_star, p_star)
    _, hist = jax.lax.scan(body, (W0, omega0, W0, m0["lyapunov"]), None, length=config.steps)
    curves = {k: v[record_at] for k, v in hist.items() if k != "lyap_up"}
    final = {k: v[-1] for k, v in hist.items() if k != "lyap_up"}
    return curves, final, jnp.sum(hist["lyap_up"])


def record_steps(steps: int, points: int) -> np.ndarray:
    """Log-spaced 0-based indices into the per-step history."""
    return np.unique(np.geomspace(1, steps, points).astype(int)) - 1


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    d, S, rule = cell.params["d"], cell.params["S"], cell.params["mu_rule"]
    at = record_steps(config.steps, config.record)
    keys = jax.random.split(jax.random.fold_in(ctx.key(), 1000 * d + S), config.n_problems)
    with jax.enable_x64(True):
        run = jax.jit(jax.vmap(lambda k: run_problem(k, d, S, config, jnp.asarray(at), rule)))
        curves, final, ups = jax.device_get(run(keys))
    final = {k: np.asarray(v, np.float64) for k, v in final.items()}
    err = np.max(np.stack([final["w_err"], np.abs(final["alpha"]), np.abs(final["beta"]),
                           np.abs(final["gamma"])]), axis=0)
    steps = at + 1
    for name in ("w_err", "loss_gap", "xi", "lyapunov"):
        for t, v in zip(steps, np.asarray(curves[name]).max(0)):
            ctx.log(int(t), **{f"max_{name}": float(v)})
    return {
        "metric": float(err.max()),
        "converged": int(np.sum(err < config.tol)),
        "n_problems": config.n_problems,
        "final_w_err_max": float(final["w_err"].max()),
        "final_loss_gap_max": float(final["loss_gap"].max()),
        "final_abs_alpha_max": float(np.abs(final["alpha"]).max()),
        "final_abs_beta_max": float(np.abs(final["beta"]).max()),
        "final_abs_gamma_max": float(np.abs(final["gamma"]).max()),
        "lyapunov_increases_max": int(np.max(ups)),
        "lyapunov_increase_frac": float(np.mean(ups) / config.steps),
        "mu_final_mean": float(final["mu"].mean()),
        "problem_curves": {k: np.asarray(v).tolist() for k, v in curves.items()},
        "curve_steps": steps.tolist(),
    }


FLOOR = 1e-16
"""Curves are clipped at this floor (float64 round-off; exact zeros) on the log plots."""


def _rule_figure(results: Sequence, config: Config, rule: str):
    from matplotlib.figure import Figure

    results = sorted([r for r in results if r.cell.params["mu_rule"] == rule],
                     key=lambda r: r.cell.params["S"])
    n = len(results)
    fig = Figure(figsize=(13, 2.8 * n + 0.6), layout="constrained")
    axes = fig.subplots(n, 4, squeeze=False)
    clip = lambda v: np.clip(np.abs(v), FLOOR, None)  # noqa: E731
    for row, r in zip(axes, results):
        c = {k: np.asarray(v) for k, v in r.metrics["problem_curves"].items()}
        t = np.asarray(r.metrics["curve_steps"])
        name = r.cell.row
        ax = row[0]
        ax.plot(t, clip(c["w_err"]).T, color="tab:orange", lw=0.8, alpha=0.7)
        ax.plot(t, clip(c["bp_w_err"]).T, color="tab:blue", lw=0.8, alpha=0.5, ls="--")
        ax.plot([], [], color="tab:orange", label="SG (Theorem 1)")
        ax.plot([], [], color="tab:blue", ls="--", label="backprop (μ = 0.5 b/‖B‖²)")
        ax.set_title(f"{name}\n‖W − W*‖∞", fontsize=9)
        ax.legend(fontsize=7)
        ax = row[1]
        ax.plot(t, clip(c["loss_gap"]).T, color="tab:orange", lw=0.8, alpha=0.7)
        ax.plot(t, clip(c["bp_loss_gap"]).T, color="tab:blue", lw=0.8, alpha=0.5, ls="--")
        ax.set_title(f"{name}\nL − L*", fontsize=9)
        ax = row[2]
        for key, symbol, color in (("alpha", "α", "tab:red"), ("beta", "β", "tab:green"),
                                   ("gamma", "γ", "tab:purple")):
            ax.plot(t, clip(c[key]).T, color=color, lw=0.8, alpha=0.6)
            ax.plot([], [], color=color, label=f"|{symbol}|")
        ax.set_title(f"{name}\nSG parameters (start −1, −1, 0)", fontsize=9)
        ax.legend(fontsize=7)
        ax = row[3]
        ax.plot(t, clip(c["lyapunov"]).T, color="k", lw=0.8, alpha=0.6)
        ax.plot(t, clip(c["xi"]).T, color="tab:cyan", lw=0.8, alpha=0.6)
        ax.plot([], [], color="k", label="‖f‖ + ‖ξ‖ (the proof's norm)")
        ax.plot([], [], color="tab:cyan", label="‖ξ‖ = ‖SG − ∂L/∂p‖")
        ups = r.metrics["lyapunov_increase_frac"]
        ax.set_title(f"{name}\n‖f‖ + ‖ξ‖ rose on {100 * ups:.2g} % of steps", fontsize=9)
        ax.legend(fontsize=7)
        for ax in row:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(FLOOR / 3, None)
            ax.set_xlabel("iteration")
    what = ("μ = 0.5·min(b/‖B‖², 1 − r/2), the bound as printed" if rule == "paper" else
            "μ = 0.5·min(b/‖B‖², r/(2‖B‖)), the bound with the factor ‖B‖ kept")
    fig.suptitle(f"Theorem 1: linear regression, linear SG between output and loss, "
                 f"line-search ν, {what}\n{config.n_problems} random problems per row "
                 f"(float64; curves clipped at {FLOOR:g})", fontsize=10)
    return fig


def figures(results: Sequence, config: Config) -> dict:
    rules = sorted({r.cell.params["mu_rule"] for r in results})
    return {("theorem1" if rule == "paper" else f"theorem1-{rule}"):
            _rule_figure(results, config, rule) for rule in rules}


THEOREM1_WORDS = ("Theorem 1. Let us consider linear regression trained with a linear SG module "
                  "attached between its output and the loss. If one chooses the learning rate "
                  "of the SG module using line search, then in every iteration there exists "
                  "small enough, positive learning rate of the main network such that it "
                  "converges to the global solution.")


def claims(preset: str) -> list[Claim]:
    """Per problem size and μ rule: the largest distance to the least-squares weights over
    the random problems ends at most 1e-6 (float64 runs; far below any sampling effect and
    far above round-off)."""
    return [Claim.at_most(f"{c.id}-converges", THEOREM1_WORDS, c.id, 1e-6,
                          key="final_w_err_max") for c in cells(preset)]


EXPERIMENT = Experiment(
    name="understanding-theorem1",
    paper=PAPER,
    title="Theorem 1 (supp. B): linear regression + linear SG converges to the global optimum",
    metric="final max(‖W − W*‖∞, |α|, |β|, |γ|), worst of the random problems",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("paper = the theorem's limit (W*, 0, 0, 0). SG learning rate by exact line search, "
           "model rate mu_factor x the proof's bound; float64."),
    claims=claims,
)
