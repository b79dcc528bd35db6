#!/usr/bin/env python
"""Bounding-box tuner: run the centre and its one-step grid neighbours until a certificate.

  python tools/tune.py --recipe rephrase --root runs/tune_rephrase scale=paper_300m data.generations=32
  python tools/tune.py --spec tune.yaml --launch        # train the runs itself, one at a time

Without --launch it prints the runs to do and exits; run them (the commands train into
ROOT/NAME) and call it again with the same arguments (exit code 0 either way; the state file's
"status" says "certified" when done). State: ROOT/tune_state.json (--state).
Spec keys (YAML/JSON): recipe, grid (synthetic | real: the megadocs grids), axes, centre,
objective, direction, root, prefix, overrides, train_script.
Several methods, G values and seeds, compared at their optima with a tuned data law: a sweep
group with ``tune:`` in tools/reproduce.py (docs/analysis.md, "Tuned sweeps").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megadoc_pl.analysis.tuner import GRIDS, RunFailed, load_spec, run_tuner


def _parse_centre(items: list[str]) -> dict | None:
    import yaml

    if not items:
        return None
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --centre {item!r} is not key=value")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="fixed recipe overrides for every run (key=value)")
    ap.add_argument("--spec", help="YAML/JSON tuning spec (flags below override its keys)")
    ap.add_argument("--recipe", help="method recipe name")
    ap.add_argument("--grid", choices=sorted(GRIDS), help="megadocs grid preset (default: synthetic)")
    ap.add_argument("--centre", action="append", metavar="KEY=VALUE",
                    help="start point, one axis per flag (default: the recipe's values)")
    ap.add_argument("--objective", help="metrics.json key to optimise (default val/iid/loss)")
    ap.add_argument("--maximize", action="store_true", help="higher is better (accuracies)")
    ap.add_argument("--root", help="parent of the run directories (default runs/tune)")
    ap.add_argument("--prefix", help="run-name prefix (default: the recipe name)")
    ap.add_argument("--state", help="state file (default ROOT/tune_state.json)")
    ap.add_argument("--train-script", help="training entry point (default recipes/train.py)")
    ap.add_argument("--launch", action="store_true", help="train pending runs sequentially here")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(
            args.spec,
            recipe=args.recipe,
            grid=args.grid,
            centre=_parse_centre(args.centre or []),
            objective=args.objective,
            direction="max" if args.maximize else None,
            root=args.root,
            prefix=args.prefix,
            overrides=list(args.overrides) or None,
            train_script=args.train_script,
        )
        state_path = Path(args.state) if args.state else Path(spec.root) / "tune_state.json"
        run_tuner(spec, state_path, do_launch=args.launch)
    except (ValueError, RunFailed) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
