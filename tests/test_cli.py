"""The command line: the default preset, "did you mean", and ``--set KEY=VALUE`` overrides
(parsing to the field's type, nested keys, errors, identity, table.md, workers)."""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import toy_experiment as toy

from experiments import framework, registry
from experiments.__main__ import main
from experiments.framework import UsageError, override, running, with_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _toy(monkeypatch):
    toy.isolate(monkeypatch)


def _record(out: Path, preset: str, cell: str = "a-x") -> dict:
    return json.loads((out / "toy" / preset / "cells" / f"{cell}.json").read_text())


# --------------------------------------------------------------------------- defaults, names


def test_run_without_preset_runs_quick(tmp_path):
    assert main(["run", "toy", "--out", str(tmp_path), "--only", "a-x"]) == 0
    assert toy.CALLS == ["a-x"]
    assert _record(tmp_path, "quick")["config"] == {"steps": 5, "scale": 1.0}
    assert not (tmp_path / "toy" / "smoke").exists()


@pytest.mark.parametrize("argv, expected", [
    (["run", "toyy"], "unknown experiment 'toyy' (did you mean 'toy'?); valid experiments: toy"),
    (["show", "tot"], "unknown experiment 'tot' (did you mean 'toy'?)"),
    (["run", "toy", "--preset", "quik"], "unknown preset 'quik' for experiment 'toy' "
                                         "(did you mean 'quick'?); valid presets: smoke,"),
])
def test_unknown_names_say_did_you_mean(tmp_path, capsys, argv, expected):
    out = ["--out", str(tmp_path)] if argv[0] == "run" else []
    assert main([*argv, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert toy.CALLS == []


def test_a_name_close_to_nothing_gets_no_suggestion(tmp_path, capsys):
    assert main(["run", "zzzzzz", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: unknown experiment 'zzzzzz'; valid experiments: toy\n")


# --------------------------------------------------------------------------- parsing values


class Kind(enum.Enum):
    DNI = "dni"
    CDNI = "cdni"


@dataclasses.dataclass(frozen=True)
class Inner:
    steps: int
    lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Outer:
    steps: int = 10
    lr: float = 0.1
    fast: bool = False
    name: str = "x"
    limit: int | None = None
    end: float | None = 1.0
    widths: tuple[int, ...] = (4, 4)
    arms: tuple[str, ...] = ("dni",)
    pairs: tuple[tuple[int, int], ...] = ((1, 2),)
    pair: tuple[int, str] = (1, "a")
    kind: Kind = Kind.DNI
    train: Inner = Inner(5)
    blocks: Mapping[str, Inner] = dataclasses.field(
        default_factory=lambda: {"mnist-cnn": Inner(3), "cifar": Inner(4)})


@pytest.mark.parametrize("assignment, field, expected", [
    ("steps=200", "steps", 200),
    ("steps=5_000", "steps", 5000),
    ("steps=1e3", "steps", 1000),
    ("lr=3e-4", "lr", 3e-4),
    ("lr=2", "lr", 2.0),
    ("fast=true", "fast", True),
    ("fast=False", "fast", False),
    ("fast=1", "fast", True),
    ("name=1", "name", "1"),
    ("name=a b", "name", "a b"),
    ("name='quoted'", "name", "quoted"),
    ("limit=512", "limit", 512),
    ("limit=None", "limit", None),
    ("limit=none", "limit", None),
    ("end=null", "end", None),
    ("end=0.5", "end", 0.5),
    ("widths=8,16", "widths", (8, 16)),
    ("widths=(8, 16)", "widths", (8, 16)),
    ("widths=[8]", "widths", (8,)),
    ("widths=8", "widths", (8,)),
    ("widths=()", "widths", ()),
    ("arms=dni,cdni", "arms", ("dni", "cdni")),
    ("arms=bprop", "arms", ("bprop",)),
    ("pairs=((3, 4), (5, 6))", "pairs", ((3, 4), (5, 6))),
    ("pair=2,b", "pair", (2, "b")),
    ("kind=cdni", "kind", Kind.CDNI),
    ("kind=CDNI", "kind", Kind.CDNI),
])
def test_set_parses_to_the_field_type(assignment, field, expected):
    new = override(Outer(), [assignment])
    value = getattr(new, field)
    assert value == expected and type(value) is type(expected)
    assert dataclasses.replace(new, **{field: getattr(Outer(), field)}) == Outer()


def test_set_reaches_nested_configs_and_mappings_of_configs():
    new = override(Outer(), ["train.steps=7", "blocks.mnist-cnn.lr=0.5", "steps=1"])
    assert new.train == Inner(7) and new.steps == 1
    assert new.blocks == {"mnist-cnn": Inner(3, 0.5), "cifar": Inner(4)}
    assert Outer().blocks["mnist-cnn"] == Inner(3)  # nothing mutated
    assert override(Outer(), ["blocks={}"]).blocks == {}
    assert override(Outer(), []) == Outer()


@pytest.mark.parametrize("assignment, expected", [
    ("stpes=3", ["unknown key 'stpes'", "did you mean 'steps'?", "valid keys: steps, lr,",
                 "train.…", "blocks.…"]),
    ("train.stps=3", ["unknown key 'stps'", "did you mean 'steps'", "valid keys of train: "
                      "steps, lr"]),
    ("blocks.mnist.steps=3", ["unknown key 'mnist'", "valid keys of blocks: mnist-cnn.…"]),
    ("steps=x", ["steps=x", "bad value for steps (int, now 10)", "whole number"]),
    ("steps=1.5", ["bad value for steps", "whole number"]),
    ("steps=None", ["bad value for steps"]),
    ("lr=fast", ["bad value for lr (float", "expected a number"]),
    ("fast=maybe", ["bad value for fast (bool", "true or false"]),
    ("widths=a,b", ["bad value for widths", "whole number"]),
    ("pair=1", ["bad value for pair", "expected 2 items"]),
    ("kind=x", ["bad value for kind", "dni, cdni"]),
    ("train=3", ["train is a nested config", "--set train.steps=…"]),
    ("blocks.cifar=3", ["blocks.cifar is a nested config"]),
    ("steps.x=3", ["steps is a value, not a nested config"]),
    ("steps", ["expected KEY=VALUE"]),
    ("=3", ["expected KEY=VALUE"]),
])
def test_a_bad_key_or_value_is_one_usage_error_naming_it(assignment, expected):
    with pytest.raises(UsageError) as e:
        override(Outer(), [assignment])
    message = str(e.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message


def test_a_config_that_rejects_the_value_is_a_usage_error():
    @dataclasses.dataclass(frozen=True)
    class Checked:
        steps: int = 1

        def __post_init__(self):
            if self.steps < 1:
                raise ValueError(f"steps must be >= 1, got {self.steps}")

    with pytest.raises(UsageError, match="steps=0: the config rejects it: steps must be"):
        override(Checked(), ["steps=0"])


def test_with_overrides_records_the_assignments_and_leaves_the_experiment_alone():
    exp = with_overrides(toy.EXPERIMENT, "quick", ["steps = 2", "scale=3"])
    assert exp.presets["quick"] == toy.Config(steps=2, scale=3.0)
    assert exp.presets["smoke"] is toy.EXPERIMENT.presets["smoke"]
    assert exp.overrides == {"quick": ("steps=2", "scale=3")}
    assert toy.EXPERIMENT.presets["quick"] == toy.Config(steps=5)
    assert toy.EXPERIMENT.overrides == {}
    assert with_overrides(toy.EXPERIMENT, "quick", []) is toy.EXPERIMENT
    cell = toy.EXPERIMENT.cells_for("quick")[0]
    assert framework.cell_identity(exp, "quick", cell, 0) != framework.cell_identity(
        toy.EXPERIMENT, "quick", cell, 0)


def test_reproduce_command_repeats_the_overrides():
    assert framework.reproduce_command("t", "quick", overrides=["steps=2", "name=a b"]) == (
        "python -m experiments run t --preset quick --set steps=2 --set 'name=a b'")
    assert framework.reproduce_command("t", "quick", make=True, overrides=["a=1", "b=2"]) == (
        "make reproduce-t PRESET=quick SET='a=1 b=2'")
    assert framework.reproduce_command("t", "quick") == "python -m experiments run t --preset quick"


# --------------------------------------------------------------------------- through the CLI


def test_set_changes_the_run_its_identity_and_the_report(tmp_path):
    out = str(tmp_path)
    assert main(["run", "toy", "--out", out, "--only", "a-x", "--set", "steps=1",
                 "--set", "scale=2"]) == 0
    record = _record(tmp_path, "quick")
    assert record["config"] == {"steps": 1, "scale": 2.0}
    assert record["metric"] == 1.0  # one halfway step to 1.0, times 2
    assert record["command"].endswith("--preset quick --set steps=1 --set scale=2")
    table = (tmp_path / "toy" / "quick" / "table.md").read_text()
    assert "- Overrides: `steps=1`, `scale=2` (`--set`)" in table
    assert "run toy --preset quick --set steps=1 --set scale=2`" in table
    assert "make reproduce-toy PRESET=quick SET='steps=1 scale=2'" in table

    toy.CALLS.clear()  # the same overrides: finished, skipped
    assert main(["run", "toy", "--out", out, "--only", "a-x", "--set", "scale=2",
                 "--set", "steps=1"]) == 0
    assert toy.CALLS == []
    toy.CALLS.clear()  # other overrides: a different run, not mixed with the first
    assert main(["run", "toy", "--out", out, "--only", "a-x", "--set", "steps=1"]) == 0
    assert toy.CALLS == ["a-x"] and _record(tmp_path, "quick")["metric"] == 0.5
    toy.CALLS.clear()  # none: the preset's own config again
    assert main(["run", "toy", "--out", out, "--only", "a-x"]) == 0
    assert toy.CALLS == ["a-x"]
    assert _record(tmp_path, "quick")["config"] == {"steps": 5, "scale": 1.0}
    table = (tmp_path / "toy" / "quick" / "table.md").read_text()
    assert "Overrides" not in table and "--set" not in table


def test_set_with_all_applies_to_every_experiment(tmp_path):
    assert main(["run", "all", "--preset", "smoke", "--out", str(tmp_path), "--only", "b-y",
                 "--set", "steps=1"]) == 0
    assert toy.CALLS == ["b-y"]
    assert _record(tmp_path, "smoke", "b-y")["config"]["steps"] == 1


@pytest.mark.parametrize("args, expected", [
    (["--set", "stpes=3"], "error: toy (quick): --set stpes: unknown key 'stpes' "
                           "(did you mean 'steps'?); valid keys: steps, scale"),
    (["--set", "steps=x"], "error: toy (quick): --set steps=x: bad value for steps (int, "
                           "now 5): expected a whole number"),
    (["--preset", "smoke", "--set", "scale=yes"], "error: toy (smoke): --set scale=yes: bad "
                                                  "value for scale (float, now 1.0)"),
])
def test_cli_set_errors_are_one_line_before_anything_runs(tmp_path, capsys, args, expected):
    assert main(["run", "toy", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(expected), err
    assert toy.CALLS == [] and not (tmp_path / "toy").exists()


def test_worker_processes_get_the_overrides(tmp_path, monkeypatch):
    monkeypatch.setattr(running, "die_with_parent", lambda: None)
    exp = with_overrides(toy.EXPERIMENT, "quick", ["steps=2"])
    cell = exp.cells_for("quick")[0]
    cmd = running.worker_command(exp, "quick", cell, out=tmp_path, seed=0, fresh=False,
                                 interval=1.0, limits=None)
    assert cmd[cmd.index("--set") + 1] == "steps=2"
    assert running.experiment_module(exp) == "toy_experiment"
    # what the worker runs: the `cell` command, in this process
    assert main(cmd[3:]) == 0
    assert toy.CALLS == ["a-x"] and _record(tmp_path, "quick")["config"]["steps"] == 2


def test_set_errors_in_a_subprocess_are_one_line(tmp_path):
    env = {**os.environ, registry.ENV_ONLY: "toy_experiment",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", "run", "toy", "--set", "scal=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("error: toy (quick): --set scal: unknown key 'scal' (did you mean "
                           "'scale'?); valid keys: steps, scale\n")


@pytest.mark.parametrize("again, start, steps", [
    (["--set", "steps=4"], 2, 4),  # the same overrides: resumes from its checkpoint
    (["--set", "steps=3"], 0, 3),  # other overrides: starts again
    ([], 0, 5),  # the preset's own config: starts again
])
def test_a_stopped_cell_resumes_only_under_the_same_overrides(tmp_path, monkeypatch, again,
                                                              start, steps):
    args = ["run", "toy", "--out", str(tmp_path), "--only", "a-x"]
    monkeypatch.setattr(toy, "INTERRUPT_AT", 2)
    assert main([*args, "--set", "steps=4"]) == 130
    assert _record(tmp_path, "quick")["partial"] is True
    monkeypatch.setattr(toy, "INTERRUPT_AT", None)
    assert main([*args, *again]) == 0
    assert toy.STARTS["a-x"] == start
    record = _record(tmp_path, "quick")
    assert record["config"]["steps"] == steps and record["metric"] == 1 - 0.5 ** steps


def test_report_publishes_an_experiments_own_preset(tmp_path, monkeypatch, capsys):
    """``run`` accepts a preset only some experiments have (table2's ``long``), and so does
    ``report``, into ``reports/NAME/PRESET/``; a preset the named experiment lacks is one
    clear error naming its presets."""
    own = dataclasses.replace(toy.EXPERIMENT,
                              presets={**toy.EXPERIMENT.presets, "long": toy.Config(steps=4)})
    monkeypatch.setattr(toy, "EXPERIMENT", own)
    results, reports = tmp_path / "results", tmp_path / "reports"
    assert main(["run", "toy", "--preset", "long", "--out", str(results), "--only", "a-x"]) == 0
    args = ["--results", str(results), "--to", str(reports)]
    assert main(["report", "toy", "--preset", "long", *args]) == 0
    assert (reports / "toy" / "long" / "table.md").is_file()
    capsys.readouterr()
    assert main(["report", "toy", "--preset", "longer", *args]) == 2
    assert capsys.readouterr().err == ("error: --preset 'longer': toy has no such preset; its "
                                       "presets: smoke, quick, paper, long\n")
