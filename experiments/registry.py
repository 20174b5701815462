"""Which experiments exist: a list of module paths, imported lazily.

Each module in :data:`MODULES` exposes ``EXPERIMENT`` (an :class:`experiments.framework.
Experiment`). A module that fails to import is reported by name with its error; it never
hides the others. Two environment variables (comma-separated module paths) change the list:
``SGJAX_EXPERIMENTS`` replaces it (to load only some modules), ``SGJAX_EXTRA_EXPERIMENTS``
adds to it (an experiment under development, the tests' toy experiment).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import traceback

from experiments.framework import Experiment, UsageError

MODULES: tuple[str, ...] = (
    "experiments.dni.table1",
    "experiments.dni.budget",
    "experiments.dni.degradation",
    "experiments.dni.stale",
    "experiments.dni.sparse",
    "experiments.dni.unlock",
    "experiments.dni.single",
    "experiments.dni.linear",
    "experiments.dni.underfit",
    "experiments.dni.wallclock",
    "experiments.blog.birdseye",
    "experiments.dni.table2",
    "experiments.dni.two_networks",
    "experiments.understanding.fig2",
    "experiments.understanding.fig3",
    "experiments.understanding.fig4",
    "experiments.understanding.fig5",
    "experiments.understanding.fig8",
    "experiments.understanding.table1",
    "experiments.understanding.table2",
    "experiments.understanding.fig6",
    "experiments.understanding.theorem1",
)
"""Module paths of the registered experiments, in listing order."""

ENV_ONLY = "SGJAX_EXPERIMENTS"
ENV_EXTRA = "SGJAX_EXTRA_EXPERIMENTS"


@dataclasses.dataclass(frozen=True)
class Registry:
    """The experiments that imported (by name) and the modules that did not (with why)."""

    experiments: dict[str, Experiment]
    modules: dict[str, str]  # experiment name -> module path
    failures: dict[str, str]  # module path -> one-line error

    def names(self) -> list[str]:
        return list(self.experiments)

    def get(self, name: str) -> Experiment:
        """The experiment called ``name``, or a :class:`UsageError` naming the closest
        valid name ("did you mean …") and listing them all."""
        if name in self.experiments:
            return self.experiments[name]
        close = difflib.get_close_matches(name, self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        msg = (f"unknown experiment {name!r}{hint}; valid experiments: "
               f"{', '.join(self.names()) or '—'}")
        if self.failures:
            msg += (
                "\n(these modules failed to import and may define it: "
                + "; ".join(f"{m}: {e}" for m, e in self.failures.items())
                + ")"
            )
        raise UsageError(msg)


def module_paths() -> tuple[str, ...]:
    """:data:`MODULES`, as replaced or extended by the environment variables."""

    def env(var):
        return [m.strip() for m in os.environ.get(var, "").split(",") if m.strip()]

    base = env(ENV_ONLY) if os.environ.get(ENV_ONLY) is not None else list(MODULES)
    return tuple(dict.fromkeys([*base, *env(ENV_EXTRA)]))


def load_module(path: str) -> Experiment:
    """Import ``path`` and return its ``EXPERIMENT``; errors name the module."""
    try:
        module = importlib.import_module(path)
    except Exception as e:
        raise ImportError(f"experiment module {path} failed to import: {_oneline(e)}") from e
    exp = getattr(module, "EXPERIMENT", None)
    if not isinstance(exp, Experiment):
        raise ImportError(f"experiment module {path} has no EXPERIMENT = Experiment(...)")
    return exp


def discover() -> Registry:
    """Import every registered module, collecting experiments and import failures."""
    experiments, modules, failures = {}, {}, {}
    for path in module_paths():
        try:
            exp = load_module(path)
        except ImportError as e:
            cause = e.__cause__ or e
            failures[path] = _oneline(cause) if e.__cause__ else str(e)
            if os.environ.get("SGJAX_DEBUG"):
                traceback.print_exception(cause)
            continue
        if exp.name in experiments:
            failures[path] = f"duplicate experiment name {exp.name!r} (also in {modules[exp.name]})"
            continue
        experiments[exp.name] = exp
        modules[exp.name] = path
    return Registry(experiments, modules, failures)


def get(name: str) -> Experiment:
    """The registered experiment called ``name`` (:class:`UsageError` if there is none)."""
    return discover().get(name)


def _oneline(e: BaseException) -> str:
    where = ""
    tb = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
    if tb:
        where = f" ({tb[-1].filename}:{tb[-1].lineno})"
    return f"{type(e).__name__}: {e}{where}"
