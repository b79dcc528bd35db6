#!/usr/bin/env python
"""Run a declared sweep and draw the papers' figures (megadoc_pl/analysis/sweep.py).

    python tools/reproduce.py --preset mini --dry-run          # list the runs (each recipe validated)
    python tools/reproduce.py --preset mini                    # train them (2 at a time, 1 thread each), then report
    python tools/reproduce.py --preset mini --report-only      # figures + results.json from finished runs
    python tools/reproduce.py --preset megadocs_300m --launch-list runs.txt --slurm array.sh \\
        --set data.real=real/ data.synthetic=gen/ data.tokenizer=tok/   # a cluster: commands / SLURM array
    python tools/reproduce.py --preset mini_tuned                 # tuned groups: the tuner's rounds, then seeds
    python tools/reproduce.py --preset megadocs_300m_tuned --dry-run   # rounds, worst-case runs and GPU-hours

A group with ``tune:`` is searched by the bounding-box tuner (megadoc_pl/analysis/sweep_tune.py):
here its rounds run as they become known, several groups' runs side by side; with --launch-list
each call writes the current round of every tuned group (call again when it has finished).

Calling it again resumes: finished runs are kept, unfinished ones restart from their last
checkpoint. Output in --out (default sweeps/PRESET): runs/, logs/, results.json, summary.txt, tuning.md (tuned groups: their certificates)
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

    from megadoc_pl.analysis import sweep, sweep_tune

    try:
        spec = sweep.load_sweep(args.preset)
        out = Path(args.out or Path("sweeps") / spec.name)
        runs = sweep.sweep_runs(spec, args.set)
        fams = sweep_tune.families(spec, out, args.set)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args, spec, runs, fams, out)
    except ValueError as e:  # a tuner state made with another tune: entry, a changed run definition
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, spec, runs: list, fams: list, out: Path) -> int:
    from megadoc_pl.analysis import sweep, sweep_tune
    from megadoc_pl.recipes import compose_recipe
    from megadoc_pl.utils import atomic_write_text

    def tuned_next(failed: frozenset = frozenset(), save: bool = True) -> list:
        return [r for f in fams for r in sweep_tune.advance(f, spec, out, failed, save=save)]

    if args.dry_run:
        try:
            nxt = tuned_next(save=False)
            for r in [*runs, *nxt]:
                compose_recipe(r.recipe, list(r.overrides))
        except (ValueError, SystemExit) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"sweep {spec.name}: {len(runs)} fixed runs, {len(fams)} tuned famil{'y' if len(fams) == 1 else 'ies'}"
              f" -> {out}/runs ({spec.description})")
        for r in runs:
            print(f"{sweep.run_status(r, out):9s} {r.name:34s} {r.recipe} {' '.join(r.overrides)}")
        if fams:
            print(sweep_tune.dry_run_table(fams, spec, out, nxt))
        return 0
    if args.launch_list:
        todo = [r for r in runs if sweep.run_status(r, out) != "finished"] + tuned_next()
        text = sweep.launch_list(todo, out)
        atomic_write_text(args.launch_list, text)
        print(f"{len(text.splitlines())} commands -> {args.launch_list}"
              + (" (the tuned groups' current round: call again when these have finished for the next)"
                 if fams else ""))
        if args.slurm:
            atomic_write_text(args.slurm, sweep.slurm_array(Path(args.launch_list).resolve(), len(text.splitlines()),
                                                            args.threads))
            print(f"SLURM array script -> {args.slurm} (sbatch {args.slurm})")
        return 0
    if not args.report_only:
        status = sweep.run_sweep(runs, out, jobs=args.jobs, threads=args.threads, more=tuned_next if fams else None)
        failed = [n for n, s in status.items() if s.startswith("failed")]
        if failed:
            print(f"{len(failed)} run(s) failed: {', '.join(failed)} (rerun to retry them; finished runs are kept)")
    pending = tuned_next()  # brings every family's state up to date
    results = sweep_tune.collect(spec, runs, out, fams)
    made = sweep.figures(results, out)
    path = sweep.write_results(results, out, made)
    print(sweep.summary(results))
    print(f"results -> {path}; figures: {', '.join(str(p) for p in made) or 'none (no finished runs)'}")
    return 0 if results["finished"] == results["total"] and not pending else 1


if __name__ == "__main__":
    sys.exit(main())
