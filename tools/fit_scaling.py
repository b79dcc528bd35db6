#!/usr/bin/env python
"""Power-law fits L(x) = A / x^B + C and data-efficiency multipliers from run directories.

  # fit loss vs model size per recipe (x from metrics.json, N in billions)
  python tools/fit_scaling.py runs/*/metrics.json --x parameters --x-scale 1e9 --group-by recipe
  # loss vs G per view, in 1 + G so that G = 0 takes part; best tuned run per G
  python tools/fit_scaling.py runs/* --x data.generations --x-offset 1 --group-by data.view --plot fits.png
  # from a CSV of points (columns x, loss[, group])
  python tools/fit_scaling.py --csv points.csv --json fits.json

  # data efficiency: baseline runs at several real-data sizes -> law -> methods' multipliers
  python tools/fit_scaling.py efficiency --baseline runs/real_* \\
      --methods runs/rephrase_* runs/stitch_* --d-real 2.04e8
  python tools/fit_scaling.py efficiency --law 2.1e2,0.24,1.9 --loss stitched=3.384 --d-real 203867748

  # the megadocs worked example (docs/analysis.md)
  python tools/fit_scaling.py example megadocs --out plots/
"""

from __future__ import annotations

import argparse
import sys

from megadoc_pl.analysis import efficiency as eff
from megadoc_pl.analysis import fits as F
from megadoc_pl.analysis import runs as R
from megadoc_pl.utils import atomic_write_json

COMMANDS = ("fit", "efficiency", "example")


def _bootstrap_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    ap.add_argument("--bootstrap", default="auto", choices=["auto", "points", "residuals"],
                    help="resample points (>= 8 distinct x) or residuals (fewer); default auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-exponent", type=float, default=F.DEFAULT_MAX_EXPONENT, help="upper bound on B")


def _boot_kwargs(a: argparse.Namespace) -> dict:
    return dict(n_boot=a.n_boot, level=a.level, method=a.bootstrap, seed=a.seed, max_exponent=a.max_exponent)


def _points_from_runs(paths: list[str], x: str, y: str, group_by: str | None, reduce: str) -> dict:
    runs = R.load_runs(paths, skip_missing=True)  # unfinished runs and stray files are skipped
    if not runs:
        raise ValueError("none of the given paths is a finished run (a directory with metrics.json)")
    return R.points_by_group(runs, x, y, group_by, reduce)


def cmd_fit(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="fit_scaling.py [fit]", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="run directories or metrics.json files")
    ap.add_argument("--csv", help="a CSV of points instead of runs")
    ap.add_argument("--x", default="x", help="x key: metrics key or dotted config key (CSV: column; default x)")
    ap.add_argument("--y", default=None, help="loss key (runs: default val/iid/loss; CSV: column, default loss)")
    ap.add_argument("--group-by", default=None, help="config/metrics key (CSV: column, default group)")
    ap.add_argument("--reduce", default="best", choices=["best", "mean", "all"],
                    help="several runs at one x: best (tuned point), mean (seeds) or all")
    ap.add_argument("--x-offset", type=float, default=0.0, help="fit in x + offset (1 for 1 + G)")
    ap.add_argument("--x-scale", type=float, default=1.0, help="fit in x / scale (1e9: N in billions)")
    ap.add_argument("--json", help="write the fits here")
    ap.add_argument("--plot", help="write a PNG of points, fits and asymptotes here")
    _bootstrap_args(ap)
    a = ap.parse_args(argv)
    if a.csv:
        points = R.read_points_csv(a.csv, a.x, a.y or "loss", a.group_by or "group")
    elif a.inputs:
        points = _points_from_runs(a.inputs, a.x, a.y or "val/iid/loss", a.group_by, a.reduce)
    else:
        raise ValueError("give run directories / metrics.json files, or --csv FILE")
    fits = F.fit_groups(points, x_offset=a.x_offset, x_scale=a.x_scale, **_boot_kwargs(a))
    x_name = f"({a.x} + {a.x_offset:g})" if a.x_offset else a.x
    if a.x_scale != 1.0:
        x_name = f"({x_name} / {a.x_scale:g})"
    print(F.format_fit_table(fits, x_name=x_name))
    if a.json:
        atomic_write_json(a.json, {"x": a.x, "x_offset": a.x_offset, "x_scale": a.x_scale,
                                   "fits": F.fit_table_rows(fits)})
        print(f"wrote {a.json}")
    if a.plot:
        from megadoc_pl.analysis.plots import plot_scaling_fits

        print(f"wrote {plot_scaling_fits(fits, a.plot, x_label=x_name, ylabel=a.y or 'loss')}")


def _parse_floats(text: str, n: int, flag: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n:
        raise ValueError(f"{flag} takes {n} comma-separated numbers, got {text!r}")
    return vals


def cmd_efficiency(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="fit_scaling.py efficiency",
                                 description="effective real tokens and multipliers D_eff / D_real")
    law = ap.add_mutually_exclusive_group(required=True)
    law.add_argument("--baseline", nargs="+", help="real-only runs at several real-data sizes")
    law.add_argument("--baseline-csv", help="CSV of the baseline's (tokens, loss) points")
    law.add_argument("--law", help="A,alpha,E of a given law L(D) = A / D^alpha + E")
    law.add_argument("--law-through", help="alpha,E,D,L: the law with alpha and E through the point (D, L)")
    ap.add_argument("--x", default=None, help="key (runs; default derived/real_tokens = real tokens seen / "
                    "passes over real) or column (CSV; default tokens) of the real-data size D")
    ap.add_argument("--y", default="val/iid/loss", help="loss key of runs (CSV: column 'loss' unless --y-col)")
    ap.add_argument("--y-col", default="loss")
    ap.add_argument("--methods", nargs="*", default=[], help="method runs (loss from --y, name from --name-by)")
    ap.add_argument("--name-by", default="name", help="key naming a method run (default: run name)")
    ap.add_argument("--loss", nargs="*", default=[], metavar="NAME=LOSS", help="method losses given directly")
    ap.add_argument("--d-real", type=float, required=True, help="real tokens the methods trained on")
    ap.add_argument("--reference-loss", type=float, help="divide by D_eff(this loss) instead of D_real")
    ap.add_argument("--json", help="write the law and the multipliers here")
    _bootstrap_args(ap)
    a = ap.parse_args(argv)
    if a.baseline or a.baseline_csv:
        if a.baseline:
            pts = _points_from_runs(a.baseline, a.x or R.REAL_TOKENS_KEY, a.y, None, "best")["all"]
        else:
            pts = R.read_points_csv(a.baseline_csv, a.x or "tokens", a.y_col, None)["all"]
        law: F.PowerLaw | F.PowerLawFit = eff.fit_data_law(*pts, **_boot_kwargs(a))
        print(F.format_fit_table({"baseline L(D)": law}, x_name="D"))
    elif a.law:
        law = eff.law_from_params(*_parse_floats(a.law, 3, "--law"))
    else:
        alpha, e, d, loss = _parse_floats(a.law_through, 4, "--law-through")
        law = eff.law_through_point(alpha, e, d, loss)
    point = law.law if isinstance(law, F.PowerLawFit) else law
    print(f"baseline law: L(D) = {point.formula().replace('x', 'D')}")
    losses: dict[str, float] = {}
    for item in a.loss:
        name, sep, value = item.partition("=")
        try:
            losses[name] = float(value)
        except ValueError:
            raise ValueError(f"--loss {item!r} is not NAME=LOSS") from None
    for run in R.load_runs(a.methods, skip_missing=True):
        losses[str(run.get(a.name_by))] = run.number(a.y)
    if not losses:
        raise ValueError("no method losses: give --methods RUN... or --loss NAME=LOSS")
    rows = eff.data_efficiency(law, losses, a.d_real, a.reference_loss)
    print(eff.format_efficiency_table(rows))
    if a.json:
        atomic_write_json(a.json, {"law": point.as_dict(), "methods": [r.as_dict() for r in rows]})
        print(f"wrote {a.json}")


def cmd_example(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="fit_scaling.py example", description="worked examples")
    ap.add_argument("name", choices=["megadocs"])
    ap.add_argument("--out", help="write the example's plots here")
    ap.add_argument("--n-boot", type=int, default=2000)
    a = ap.parse_args(argv)
    from megadoc_pl.analysis import worked_example

    print(worked_example.run(a.out, n_boot=a.n_boot))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in COMMANDS else "fit"
    try:
        {"fit": cmd_fit, "efficiency": cmd_efficiency, "example": cmd_example}[cmd](argv)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
