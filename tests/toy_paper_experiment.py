"""A tiny deterministic experiment for tests/test_paper_tooling.py: like ``toy_experiment``
(``w`` moves halfway to ``params["target"]`` per step) but with evaluations every
``config.eval_every`` steps, and switches that reach worker processes (environment
variables): ``TOYPAPER_SLEEP`` seconds per step (so a time limit bites; not part of the
config, so a rerun without it resumes the same cell) and ``TOYPAPER_CRASH`` (comma-separated
cell ids that raise).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax.numpy as jnp

from experiments.framework import Cell, Experiment

SLEEP = "TOYPAPER_SLEEP"
CRASH = "TOYPAPER_CRASH"


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int
    eval_every: int = 2


def run_cell(cell: Cell, config: Config, ctx) -> dict:
    if cell.id in os.environ.get(CRASH, "").split(","):
        raise ValueError(f"boom in {cell.id}")
    sleep = float(os.environ.get(SLEEP, "0"))
    target = jnp.float32(cell.params["target"])
    state = {"w": jnp.zeros((), jnp.float32), "key": ctx.key()}
    start, state = ctx.restore(state)
    loss = (state["w"] - target) ** 2
    for step in ctx.progress(config.steps, start=start):
        time.sleep(sleep)
        state = {**state, "w": state["w"] + 0.5 * (target - state["w"])}
        loss = (state["w"] - target) ** 2
        if (step + 1) % config.eval_every == 0:
            ctx.log(step + 1, loss=loss, w=state["w"])
            ctx.save(step + 1, state)
    return {"metric": float(state["w"]), "final_loss": float(loss)}


EXPERIMENT = Experiment(
    name="toypaper",
    paper="Toy (tests only)",
    title="Toy table for the paper-run tooling",
    metric="final w",
    cells=[
        Cell("a-x", "A", "x", {"target": 1.0}, paper=1.0),
        Cell("a-y", "A", "y", {"target": 2.0}, paper=2.0),
        Cell("b-x", "B", "x", {"target": 4.0}, paper=4.0),
    ],
    presets={"smoke": Config(steps=4), "quick": Config(steps=8), "paper": Config(steps=100)},
    run_cell=run_cell,
    notes="not a paper result",
)
