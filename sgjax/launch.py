"""Run one script as K JAX processes joined by ``jax.distributed``, locally or on a cluster.

Decoupled stages (DNI, Jaderberg et al. 2016, Sec. 2) can live in different processes, one
stage per process; this module starts such a program and joins its processes, on JAX's own
distributed runtime (no home-made RPC).

A script makes one call before it uses JAX::

    import jax
    import sgjax.launch

    info = sgjax.launch.initialize()   # a no-op in a plain single process
    print(info.process_id, info.num_processes, jax.process_count())

Locally, ``sgjax.launch`` starts K processes of that script on this machine::

    python -m sgjax.launch --processes 3 train.py --epochs 2
    python -m sgjax.launch --processes 3 --timeout 600 -m mypackage.train --epochs 2

Each process gets the coordinator address ``127.0.0.1:<port>`` (a free port, or ``--port``),
the number of processes and its own id in the environment variables named by
:data:`ENV_COORDINATOR_ADDRESS`, :data:`ENV_NUM_PROCESSES` and :data:`ENV_PROCESS_ID`;
:func:`initialize` reads them. Every line a process prints is passed through with the prefix
``[p<id>] ``. ``JAX_PLATFORMS`` is passed on untouched: ``JAX_PLATFORMS=cpu python -m
sgjax.launch ...`` runs K CPU processes of one CPU device each, joined by gloo collectives.

Failure ends the run, never a silent hang: when a process exits non-zero or is killed, the
launcher stops the others (SIGTERM, then SIGKILL after ``--grace`` seconds) and exits non-zero
with one message naming that process and its exit code or signal; when the run exceeds
``--timeout`` seconds, it stops all of them and says so; a process that exits before it
joins ends the run at once (exit code 0 too, once the others give up waiting in
:func:`initialize`: ``--join-timeout`` seconds plus a few). The launcher exits 0 only when
every process exits 0. Under the launcher a joined process stops on SIGTERM (JAX's
preemption notifier, which would take SIGTERM over as a cloud preemption notice, is undone).

On one machine with several GPUs, each process sees all of them; give each its own with
``initialize(local_device_ids=int(os.environ[sgjax.launch.ENV_PROCESS_ID]))``.

On a cluster, do not use the launcher: start one process per host (or per accelerator) with
the cluster's own tool, and the same :func:`initialize` call hands over to
``jax.distributed.initialize``'s own detection:

- SLURM: ``srun --nodes 2 --ntasks-per-node 1 python train.py`` (the coordinator is the
  first node of the job; the process ids are the SLURM task ids).
- Cloud TPU pods: run the script on every host (``gcloud compute tpus tpu-vm ssh ...
  --worker=all``); the TPU metadata names the coordinator.
- Open MPI: ``mpirun -n 4 python train.py`` (the ``OMPI_*`` variables are detected).
- Anything else: pass the three values explicitly, e.g. from your own flags::

      sgjax.launch.initialize(coordinator_address="10.0.0.1:1234", num_processes=4,
                              process_id=int(os.environ["RANK"]))

  (``JAX_COORDINATOR_ADDRESS`` in the environment is read by JAX itself.)
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import IO, NamedTuple

__all__ = [
    "ENV_COORDINATOR_ADDRESS",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_JOIN_TIMEOUT",
    "ENV_STATUS_DIR",
    "ProcessInfo",
    "LaunchResult",
    "free_port",
    "initialize",
    "launch",
    "main",
]

ENV_COORDINATOR_ADDRESS = "SGJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SGJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SGJAX_PROCESS_ID"
# Seconds `jax.distributed.initialize` waits for every process to join.
ENV_JOIN_TIMEOUT = "SGJAX_JOIN_TIMEOUT"
# A folder where `initialize` leaves `joined.<id>`, so the launcher can say whether a process
# that failed had joined the others.
ENV_STATUS_DIR = "SGJAX_LAUNCH_STATUS_DIR"

DEFAULT_JOIN_TIMEOUT = 60
DEFAULT_GRACE = 5.0
# A peer that sends no heartbeat for this long is declared dead by the coordination service,
# which then ends every process (newer than jax 0.5.0, where it is fixed; JAX's default is
# 100 s).
LOCAL_HEARTBEAT_TIMEOUT = 10


class ProcessInfo(NamedTuple):
    """Where this process stands after :func:`initialize`.

    ``distributed`` is False for a plain single process (``jax.distributed`` not started).
    """

    process_id: int
    num_processes: int
    coordinator_address: str | None
    distributed: bool


class LaunchResult(NamedTuple):
    """The outcome of :func:`launch`: ``returncode`` 0 when every process exited 0, else the
    failing process's exit code, 128 + its signal, or 124 for the timeout; ``message`` says
    why (empty on success)."""

    returncode: int
    message: str


# ---------------------------------------------------------------------------------------------
# In the user's script


def _distributed_state():
    from jax._src import distributed

    return distributed.global_state


def _is_initialized() -> bool:
    import jax

    is_init = getattr(jax.distributed, "is_initialized", None)  # jax >= 0.5.1
    if is_init is not None:
        return bool(is_init())
    return _distributed_state().client is not None


def _cluster_detected() -> bool:
    """Whether ``jax.distributed.initialize()`` without arguments would find a cluster (SLURM,
    TPU pod, Open MPI, ...) or an explicit ``JAX_COORDINATOR_ADDRESS``."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # a JAX without this registry: let JAX decide
        return True
    return any(
        not getattr(env, "opt_in_only_method", False) and env.is_env_present()
        for env in ClusterEnv._cluster_types
    )


def _use_gloo_on_cpu() -> None:
    """Cross-process collectives on CPU need an implementation: gloo is JAX's default in
    recent versions (e.g. 0.10.2), but jax 0.5.0 defaults to none, and a multi-process CPU
    computation then fails ("Multiprocess computations aren't implemented on the CPU backend").
    Set gloo only where the value is that none, the user did not choose one
    (``JAX_CPU_COLLECTIVES_IMPLEMENTATION``), and CPU is a platform in use."""
    import jax

    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        return
    platforms = jax.config.jax_platforms or ""
    if platforms and "cpu" not in platforms.split(","):
        return
    # A flag, not a config attribute, in jax 0.5.0: read it through `values`.
    current = jax.config.values.get("jax_cpu_collectives_implementation", "gloo")
    if current in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _supported(kwargs: dict) -> dict:
    """Drop the keyword arguments this JAX's ``jax.distributed.initialize`` does not take
    (``heartbeat_timeout_seconds`` is newer than jax 0.5.0)."""
    import jax

    params = inspect.signature(jax.distributed.initialize).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _restore_sigterm() -> None:
    """Give SIGTERM back the handler Python had (by default: end the process).

    ``jax.distributed.initialize`` starts JAX's preemption notifier, which takes SIGTERM over
    at the C level as a cloud preemption notice, so the process no longer stops on it. Under
    the local launcher SIGTERM means "stop now" (a peer failed): reinstalling Python's own
    handler makes it so. Signals can only be set from the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not an integer; it is set by `python -m sgjax.launch`, "
            f"unset it to run without the launcher"
        ) from None


def initialize(**kwargs) -> ProcessInfo:
    """Join this process to the others; call it once, before any other JAX call.

    - Started by ``python -m sgjax.launch``: joins the local processes, with the launcher's
      coordinator, process count and id (``kwargs`` override them, e.g. ``local_device_ids``)
      and short timeouts for local runs.
    - Otherwise, with ``kwargs`` or on a cluster JAX detects (SLURM, TPU pod, Open MPI,
      ``JAX_COORDINATOR_ADDRESS``): ``jax.distributed.initialize(**kwargs)``.
    - Otherwise (a plain single process): does nothing.

    Calling it again after the processes have joined returns the same answer. On CPU it
    selects gloo collectives where this JAX's default has none.

    Returns:
      ``ProcessInfo(process_id, num_processes, coordinator_address, distributed)``.
    """
    import jax

    if _is_initialized():
        state = _distributed_state()
        return ProcessInfo(state.process_id, state.num_processes,
                           state.coordinator_address, True)
    status_dir = None
    if os.environ.get(ENV_COORDINATOR_ADDRESS):
        join_timeout = _env_int(ENV_JOIN_TIMEOUT) if os.environ.get(ENV_JOIN_TIMEOUT) else (
            DEFAULT_JOIN_TIMEOUT)
        args = dict(
            coordinator_address=os.environ[ENV_COORDINATOR_ADDRESS],
            num_processes=_env_int(ENV_NUM_PROCESSES),
            process_id=_env_int(ENV_PROCESS_ID),
            initialization_timeout=join_timeout,
            heartbeat_timeout_seconds=LOCAL_HEARTBEAT_TIMEOUT,
        )
        args = {**_supported(args), **kwargs}
        status_dir = os.environ.get(ENV_STATUS_DIR)
    elif kwargs or _cluster_detected():
        args = kwargs
    else:
        return ProcessInfo(0, 1, None, False)
    _use_gloo_on_cpu()
    jax.distributed.initialize(**args)
    state = _distributed_state()
    if os.environ.get(ENV_COORDINATOR_ADDRESS):
        _restore_sigterm()
    if status_dir:
        with open(os.path.join(status_dir, f"joined.{state.process_id}"), "w"):
            pass
    return ProcessInfo(state.process_id, state.num_processes, state.coordinator_address, True)


# ---------------------------------------------------------------------------------------------
# The launcher


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream: IO[bytes], out: IO[str], prefix: str, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        if not line.endswith("\n"):
            line += "\n"
        with lock:
            out.write(prefix + line)
            out.flush()
    stream.close()


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "an unknown signal"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own process group
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM to every process still running (and its children), SIGKILL after ``grace``."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.poll() is None:  # only while its leader lives is the group surely ours
            _signal(p, signal.SIGKILL)
            p.wait()


def launch(
    command: Sequence[str],
    processes: int,
    *,
    timeout: float | None = None,
    port: int | None = None,
    join_timeout: int = DEFAULT_JOIN_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    env: dict[str, str] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> LaunchResult:
    """Run ``command`` (e.g. ``[sys.executable, "train.py"]``) as ``processes`` local processes
    joined through :func:`initialize`, and wait for them.

    Args:
      command: the program and its arguments, the same for every process.
      processes: K >= 1.
      timeout: seconds the whole run may take (None: no limit).
      port: the coordinator's port on 127.0.0.1 (None: a free one).
      join_timeout: seconds a process waits in :func:`initialize` for the others to join.
      grace: seconds between SIGTERM and SIGKILL when stopping processes.
      env: the processes' base environment (default ``os.environ``).
      stdout, stderr: where the prefixed lines go (default ``sys.stdout``, ``sys.stderr``).

    Returns:
      ``LaunchResult(returncode, message)``; nothing is raised for a failing process.
    """
    if not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
    if not command:
        raise ValueError("command is empty: pass the program to run, e.g. [sys.executable, "
                         "'train.py']")
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if timeout is not None:
        join_timeout = max(1, min(join_timeout, math.ceil(timeout)))
    address = f"127.0.0.1:{port or free_port()}"
    status_dir = tempfile.mkdtemp(prefix="sgjax-launch-")
    base = dict(os.environ if env is None else env)
    base.update({
        ENV_COORDINATOR_ADDRESS: address,
        ENV_NUM_PROCESSES: str(processes),
        ENV_JOIN_TIMEOUT: str(join_timeout),
        ENV_STATUS_DIR: status_dir,
        "PYTHONUNBUFFERED": "1",  # lines appear as they are printed, not at exit
    })
    lock = threading.Lock()
    exits: queue.Queue[tuple[int, int]] = queue.Queue()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []

    def waiter(i: int, p: subprocess.Popen) -> None:
        exits.put((i, p.wait()))  # queue order is exit order

    start = time.monotonic()
    try:
        for i in range(processes):
            p = subprocess.Popen(
                list(command), env={**base, ENV_PROCESS_ID: str(i)}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            procs.append(p)
            for stream, out in ((p.stdout, stdout), (p.stderr, stderr)):
                t = threading.Thread(target=_pump, args=(stream, out, f"[p{i}] ", lock),
                                     daemon=True)
                t.start()
                pumps.append(t)
            threading.Thread(target=waiter, args=(i, p), daemon=True).start()

        codes: dict[int, int] = {}
        result = None
        while len(codes) < processes:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                running = [i for i in range(processes) if i not in codes]
                result = LaunchResult(124, (
                    f"the run exceeded --timeout {timeout:g} s; stopped process(es) "
                    f"{', '.join(map(str, running))}, still running"
                    + _joined_note(running, status_dir)))
                break
            try:  # wake up now and then so that Ctrl-C is seen promptly
                i, code = exits.get(timeout=1.0 if left is None else min(left, 1.0))
            except queue.Empty:
                continue
            codes[i] = code
            if code != 0:
                joined = os.path.exists(os.path.join(status_dir, f"joined.{i}"))
                early = [j for j, c in codes.items() if c == 0
                         and not os.path.exists(os.path.join(status_dir, f"joined.{j}"))]
                message = (f"process {i} of {processes} {_describe(code)}"
                           f"{'' if joined else ' before it joined the others'}")
                if early:
                    message += (f" (process(es) {', '.join(map(str, early))} had exited with "
                                f"code 0 without joining: does the script call "
                                f"sgjax.launch.initialize() in every process?)")
                running = [j for j in range(processes) if j not in codes]
                if running:
                    message += f"; stopped process(es) {', '.join(map(str, running))}"
                result = LaunchResult(128 - code if code < 0 else code, message)
                break
        if result is None:
            result = LaunchResult(0, "")
    finally:
        _stop(procs, grace)
        for t in pumps:
            t.join(timeout=2.0)  # a grandchild may hold a pipe open; don't wait on it
        shutil.rmtree(status_dir, ignore_errors=True)
    return result


def _joined_note(ids: Sequence[int], status_dir: str) -> str:
    waiting = [i for i in ids if not os.path.exists(os.path.join(status_dir, f"joined.{i}"))]
    if not waiting:
        return ""
    return f" (process(es) {', '.join(map(str, waiting))} had not joined the others)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port in 1..65535, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sgjax.launch",
        description="Run a script as K local JAX processes joined by jax.distributed; the "
                    "script calls sgjax.launch.initialize() first.",
        allow_abbrev=False,
    )
    parser.add_argument("--processes", "-n", type=_positive_int, required=True, metavar="K",
                        help="number of processes (>= 1)")
    parser.add_argument("--timeout", type=_positive_int, default=None, metavar="SECONDS",
                        help="stop every process and fail when the run takes longer "
                             "(default: no limit)")
    parser.add_argument("--join-timeout", type=_positive_int, default=DEFAULT_JOIN_TIMEOUT,
                        metavar="SECONDS",
                        help="seconds a process waits in initialize() for the others "
                             f"(default {DEFAULT_JOIN_TIMEOUT}, at most --timeout)")
    parser.add_argument("--port", type=_port, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free port)")
    parser.add_argument("--grace", type=_seconds, default=DEFAULT_GRACE, metavar="SECONDS",
                        help="seconds between SIGTERM and SIGKILL when stopping processes "
                             f"(default {DEFAULT_GRACE:g})")
    parser.add_argument("-m", "--module", action="store_true",
                        help="run SCRIPT as a module (python -m SCRIPT)")
    parser.add_argument("script", metavar="SCRIPT", help="the Python script (or module with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sgjax.launch``: returns the exit status (see :class:`LaunchResult`)."""
    parser = _parser()
    ns = parser.parse_args(argv)
    if not ns.module and not os.path.isfile(ns.script):
        parser.error(f"script {ns.script!r} not found (to run a module, pass -m {ns.script})")
    command = [sys.executable, *(["-m"] if ns.module else []), ns.script, *ns.args]

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupted)
    try:
        result = launch(command, ns.processes, timeout=ns.timeout, port=ns.port,
                        join_timeout=ns.join_timeout, grace=ns.grace)
    except KeyboardInterrupt:
        print("sgjax.launch: interrupted; stopped every process", file=sys.stderr, flush=True)
        return 130
    if result.returncode:
        print(f"sgjax.launch: error: {result.message}", file=sys.stderr, flush=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
