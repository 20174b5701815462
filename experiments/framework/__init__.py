"""The experiment framework: declare a paper's table as data, run it, resume it, report it.

An experiment module (one per paper table or figure, e.g. ``experiments/dni/table1.py``)
exposes one :class:`Experiment` named ``EXPERIMENT``::

    EXPERIMENT = Experiment(
        name="table1",
        paper="DNI (Jaderberg et al. 2016)",
        title="Table 1: every-layer DNI on MNIST and CIFAR-10",
        metric="test error (%)",
        cells=[Cell("mnist-fcn3-dni", row="MNIST FCN 3", column="DNI",
                    params={"dataset": "mnist", "depth": 3, "method": "dni"}, paper=2.32), ...],
        presets={"smoke": Config(steps=20), "quick": Config(...), "paper": Config(...)},
        run_cell=run_cell,
    )

    def run_cell(cell, config, ctx):
        state = init(ctx.key(), cell.params, config)
        start, state = ctx.restore(state)              # resume mid-cell after a kill
        for step in ctx.progress(config.steps, start=start):
            state, loss = train_step(state, next_batch())
            if (step + 1) % config.log_every == 0:
                ctx.log(step + 1, loss=loss, test_error=evaluate(state))   # checks finiteness
                ctx.save(step + 1, state)               # throttled to every few minutes
        return {"metric": evaluate(state)}

(:func:`experiments.training.train_and_evaluate` is that loop, scan-fused.)
:func:`run_experiment` runs the cells, skips the ones already finished with the same
params, config and seed, and writes ``<out>/<name>/<preset>/``: ``cells/<cell>.json``,
``results.csv``, ``table.md`` (paper | ours | diff | verdict per cell, then the claims) and
the figures as PNG; :func:`publish_report` copies a finished run into the committed
``reports/`` (``reports/<name>/`` for ``quick``, ``reports/<name>/paper/`` for ``paper``).

An experiment also declares what the paper says, as :class:`Claim` s in the paper's own
words (``claims=[Claim.near(...), Claim.at_most(...), Claim.less(...)]`` or a function of
the preset); :mod:`~experiments.framework.verdicts` computes each verdict (holds / differs
/ partial / not run) from the cell records, and :func:`write_index` generates
``reports/README.md``, one row per claim. ``python -m experiments.framework`` re-renders
every committed report from what is committed (:func:`rerender_reports`).

The modules, by concern: :mod:`~experiments.framework.declare` (cells, experiments,
configs as data), :mod:`~experiments.framework.checkpoints` (atomic ``.npz`` checkpoints),
:mod:`~experiments.framework.context` (what a running cell gets: :class:`RunContext`),
:mod:`~experiments.framework.store` (finished cells on disk, identity, provenance),
:mod:`~experiments.framework.running` (:func:`run_experiment`),
:mod:`~experiments.framework.verdicts` (claims checked against results),
:mod:`~experiments.framework.overrides` (``--set KEY=VALUE`` on a preset's config) and
:mod:`~experiments.framework.reports` (tables, CSV, figures, ``reports/`` and its index).
"""

from experiments.framework.checkpoints import Checkpointer, CheckpointError, is_prng_key
from experiments.framework.context import (
    DEFAULT_CHECKPOINT_INTERVAL_S,
    NonFiniteError,
    RunContext,
    check_finite,
)
from experiments.framework.declare import (
    PRESETS,
    Cell,
    CellResult,
    Claim,
    Curve,
    Experiment,
    UsageError,
    canonical,
    reproduce_command,
    to_jsonable,
)
from experiments.framework.overrides import override, with_overrides
from experiments.framework.reports import (
    REPORTS_DIR,
    RunSummary,
    default_figures,
    format_duration,
    load_report,
    measured_time_s,
    plot_curves,
    provenance,
    publish_report,
    render_table,
    report_dir,
    rerender_reports,
    write_index,
    write_reports,
)
from experiments.framework.running import (
    DEFAULT_OUT,
    check_interval,
    check_out_dir,
    estimate,
    run_experiment,
    select_cells,
)
from experiments.framework.store import (
    cell_identity,
    code_version,
    describe_machine,
    load_results,
)

__all__ = [
    "DEFAULT_CHECKPOINT_INTERVAL_S", "DEFAULT_OUT", "PRESETS", "REPORTS_DIR", "Cell",
    "CellResult", "CheckpointError", "Checkpointer", "Claim", "Curve", "Experiment",
    "NonFiniteError",
    "RunContext", "RunSummary", "UsageError", "canonical", "cell_identity", "check_finite",
    "check_interval", "check_out_dir", "code_version", "default_figures", "describe_machine",
    "estimate", "format_duration", "is_prng_key", "load_report", "load_results",
    "measured_time_s",
    "plot_curves", "provenance", "publish_report", "render_table", "report_dir",
    "rerender_reports", "reproduce_command",
    "run_experiment", "select_cells", "to_jsonable", "with_overrides", "write_index",
    "write_reports", "override",
]
