"""The pipelined Runner launched as K processes (``python -m sgjax.launch``, gloo CPU
collectives): each process owns one stage, and the run equals the one-process run, in
training and in inference; a process that dies ends the run with one clear error.

Every launch has a timeout; ports are free ones (the file runs under ``pytest -n 2``).
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest
from subprocess_env import subprocess_env

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "pipeline_processes.py"
TIMEOUT = 240


def launch(K: int, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = subprocess_env(PYTHONPATH=str(ROOT / "tests"))  # one CPU device per process
    cmd = [sys.executable, "-m", "sgjax.launch", "--processes", str(K), "--timeout",
           str(TIMEOUT), str(SCRIPT), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT + 60)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("K", [2, 3])
def test_pipelined_runner_across_processes_equals_one_process(K, tmp_path):
    import pipeline_processes as script

    out = tmp_path / "gathered.pkl"
    proc, _ = launch(K, str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for k in range(K):
        assert f"[p{k}] process {k}: done" in proc.stdout
    with open(out, "rb") as f:
        results = pickle.load(f)
    for kind in script.KINDS:
        state, losses, inference = script.run(kind, K)
        m_state, m_losses, m_inference = results[kind]
        chex.assert_trees_all_close(m_state, state, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m_losses, losses, rtol=1e-6)
        assert np.isnan(losses[: K - 1]).all() and np.isfinite(losses[K - 1:]).all()
        np.testing.assert_allclose(m_inference, inference, rtol=1e-6, atol=1e-6)


def test_a_process_that_dies_mid_run_ends_the_others(tmp_path):
    proc, seconds = launch(2, str(tmp_path / "never.pkl"), "5")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "process 1 of 2 exited with code 3" in last, proc.stderr[-2000:]
    assert seconds < 90, seconds
    assert not (tmp_path / "never.pkl").exists()
