"""Shared test configuration.

Tests that train on real MNIST read it from ``SGJAX_DATA_DIR`` (or
``../shared/data``); they never download it. On a machine without the files such
a test is *skipped* with the loader's message (which says where to put them),
unless ``SGJAX_REQUIRE_DATA=1``, which makes the missing dataset a failure
(``.ci/run`` sets it whenever the offline copy exists).

XLA compiles the tests' programs without backend optimisation
(``--xla_backend_optimization_level=0``, set here before anything imports jax): these
programs are tiny and compiling them dominates the suite's time (6 min → 4 min on 2 cores),
and every comparison the tests make holds at either level. ``SGJAX_TEST_XLA_OPT=1`` keeps
XLA's default level (the experiments and benchmarks always run with it).
"""

from __future__ import annotations

import os

if os.environ.get("SGJAX_TEST_XLA_OPT") != "1":
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))
import re

import pytest

from experiments.data import DatasetNotFoundError


def _missing_dataset(excinfo) -> str | None:
    if excinfo is None:
        return None
    if excinfo.errisinstance(DatasetNotFoundError):
        return str(excinfo.value).splitlines()[0]
    text = str(excinfo.value)  # e.g. an nbclient CellExecutionError wrapping it
    if "DatasetNotFoundError" in text:
        return "dataset not found (see the notebook's error)"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    outcome = yield
    excinfo = outcome.excinfo
    if excinfo is None or os.environ.get("SGJAX_REQUIRE_DATA") == "1":
        return
    from _pytest._code import ExceptionInfo

    reason = _missing_dataset(ExceptionInfo.from_exc_info(excinfo))
    if reason:
        outcome.force_exception(pytest.skip.Exception(f"needs real data: {reason}"))


_CLI_NOT_FOUND = re.compile(r"^error: (Dataset '[^']+' not found)", re.MULTILINE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that runs the CLI sees a missing dataset as exit status 1 and the CLI's one-line
    error on stderr, not as an exception: skip it too, with the same rule."""
    outcome = yield
    report = outcome.get_result()
    if (report.when != "call" or not report.failed
            or os.environ.get("SGJAX_REQUIRE_DATA") == "1"):
        return
    found = _CLI_NOT_FOUND.search(report.capstderr or "")
    if found:
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           f"Skipped: needs real data: {found.group(1)}")


@pytest.fixture(autouse=True)
def _no_public_mirrors(monkeypatch):
    """Tests never download from the internet: a dataset that is missing or corrupt would
    otherwise be fetched from the public mirrors. Every download goes to a closed local
    port (a test that serves files sets its own ``SGJAX_DATA_URL``)."""
    monkeypatch.setenv("SGJAX_DATA_URL", "http://127.0.0.1:9")
