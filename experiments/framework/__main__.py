"""``python -m experiments.framework``: re-render every committed report's ``table.md``
(with its verdicts) and ``reports/README.md`` (the verdict table) from what is committed
under ``reports/``, without rerunning anything
(:func:`experiments.framework.reports.rerender_reports`)."""

import os
import sys

from experiments.framework.reports import rerender_reports

if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    for written in rerender_reports():
        print(f"wrote {written}", file=sys.stderr)
