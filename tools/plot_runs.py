#!/usr/bin/env python
"""Table (Markdown + CSV) and standard plots of a set of runs.

  python tools/plot_runs.py runs/* --out report/
  python tools/plot_runs.py runs/* --out report/ --y val/long/loss --method-key data.view

Writes runs.md, runs.csv, loss_vs_generations.png, loss_vs_epochs.png and
loss_by_position_<set>_<kind>.png (plots without enough data are skipped, with a note).
Directories without metrics.json (unfinished runs) are skipped.
"""

from __future__ import annotations

import argparse
import sys

from megadoc_pl.analysis.plots import plot_run_set
from megadoc_pl.analysis.runs import load_runs, write_run_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories or metrics.json files")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--y", default="val/iid/loss", help="loss key for the plots (default val/iid/loss)")
    ap.add_argument("--method-key", default="recipe", help="key that names a method (default recipe)")
    ap.add_argument("--columns", nargs="+", help="table columns (default: common keys + every val/* metric)")
    a = ap.parse_args(argv)
    try:
        runs = load_runs(a.runs, skip_missing=True)
        if not runs:
            raise ValueError("none of the given directories has a metrics.json")
        files = write_run_table(runs, a.out, a.columns)
        plots, notes = plot_run_set(runs, a.out, y=a.y, method_key=a.method_key)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(runs)} runs")
    for p in files + plots:
        print(f"wrote {p}")
    for n in notes:
        print(f"skipped {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
