"""Wall-clock time to a target test error: decoupled stages on K devices against
backprop on one (DNI, Jaderberg et al. 2016, §1: "The possibility to parallelise training
of currently sequential systems could hugely speed up computation time").

The promise, end to end. Cut a network into ``K`` stages joined by synthetic gradient
models and run them with the pipelined schedule (:class:`sgjax.Runner`,
``schedule="pipelined"``, the staleness stated in :mod:`sgjax.train`): on every tick each
stage updates on what its neighbours sent on the previous tick, so with stage *k* on
device *k* the ``K`` stages compute at the same time. Does that reach a given test error
sooner, in seconds, than backprop on one device?

The cells (one training each; ``K`` in :attr:`Config.stages`):

* ``bprop-1dev``: backprop (the uncut network, :func:`sgjax.sync`, one fused program per
  chunk) on one device: the baseline.
* ``cdni-k<K>-1dev``: the network cut into ``K`` stages with cDNI (linear synthetic
  gradient models conditioned on the labels: strong on MNIST), the pipelined Runner with
  every stage on ONE device: the same arithmetic as the next cell, no overlap. Against
  ``bprop-1dev`` it shows what the synthetic gradient models and staleness cost; against
  the next cell, what overlap buys.
* ``cdni-k<K>-<K>dev``: the same, stage *k* on device *k* (one SPMD program over a
  ``stage`` mesh axis, :mod:`sgjax.mesh`).

The network (:func:`network`): an MNIST FCN of :attr:`Config.depth` layers of
:attr:`Config.width` units (linear, batch norm, ReLU; A.1's block), Adam, batch
:attr:`Config.batch_size` drawn uniformly with replacement from the device-resident
training set. The ``K`` stages are cut where the slowest stage is cheapest
(:func:`balanced_cuts`: multiply-adds of the layers and of the synthetic gradient model
at each cut), because a pipeline runs at the pace of its slowest stage.

The clock (:func:`train`). Each cell trains for :attr:`Config.steps` steps in chunks of
:attr:`Config.eval_every` steps, one compiled dispatch per chunk (:func:`sgjax.fused`),
and measures the test error after every chunk. The clock counts only the chunks
(dispatch to ``block_until_ready``): compilation (ahead of time, before the clock
starts), one warm-up execution of the compiled chunk (its result discarded: a first
execution pays one-time costs) and evaluation are excluded, so the time to target is the
training time backprop or the decoupled stages need, at ``eval_every`` steps'
resolution. Each cell
also records steps per second, the process's CPU seconds while training (overlap on
several devices uses more cores at once), compile seconds and the final error.

Where it runs. Forced CPU devices must be set before jax starts, so every cell trains in
a subprocess (``python -m experiments.dni.wallclock --worker SPEC``, with a timeout):
with :attr:`Config.forced_cpu_devices` it gets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (``N`` = the largest ``K`` of
the preset, the same for every cell so that only placement differs) and
``JAX_PLATFORMS=cpu``; otherwise it uses the default backend's real devices and a
``K``-device cell needs ``K`` of them (a clear error, never a silent fallback to fewer).

Limits, stated with every report (:data:`LIMITS`). On a CPU the forced devices are
threads of one process sharing this machine's cores, and XLA's CPU matrix products are
already multi-threaded, so the overlap has few idle cores to fill: the speed-up measured
here is bounded by the cores there are (two on the machine ``quick`` was calibrated on,
with other work on them), not by the method. On an accelerator with ``K`` real devices it
is not; ``paper`` is that run. With a single accelerator, only the one-device cells can
run (``--only bprop-1dev 'cdni-*-1dev'``); the ``K``-device cells fail with a clear error
rather than measuring something else.

Reproduce with ``python -m experiments run wallclock --preset quick``
(``make reproduce-wallclock PRESET=quick``; presets ``smoke``, ``quick``, ``paper``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.framework import Cell, CellResult, Claim, Experiment

NUM_CLASSES = 10
INPUT_SIZE = 784


@dataclasses.dataclass(frozen=True)
class Config:
    """One preset.

    ``depth``/``width``: layers and hidden units of the MNIST FCN; ``stages``: the
    numbers of stages ``K`` compared (each gives a one-device and a ``K``-device cell);
    ``steps``/``eval_every``: training steps and steps per compiled chunk (the test error
    is measured after each chunk); ``target``: the test error (%) whose time is measured;
    ``lr``: Adam's learning rate (constant); ``train_limit``/``test_limit``: first
    examples kept (``None``: all); ``forced_cpu_devices``: the devices are forced CPU
    devices (``True``) or the default backend's real ones (``False``); ``timeout_s``: a
    cell's subprocess is stopped after this many seconds.
    """

    depth: int
    width: int
    stages: tuple[int, ...]
    steps: int
    eval_every: int
    target: float
    lr: float = 1e-3
    batch_size: int = 256
    train_limit: int | None = None
    test_limit: int | None = None
    forced_cpu_devices: bool = True
    timeout_s: float = 1_800.0


PRESETS = {
    "smoke": Config(depth=3, width=32, stages=(2,), steps=8, eval_every=4, target=100.0,
                    batch_size=32, train_limit=512, test_limit=256, timeout_s=300.0),
    "quick": Config(depth=5, width=512, stages=(2, 4), steps=1_200, eval_every=100,
                    target=3.0, timeout_s=900.0),
    "paper": Config(depth=7, width=2048, stages=(2, 4), steps=5_000, eval_every=250,
                    target=2.5, forced_cpu_devices=False),
}
PRESET_NOTES = {
    "smoke": "wiring only, numbers mean nothing: 3 layers of 32 units, 8 steps, 2 stages",
    "quick": ("MNIST FCN 5 (4 × 512 hidden units, batch norm), batch 256, Adam 1e-3, "
              "1.2k steps, test error every 100 steps, target 3 %; K = 2 and 4 stages on 2 and 4 "
              "forced CPU devices that share this machine's cores (see the limits)"),
    "paper": ("for an accelerator with at least 4 devices: MNIST FCN 7 (6 × 2048), 5k "
              "steps, target 2.5 % (not yet calibrated on an accelerator); with fewer "
              "devices run only the one-device cells (--only bprop-1dev 'cdni-*-1dev')"),
}

LIMITS = (
    "training time only (compilation, one warm-up chunk and evaluation excluded), at "
    "eval_every steps' resolution; forced CPU devices are threads of one process sharing "
    "the machine's cores, and XLA's CPU matrix products are multi-threaded already, so "
    "the speed-up on a CPU is bounded by its idle cores (2 cores, shared with other work, "
    "at quick), not by the method; K real accelerator devices (paper) have no such bound; "
    "one seed")


# --------------------------------------------------------------------------- cells


def cell_id(method: str, k: int = 1, devices: int = 1) -> str:
    """``bprop-1dev``, ``cdni-k2-1dev``, ``cdni-k2-2dev`` …"""
    return "bprop-1dev" if method == "bprop" else f"cdni-k{k}-{devices}dev"


def cells(preset: str) -> list[Cell]:
    config = PRESETS[preset]
    net = f"MNIST FCN {config.depth} × {config.width}"
    out = [Cell(cell_id("bprop"), row=f"{net}, backprop", column="1 device",
                params={"method": "bprop", "stages": 1, "devices": 1})]
    for k in config.stages:
        for n in (1, k):
            out.append(Cell(cell_id("cdni", k, n), row=f"{net}, cDNI pipelined, {k} stages",
                            column=f"{n} device" + ("s" if n > 1 else ""),
                            params={"method": "cdni", "stages": k, "devices": n}))
    return out


# --------------------------------------------------------------------------- the network


def layer_sizes(depth: int, width: int) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of each of the FCN's ``depth`` dense layers."""
    if depth < 2:
        raise ValueError(f"depth={depth}: the FCN needs at least 2 layers to be cut")
    ins = [INPUT_SIZE] + [width] * (depth - 1)
    outs = [width] * (depth - 1) + [NUM_CLASSES]
    return list(zip(ins, outs))


def balanced_cuts(depth: int, width: int, k: int) -> tuple[int, ...]:
    """The ``k − 1`` cuts (layer indices, as :func:`sgjax.split_at` takes them) whose
    slowest stage is cheapest. A stage's cost is the multiply-adds of its dense layers
    plus, below each cut, those of the linear cDNI model (``(width + classes) × width``),
    all times three (forward, backward, update); ties go to the earliest cuts."""
    sizes = layer_sizes(depth, width)
    if not 1 <= k <= depth:
        raise ValueError(f"stages={k}: a {depth}-layer FCN can be cut into 1..{depth} stages")
    layer_cost = [i * o for i, o in sizes]
    sg_cost = (width + NUM_CLASSES) * width

    def slowest(cuts):
        bounds = (0, *cuts, depth)
        return max(sum(layer_cost[a:b]) + (sg_cost if b < depth else 0)
                   for a, b in zip(bounds, bounds[1:]))

    return min(itertools.combinations(range(1, depth), k - 1), key=slowest)


def network(config: Config, method: str, k: int):
    """The :class:`sgjax.Split` of one cell: uncut for ``bprop``, cut at
    :func:`balanced_cuts` with linear label-conditioned synthetic gradient models for
    ``cdni``."""
    import optax

    import sgjax
    from experiments import training

    layers = training.mlp_layers(config.depth, config.width, NUM_CLASSES)
    cuts = () if method == "bprop" else balanced_cuts(config.depth, config.width, k)
    feedback = None if method == "bprop" else sgjax.feedback.synthetic(
        sgjax.predictors.linear(conditioned=True))
    return sgjax.split_at(layers, cuts, feedback=feedback,
                          loss=sgjax.losses.softmax_cross_entropy,
                          optimizer=optax.adam(config.lr), input_shape=(INPUT_SIZE,),
                          batch_size=config.batch_size, num_classes=NUM_CLASSES)


# --------------------------------------------------------------------------- the worker


def train(config: Config, method: str, k: int, n_devices: int, seed: int) -> dict[str, Any]:
    """Train one cell in this process and time it (see the module docstring's clock).

    Returns JSON data: ``curve`` (``[step, training seconds, test error %]`` from step 0),
    ``time_to_target_s``/``steps_to_target`` (the first evaluation after training at or
    below the target; ``None`` if none is), ``train_s``, ``cpu_s``, ``compile_s``,
    ``warmup_s`` (the discarded first execution), ``steps_per_s``, ``final_error``,
    ``devices``, ``cuts``."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import sgjax
    from experiments import data, training

    devices = jax.devices()
    if config.forced_cpu_devices and devices[0].platform != "cpu":
        raise RuntimeError(f"forced CPU devices were asked for, but jax runs on "
                           f"{devices[0].platform}")
    if len(devices) < n_devices:
        raise RuntimeError(
            f"this cell needs {n_devices} devices and jax sees {len(devices)} "
            f"({devices[0].platform}); run it on a machine with {n_devices} devices, or run "
            "only the one-device cells (--only bprop-1dev 'cdni-*-1dev')")
    used = devices[:n_devices]

    ds = data.load("mnist", train_limit=config.train_limit, test_limit=config.test_limit,
                   progress=False)
    # The data and the per-step keys sit on every device the program runs on (replicated):
    # each step's batch is gathered inside the compiled chunk.
    where = used[0] if n_devices == 1 else NamedSharding(Mesh(np.array(used), ("d",)),
                                                         PartitionSpec())
    x_train = jax.device_put(ds.x_train.reshape(-1, INPUT_SIZE).astype(np.float32), where)
    y_train = jax.device_put(ds.y_train, where)
    x_test = ds.x_test.reshape(-1, INPUT_SIZE).astype(np.float32)
    y_test = np.asarray(ds.y_test)

    split = network(config, method, k)
    if method == "bprop":
        trainer = sgjax.sync(split)
        infer = jax.jit(split.apply)
        apply = lambda state, x: infer(state.stages, x)  # noqa: E731
    else:
        trainer = sgjax.Runner(split, schedule="pipelined", devices=used)
        apply = trainer.apply

    k_init, k_data = jax.random.split(jax.random.key(seed))
    b = config.batch_size
    with jax.default_device(used[0]):
        state = trainer.init(k_init, sgjax.Batch(x_train[:b], y_train[:b]))
    run = sgjax.fused(trainer, batch_fn=training.uniform_batches(b))

    def chunk_keys(c):
        return jax.device_put(jax.random.split(jax.random.fold_in(k_data, c),
                                               config.eval_every), where)

    t0 = time.perf_counter()
    compiled = run.lower(state, chunk_keys(0), (x_train, y_train)).compile()
    compile_s = time.perf_counter() - t0
    # A compiled program's first execution pays one-time costs (buffers, thread pools):
    # one chunk on keys no training chunk uses, its result discarded, keeps them off the
    # clock.
    t0 = time.perf_counter()
    unused = config.steps // config.eval_every
    jax.block_until_ready(compiled(state, chunk_keys(unused), (x_train, y_train)))
    warmup_s = time.perf_counter() - t0

    def test_error(state) -> float:
        wrong, n = 0, x_test.shape[0]
        for i in range(0, n, 1000):
            logits = np.asarray(apply(state, x_test[i:i + 1000]))
            wrong += int(np.sum(logits.argmax(-1) != y_test[i:i + 1000]))
        return 100.0 * wrong / n

    curve = [[0, 0.0, test_error(state)]]
    train_s = cpu_s = 0.0
    for c in range(config.steps // config.eval_every):
        keys = chunk_keys(c)
        jax.block_until_ready(keys)
        wall, cpu = time.perf_counter(), time.process_time()
        state, _ = compiled(state, keys, (x_train, y_train))
        jax.block_until_ready(state)
        train_s += time.perf_counter() - wall
        cpu_s += time.process_time() - cpu
        curve.append([(c + 1) * config.eval_every, train_s, test_error(state)])

    reached = next((p for p in curve[1:] if p[2] <= config.target), None)
    steps = curve[-1][0]
    return {
        "curve": curve,
        "time_to_target_s": reached[1] if reached else None,
        "steps_to_target": reached[0] if reached else None,
        "train_s": train_s, "cpu_s": cpu_s, "compile_s": compile_s, "warmup_s": warmup_s,
        "steps_per_s": steps / train_s if train_s > 0 else None,
        "final_error": curve[-1][2],
        "devices": [str(d) for d in used], "platform": used[0].platform,
        "device_count": len(devices),
        "cuts": list(split.cuts) if hasattr(split, "cuts") else None,
    }


def _worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    cfg = spec["config"]
    config = Config(**{**cfg, "stages": tuple(cfg["stages"])})
    result = train(config, spec["method"], spec["stages"], spec["devices"], spec["seed"])
    Path(out_path).write_text(json.dumps(result))


def worker_env(config: Config) -> dict[str, str]:
    """The subprocess's environment: forced CPU devices (as many as the largest ``K``)
    when :attr:`Config.forced_cpu_devices`, and this checkout on ``PYTHONPATH``."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if config.forced_cpu_devices:
        n = max((1, *config.stages))
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def run_in_subprocess(config: Config, method: str, k: int, n_devices: int,
                      seed: int) -> dict[str, Any]:
    """:func:`train` in a fresh Python process (so the XLA flags take effect), stopped
    after :attr:`Config.timeout_s`; a failure raises one ``RuntimeError`` with the end
    of the worker's output."""
    with tempfile.TemporaryDirectory(prefix="wallclock-") as tmp:
        spec, out = Path(tmp, "spec.json"), Path(tmp, "result.json")
        spec.write_text(json.dumps({"config": dataclasses.asdict(config), "method": method,
                                    "stages": k, "devices": n_devices, "seed": seed}))
        cmd = [sys.executable, "-m", "experiments.dni.wallclock", "--worker", str(spec),
               str(out)]
        what = f"wallclock worker ({method}, {k} stages, {n_devices} devices)"
        try:
            proc = subprocess.run(cmd, env=worker_env(config), capture_output=True,
                                  text=True, timeout=config.timeout_s)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"{what} ran past timeout_s={config.timeout_s:g} s; give it "
                               "more (--set timeout_s=...) or fewer steps") from e
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
            raise RuntimeError(f"{what} failed with exit code {proc.returncode}:\n{tail}")
        return json.loads(out.read_text())


def run_cell(cell: Cell, config: Config, ctx) -> dict[str, Any]:
    p = cell.params
    result = run_in_subprocess(config, p["method"], p["stages"], p["devices"], ctx.seed)
    for step, seconds, error in result["curve"]:
        ctx.log(step, test_error=error, train_seconds=seconds)
    if result["time_to_target_s"] is None:
        raise RuntimeError(
            f"{cell.id} did not reach the target test error {config.target:g} % in "
            f"{config.steps} steps (final {result['final_error']:.2f} %), so it has no time "
            "to target: give it more steps (--set steps=...) or a higher target "
            "(--set target=...)")
    metrics = {k: v for k, v in result.items() if k != "curve"}
    return {"metric": result["time_to_target_s"], **metrics}


# --------------------------------------------------------------------------- claims


STRICTLY = 1e-3
"""The lead (seconds) a faster cell needs: one millisecond, so that a tie never holds."""
PROMISE = ("The possibility to parallelise training of currently sequential systems could "
           "hugely speed up computation time.")


def claims(preset: str) -> list[Claim]:
    """Per ``K``: the decoupled stages on ``K`` devices reach the target sooner than
    backprop on one device (the promise), and sooner than the same stages on one device
    (the overlap, with staleness and synthetic gradient models the same on both sides).
    Strict orderings of the training seconds to the target (:data:`STRICTLY`: the paper
    gives no number, so any measurable lead holds); :data:`LIMITS` bounds what a CPU can
    show."""
    out = []
    for k in PRESETS[preset].stages:
        cause = CAUSES.get((preset, k), "")
        out += [
            Claim.less(f"k{k}-devices-beat-bprop", PROMISE, cell_id("cdni", k, k),
                       cell_id("bprop"), margin=STRICTLY, cause=cause),
            Claim.less(f"k{k}-devices-beat-one-device", PROMISE, cell_id("cdni", k, k),
                       cell_id("cdni", k, 1), margin=STRICTLY, cause=cause),
        ]
    return out


_CPU_CAUSE = (
    "cores, not the method, as far as measured: forced CPU devices are threads of one "
    "process that share this machine's 2 cores (and XLA's CPU matrix products already use "
    "both), so K devices can only overlap on idle cores; compare each cell's cpu_s with "
    "its train_s (CPU-seconds per training second) and its steps_per_s with the "
    "one-device control's. The steps each cell needed to reach the target (the figure's "
    "right panel) separate what staleness and the synthetic gradient models cost from "
    "what the placement costs. A machine with K idle cores or K accelerators is the test "
    "(make bench's throughput model predicts it from per-stage times)")

CAUSES: dict[tuple[str, int], str] = {("quick", 2): _CPU_CAUSE, ("quick", 4): _CPU_CAUSE}
"""Cause of a "differs", per ``(preset, K)``, found at ``quick``; the numbers it points to
are in ``reports/wallclock/``."""


# --------------------------------------------------------------------------- figures


def _label(cell: Cell) -> str:
    p = cell.params
    if p["method"] == "bprop":
        return "backprop, 1 device"
    return (f"cDNI pipelined, {p['stages']} stages on {p['devices']} "
            f"device{'s' if p['devices'] > 1 else ''}")


def speedups(results: Sequence[CellResult]) -> dict[str, float]:
    """Backprop's training seconds to the target ÷ each decoupled cell's (above 1: the
    decoupled stages got there sooner), by cell id, for the cells that have both."""
    by = {r.cell.id: r.metrics.get("time_to_target_s") for r in results}
    base = by.get(cell_id("bprop"))
    if not base:
        return {}
    return {c: base / t for c, t in by.items() if c != cell_id("bprop") and t}


def figures(results: Sequence[CellResult], config: Config) -> dict[str, Any]:
    """``wallclock``: test error against training seconds (compilation, warm-up and
    evaluation excluded; each decoupled cell's speed-up over backprop in its legend
    entry) and against steps (what staleness and the synthetic gradient models cost per
    step, whatever the devices), the target marked; log error axes."""
    from matplotlib.figure import Figure

    from experiments.framework.reports import log_axis

    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    by_time, by_step = fig.subplots(1, 2)
    styles = {1: "-", 2: "--", 4: ":"}
    ratio = speedups(results)
    for r in results:
        to_target = r.metrics.get("time_to_target_s")
        seconds, errors = r.curves.get("train_seconds"), r.curves.get("test_error")
        if seconds is None or errors is None:
            continue
        p = r.cell.params
        style = dict(color="0.3" if p["method"] == "bprop" else (
            "tab:blue" if p["devices"] == 1 else "tab:green"), marker=".",
            ls=styles.get(p["stages"], "-."))
        label = _label(r.cell) + (f": {to_target:.3g} s to target" if to_target else "")
        if r.cell.id in ratio:
            label += f" (backprop ÷ this = {ratio[r.cell.id]:.2f})"
        by_time.plot(seconds.value, errors.value, label=label, **style)
        steps = r.metrics.get("steps_to_target")
        by_step.plot(errors.step, errors.value, **style, label=_label(r.cell) + (
            f": {steps} steps to target" if steps else ""))
    for ax, xlabel in ((by_time, "training seconds (compilation, warm-up and evaluation "
                                 "excluded)"), (by_step, "step")):
        ax.axhline(config.target, color="tab:red", lw=0.8, ls="--",
                   label=f"target {config.target:g} %")
        log_axis(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test error (%, log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    by_time.set_title("against wall-clock time: what overlap buys", fontsize="small")
    by_step.set_title("against steps: what staleness and synthetic gradients cost\n"
                      "(1 or K devices: the same numbers, the curves coincide)",
                      fontsize="small")
    where = ("forced CPU devices sharing this machine's cores" if config.forced_cpu_devices
             else "one accelerator device each")
    fig.suptitle(f"MNIST FCN {config.depth} × {config.width}: time to {config.target:g} % "
                 f"test error, decoupled stages ({where}) vs backprop on one device",
                 fontsize="medium")
    return {"wallclock": fig}


EXPERIMENT = Experiment(
    name="wallclock",
    paper="DNI (Jaderberg et al. 2016)",
    title="Wall-clock time to a target test error: decoupled stages on K devices vs backprop",
    metric="training seconds to the target test error",
    cells=cells,
    presets=PRESETS,
    run_cell=run_cell,
    figures=figures,
    notes=("metric = training seconds to the preset's target test error (results.csv also "
           "has steps_per_s, cpu_s, compile_s, final_error); limits: " + LIMITS),
    preset_notes=PRESET_NOTES,
    claims=claims,
)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        raise SystemExit("usage: python -m experiments.dni.wallclock --worker SPEC.json "
                         "OUT.json (run by the wallclock experiment; use "
                         "python -m experiments run wallclock)")
    _worker(sys.argv[2], sys.argv[3])
