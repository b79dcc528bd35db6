#!/usr/bin/env python
"""Run a declared sweep and draw the papers' figures (megadoc_pl/analysis/sweep.py).

    python tools/reproduce.py --preset mini --dry-run          # list the runs (each recipe validated)
    python tools/reproduce.py --preset mini                    # train them (2 at a time, 1 thread each), then report
    python tools/reproduce.py --preset mini --report-only      # figures + results.json from finished runs
    python tools/reproduce.py --preset megadocs_300m --launch-list runs.txt --slurm array.sh \\
        --set data.real=real/ data.synthetic=gen/ data.tokenizer=tok/   # a cluster: commands / SLURM array

Calling it again resumes: finished runs are kept, unfinished ones restart from their last
checkpoint. Output in --out (default sweeps/PRESET): runs/, logs/, results.json, summary.txt
and the PNG figures (loss vs G per validation set, loss by position on the long set, the data
law and the efficiency multipliers when the sweep has a D-sweep).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini", help="sweep name (megadoc_pl/analysis/sweeps/) or a YAML path")
    ap.add_argument("--out", help="output directory (default: sweeps/PRESET)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and their status; train nothing")
    ap.add_argument("--report-only", action="store_true", help="only collect finished runs and draw the figures")
    ap.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    ap.add_argument("--launch-list", metavar="FILE", help="write one command per unfinished run and exit")
    ap.add_argument("--slurm", metavar="FILE", help="with --launch-list: also write a SLURM array script")
    args = ap.parse_args(argv)

    from megadoc_pl.analysis import sweep
    from megadoc_pl.recipes import compose_recipe
    from megadoc_pl.utils import atomic_write_text

    try:
        spec = sweep.load_sweep(args.preset)
        runs = sweep.sweep_runs(spec, args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("sweeps") / spec.name)
    if args.dry_run:
        for r in runs:
            try:
                compose_recipe(r.recipe, list(r.overrides))
            except (ValueError, SystemExit) as e:
                print(f"error: run {r.name}: {e}", file=sys.stderr)
                return 2
        print(f"sweep {spec.name}: {len(runs)} runs -> {out}/runs ({spec.description})")
        for r in runs:
            print(f"{sweep.run_status(r, out):9s} {r.name:34s} {r.recipe} {' '.join(r.overrides)}")
        return 0
    if args.launch_list:
        text = sweep.launch_list(runs, out)
        atomic_write_text(args.launch_list, text)
        print(f"{len(text.splitlines())} commands -> {args.launch_list}")
        if args.slurm:
            atomic_write_text(args.slurm, sweep.slurm_array(Path(args.launch_list).resolve(), len(text.splitlines()),
                                                            args.threads))
            print(f"SLURM array script -> {args.slurm} (sbatch {args.slurm})")
        return 0
    if not args.report_only:
        status = sweep.run_sweep(runs, out, jobs=args.jobs, threads=args.threads)
        failed = [n for n, s in status.items() if s.startswith("failed")]
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun to retry them; finished runs are kept)")
    results = sweep.collect(spec, runs, out)
    made = sweep.figures(results, out)
    path = sweep.write_results(results, out, made)
    print(sweep.summary(results))
    print(f"results -> {path}; figures: {', '.join(str(p) for p in made) or 'none (no finished runs)'}")
    return 0 if results["finished"] == results["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
