"""``python -m sgjax.launch``: K local CPU processes joined by ``jax.distributed`` (gloo), and a
run that fails (a process killed, one that never joins, a timeout) ends with one clear
message, never a hang.

Every test starts real processes, each with a timeout; the coordinator port is always a free
one, so the file runs under ``pytest -n 2`` too.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from subprocess_env import subprocess_env

from sgjax import launch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]

# One script for every test: argv[1] says how it behaves.
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import numpy as np

    mode = sys.argv[1]
    pid = int(os.environ["SGJAX_PROCESS_ID"])
    if mode == "sleep" and pid == 0:  # must be SIGKILLed
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "never-joins" and pid == 1:
        sys.exit(5)
    if mode == "never-joins-exit-0" and pid == 1:
        sys.exit(0)
    import sgjax.launch
    info = sgjax.launch.initialize()

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if mode == "sleep":
        time.sleep(1000)

    k = jax.process_count()
    assert (info.process_id, info.num_processes) == (jax.process_index(), k), info
    assert len(jax.devices()) == k and len(jax.local_devices()) == 1, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("process",))
    local = [jax.device_put(np.array([pid + 1.0], np.float32), d) for d in jax.local_devices()]
    x = jax.make_array_from_single_device_arrays(
        (k,), NamedSharding(mesh, PartitionSpec("process")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))
    if mode == "killed" and pid == 1:
        os._exit(3)
    if mode == "sigkill" and pid == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # in "killed"/"sigkill", process 0 blocks here in a collective
        value = float(total(x))
        if mode == "ok":
            break
    print(f"process {pid} of {k}: sum {value:g}")
""")


def child_env():
    return subprocess_env()  # one CPU device per process


def run(tmp_path, mode, k, *, cli, timeout=60, grace=launch.DEFAULT_GRACE,
        join_timeout=launch.DEFAULT_JOIN_TIMEOUT):
    """Launch SCRIPT as ``k`` processes, through ``python -m sgjax.launch`` (``cli``) or
    in this process through :func:`launch.launch` (2 s faster: no second import of sgjax).
    Returns (exit status, stdout, the launcher's last stderr line, seconds)."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    start = time.monotonic()
    if cli:
        cmd = [sys.executable, "-m", "sgjax.launch", "--processes", str(k), "--timeout",
               str(timeout), "--grace", str(grace), str(script), mode]
        proc = subprocess.run(cmd, env=child_env(), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout + grace + 30)
        status, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        out_io, err_io = io.StringIO(), io.StringIO()
        result = launch.launch([sys.executable, str(script), mode], k, timeout=timeout,
                               grace=grace, join_timeout=join_timeout, env=child_env(),
                               stdout=out_io, stderr=err_io)
        status, out, err = result.returncode, out_io.getvalue(), err_io.getvalue()
        err += f"sgjax.launch: error: {result.message}\n" if status else ""
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return status, out, last, time.monotonic() - start, err


@pytest.mark.parametrize("k, cli", [(2, True), (3, False)])
def test_processes_join_and_run_a_collective(tmp_path, k, cli):
    status, out, last, _, err = run(tmp_path, "ok", k, cli=cli)
    assert status == 0, out + err
    want = sum(range(1, k + 1))
    for i in range(k):
        assert f"[p{i}] process {i} of {k}: sum {want}\n" in out, out
    assert "sgjax.launch: error" not in err


@pytest.mark.parametrize("mode, cli, how, status", [
    ("killed", True, "exited with code 3", 3),
    ("sigkill", False, "was killed by signal 9 (SIGKILL)", 128 + 9),
])
def test_a_killed_process_ends_the_run(tmp_path, mode, cli, how, status):
    got, _, last, elapsed, err = run(tmp_path, mode, 2, cli=cli)
    assert last == f"sgjax.launch: error: process 1 of 2 {how}; stopped process(es) 0", (
        err[-3000:])
    assert got == status
    assert elapsed < 45


def test_a_process_that_never_joins_ends_the_run(tmp_path):
    status, _, last, elapsed, err = run(tmp_path, "never-joins", 2, cli=False)
    assert last == (
        "sgjax.launch: error: process 1 of 2 exited with code 5 before it joined the others; "
        "stopped process(es) 0"), err[-3000:]
    assert status == 5
    assert elapsed < 45


@pytest.mark.slow
def test_a_process_that_exits_0_without_joining_ends_the_run(tmp_path):
    # Process 0 gives up waiting for process 1 after the join timeout (plus ~8 s in jax
    # 0.10.2, where the coordination service aborts it).
    status, _, last, elapsed, err = run(tmp_path, "never-joins-exit-0", 2, cli=False,
                                        join_timeout=3)
    assert last.startswith("sgjax.launch: error: process 0 of 2 "), err[-3000:]
    assert last.endswith(
        " before it joined the others (process(es) 1 had exited with code 0 without joining: "
        "does the script call sgjax.launch.initialize() in every process?)"), err[-3000:]
    assert status != 0
    assert elapsed < 30


def test_timeout_stops_every_process(tmp_path):
    # Process 0 ignores SIGTERM: the launcher must SIGKILL it after the grace period.
    status, _, last, elapsed, err = run(tmp_path, "sleep", 2, cli=False, timeout=4, grace=1)
    assert last.startswith(
        "sgjax.launch: error: the run exceeded --timeout 4 s; stopped process(es) 0, 1, "
        "still running"), err[-3000:]
    assert status == 124
    assert 4 + 1 <= elapsed < 4 + 1 + 10


@pytest.mark.parametrize("flags, complaint", [
    (["--processes", "0"], "argument --processes/-n: expected a number >= 1, got 0"),
    (["--processes", "2", "--timeout", "1.5"], "argument --timeout: expected a whole number"),
    (["--processes", "2", "missing.py"], "script 'missing.py' not found"),
    (["--processes", "2"], "the following arguments are required: SCRIPT"),
])
def test_bad_arguments_get_one_clear_error(flags, complaint, capsys):
    with pytest.raises(SystemExit) as exit_:
        launch.main(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert complaint in err.strip().splitlines()[-1], err


def test_initialize_without_the_launcher_is_a_single_process():
    code = ("import jax, sgjax.launch; info = sgjax.launch.initialize(); "
            "print(info.process_id, info.num_processes, info.distributed, jax.process_count())")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SGJAX_", "SLURM_", "OMPI_", "JAX_COORDINATOR"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "1", "False", "1"]


def test_launch_rejects_bad_values():
    with pytest.raises(ValueError, match="processes must be an integer >= 1, got 0"):
        launch.launch([sys.executable, "-c", "pass"], 0)
    with pytest.raises(ValueError, match="timeout must be > 0 seconds or None, got -1"):
        launch.launch([sys.executable, "-c", "pass"], 1, timeout=-1)
