"""Bounding-box tuner: coordinate-wise local search on a discrete grid, with a certificate.

The megadocs procedure (docs/papers.md, megadocs 1.6): around a centre on a discrete grid of
(real epochs, lr, weight decay, synthetic fraction), run the centre and its one-step
neighbours on every axis (at most 1 + 2 * axes runs), move the centre to the best run and
repeat until the centre is at least as good as every neighbour that exists on the grid. That
final neighbourhood is a *local-optimality certificate*: every one-step move was run and none
was better. A neighbour beyond the grid's end does not exist; the certificate lists it as a
grid edge (widen the grid to test it).

The tuner never trains by itself unless asked: it writes one override list per run
(``key=value`` lines, with a run name derived from the point), reads each run's
``ROOT/NAME/metrics.json`` when it exists, and keeps its state in a JSON file, so it can be
called again after the runs finish (or after a crash) and picks up where it stopped. Points
already evaluated are never rerun. A neighbour must be strictly better to move there, so the
search cannot cycle; a NaN objective (a diverged run) counts as worse than any number.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from megadoc_pl.errors import BadInput
from megadoc_pl.utils import atomic_write_json, atomic_write_text, json_fingerprint

# Grids of the megadocs code (docs/papers.md, megadocs 1.6), axis order = the run-name order.
GRIDS: dict[str, dict[str, list]] = {
    "synthetic": {
        "data.mixture.real_epochs": [1, 2, 4, 8, 16, 32, 64],
        "train.lr": [1e-3, 3e-3, 1e-2],
        "train.weight_decay": [0.1, 0.4, 0.8, 1.6],
        "data.mixture.synthetic_fraction": [0.5, 0.75, 0.9],
    },
    "real": {
        "data.mixture.real_epochs": [1, 2, 4, 8, 16, 32, 64],
        "train.lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
        "train.weight_decay": [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4],
    },
}
# Short names used in run names; other axes use the last component of their key.
AXIS_SHORT = {
    "data.mixture.real_epochs": "E",
    "train.lr": "lr",
    "train.weight_decay": "wd",
    "data.mixture.synthetic_fraction": "w",
}
STATE_VERSION = 1


@dataclass
class TuneSpec:
    """What to tune: the recipe, the grid, the start, the objective, where runs go."""

    recipe: str
    axes: dict  # key -> list of grid values (ordered as given)
    centre: dict  # key -> a value on that axis
    objective: str = "val/iid/loss"  # metrics.json key
    direction: str = "min"  # min (losses) | max (accuracies)
    root: str = "runs/tune"  # run directories are ROOT/NAME
    prefix: str = ""  # run-name prefix (default: the recipe name)
    overrides: list = field(default_factory=list)  # fixed key=value for every run (scale=..., data.generations=...)
    train_script: str = "recipes/train.py"  # what --launch runs

    def __post_init__(self) -> None:
        if not self.axes:
            raise ValueError("the grid has no axes")
        if self.direction not in ("min", "max"):
            raise ValueError(f"direction must be min or max, got {self.direction!r}")
        for key, values in self.axes.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ValueError(f"grid axis {key}: needs a non-empty list of values, got {values!r}")
            if len(set(map(_canon, values))) != len(values):
                raise ValueError(f"grid axis {key}: repeated values in {values}")
        for key in self.centre:
            if key not in self.axes:
                raise ValueError(f"centre key {key!r} is not a grid axis ({', '.join(self.axes)})")
        missing = [k for k in self.axes if k not in self.centre]
        if missing:
            raise ValueError(f"centre has no value for axis {', '.join(missing)}")
        for key, v in self.centre.items():
            self.axis_index(key, v)  # raises when off the grid
        for o in self.overrides:
            if "=" not in str(o):
                raise ValueError(f"override {o!r} is not key=value")
        if not self.prefix:
            self.prefix = self.recipe

    def axis_index(self, key: str, value: Any) -> int:
        for i, v in enumerate(self.axes[key]):
            if _same(v, value):
                return i
        raise ValueError(f"centre {key}={value!r} is not on the grid {self.axes[key]}")

    def point(self, index: Sequence[int]) -> dict:
        return {k: self.axes[k][i] for k, i in zip(self.axes, index)}

    def run_name(self, index: Sequence[int]) -> str:
        parts = []
        for k, i in zip(self.axes, index):
            parts.append(f"{AXIS_SHORT.get(k, k.rsplit('.', 1)[-1])}{_fmt_value(self.axes[k][i])}")
        return f"{self.prefix}-" + "_".join(parts)

    def run_overrides(self, index: Sequence[int]) -> list[str]:
        """The recipe overrides of one run (fixed overrides, then the point, then run name/root)."""
        point = [f"{k}={_fmt_value(v)}" for k, v in self.point(index).items()]
        # run.resume=auto: a run killed mid-training continues from its last checkpoint.
        return [*map(str, self.overrides), *point, f"run.name={self.run_name(index)}", f"run.root={self.root}",
                "run.resume=auto"]

    def command(self, index: Sequence[int]) -> list[str]:
        return ["python", self.train_script, "--recipe", self.recipe, *self.run_overrides(index)]


def _canon(v: Any) -> Any:
    return round(float(v), 12) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    return str(a) == str(b)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(int(v)) if v.is_integer() and abs(v) >= 1 else repr(v)
    return str(v)


# --------------------------------------------------------------------------- spec loading


def load_spec(path: str | Path | None = None, **overrides: Any) -> TuneSpec:
    """A TuneSpec from a YAML/JSON file and/or keyword overrides (None values are ignored).

    ``grid: synthetic|real`` selects a megadocs grid (default: ``real`` when the recipe's view is
    ``real``, else ``synthetic``); ``axes`` entries replace its axes (an axis set to null is
    removed). ``grid: none`` starts from no axis: exactly the ``axes`` given, in their order. Without a centre the recipe's own values are used when the recipe can be loaded
    (snapped to the nearest grid value), else the middle value of each axis.
    """
    raw: dict = {}
    if path is not None:
        import yaml

        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"{p}: cannot read the tuning spec ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{p}: the tuning spec must be a mapping of keys (recipe, axes, centre, ...)")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in TuneSpec.__dataclass_fields__.values()} | {"grid"}  # type: ignore[attr-defined]
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown tuning-spec keys {unknown}; known: {sorted(known)}")
    if "recipe" not in raw:
        raise ValueError("the tuning spec needs a recipe (recipe: NAME, or --recipe NAME)")
    recipe_values = _recipe_values(raw["recipe"], list(raw.get("overrides") or []))
    # Default grid: the real-only grid for a recipe without synthetic data, else the synthetic one.
    default_grid = "real" if recipe_values.get("data.view") == "real" else "synthetic"
    grid = raw.pop("grid", None) or default_grid
    if grid not in (*GRIDS, "none"):
        raise ValueError(f"unknown grid {grid!r}: use one of {', '.join(GRIDS)}, or none (only the axes given)")
    axes = {} if grid == "none" else {k: list(v) for k, v in GRIDS[grid].items()}
    for k, v in (raw.pop("axes", None) or {}).items():
        if v is None:
            axes.pop(k, None)
        else:
            axes[k] = list(v)
    if recipe_values:
        bad = [k for k in axes if k not in recipe_values]
        if bad:
            raise ValueError(f"grid axis {', '.join(bad)} is not a key of recipe {raw['recipe']!r}")
    centre = dict(raw.pop("centre", None) or {})
    for k in axes:
        if k not in centre:
            v = recipe_values.get(k)
            # The recipe's value snapped to the grid, else the middle of the axis.
            centre[k] = _nearest(axes[k], float(v)) if isinstance(v, (int, float)) else axes[k][(len(axes[k]) - 1) // 2]
    return TuneSpec(axes=axes, centre=centre, **raw)


def _recipe_values(recipe: str, overrides: list) -> dict:
    """The resolved recipe as a flat dict of dotted keys ({} without the recipe loader).

    Loading it here also checks the recipe name and the fixed overrides before any run is
    written: a typo fails now with the loader's one-line message, not in every launched run.
    """
    from omegaconf import OmegaConf

    from megadoc_pl.analysis.runs import flatten
    from megadoc_pl.recipes import load_recipe

    cfg = load_recipe(recipe, overrides=[o for o in overrides if not str(o).startswith("run.")])
    return flatten(OmegaConf.to_container(cfg, resolve=True))


def _nearest(grid: list, v: float) -> Any:
    def dist(g: Any) -> float:
        g = float(g)
        if g > 0 and v > 0:
            return abs(math.log(g / v))
        return abs(g - v) + 1e6  # prefer positive matches on log axes
    return min(grid, key=dist)


# --------------------------------------------------------------------------- the search


@dataclass
class Step:
    """What the tuner needs next: runs to do, or the certificate when done."""

    pending: list[tuple[int, ...]]
    certified: bool
    state: dict


def spec_fingerprint(spec: TuneSpec) -> str:
    """What the search depends on (not how runs are launched)."""
    d = asdict(spec)
    d.pop("train_script")
    d["axis_order"] = list(spec.axes)  # state indices follow this order; JSON sorts dict keys
    return json_fingerprint(d)


def new_state(spec: TuneSpec) -> dict:
    centre = [spec.axis_index(k, spec.centre[k]) for k in spec.axes]
    return {
        "version": STATE_VERSION,
        "spec": asdict(spec),
        "spec_fingerprint": spec_fingerprint(spec),
        "centre": centre,
        "path": [list(centre)],
        "results": {},
        "status": "running",
        "certificate": None,
    }


def load_state(path: str | Path, spec: TuneSpec) -> dict:
    """The saved state for ``spec``, or a new one. A state made with another spec is an error."""
    p = Path(path)
    if not p.exists():
        return new_state(spec)
    try:
        state = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: the tuner state is not valid JSON; delete it to start over") from None
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{p}: tuner state version {state.get('version')} is not {STATE_VERSION}")
    if state.get("spec_fingerprint") != spec_fingerprint(spec):
        old = state.get("spec", {})
        new = json.loads(json.dumps(asdict(spec)))
        diff = sorted(k for k in set(old) | set(new) if k != "train_script" and old.get(k) != new.get(k))
        widened = _widen(state, spec) if diff == ["axes"] else None
        if widened is not None:
            return widened
        raise ValueError(
            f"{p}: this state was made with a different tuning spec (differs in: {', '.join(diff)}"
            f"{'; an axis lost or reordered values' if diff == ['axes'] else ''}); "
            "use another --state file, or delete this one to start over (widening an axis keeps the state)"
        )
    return state


def _widen(state: dict, spec: TuneSpec) -> dict | None:
    """The state carried over to a grid whose axes only gained values (a certificate at a grid
    edge says: widen the grid). Points are re-indexed by value; a certified search reopens, and
    the next step runs the new neighbours its centre now has (or certifies again at once).
    None when an axis was added, removed, lost a value or changed the order of its old values."""
    old_axes = state["spec"]["axes"]
    if list(old_axes) != list(spec.axes):
        return None
    for key, values in old_axes.items():
        try:
            pos = [spec.axis_index(key, v) for v in values]
        except ValueError:
            return None
        if pos != sorted(pos):
            return None

    def remap(index: Sequence[int]) -> list[int]:
        return [spec.axis_index(k, old_axes[k][i]) for k, i in zip(spec.axes, index)]

    added = {k: [v for v in spec.axes[k] if not any(_same(v, o) for o in old_axes[k])] for k in spec.axes}
    out = dict(state)
    out["centre"] = remap(state["centre"])
    out["path"] = [remap(i) for i in state["path"]]
    out["results"] = {name: {**r, "index": remap(r["index"])} for name, r in state["results"].items()}
    out["spec"], out["spec_fingerprint"] = asdict(spec), spec_fingerprint(spec)
    out["widened"] = [*state.get("widened", []), {k: v for k, v in added.items() if v}]
    out["status"], out["certificate"] = "running", None
    return out


def neighbourhood(spec: TuneSpec, centre: Sequence[int]) -> tuple[list[tuple[str, int, tuple]], list[dict]]:
    """(label, step, index) for the centre and its existing one-step neighbours; and grid edges."""
    hood = [("centre", 0, tuple(centre))]
    edges = []
    for a, key in enumerate(spec.axes):
        for step in (-1, +1):
            i = centre[a] + step
            if 0 <= i < len(spec.axes[key]):
                idx = list(centre)
                idx[a] = i
                hood.append((key, step, tuple(idx)))
            else:
                end = "first" if step < 0 else "last"
                edges.append({"axis": key, "step": step,
                              "reason": f"{key}={_fmt_value(spec.axes[key][centre[a]])} is the grid's {end} value"})
    return hood, edges


def read_objective(spec: TuneSpec, name: str) -> float | None:
    """The objective of run NAME from ROOT/NAME/metrics.json; None while the file is absent."""
    path = Path(spec.root) / name / "metrics.json"
    if not path.exists():
        return None
    from megadoc_pl.analysis.runs import load_run

    run = load_run(path)
    if spec.objective not in run.metrics:
        keys = ", ".join(sorted(k for k in run.metrics if "/" in k)[:10])
        raise ValueError(f"{path}: no objective key {spec.objective!r} (has: {keys}); set objective in the spec")
    try:
        return float(run.metrics[spec.objective])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: {spec.objective}={run.metrics[spec.objective]!r} is not a number") from None


def _score(spec: TuneSpec, value: float) -> float:
    """Lower is better; NaN (a diverged run) is worst."""
    if value is None or math.isnan(value):
        return math.inf
    return value if spec.direction == "min" else -value


def step(
    spec: TuneSpec,
    state: dict,
    read: Callable[[TuneSpec, str], float | None] = read_objective,
    save: Callable[[dict], None] | None = None,
) -> Step:
    """Advance the search as far as the finished runs allow.

    Reads results of the current neighbourhood, moves the centre while a neighbour is strictly
    better, and returns either the runs still to do or the certificate. ``save`` is called
    whenever the state changes (the CLI saves atomically to the state file).
    """
    def changed() -> None:
        if save is not None:
            save(state)

    while True:
        if state["status"] == "certified":
            return Step([], True, state)
        centre = tuple(state["centre"])
        hood, edges = neighbourhood(spec, centre)
        pending = []
        for _, _, idx in hood:
            name = spec.run_name(idx)
            if name in state["results"]:
                continue
            value = read(spec, name)
            if value is None:
                pending.append(idx)
            else:
                state["results"][name] = {"index": list(idx), "point": spec.point(idx), "objective": value}
                changed()
        if pending:
            return Step(pending, False, state)

        def score(idx: tuple) -> float:
            return _score(spec, state["results"][spec.run_name(idx)]["objective"])

        centre_score = score(centre)
        best = min((score(idx), order, idx) for order, (_, _, idx) in enumerate(hood))
        if best[0] < centre_score:
            state["centre"] = list(best[2])
            state["path"].append(list(best[2]))
            changed()
            continue
        state["status"] = "certified"
        state["certificate"] = _certificate(spec, state, hood, edges)
        changed()
        return Step([], True, state)


def _certificate(spec: TuneSpec, state: dict, hood: list, edges: list) -> dict:
    res = state["results"]
    centre_name = spec.run_name(hood[0][2])
    c_val = res[centre_name]["objective"]
    neighbours = []
    for key, step_, idx in hood[1:]:
        name = spec.run_name(idx)
        v = res[name]["objective"]
        neighbours.append({"axis": key, "step": step_, "name": name, "point": spec.point(idx),
                           "objective": v, "delta": v - c_val})
    ties = sum(1 for n in neighbours if _score(spec, n["objective"]) == _score(spec, c_val))
    word = "lower" if spec.direction == "min" else "higher"
    statement = (
        f"{spec.objective} = {c_val:.6g} at {centre_name} is {word} than or equal to all "
        f"{len(neighbours)} existing one-step neighbours ({ties} ties)"
    )
    if edges:
        statement += f"; {len(edges)} neighbour(s) lie beyond the grid: " + "; ".join(e["reason"] for e in edges)
    return {
        "centre": spec.point(hood[0][2]),
        "name": centre_name,
        "objective": c_val,
        "neighbours": neighbours,
        "grid_edges": edges,
        "rounds": len(state["path"]),
        "runs": len(res),
        "statement": statement,
    }


# --------------------------------------------------------------------------- CLI driver


def write_run_configs(spec: TuneSpec, pending: Sequence[tuple], config_dir: str | Path) -> list[Path]:
    """One ``NAME.txt`` per pending run (its key=value overrides, one per line) + ``pending.sh``."""
    config_dir = Path(config_dir)
    paths = []
    for idx in pending:
        p = config_dir / f"{spec.run_name(idx)}.txt"
        atomic_write_text(p, "\n".join(spec.run_overrides(idx)) + "\n")
        paths.append(p)
    script = "\n".join(shlex.join(spec.command(idx)) for idx in pending)
    atomic_write_text(config_dir / "pending.sh", "#!/bin/sh\nset -e\n" + script + "\n")
    return paths


def _train_script(spec: TuneSpec) -> str:
    return find_train_script(spec.train_script)


def find_train_script(path: str = "recipes/train.py") -> str:
    """The training script: as given, else relative to the checkout that holds this package."""
    script = Path(path)
    if script.exists():
        return str(script)
    alt = Path(__file__).resolve().parents[2] / script
    if not script.is_absolute() and alt.exists():
        return str(alt)
    raise BadInput(f"training script {script} not found (fix: run from the repository root or set train_script)")


class RunFailed(RuntimeError):
    """A training run launched by the tuner exited non-zero or wrote no metrics.json."""


def launch(spec: TuneSpec, idx: tuple, python: str = sys.executable) -> None:
    """Train one point in this process's environment; :class:`RunFailed` naming the run on failure."""
    cmd = [python, _train_script(spec), *spec.command(idx)[2:]]
    print("launch:", shlex.join(cmd), flush=True)
    rc = subprocess.run(cmd).returncode
    name = spec.run_name(idx)
    metrics = Path(spec.root) / name / "metrics.json"
    if rc != 0 or not metrics.exists():
        raise RunFailed(
            f"run {name} failed (exit code {rc}"
            + ("" if metrics.exists() else f", no {metrics}")
            + ") (fix: remove the cause, then rerun tune.py to resume; finished runs are kept)"
        )


def run_tuner(spec: TuneSpec, state_path: str | Path, do_launch: bool = False, out=print) -> dict:
    """Advance the search; with ``do_launch`` train pending runs one at a time until certified.

    Without launching, writes the pending runs' configs beside the state file, prints their
    commands and returns. Returns the state (``status`` is ``certified`` when done).
    """
    state_path = Path(state_path)
    state = load_state(state_path, spec)

    def save(s: dict) -> None:
        atomic_write_json(state_path, s)

    save(state)
    while True:
        st = step(spec, state, save=save)
        if st.certified:
            cert = state["certificate"]
            out(f"certified after {cert['rounds']} centre(s), {cert['runs']} runs: {cert['statement']}")
            return state
        config_dir = state_path.parent / "tune_configs"
        write_run_configs(spec, st.pending, config_dir)
        if not do_launch:
            out(f"{len(st.pending)} run(s) to do around centre {spec.run_name(state['centre'])} "
                f"(override lists in {config_dir}/, all commands in {config_dir / 'pending.sh'}):")
            for idx in st.pending:
                out("  " + shlex.join(spec.command(idx)))
            out("run them, then call tune.py again with the same arguments (or pass --launch)")
            return state
        for idx in st.pending:
            launch(spec, idx)
