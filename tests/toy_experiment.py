"""A tiny deterministic experiment used by tests/test_framework.py and tests/test_cli.py.

Each cell moves ``w`` halfway to ``params["target"]`` per step; the metric is the final ``w``
times ``config.scale``. Module-level switches let tests make it diverge or be interrupted.
"""

from __future__ import annotations

import dataclasses
import os
import signal

import jax.numpy as jnp

from experiments import data
from experiments.framework import Cell, Experiment

CALLS: list[str] = []  # cell ids in the order run_cell was called
STARTS: dict[str, int] = {}  # step each cell started from (non-zero after a resume)
DIVERGE = False  # make the loss NaN at the first step
INTERRUPT_AT: int | None = None  # interrupt the run after checkpointing this step...
INTERRUPT_WITH = "sigint"  # ...as Ctrl-C does ("sigint") or as `kill` does ("sigterm")
LOAD_DATA: str | None = None  # load this dataset (experiments.data.load) first, like a real cell


def isolate(monkeypatch) -> None:
    """Make the registry see only this experiment and reset its switches and records (the
    body of the autouse fixture of every test file that runs it)."""
    from experiments import registry

    monkeypatch.setenv(registry.ENV_ONLY, "toy_experiment")
    monkeypatch.delenv(registry.ENV_EXTRA, raising=False)
    CALLS.clear()
    STARTS.clear()
    module = globals()
    for name, value in (("DIVERGE", False), ("INTERRUPT_AT", None), ("LOAD_DATA", None)):
        monkeypatch.setitem(module, name, value)


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int
    scale: float = 1.0


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    CALLS.append(cell.id)
    if LOAD_DATA is not None:
        data.load(LOAD_DATA, train_limit=8, test_limit=8)
    target = jnp.float32(cell.params["target"])
    state = {"w": jnp.zeros((), jnp.float32), "key": ctx.key()}
    start, state = ctx.restore(state)
    STARTS[cell.id] = start
    for step in ctx.progress(config.steps, start=start):
        loss = (state["w"] - target) ** 2
        if DIVERGE:
            loss = loss * jnp.nan
        state = {**state, "w": state["w"] + 0.5 * (target - state["w"])}
        ctx.log(step + 1, loss=loss)
        ctx.save(step + 1, state, force=True)
        if INTERRUPT_AT == step + 1:
            if INTERRUPT_WITH == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
    return {"metric": float(state["w"]) * config.scale, "final_loss": float(loss)}


EXPERIMENT = Experiment(
    name="toy",
    paper="Toy (tests only)",
    title="Toy table: halfway steps to a target",
    metric="final w",
    cells=[
        Cell("a-x", "A", "x", {"target": 1.0}, paper=1.0),
        Cell("a-y", "A", "y", {"target": 2.0}, paper=2.0),
        Cell("b-x", "B", "x", {"target": 4.0}, paper=3.5),
        Cell("b-y", "B", "y", {"target": 8.0}),
    ],
    presets={"smoke": Config(steps=3), "quick": Config(steps=5), "paper": Config(steps=8)},
    run_cell=run_cell,
    notes="not a paper result",
)
