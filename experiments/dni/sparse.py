"""DNI (Jaderberg et al. 2016) §3.1 "Sparse updates", Fig. 5 (left): every-layer DNI with
stochastic updates, a population of runs compiled as one program.

"we perform an experiment on a four layer FCN model on MNIST, where the backwards pass and
update for every layer occurs in random order and only with some probability
``p_update`` … We ran 100 experiments with different values of ``p_update`` uniformly
sampled between 0 and 1 … With ``p_update = 0.2`` the network can still train to 2%
accuracy. Incredibly, when the DNI is conditioned on the labels of the data …, the network
trains perfectly with only 5% chance of an update, albeit just slower." Fig. 5 (left)
plots each run's test error against its ``p_update``, after several iteration counts.

The claims, checked by the numbers in ``table.md`` and ``fig5-left.png``:

* **DNI, p_update = 0.2: about 2 % test error.** Metric of the ``dni`` cell: mean final
  test error of the members with ``p_update = 0.2`` (paper 2.0). Verdict (``verdict`` in
  ``results.csv``): "holds" if ≤ 3 %.
* **cDNI trains with p_update = 0.05, only more slowly.** Metric of the ``cdni`` cell: mean
  final test error of the members with ``p_update = 0.05`` (paper: "trains perfectly",
  read as the ≈ 2 % the rest of the population reaches). "holds" if ≤ 3 % at the end
  *and* worse than ``p_update = 1`` at the first snapshot (slower).

Because a preset's number of steps is far below the paper's 500k, each cell also records
``error_at_p1`` (the same population's ``p_update = 1`` members), so the *relative* claim
— sparse updates cost little — can be read even where the absolute one differs.

What is built. A.1's 4-layer MNIST FCN (3 hidden layers of 256, batch norm, ReLU), DNI
(two hidden layers, :attr:`Config.sg_width_divisor` narrower at ``quick``) or cDNI
(linear, label-conditioned) synthetic gradient models after every layer, trained by
:func:`sgjax.stochastic` with ``p_update`` as a traced argument: at every step each
layer, after its forward pass, does its backward pass and update with probability
``p_update``; a layer that skips sends no gradient down, but the synthetic gradient model
at its output is still fitted to the message the layer above sent. Every member of the
population — ``len(p_values) × seeds`` networks — is one slice of a ``jax.vmap`` over the
train state and ``p_update``, so the whole population is one compiled ``lax.scan`` per
chunk (:func:`experiments.training.train_and_evaluate` with ``seeds=M``). Members with the
same seed share their initialisation (common random numbers across ``p_update``).

Timing (``timing`` in each cell's metrics, and ``fig5-timing.png``): after compiling, the
same ``timing_steps`` steps are run (a) for the whole population in one vmapped program
and (b) member by member with one compiled single-member program (``p_update`` traced, so
it compiles once). We also report the compile times, and (c) = what ``M`` separate
processes would cost: ``M × (single compile + single run)``.

Measured at ``quick`` (4 members, 50 steps, 2 CPU cores shared with other jobs): the
population was *not* cheaper on this CPU. DNI: population 33.0 s to run (+ 141 s compile)
vs 8.6 s one by one (+ 36 s compile; 151 s as 4 separate processes); cDNI: 4.0 s (+ 18 s)
vs 1.2 s (+ 6.6 s; 27.5 s as separate processes). The reason is how ``vmap`` treats
``lax.cond``: batched over members, each stage's "update or skip" becomes a ``select`` that
computes *both* branches, so every member pays for a full backward pass and update at
every step whatever its ``p_update``, while a member run alone skips the work it does not
do (at ``p_update = 0.05`` most of it). Two cores also gain little from batching: one
member's 256×784 matmuls already keep them busy. The population's advantage — one program,
one compile, batched matmuls — is an accelerator's; on a GPU the same code runs the 100
members of ``paper`` in one program.

Reproduce with ``python -m experiments run sparse --preset quick``
(``make reproduce-sparse PRESET=quick``; presets ``smoke``, ``quick``, ``paper``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import sgjax
from experiments import training
from experiments.dni import fcn, table1
from experiments.framework import Cell, CellResult, Experiment

DEPTH = 4
METHODS = ("dni", "cdni")
CLAIM_P = {"dni": 0.2, "cdni": 0.05}
"""The ``p_update`` each claim is about."""
PAPER_ERROR = 2.0
"""Both claims' test error (%), read from the text ("train to 2%", "trains perfectly")."""
TOLERANCE = 1.0
"""A claim "holds" when our error is at most ``PAPER_ERROR + TOLERANCE``."""


@dataclasses.dataclass(frozen=True)
class Config:
    """One preset. ``train``: steps, learning rate, widths, data limits
    (:class:`experiments.dni.table1.Config`); ``p_values``: the population's ``p_update``
    values (each run with every seed of ``seeds``); ``snapshots``: the iteration counts
    at which the population's test errors are plotted (each must be an evaluation step);
    ``timing_steps``: steps timed for the population-vs-one-by-one comparison (0: no
    timing)."""

    train: table1.Config
    p_values: tuple[float, ...]
    seeds: int
    snapshots: tuple[int, ...]
    timing_steps: int


def _paper_p_values(n: int = 100, seed: int = 0) -> tuple[float, ...]:
    """``n`` values uniform in (0, 1] (the paper's 100 runs), plus the two claims' values."""
    rng = np.random.default_rng(seed)
    values = 1.0 - rng.uniform(0.0, 1.0, n - 2)  # (0, 1]: p_update = 0 never trains
    return tuple(sorted({*map(float, np.round(values, 4)), *CLAIM_P.values()}))


PRESETS = {
    "smoke": Config(train=table1.SMOKE, p_values=(0.05, 0.2, 1.0), seeds=1,
                    snapshots=(2, 4), timing_steps=0),
    "quick": Config(
        train=table1.Config(steps=1_500, lr=3e-4, lr_boundaries=(900, 1_200),
                            eval_every=500, chunk=250, sg_width_divisor=4),
        p_values=(0.05, 0.2, 0.5, 1.0), seeds=1, snapshots=(500, 1_000, 1_500),
        timing_steps=50),
    "paper": Config(train=table1.PAPER_CONFIG, p_values=_paper_p_values(), seeds=1,
                    snapshots=(50_000, 100_000, 250_000, 500_000), timing_steps=1_000),
}
PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: 4 steps, widths / 8, 3 members",
    "quick": ("A.1's 4-layer FCN, DNI models 4× narrower (2 × 256), batch 256, Adam 3e-4 "
              "(paper 3e-5) for 1.5k steps (paper 500k), ÷10 at 60 %/80 %; 4 p_update values "
              "(0.05, 0.2, 0.5, 1) × 1 seed = 4 members per method (CPU time: a member-step "
              "costs about 10 ms unloaded)"),
    "paper": "A.1's protocol; 100 p_update values uniform in (0, 1] (plus 0.05 and 0.2)",
}


def cells(preset: str) -> list[Cell]:
    return [Cell(m, row=f"MNIST FCN {DEPTH}, p_update = {CLAIM_P[m]:g}",
                 column={"dni": "DNI", "cdni": "cDNI"}[m], params={"method": m},
                 paper=PAPER_ERROR) for m in METHODS]


class Member(NamedTuple):
    """One member of the population: its train state and its ``p_update``."""

    train: sgjax.TrainState
    p_update: jax.Array


def member_step(schedule: sgjax.Schedule):
    """``step(member, x, y, key) -> (member, info)``: one stochastic step at the member's
    own ``p_update`` (a traced value, so the step can be vmapped over it)."""

    def step(member, x, y, key):
        ts, info = schedule.step(member.train, x, y, key, member.p_update)
        return Member(ts, member.p_update), {"loss": info["loss"]}

    return step


def population(config: Config) -> tuple[np.ndarray, np.ndarray]:
    """``(p_update, seed)`` of every member, ``(M,)`` each: every value for every seed."""
    p = np.tile(np.asarray(config.p_values, np.float32), config.seeds)
    s = np.repeat(np.arange(config.seeds), len(config.p_values))
    return p, s


def make_split(method: str, config: table1.Config, input_shape) -> sgjax.Split:
    layers = table1.make_layers("mnist", "fcn", DEPTH, config)
    feedback = sgjax.feedback.synthetic(table1.make_predictor("mnist", "fcn", method, config))
    return fcn.fcn_split(DEPTH, "every", feedback, config, input_shape, layers=layers)


def init_population(schedule, key, p, seeds, x0, y0) -> Member:
    """Members initialised with ``fold_in(key, seed)``: equal seeds, equal networks."""
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.asarray(seeds))
    ts = jax.vmap(lambda k: schedule.init(k, x0, y0))(keys)
    return Member(ts, jnp.asarray(p, jnp.float32))


def _chunk_runner(step, batch_fn, vmapped: bool, compiler_options=None):
    """A compiled ``run(state, steps, data=(data, keys))`` of ``len(steps)`` steps (as in
    :func:`experiments.training.train_and_evaluate`), vmapped over members or not."""
    body = jax.vmap(step) if vmapped else step

    def batch_at(d, t):
        data, k = d
        if vmapped:
            return tuple(jax.vmap(lambda kk: batch_fn(data, jax.random.fold_in(kk, t)))(k))
        return tuple(batch_fn(data, jax.random.fold_in(k, t)))

    return jax.jit(sgjax.fused(body, batch_fn=batch_at),
                   compiler_options=dict(compiler_options or {}) or None)


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t


def time_population(step, state: Member, batch_fn, data, key, steps: int,
                    compiler_options=None) -> dict[str, float]:
    """Seconds to run ``steps`` steps of every member: in one vmapped program, and one
    member at a time with a single compiled single-member program (each measured after
    a first, compiling call)."""
    m = state.p_update.shape[0]
    keys = jax.random.split(key, m)
    ts = jnp.arange(steps)
    pop = _chunk_runner(step, batch_fn, True, compiler_options)
    _, pop_first = _timed(pop, state, ts, data=(data, keys))
    _, pop_run = _timed(pop, state, ts, data=(data, keys))
    one = _chunk_runner(step, batch_fn, False, compiler_options)
    member = lambda i: jax.tree.map(lambda a: a[i], state)  # noqa: E731
    _, one_first = _timed(one, member(0), ts, data=(data, keys[0]))
    one_runs = [_timed(one, member(i), ts, data=(data, keys[i]))[1] for i in range(m)]
    one_run = float(np.sum(one_runs))
    return {
        "members": m, "steps": steps,
        "population_run_s": pop_run, "population_compile_s": max(pop_first - pop_run, 0.0),
        "one_by_one_run_s": one_run,
        "single_compile_s": max(one_first - one_run / m, 0.0),
        "separate_processes_s": m * max(one_first - one_run / m, 0.0) + one_run,
        "speedup_run": one_run / pop_run,
    }


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    cfg, method = config.train, cell.params["method"]
    ds = table1.load_dataset("mnist", cfg.train_limit, cfg.test_limit)
    split = make_split(method, cfg, ds.input_shape)
    schedule = sgjax.stochastic(split, None)
    step = member_step(schedule)
    x_train = jnp.asarray(ds.x_train.reshape(-1, *split.input_shape))
    y_train = jnp.asarray(ds.y_train)
    x_test = jnp.asarray(ds.x_test.reshape(-1, *split.input_shape))
    y_test = jnp.asarray(ds.y_test)
    p, seeds = population(config)
    k_init, k_data, k_time = jax.random.split(ctx.key(), 3)
    state = init_population(schedule, k_init, p, seeds, x_train[:cfg.batch_size],
                            y_train[:cfg.batch_size])
    batch_fn = training.uniform_batches(cfg.batch_size, keyed=True)
    compiler = training.FAST_COMPILE if cfg.fast_compile else None

    timing = None
    if config.timing_steps:
        timing = time_population(step, state, batch_fn, (x_train, y_train), k_time,
                                 config.timing_steps, compiler)

    apply = training.inference_fn(split, compiler_options=compiler, seeds=True)
    snapshots: dict[int, list[float]] = {}

    def evaluate(member, t):
        err = training.evaluate_error(apply, member.train.stages, x_test, y_test)
        snapshots[int(t)] = np.asarray(err).tolist()
        return {"test_error": err}

    _, final = training.train_and_evaluate(
        ctx, step, state, steps=cfg.steps, chunk=cfg.chunk, eval_every=cfg.eval_every,
        eval_at=tuple(s for s in config.snapshots if s <= cfg.steps),
        batch_fn=batch_fn, data=(x_train, y_train), key=k_data, evaluate=evaluate,
        seeds=len(p), compiler_options=compiler)
    errors = np.asarray(final["test_error_per_seed"])
    at = lambda q, e=errors: float(np.mean(e[np.isclose(p, q)]))  # noqa: E731
    claim_p = CLAIM_P[method]
    metric = at(claim_p)
    first = min(snapshots) if snapshots else None
    holds = metric <= PAPER_ERROR + TOLERANCE
    slower = None
    if method == "cdni" and first is not None and np.any(np.isclose(p, 1.0)):
        e0 = np.asarray(snapshots[first])
        slower = bool(at(claim_p, e0) > at(1.0, e0))
        holds = holds and slower
    return {
        "metric": metric, "verdict": "holds" if holds else "differs",
        "error_at_p1": at(1.0) if np.any(np.isclose(p, 1.0)) else None,
        "slower_than_p1_at_first_snapshot": slower,
        "p_update": p.tolist(), "seed": seeds.tolist(), "final_errors": errors.tolist(),
        "snapshots": {str(k): v for k, v in sorted(snapshots.items())},
        "timing": timing,
    }


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``fig5-left``: each member's test error against its ``p_update`` after each
    snapshot's number of iterations, DNI and cDNI side by side (log error axis, as in
    the paper); ``fig5-timing``: the population's run time against one-by-one."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, squeeze=False)[0]
    cmap = __import__("matplotlib").colormaps["viridis"]
    for ax, method in zip(axes, METHODS):
        r = next((r for r in results if r.cell.params["method"] == method), None)
        ax.set_title({"dni": "DNI", "cdni": "cDNI"}[method] + (
            f" — {r.metrics['verdict']}" if r is not None else ""), fontsize="medium")
        if r is None:
            continue
        p = np.asarray(r.metrics["p_update"])
        snaps = sorted(r.metrics["snapshots"].items(), key=lambda kv: int(kv[0]))
        snaps = [(k, v) for k, v in snaps if int(k) in config.snapshots] or snaps
        for i, (step, err) in enumerate(snaps):
            ax.scatter(p, err, s=14, color=cmap(i / max(len(snaps) - 1, 1)),
                       label=f"{int(step):,} iterations")
        ax.axhline(PAPER_ERROR, color="k", ls=":", lw=1, label="paper's 2 %")
        ax.axvline(CLAIM_P[method], color="tab:red", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("p_update")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("test error (%)")
    fig.suptitle(f"DNI Fig. 5 (left): {DEPTH}-layer MNIST FCN, stochastic updates",
                 fontsize="medium")

    tfig = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = tfig.add_subplot()
    labels, pop, one, procs = [], [], [], []
    for r in results:
        t = r.metrics.get("timing")
        if not t:
            continue
        labels.append(f"{r.cell.column}\n{t['members']} members × {t['steps']} steps")
        pop.append(t["population_run_s"])
        one.append(t["one_by_one_run_s"])
        procs.append(t["separate_processes_s"])
    x = np.arange(len(labels))
    ax.bar(x - 0.27, pop, 0.27, label="population (one vmapped program)")
    ax.bar(x, one, 0.27, label="one by one (same compiled program)")
    ax.bar(x + 0.27, procs, 0.27, label="separate processes (compile each)")
    ax.set_xticks(x, labels, fontsize="small")
    ax.set_ylabel("seconds")
    ax.legend(fontsize="x-small")
    ax.set_title("Population vs members one by one (after compiling)", fontsize="medium")
    return {"fig5-left": fig, "fig5-timing": tfig}


EXPERIMENT = Experiment(
    name="sparse",
    paper="DNI (Jaderberg et al. 2016)",
    title="Fig. 5 (left): sparse (stochastic) updates with every-layer DNI / cDNI",
    metric="test error (%)",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("one cell = the whole population (every p_update × seed), one vmapped program; "
           "metric = mean final test error of the members at the claim's p_update; paper "
           f"= 2 % read from §3.1's text; verdict 'holds' if ≤ {PAPER_ERROR + TOLERANCE:g} % "
           "(cDNI: and slower than p_update = 1 at the first snapshot)"),
    preset_notes=PRESET_NOTES,
)
