"""The environment of a process a test launches (``sgjax.launch`` workers, a pytest run with
forced devices)."""

from __future__ import annotations

import os

DEVICE_COUNT = "--xla_force_host_platform_device_count"


def subprocess_env(*, drop: tuple[str, ...] = (DEVICE_COUNT,), add: tuple[str, ...] = (),
                   **overrides: str) -> dict[str, str]:
    """This process's environment on the CPU platform with ``overrides``, its ``XLA_FLAGS``
    less the flags starting with ``drop`` (by default the forced device count: one CPU
    device per process) plus ``add``. The other flags, such as the tests' optimisation level
    (``conftest.py``), stay, so a launched process computes what this one compares it with."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **overrides}
    flags = [f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith(drop)]
    flags += add
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env
