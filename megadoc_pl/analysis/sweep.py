"""Declared sweeps (tools/reproduce.py): a grid of runs, run or listed, and the papers' figures.

A sweep is a YAML file (``megadoc_pl/analysis/sweeps/<preset>.yaml``)::

    scale: mini                     # scale preset of every run
    seeds: [0, 1]                   # train.seed = train.data_seed = seed
    overrides: [...]                # key=value for every run
    groups:
      real:     {recipe: baseline_real, role: baseline, axes: {data.mixture.real_epochs: [2, 4, 8]}}
      stitch:   {recipe: megadoc_stitch, role: method,
                 axes: {data.generations: [2, 8], data.mixture.real_epochs: [1], ...}}
      real_D:   {recipe: baseline_real, role: data, seeds: [0],
                 axes: {data.real_fraction: [0.25, 0.5], data.mixture.real_epochs: [4, 8]}}

Every group expands to the product of its axes times its seeds; a run is named from its group
and axis values (``stitch-G8-E1-w0.75-s0``) and lives in ``OUT/runs/NAME``. Roles tell the
analysis what a group is: ``baseline`` (real-only at the full corpus), ``method`` (loss vs G),
``data`` (real-only on ``data.real_fraction`` subsets: with the baseline, the D-sweep of the
data law L(D) = A / D^alpha + E that turns losses into data-efficiency multipliers).

A run whose ``metrics.json`` says ``finished`` is never rerun, so calling the sweep again
resumes it; an unfinished one restarts with ``run.resume=auto`` (from its last checkpoint).
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from megadoc_pl.analysis.tuner import AXIS_SHORT, find_train_script
from megadoc_pl.utils import atomic_write_json, atomic_write_text

SWEEPS_DIR = Path(__file__).parent / "sweeps"
ROLES = ("baseline", "method", "data")
GROUP_KEYS = ("recipe", "role", "method", "axes", "tune", "seeds", "overrides")
TUNE_KEYS = ("axes", "centre", "grid", "objective", "direction")
SHORT = {**AXIS_SHORT, "data.generations": "G", "data.real_fraction": "D", "data.mixture.budget_tokens": "B"}
VAL_SETS = ("iid", "long")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its name, recipe, group and the key=value overrides that define it."""

    name: str
    group: str
    role: str
    recipe: str
    seed: int
    values: tuple  # ((axis key, value), ...) in the group's axis order
    overrides: tuple  # every key=value the run is trained with
    method: str = ""  # the label the analysis compares (default: the group)

    @property
    def cell(self) -> str:
        """The run's name without its seed: runs of one cell differ only by seed."""
        return self.name.rsplit("-s", 1)[0]

    def value(self, key: str, default: Any = None) -> Any:
        return dict(self.values).get(key, default)

    def command(self, out_dir: str | Path, python: str = sys.executable) -> list[str]:
        return [python, find_train_script(), "--recipe", self.recipe, *self.overrides,
                f"run.root={Path(out_dir) / 'runs'}", f"run.name={self.name}", "run.resume=auto"]


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    name: str
    description: str
    scale: str
    seeds: list
    overrides: list
    groups: dict
    path: Optional[Path] = None
    extra: dict = field(default_factory=dict)


def load_sweep(preset: str) -> SweepSpec:
    """A sweep by preset name (``sweeps/<name>.yaml``) or YAML path; one-line errors for bad files."""
    from omegaconf import OmegaConf

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else SWEEPS_DIR / f"{preset}.yaml"
    if not path.exists():
        have = sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))
        raise ValueError(f"sweep preset {preset!r} not found (presets: {', '.join(have)}; or give a YAML path)")
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = sorted(set(raw) - {"description", "scale", "seeds", "overrides", "groups", "cost"})
    if unknown or not raw.get("groups"):
        raise ValueError(f"{path}: unknown key(s) {unknown} or no groups (keys: description, scale, seeds, "
                         "overrides, groups, cost)")
    for g, spec in raw["groups"].items():
        if set(spec) - set(GROUP_KEYS) or "recipe" not in spec:
            raise ValueError(f"{path}: group {g!r} needs recipe and may have {', '.join(GROUP_KEYS[1:])}")
        if spec.get("role", "method") not in ROLES:
            raise ValueError(f"{path}: group {g!r} role must be one of {', '.join(ROLES)}")
        if "tune" in spec:
            check_tune_entry(path, g, spec["tune"])
    cost = raw.get("cost") or {}
    if set(cost) - {"gpu", "real_tokens", "synthetic_per_generation"}:
        raise ValueError(f"{path}: cost may have gpu, real_tokens, synthetic_per_generation")
    return SweepSpec(path.stem, str(raw.get("description", "")), str(raw.get("scale", "demo")),
                     list(raw.get("seeds", [0])), list(raw.get("overrides", [])), dict(raw["groups"]), path,
                     {"cost": cost} if cost else {})


def check_tune_entry(path: Any, group: str, tune: Any) -> None:
    """One-line errors for a malformed ``tune:`` entry (before anything is trained)."""
    if not isinstance(tune, dict):
        raise ValueError(f"{path}: group {group!r} tune must be a mapping ({', '.join(TUNE_KEYS)})")
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    if unknown:
        raise ValueError(f"{path}: group {group!r} tune has unknown key(s) {unknown} (keys: {', '.join(TUNE_KEYS)})")


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_tag(values: Sequence[tuple]) -> str:
    """The name part of axis values: ``[(data.generations, 8), (real_epochs, 4)]`` -> ``-G8-E4``."""
    return "".join(f"-{SHORT.get(k, k.rsplit('.', 1)[-1])}{_fmt(v)}" for k, v in values)


def make_run(spec: SweepSpec, group: str, g: dict, values: Sequence[tuple], seed: int,
             extra_overrides: Sequence[str] = ()) -> SweepRun:
    """The run of ``group`` at axis ``values`` and ``seed`` (its name and every override)."""
    ov = [f"scale={spec.scale}", *spec.overrides, *g.get("overrides", []), *(f"{k}={v}" for k, v in values),
          f"train.seed={seed}", f"train.data_seed={seed}", *extra_overrides]
    return SweepRun(f"{group}{run_tag(values)}-s{seed}", group, g.get("role", "method"), g["recipe"], int(seed),
                    tuple(values), tuple(ov), str(g.get("method", group)))


def sweep_runs(spec: SweepSpec, extra_overrides: Sequence[str] = ()) -> list[SweepRun]:
    """Every run of the sweep's fixed groups, in file order (groups, then axis product, then
    seeds). Tuned groups (``tune:``) decide their runs as they go: sweep_tune.families."""
    runs = []
    for group, g in spec.groups.items():
        if "tune" in g:
            continue
        axes = dict(g.get("axes") or {})
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            for seed in g.get("seeds", spec.seeds):
                runs.append(make_run(spec, group, g, list(zip(keys, combo)), seed, extra_overrides))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"sweep {spec.name}: run names repeat ({dup[:3]}); give groups distinct names or axes")
    return runs


# --------------------------------------------------------------------------- running


def run_status(run: SweepRun, out_dir: str | Path) -> str:
    """``finished``, ``started`` (a directory without a finished metrics.json) or ``pending``."""
    import json

    d = Path(out_dir) / "runs" / run.name
    m = d / "metrics.json"
    if m.exists():
        try:
            if json.loads(m.read_text()).get("status") == "finished":
                return "finished"
        except ValueError:
            pass
    return "started" if d.exists() else "pending"


def _say(line: str) -> None:
    print(line, flush=True)  # a sweep's console is often a file (nohup, a scheduler's log)


def run_sweep(runs: Sequence[SweepRun], out_dir: str | Path, jobs: int = 1, threads: int = 1,
              log: Callable[[str], None] = _say,
              more: Optional[Callable[[frozenset], list[SweepRun]]] = None) -> dict[str, str]:
    """Train every unfinished run, ``jobs`` at a time, each with ``threads`` torch threads.

    Each run is its own process (``recipes/train.py``) with ``OMP_NUM_THREADS=threads`` (torch's
    default thread count on shared cores runs several times slower than one thread); its output
    goes to ``OUT/logs/NAME.log``. ``more(failed)``, when given, is asked for further runs after
    every run that ends (the tuned groups' next rounds: sweep_tune.advance); its runs go first,
    as later rounds wait on them. Returns {name: finished | failed (exit code) | skipped}.
    """
    out_dir = Path(out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    check_definitions(runs, out_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    todo = [r for r in runs if run_status(r, out_dir) != "finished"]
    result = {r.name: "skipped (finished)" for r in runs if r not in todo}
    running: list[tuple[SweepRun, subprocess.Popen, Any, float]] = []

    def ask() -> None:
        if more is None:
            return
        failed = frozenset(n for n, s in result.items() if s.startswith("failed"))
        busy = {r.name for r, *_ in running} | {r.name for r in todo} | set(result)
        new = [r for r in more(failed) if r.name not in busy]
        check_definitions(new, out_dir)
        todo[:0] = new

    ask()
    log(f"{len(result)} of {len(runs)} fixed runs already finished; {len(todo)} to train now"
        + (" (tuned groups add rounds as they go)" if more else "") + f", {jobs} at a time")
    while todo or running:
        while todo and len(running) < jobs:
            r = todo.pop(0)
            f = open(out_dir / "logs" / f"{r.name}.log", "a")
            f.write("$ " + shlex.join(r.command(out_dir)) + "\n")
            f.flush()
            running.append((r, subprocess.Popen(r.command(out_dir), stdout=f, stderr=subprocess.STDOUT, env=env), f,
                            time.time()))
        time.sleep(0.2)
        for item in list(running):
            r, proc, f, t0 = item
            if proc.poll() is None:
                continue
            f.close()
            running.remove(item)
            ok = proc.returncode == 0 and run_status(r, out_dir) == "finished"
            result[r.name] = "finished" if ok else f"failed (exit {proc.returncode}, see logs/{r.name}.log)"
            log(f"{r.name}: {result[r.name]} in {time.time() - t0:.0f}s")
            ask()
    return result


def check_definitions(runs: Sequence[SweepRun], out_dir: str | Path) -> None:
    """Record each run's recipe and overrides in ``OUT/definitions.json``; refuse a run whose
    recorded definition differs (a changed sweep file would otherwise keep a stale finished run)."""
    import json

    path = Path(out_dir) / "definitions.json"
    have = json.loads(path.read_text()) if path.exists() else {}
    for r in runs:
        mine = [r.recipe, *r.overrides]
        if r.name in have and have[r.name] != mine:
            raise ValueError(f"run {r.name} in {out_dir} was made with {have[r.name]}, the sweep now says {mine} "
                             "(fix: another --out, or delete that run's directory and its entry in definitions.json)")
        have[r.name] = mine
    atomic_write_json(path, have)


def launch_list(runs: Sequence[SweepRun], out_dir: str | Path, python: str = "python") -> str:
    """One shell command per run (for a cluster scheduler or a hand launch), unfinished runs only."""
    return "".join(shlex.join(r.command(out_dir, python)) + "\n" for r in runs if run_status(r, out_dir) != "finished")


def slurm_array(commands_file: str | Path, count: int, threads: int = 1) -> str:
    """An sbatch script running line ``SLURM_ARRAY_TASK_ID + 1`` of ``commands_file`` per array task."""
    return (f"#!/bin/bash\n#SBATCH --array=0-{max(count - 1, 0)}\n#SBATCH --cpus-per-task={threads}\n"
            f"export OMP_NUM_THREADS={threads}\n"
            f'eval "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(commands_file))})"\n')


# --------------------------------------------------------------------------- results


def _mean_std(xs: Sequence[float]) -> dict:
    a = np.asarray([x for x in xs if x is not None and math.isfinite(x)], float)
    if not a.size:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def collect(spec: SweepSpec, runs: Sequence[SweepRun], out_dir: str | Path, optima: Optional[set] = None,
            tuned_groups: Sequence[str] = (), tuning: Optional[Callable[[list], list]] = None) -> dict:
    """Every finished run's numbers, per-cell means with seed spread, the overfitting check, the
    ordering per validation set, and (with a D-sweep) the data law and efficiency multipliers.

    Tuned groups (sweep_tune.collect passes them): their runs are in ``runs`` too, but only the
    cells in ``optima`` (each family's certified optimum, mean over its seeds) take part in the
    orderings and the data law; the other points of a search stay in ``runs`` and ``cells``
    (``candidate: false``). ``tuning(cells)`` gives the families' rows (``results["tuning"]``).
    """
    from megadoc_pl.analysis.runs import load_run

    optima = optima or set()
    group_of = {r.cell: r.group for r in runs}
    out_dir = Path(out_dir)
    rows = []
    for r in runs:
        row = {"name": r.name, "group": r.method, "role": r.role, "cell": r.cell, "seed": r.seed,
               "status": run_status(r, out_dir), **{k: v for k, v in r.values}}
        if row["status"] == "finished":
            m = load_run(out_dir / "runs" / r.name).metrics
            for s in VAL_SETS:
                row[f"val/{s}/loss"] = m.get(f"val/{s}/loss")
                row[f"val/{s}/loss_best"] = m.get(f"val/{s}/loss_best")
            passes = m.get("train/passes/real") or 0
            row["real_unique_tokens"] = m["train/tokens/real"] / passes if passes else None
            row["tokens"] = m.get("tokens_seen")
            row["wall_time_s"] = m.get("wall_time_s")
        rows.append(row)
    done = [r for r in rows if r["status"] == "finished"]
    cells: dict[str, dict] = {}
    for r in done:
        c = cells.setdefault(r["cell"], {"cell": r["cell"], "group": r["group"], "role": r["role"],
                                         **{k: r[k] for k, _ in next(x for x in runs if x.name == r["name"]).values},
                                         "runs": []})
        c["runs"].append(r["name"])
    for c in cells.values():
        members = [r for r in done if r["cell"] == c["cell"]]
        for s in VAL_SETS:
            c[f"val/{s}/loss"] = _mean_std([r[f"val/{s}/loss"] for r in members])
        # A seed may draw another data.real_fraction subset (the draw follows train.data_seed), so
        # the cell's D is the mean over its seeds' unique real tokens.
        ds = [r["real_unique_tokens"] for r in members if r["real_unique_tokens"]]
        c["real_unique_tokens"] = float(np.mean(ds)) if ds else None
        c["candidate"] = c["cell"] in optima or group_of[c["cell"]] not in tuned_groups
    results = {"sweep": spec.name, "description": spec.description, "scale": spec.scale,
               "runs": rows, "cells": list(cells.values()),
               "finished": len(done), "total": len(rows)}
    candidates = [c for c in cells.values() if c["candidate"]]
    results["real_only_overfit"] = overfit_check(list(cells.values()), done)
    results["best"] = best_cells(candidates)
    results["efficiency"] = efficiency(candidates, results["best"])
    results["tuning"] = tuning(list(cells.values())) if tuning else []
    results["paired"] = paired(results["best"], done)
    return results


def paired(best: dict, runs: list[dict]) -> dict:
    """Each method's best cell against real-only's, seed by seed (per validation set).

    The seeds of a sweep are shared: seed s trains every method on the same data draw and
    order seeds, so the per-seed difference removes what the seeds have in common (with
    ``data.real_fraction`` below 1, the subset drawn) and is tighter than two means' spreads.
    """
    out: dict[str, list] = {}
    for s in VAL_SETS:
        base = next((v for v in best[s] if v["name"] == "real-only"), None)
        rows = []
        if base is not None:
            ref = {r["seed"]: r[f"val/{s}/loss"] for r in runs if r["cell"] == base["cell"]}
            for v in best[s]:
                if v["name"] == "real-only":
                    continue
                mine = {r["seed"]: r[f"val/{s}/loss"] for r in runs if r["cell"] == v["cell"]}
                d = [mine[k] - ref[k] for k in sorted(set(mine) & set(ref)) if mine[k] is not None and ref[k] is not None]
                if d:
                    rows.append({"name": v["name"], "vs": "real-only", **_mean_std(d),
                                 "wins": sum(x < 0 for x in d), "seeds": sorted(set(mine) & set(ref))})
        out[s] = rows
    return out


def _loss(c: dict, s: str = "iid") -> float:
    v = c["loss"]["mean"] if "loss" in c else c[f"val/{s}/loss"]["mean"]
    return math.inf if v is None else v


def overfit_check(cells: list[dict], runs: list[dict], tol: float = 1e-3) -> dict:
    """Did real-only overfit? Validation loss rising with real epochs E (baseline cells, by E), or
    rising within a run (its final validation loss above its best by more than ``tol``)."""
    base = [c for c in cells if c["role"] == "baseline"]
    # A tuned baseline's cells differ in seeds (its search ran on the first seed, its optimum on
    # all): compare them on the seeds every baseline cell has.
    seeds = {c.get("cell"): {r["seed"]: r["val/iid/loss"] for r in runs if "cell" in r and r["cell"] == c.get("cell")}
             for c in base}
    common = set.intersection(*(set(s) for s in seeds.values())) if seeds else set()
    per_e: dict = {}  # the best baseline cell per E (a tuned baseline has several per E)
    for c in base:
        e = c.get("data.mixture.real_epochs", 0)
        shared = [seeds[c.get("cell")][s] for s in common if seeds[c.get("cell")][s] is not None]
        per_e[e] = min(per_e.get(e, math.inf), float(np.mean(shared)) if shared else _loss(c))
    by_e = sorted(per_e.items())
    rising_e = [(a[0], b[0]) for a, b in zip(by_e, by_e[1:]) if b[1] > a[1] + tol]
    within = [r["name"] for r in runs if r["role"] == "baseline" and r["val/iid/loss"] is not None
              and r["val/iid/loss_best"] is not None and r["val/iid/loss"] > r["val/iid/loss_best"] + tol]
    best_e = min(by_e, key=lambda t: t[1])[0] if by_e else None
    return {"loss_by_epochs": by_e, "rises_with_epochs": rising_e, "rises_within_run": within,
            "best_epochs": best_e, "overfit": bool(rising_e or within),
            "best_epochs_is_largest": bool(by_e) and best_e == by_e[-1][0]}


def best_cells(cells: list[dict]) -> dict:
    """Per validation set, best first: real-only's best cell and each method's best cell at every G."""
    out = {}
    for s in VAL_SETS:
        best: dict[str, dict] = {}
        base = [c for c in cells if c["role"] == "baseline"]
        if base:
            b = min(base, key=lambda c: _loss(c, s))
            best["real-only"] = {"name": "real-only", "cell": b["cell"], "loss": b[f"val/{s}/loss"]}
        for c in cells:
            key = f"{c['group']} G={c.get('data.generations', '?')}"
            if c["role"] == "method" and (key not in best or _loss(c, s) < _loss(best[key], s)):
                best[key] = {"name": key, "cell": c["cell"], "loss": c[f"val/{s}/loss"], "group": c["group"],
                             "generations": c.get("data.generations")}
        out[s] = sorted(best.values(), key=lambda v: v["loss"]["mean"])
    return out


def efficiency(cells: list[dict], best: dict, n_boot: int = 500) -> dict:
    """The baseline data law L(D) on val/iid (best cell per D: the data group's fractions plus
    the baseline's full corpus) and each method's multiplier D_eff / D_real, or why not."""
    from megadoc_pl.analysis.efficiency import data_efficiency, fit_data_law

    per_d: dict[float, dict] = {}
    for c in cells:
        if c["role"] in ("baseline", "data") and c.get("real_unique_tokens"):
            d = float(c["real_unique_tokens"])
            if d not in per_d or _loss(c) < _loss(per_d[d]):
                per_d[d] = c
    points = sorted((d, _loss(c)) for d, c in per_d.items())
    out: dict[str, Any] = {"points": [{"tokens": d, "loss": l, "cell": per_d[d]["cell"]} for d, l in points]}
    if len(points) < 4:
        out["skipped"] = f"{len(points)} data sizes; the 3-parameter law needs at least 4 (add data.real_fraction values)"
        return out
    fit = fit_data_law([p[0] for p in points], [p[1] for p in points], n_boot=n_boot, seed=0)
    out["law"] = fit.as_dict()
    # The methods' D: the baseline's (the law's other points may lie above it, as in the papers),
    # or each method's own unique real tokens when its run reports them.
    base_d = [float(c["real_unique_tokens"]) for c in cells if c["role"] == "baseline" and c.get("real_unique_tokens")]
    d_real = max(base_d) if base_d else max(per_d)
    d_of = {c["cell"]: c.get("real_unique_tokens") for c in cells}
    base_loss = next((v["loss"]["mean"] for v in best["iid"] if v["name"] == "real-only"), None)
    rows = []
    for v in best["iid"]:
        if v["name"] == "real-only":
            continue
        name, loss = v["name"], v["loss"]["mean"]
        try:
            row = data_efficiency(fit, {name: loss}, float(d_of.get(v["cell"]) or d_real))[0].as_dict()
            if base_loss is not None:  # the predecessor's definition: D_eff(method) / D_eff(real-only's loss)
                ref = data_efficiency(fit, {name: loss}, d_real, reference_loss=base_loss)[0].as_dict()
                row.update({f"vs_baseline_loss{k[len('multiplier'):]}": ref[k]
                            for k in ("multiplier", "multiplier_lo", "multiplier_hi")})
            rows.append(row)
        except ValueError as e:
            rows.append({"name": name, "loss": loss, "error": str(e)})
    out["d_real"], out["multipliers"], out["fit"] = d_real, rows, fit
    return out


# --------------------------------------------------------------------------- report


def figures(results: dict, out_dir: str | Path) -> list[Path]:
    """The papers' figures as PNG: loss vs G (per validation set), loss by position on the long
    set, and (with a data law) the law and the multipliers."""
    from megadoc_pl.analysis import plots
    from megadoc_pl.analysis.runs import read_loss_by_position

    out_dir = Path(out_dir)
    made = []
    for s in VAL_SETS:
        best = results["best"][s]
        points: dict[str, list[tuple[float, float, float]]] = {}
        for v in best:
            if "group" in v:
                points.setdefault(v["group"], []).append((float(v["generations"]), v["loss"]["mean"],
                                                          v["loss"].get("std") or 0.0))
        base = next((v["loss"] for v in best if v["name"] == "real-only"), None)
        if points:
            series = {k: ([p[0] for p in sorted(v)], [p[1] for p in sorted(v)]) for k, v in points.items()}
            errors = {k: [p[2] for p in sorted(v)] for k, v in points.items()}
            made.append(plots.plot_loss_vs_generations(
                series, out_dir / f"loss_vs_G_{s}.png", baseline=base["mean"] if base else None,
                baseline_error=base.get("std") if base else None, errors=errors, ylabel=f"val/{s}/loss",
                title=f"val/{s}: best E/w per method and G (mean +- std over seeds)"))
    curves = {}
    for v in results["best"]["long"]:
        run = next((r for r in results["runs"] if r["cell"] == v["cell"] and r["status"] == "finished"), None)
        csv = out_dir / "runs" / run["name"] / "loss_by_position_long.csv" if run else None
        if csv is not None and csv.exists():
            kinds = read_loss_by_position(csv)
            if "document" in kinds:
                curves[v["name"]] = kinds["document"]
    if curves:
        made.append(plots.plot_loss_by_position(curves, out_dir / "loss_by_position_long.png", log_x=True,
                                                title="val/long: loss by position in the document"))
    if any("certificate" in r for r in results.get("tuning", [])):
        made.append(plots.plot_certificates(results["tuning"], out_dir / "certificates.png"))
    eff = results["efficiency"]
    if "fit" in eff:
        made.append(plots.plot_scaling_fits({"real-only L(D)": eff["fit"]}, out_dir / "data_law.png",
                                            x_label="unique real tokens D", ylabel="val/iid/loss"))
        ok = [r for r in eff["multipliers"] if "multiplier" in r]
        if ok:
            made.append(plots.plot_multipliers(ok, out_dir / "data_efficiency.png"))
    return made


def summary(results: dict) -> str:
    """What the sweep shows, in words: overfitting first, then orderings with seed spread."""
    lines = [f"sweep {results['sweep']}: {results['finished']}/{results['total']} runs finished"]
    o = results["real_only_overfit"]
    if o["loss_by_epochs"]:
        lines.append("real-only val/iid by E: " + ", ".join(f"E={e:g}: {l:.4f}" for e, l in o["loss_by_epochs"]))
        if o["overfit"]:
            lines.append(f"real-only overfit: loss rises with E {o['rises_with_epochs']} / within runs "
                         f"{o['rises_within_run']}; best E={o['best_epochs']:g}")
        else:
            lines.append("WARNING: real-only did not overfit (loss falls with E and within every run): this is not "
                         "the data-constrained regime the papers study, so the ordering below says little")
        if o["best_epochs_is_largest"]:
            lines.append("note: real-only's best E is the largest tried; widen the E axis")
    lines += tuning_lines(results.get("tuning", []))
    for s in VAL_SETS:
        best = results["best"][s]
        if best:
            lines.append(f"val/{s} (mean +- std over seeds, best E/w per method and G):")
            for v in best:
                l = v["loss"]
                lines.append(f"  {v['name']:24s} {l['mean']:.4f} +- {l['std']:.4f} (n={l['n']}, range {l['max'] - l['min']:.4f})")
    for s, rows in results.get("paired", {}).items():
        if rows:
            lines.append(f"val/{s}, each method minus real-only on the same seed (mean +- std; seeds won):")
            for r in rows:
                lines.append(f"  {r['name']:24s} {r['mean']:+.4f} +- {r['std']:.4f} ({r['wins']}/{r['n']})")
    eff = results["efficiency"]
    if "skipped" in eff:
        lines.append(f"data efficiency: skipped ({eff['skipped']})")
    else:
        for r in eff["multipliers"]:
            if "multiplier" in r:
                lines.append(f"data efficiency {r['name']}: {r['multiplier']:.3f}x {_interval(r, 'multiplier')} "
                             "(D_eff / D)" + (f"; {r['vs_baseline_loss']:.3f}x {_interval(r, 'vs_baseline_loss')} "
                                              "(D_eff / D_eff(real-only's loss))" if "vs_baseline_loss" in r else ""))
            else:
                lines.append(f"data efficiency {r['name']}: {r['error']}")
    return "\n".join(lines)


def _interval(r: dict, key: str) -> str:
    def num(v: Any) -> str:
        return "none" if v is None else (v if isinstance(v, str) else f"{v:.3f}")

    return f"[{num(r.get(key + '_lo'))}, {num(r.get(key + '_hi'))}]"


def write_results(results: dict, out_dir: str | Path, made: Sequence[Path]) -> Path:
    """``OUT/results.json`` (strict JSON: the fit object is replaced by its dict)."""
    out = {k: v for k, v in results.items() if k != "efficiency"}
    out["efficiency"] = {k: v for k, v in results["efficiency"].items() if k != "fit"}
    out["figures"] = [str(Path(p).name) for p in made]
    out["summary"] = summary(results).splitlines()
    path = Path(out_dir) / "results.json"
    atomic_write_json(path, out)
    atomic_write_text(Path(out_dir) / "summary.txt", summary(results) + "\n")
    if results.get("tuning"):
        atomic_write_text(Path(out_dir) / "tuning.md", certificates_markdown(results["tuning"]))
    return path


# --------------------------------------------------------------------------- tuned groups (report)


def tuning_lines(rows: Sequence[dict]) -> list[str]:
    """One line per tuned family: where it was certified, its search, grid edges, seed spread."""
    lines = []
    for r in rows:
        if "certificate" not in r:
            lines.append(f"tuned {r['family']}: {r['status']} after {r['runs']} run(s), {r['rounds']} centre(s)")
            continue
        c = r["certificate"]
        pt = _point(c["centre"])
        edges = f"; at the grid's edge in {', '.join(sorted({e['axis'] for e in c['grid_edges']}))}" \
            if c["grid_edges"] else ""
        spread = r.get("seed_spread") or {}
        s = spread.get(f"{r['objective']}")
        seeds = f"; {r['objective']} over seeds {s['mean']:.4f} +- {s['std']:.4f} (n={s['n']})" if s and s["n"] else ""
        lines.append(f"tuned {r['family']}: certified at {pt} ({c['objective']:.4f}) after {c['runs']} runs, "
                     f"{c['rounds']} centre(s){edges}{seeds}")
    return lines


def certificates_markdown(rows: Sequence[dict]) -> str:
    """``OUT/tuning.md``: per family the optimum, each one-step neighbour with its loss and delta,
    the grid edges, and the seed spread at the optimum."""
    out = ["# Tuned families: certificates", ""]
    for r in rows:
        out.append(f"## {r['family']}")
        if "certificate" not in r:
            out += [f"{r['status']} after {r['runs']} run(s) and {r['rounds']} centre(s): no certificate yet.", ""]
            continue
        c = r["certificate"]
        out += [f"{c['statement']}.", "", f"Search: {c['runs']} runs, {c['rounds']} centre(s) from "
                f"{_point(r['start'])}.", "", f"| point | {r['objective']} | delta |", "|---|---|---|",
                f"| **{_point(c['centre'])}** (optimum) | {c['objective']:.4f} | |"]
        for n in c["neighbours"]:
            out.append(f"| {_point(n['point'])} | {n['objective']:.4f} | {n['delta']:+.4f} |")
        for e in c["grid_edges"]:
            out.append(f"| beyond the grid: {e['axis']} {'-' if e['step'] < 0 else '+'}1 | | ({e['reason']}) |")
        spread = r.get("seed_spread") or {}
        for key, s in spread.items():
            if s and s.get("n"):
                out.append(f"\nAt the optimum, {key} over {s['n']} seeds: {s['mean']:.4f} +- {s['std']:.4f} "
                           f"(range {s['max'] - s['min']:.4f}).")
        out.append("")
    return "\n".join(out)


def _point(p: dict) -> str:
    return ", ".join(f"{AXIS_SHORT.get(k, k)}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in p.items())
