"""experiments.training.train_and_evaluate's steering hooks: an ``evaluate`` that returns an
:class:`~experiments.training.Evaluation` replaces the state (a curriculum) and stops
training early; a run resumed after an early stop does no further steps (``stopped``)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from experiments import framework, training
from experiments.framework import Cell


def _ctx(tmp_path, name="c"):
    return framework.RunContext(
        experiment="toy", preset="smoke", cell=Cell(name, "r", "c"), seed=0, out_dir=tmp_path,
        checkpoint_dir=tmp_path / "checkpoints" / name, checkpoint_interval_s=0.0,
        fingerprint={"cell": name})


def _step(state, batch):
    """Adds the state's level to a running sum each step; counts steps."""
    del batch
    return {**state, "sum": state["sum"] + state["level"], "n": state["n"] + 1}, {}


def _curriculum(stop_at_level):
    """Every evaluation moves to the next level, and stops once ``stop_at_level`` is
    reached; the evaluations it saw are logged."""

    def evaluate(state, step):
        level = int(state["level"]) + 1
        return training.Evaluation({"level": level}, {**state, "level": jnp.int32(level)},
                                   stop=level >= stop_at_level)

    return evaluate


def _state():
    zero = jnp.zeros((), jnp.int32)
    return {"level": zero, "sum": zero, "n": zero}  # one zeros array thrice: not donatable


def _run(ctx, stop_at_level, steps=20):
    return training.train_and_evaluate(
        ctx, _step, _state(), steps=steps, chunk=3, eval_every=5,
        evaluate=_curriculum(stop_at_level), metrics=(),
        stopped=lambda s: int(s["level"]) >= stop_at_level)


def test_evaluation_replaces_the_state_and_stops(tmp_path):
    ctx = _ctx(tmp_path)
    state, final = _run(ctx, stop_at_level=3)
    # levels 0, 1, 2 for 5 steps each, then the third evaluation stops at step 15
    assert int(state["n"]) == 15 and int(state["level"]) == 3
    assert int(state["sum"]) == 5 * (0 + 1 + 2)
    assert [s for s, _ in ctx.curves["level"]] == [5, 10, 15]
    assert final["level"] == 3


def test_without_stop_the_loop_runs_to_the_end(tmp_path):
    state, _ = _run(_ctx(tmp_path), stop_at_level=100)
    assert int(state["n"]) == 20 and int(state["level"]) == 4


def test_resumed_after_an_early_stop_does_no_more_steps(tmp_path):
    _run(_ctx(tmp_path, "r"), stop_at_level=3)
    again = _ctx(tmp_path, "r")
    state, final = _run(again, stop_at_level=3)
    assert again.resumed_from_step == 15
    assert int(state["n"]) == 15 and int(state["sum"]) == 15
    assert final["level"] == 4  # the final evaluation of a resumed, finished run


@pytest.mark.parametrize("bad", [object(), 3])
def test_a_non_trainer_is_one_clear_error(tmp_path, bad):
    with pytest.raises(TypeError, match="needs a trainer or a step function"):
        training.train_and_evaluate(_ctx(tmp_path), bad, _state(), steps=2, chunk=1)
