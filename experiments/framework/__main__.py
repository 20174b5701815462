"""``python -m experiments.framework [--figures]``: re-render every committed report's
``table.md`` (with its verdicts) and ``reports/README.md`` (the verdict table) from what is
committed under ``reports/``, without rerunning anything; ``--figures`` also redraws each
report's PNGs from its ``cells/`` (reports without ``cells/`` keep theirs)
(:func:`experiments.framework.reports.rerender_reports`)."""

import argparse
import os
import sys

from experiments.framework.reports import rerender_reports

if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    parser = argparse.ArgumentParser(prog="python -m experiments.framework",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", action="store_true",
                        help="also redraw every report's figures from its cells/")
    args = parser.parse_args()
    for written in rerender_reports(figures=args.figures):
        print(f"wrote {written}", file=sys.stderr)
