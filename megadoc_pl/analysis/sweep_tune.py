"""Tuned groups of a declared sweep: the bounding-box tuner (tuner.py) driven by tools/reproduce.py.

A sweep group may say ``tune:`` as well as (or instead of) ``axes:``::

    stitch:
      recipe: megadoc_stitch
      axes: {data.generations: [2, 8]}            # fixed axes: one tuner per value combination
      tune:
        axes: {data.mixture.real_epochs: [4, 8, 16, 32], data.mixture.synthetic_fraction: [0.5, 0.75, 0.9],
               train.weight_decay: [0.1, 0.4, 1.6]}
        centre: {data.mixture.real_epochs: 16, data.mixture.synthetic_fraction: 0.75, train.weight_decay: 0.4}
        # grid: synthetic | real   (start from a megadocs grid, tuner.GRIDS; `axes` entries replace its axes)
        # objective: val/iid/loss  (metrics.json key), direction: min

Each combination of the fixed axes is a *family*: its tuner runs the centre and its one-step
neighbours at the group's first seed, moves to the best strictly better point and repeats until
the centre is certified (tuner.py). The family's remaining seeds then train at the certified
optimum only. Runs are ordinary sweep runs (``OUT/runs/stitch-G8-E16-w0.75-wd0.4-s0``), so
finished runs are never rerun and a killed call resumes; the tuner's state for each family is
``OUT/tune/FAMILY.json``. The analysis compares families at their optimum (mean over seeds), not
at the luckiest single-seed point of the search.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from megadoc_pl.analysis import tuner
from megadoc_pl.analysis.sweep import SweepRun, SweepSpec, make_run, run_status, run_tag
from megadoc_pl.analysis.sweep import collect as collect_sweep
from megadoc_pl.utils import atomic_write_json


@dataclass
class FamilySpec(tuner.TuneSpec):
    """A TuneSpec whose runs are named like sweep runs (``PREFIX-E16-w0.75-s0``)."""

    seed: int = 0

    def run_name(self, index: Sequence[int]) -> str:
        return f"{self.prefix}{run_tag(list(self.point(index).items()))}-s{self.seed}"


@dataclass
class Family:
    """One tuner of a tuned group: the group at one combination of its fixed axes."""

    name: str  # group + fixed-axis tag: "stitch-G8"
    group: str
    g: dict  # the group's sweep entry
    fixed: tuple  # ((key, value), ...)
    spec: FamilySpec
    seeds: list
    extra: tuple = ()
    state: dict = field(default_factory=dict)

    def run(self, point: dict, seed: int, sweep: SweepSpec) -> SweepRun:
        values = [*self.fixed, *point.items()]
        return make_run(sweep, self.group, self.g, values, seed, self.extra)

    def tuning_run(self, index: Sequence[int], sweep: SweepSpec) -> SweepRun:
        return self.run(self.spec.point(index), self.seeds[0], sweep)

    @property
    def certified(self) -> bool:
        return self.state.get("status") == "certified"


def families(sweep: SweepSpec, out_dir: str | Path, extra_overrides: Sequence[str] = ()) -> list[Family]:
    """Every family of every tuned group, with its spec checked against the recipe (one-line errors)."""
    import itertools

    out = []
    for group, g in sweep.groups.items():
        if "tune" not in g:
            continue
        t = g["tune"]
        axes = dict(g.get("axes") or {})
        keys = list(axes)
        for combo in itertools.product(*(axes[k] for k in keys)):
            fixed = tuple(zip(keys, combo))
            name = group + run_tag(list(fixed))
            seeds = [int(s) for s in g.get("seeds", sweep.seeds)]
            base = make_run(sweep, group, g, list(fixed), seeds[0], extra_overrides)
            try:  # without a megadocs grid the tuned axes are exactly those given
                spec = tuner.load_spec(None, recipe=g["recipe"], grid=t.get("grid") or "none", axes=t.get("axes"),
                                       centre=t.get("centre"), objective=t.get("objective"),
                                       direction=t.get("direction"), root=str(Path(out_dir) / "runs"), prefix=name,
                                       overrides=[o for o in base.overrides if not o.startswith("train.seed")
                                                  and not o.startswith("train.data_seed")])
            except ValueError as e:
                raise ValueError(f"{sweep.path or sweep.name}: group {group!r} tune: {e}") from None
            tuned_fixed = sorted(set(spec.axes) & set(keys))
            if tuned_fixed:
                raise ValueError(f"{sweep.path or sweep.name}: group {group!r}: {tuned_fixed} is both a fixed axis "
                                 "and a tuned one; keep it in one of axes / tune.axes")
            fspec = FamilySpec(**asdict(spec), seed=seeds[0])
            out.append(Family(name, group, g, fixed, fspec, seeds, tuple(extra_overrides)))
    return out


def state_path(out_dir: str | Path, fam: Family) -> Path:
    return Path(out_dir) / "tune" / f"{fam.name}.json"


def advance(fam: Family, sweep: SweepSpec, out_dir: str | Path, failed: frozenset = frozenset(),
            save: bool = True) -> list[SweepRun]:
    """Step the family's tuner as far as finished runs allow; the runs it needs next.

    While tuning: the pending neighbourhood (at the first seed). Once certified: the other seeds
    at the optimum that are not finished. A run named in ``failed`` is left out, which holds its
    family's search where it is until a later call retries the run. ``save=False`` (dry runs)
    reads finished runs but writes no state.
    """
    out_dir = Path(out_dir)
    path = state_path(out_dir, fam)
    try:
        fam.state = tuner.load_state(path, fam.spec)
    except ValueError as e:
        raise ValueError(f"{e} (fix: another --out, or delete {path} and the family's runs)") from None

    def read(spec: tuner.TuneSpec, name: str) -> float | None:
        run = SweepRun(name, fam.group, "", "", 0, (), ())
        if run_status(run, out_dir) != "finished":
            return None
        return tuner.read_objective(spec, name)

    st = tuner.step(fam.spec, fam.state, read=read)
    if save:
        atomic_write_json(path, fam.state)
    if not st.certified:
        runs = [fam.tuning_run(idx, sweep) for idx in st.pending]
    else:
        best = fam.state["certificate"]["centre"]
        runs = [fam.run(best, s, sweep) for s in fam.seeds[1:]]
    return [r for r in runs if run_status(r, out_dir) != "finished" and r.name not in failed]


def all_runs(fams: Sequence[Family], sweep: SweepSpec) -> list[SweepRun]:
    """Every run the families have evaluated or need (for collecting results)."""
    runs = []
    for fam in fams:
        for rec in fam.state.get("results", {}).values():
            runs.append(fam.run(rec["point"], fam.seeds[0], sweep))
        if fam.certified:
            runs += [fam.run(fam.state["certificate"]["centre"], s, sweep) for s in fam.seeds[1:]]
    seen, out = set(), []
    for r in runs:
        if r.name not in seen:
            seen.add(r.name)
            out.append(r)
    return out


def optimum_cell(fam: Family, sweep: SweepSpec) -> str | None:
    """The cell name (run name without seed) of the family's certified optimum, else None."""
    if not fam.certified:
        return None
    return fam.run(fam.state["certificate"]["centre"], fam.seeds[0], sweep).cell


def collect(sweep: SweepSpec, runs: Sequence[SweepRun], out_dir: str | Path, fams: Sequence[Family]) -> dict:
    """:func:`megadoc_pl.analysis.sweep.collect` with the families' runs, their optima as the
    only cells compared, and their certificates under ``tuning``."""
    optima = {optimum_cell(f, sweep) for f in fams} - {None}
    return collect_sweep(sweep, [*runs, *all_runs(fams, sweep)], out_dir, optima=optima,
                         tuned_groups={f.group for f in fams}, tuning=lambda cells: report(fams, sweep, cells))


def report(fams: Sequence[Family], sweep: SweepSpec, cells: Sequence[dict]) -> list[dict]:
    """Per family: status, rounds, the certificate (optimum, neighbours and their losses, grid
    edges) and the seed spread at the optimum (from the collected cells)."""
    by_cell = {c["cell"]: c for c in cells}
    out = []
    for fam in fams:
        st = fam.state
        row: dict[str, Any] = {"family": fam.name, "group": fam.group, "fixed": dict(fam.fixed),
                               "axes": fam.spec.axes, "start": fam.spec.centre, "objective": fam.spec.objective,
                               "status": st.get("status", "pending"), "rounds": len(st.get("path", [])),
                               "runs": len(st.get("results", {}))}
        if fam.certified:
            cert = dict(st["certificate"])
            row["certificate"] = cert
            cell = by_cell.get(optimum_cell(fam, sweep))
            row["optimum_cell"] = optimum_cell(fam, sweep)
            row["seed_spread"] = {k: cell[k] for k in cell if k.startswith("val/")} if cell else None
        out.append(row)
    return out


# --------------------------------------------------------------------------- cost (dry run)


def worst_case(fam: Family) -> dict:
    """Run counts of one family: round 1 (the start's neighbourhood), the most any later round can
    add (2 per axis), and the worst case of the whole search (every grid point) plus the seeds."""
    hood, _ = tuner.neighbourhood(fam.spec, [fam.spec.axis_index(k, fam.spec.centre[k]) for k in fam.spec.axes])
    grid = math.prod(len(v) for v in fam.spec.axes.values())
    return {"round1": len(hood), "per_round_max": 2 * len(fam.spec.axes), "grid": grid,
            "seeds": len(fam.seeds) - 1, "worst_case_runs": grid + len(fam.seeds) - 1}


def gpu_hours(fam: Family, sweep: SweepSpec, cost: dict) -> dict:
    """GPU-hours of round 1 and of the worst case, from the dry-run cost model (FLOPs at the
    assumed stream sizes and ``cost.gpu``'s peak at the assumed MFU; no data read).

    The worst case is the grid size times the costliest grid point (its corner of largest
    values), plus the extra seeds at that point: an upper bound.
    """
    hood, _ = tuner.neighbourhood(fam.spec, [fam.spec.axis_index(k, fam.spec.centre[k]) for k in fam.spec.axes])
    r1 = sum(run_gpu_hours(fam.tuning_run(idx, sweep), cost) for _, _, idx in hood)
    corner = {k: max(v) for k, v in fam.spec.axes.items()}
    top = run_gpu_hours(fam.run(corner, fam.seeds[0], sweep), cost)
    wc = worst_case(fam)
    return {"round1": r1, "costliest_run": top, "per_round_max": top * wc["per_round_max"],
            "worst_case": top * wc["worst_case_runs"]}


def run_gpu_hours(run: SweepRun, cost: dict) -> float:
    """GPU-hours of one run from :func:`megadoc_pl.dryrun.assumed_dry_run_report` and the assumed GPU."""
    from megadoc_pl.dryrun import ASSUMED_MFU, assumed_dry_run_report
    from megadoc_pl.model.flops import peak_bf16_flops
    from megadoc_pl.recipes import compose_recipe

    cfg = compose_recipe(run.recipe, list(run.overrides))
    real = _tokens(cost["real_tokens"])
    sizes = {"real": real}
    if str(cfg.data.view) != "real":
        sizes["synthetic"] = int(real * float(cost.get("synthetic_per_generation", 1.0)) * int(cfg.data.generations))
    flops = assumed_dry_run_report(cfg, sizes)["flops"]["total"]
    peak = peak_bf16_flops(str(cost.get("gpu", "H100")))
    if peak is None:
        raise ValueError(f"cost.gpu={cost.get('gpu')!r}: unknown peak FLOP/s (use a GPU name such as H100, A100)")
    return flops / (peak * ASSUMED_MFU) / 3600


def _tokens(v: Any) -> int:
    from megadoc_pl.dryrun import parse_stream_sizes

    return parse_stream_sizes(f"real={v}")["real"]


def dry_run_table(fams: Sequence[Family], sweep: SweepSpec, out_dir: str | Path, nxt: Sequence[SweepRun]) -> str:
    """The tuned families for ``--dry-run``: where each stands, its next runs, the worst-case run
    count and, with the sweep's ``cost:`` assumptions, GPU-hours of round 1 and of the worst case."""
    cost = sweep.extra.get("cost")
    lines = ["tuned families (round 1 = the start's neighbourhood; worst case = every grid point, then the "
             "seeds at the optimum):"]
    tot = {"round1": 0, "worst_case_runs": 0, "h1": 0.0, "hw": 0.0}
    for fam in fams:
        wc = worst_case(fam)
        st = fam.state
        where = ("certified" if fam.certified else
                 f"round {len(st.get('path', [1]))}, {len(st.get('results', {}))} run(s) evaluated")
        line = (f"  {fam.name:22s} {where}; round 1: {wc['round1']} runs, later rounds <= {wc['per_round_max']}, "
                f"worst case {wc['worst_case_runs']} runs ({wc['grid']} grid points + {wc['seeds']} seeds)")
        tot["round1"] += wc["round1"]
        tot["worst_case_runs"] += wc["worst_case_runs"]
        if cost:
            h = gpu_hours(fam, sweep, cost)
            line += (f"; GPU-hours round 1 {h['round1']:.1f}, a later round <= {h['per_round_max']:.1f}, "
                     f"worst case {h['worst_case']:.1f}")
            tot["h1"] += h["round1"]
            tot["hw"] += h["worst_case"]
        lines.append(line)
        for r in nxt:
            if r.name.startswith(fam.name + "-"):
                lines.append(f"    {run_status(r, out_dir):9s} {r.name}")
    total = f"total: round 1 {tot['round1']} runs, worst case {tot['worst_case_runs']} runs"
    if cost:
        from megadoc_pl.dryrun import ASSUMED_MFU

        total += (f"; GPU-hours round 1 {tot['h1']:.1f}, worst case {tot['hw']:.1f} ({cost.get('gpu', 'H100')} at "
                  f"{ASSUMED_MFU:.0%} MFU, real corpus {cost['real_tokens']} tokens, "
                  f"{cost.get('synthetic_per_generation', 1.0)}x real per generation)")
    lines.append(total)
    return "\n".join(lines)


