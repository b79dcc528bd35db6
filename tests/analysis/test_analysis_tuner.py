"""Bounding-box tuner: finds and certifies a grid optimum, resumes, never reruns a point."""

from __future__ import annotations

import itertools
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from megadoc_pl.analysis import tuner as T
from megadoc_pl.utils import atomic_write_json
from helpers import load_script

AXES = {
    "data.mixture.real_epochs": [1, 2, 4, 8, 16, 32, 64],
    "train.lr": [1e-3, 3e-3, 1e-2],
    "train.weight_decay": [0.1, 0.4, 0.8, 1.6],
    "data.mixture.synthetic_fraction": [0.5, 0.75, 0.9],
}
OPT = {"data.mixture.real_epochs": 16, "train.lr": 3e-3, "train.weight_decay": 1.6,
       "data.mixture.synthetic_fraction": 0.9}  # wd and w at the grid's last value: edges


def objective(point: dict) -> float:
    """Convex in log-grid coordinates with an unique minimum at OPT (and distinct values)."""
    total = 3.0
    for w, key in zip((0.011, 0.023, 0.007, 0.013), AXES):
        total += w * (math.log2(float(point[key])) - math.log2(float(OPT[key]))) ** 2
    return total


def spec(tmp_path: Path, **kw) -> T.TuneSpec:
    centre = {"data.mixture.real_epochs": 1, "train.lr": 1e-2, "train.weight_decay": 0.1,
              "data.mixture.synthetic_fraction": 0.5}
    return T.TuneSpec(recipe="rephrase", axes=AXES, centre=centre, root=str(tmp_path / "runs"), **kw)


def write_metrics(s: T.TuneSpec, idx, written: set, value: float | None = None) -> None:
    name = s.run_name(idx)
    assert name not in written, f"{name} was requested twice"
    written.add(name)
    d = Path(s.root) / name
    d.mkdir(parents=True)
    v = objective(s.point(idx)) if value is None else value
    (d / "metrics.json").write_text(json.dumps({"val/iid/loss": v, "steps": 1}))


def brute_force_optimum(s: T.TuneSpec) -> tuple:
    return min(itertools.product(*(range(len(v)) for v in s.axes.values())), key=lambda i: objective(s.point(i)))


def test_finds_and_certifies_the_grid_optimum(tmp_path):
    s = spec(tmp_path)
    state = T.new_state(s)
    written: set = set()
    for _ in range(50):
        st = T.step(s, state)
        if st.certified:
            break
        assert st.pending
        for idx in st.pending:
            write_metrics(s, idx, written)
    assert state["status"] == "certified"
    best = brute_force_optimum(s)
    assert tuple(state["centre"]) == best
    cert = state["certificate"]
    assert cert["centre"] == s.point(best) and cert["objective"] == pytest.approx(objective(s.point(best)))
    # every existing neighbour was run and none is better; wd and w sit on the grid's last value
    assert len(cert["neighbours"]) == 2 * 4 - 2
    assert all(n["delta"] > 0 for n in cert["neighbours"])
    assert {(e["axis"], e["step"]) for e in cert["grid_edges"]} == {
        ("train.weight_decay", 1), ("data.mixture.synthetic_fraction", 1)}
    assert cert["runs"] == len(written) == len(state["results"])
    # far fewer runs than the grid (7*3*4*3 = 252)
    assert len(written) < 60


def test_names_and_overrides(tmp_path):
    s = spec(tmp_path)
    idx = (4, 1, 2, 1)
    assert s.run_name(idx) == "rephrase-E16_lr0.003_wd0.8_w0.75"
    assert s.run_overrides(idx) == [
        "data.mixture.real_epochs=16", "train.lr=0.003", "train.weight_decay=0.8",
        "data.mixture.synthetic_fraction=0.75", "run.name=rephrase-E16_lr0.003_wd0.8_w0.75",
        f"run.root={s.root}", "run.resume=auto"]
    assert s.command(idx)[:4] == ["python", "recipes/train.py", "--recipe", "rephrase"]


def test_ties_and_nan_do_not_move_the_centre(tmp_path):
    s = T.TuneSpec(recipe="r", axes={"train.lr": [1e-3, 3e-3, 1e-2]}, centre={"train.lr": 3e-3},
                   root=str(tmp_path / "runs"))
    state = T.new_state(s)
    values = {0: math.nan, 1: 3.0, 2: 3.0}  # lower neighbour diverged, upper one ties
    st = T.step(s, state)
    written: set = set()
    for idx in st.pending:
        write_metrics(s, idx, written, values[idx[0]])
    st = T.step(s, state)
    assert st.certified and state["centre"] == [1]
    assert "(1 ties)" in state["certificate"]["statement"]


def test_cli_resumes_from_its_state_file_midway(tmp_path, capsys):
    """Kill midway: finish only some runs between calls; the search ends where an uninterrupted one does."""
    main = load_script("tools/tune.py").main
    root = tmp_path / "runs"
    args = ["--recipe", "rephrase", "--root", str(root), "--centre", "data.mixture.real_epochs=1",
            "--centre", "train.lr=0.01", "--centre", "train.weight_decay=0.1",
            "--centre", "data.mixture.synthetic_fraction=0.5", "scale=demo"]
    s = T.load_spec(None, recipe="rephrase", root=str(root), overrides=["scale=demo"],
                    centre={"data.mixture.real_epochs": 1, "train.lr": 0.01, "train.weight_decay": 0.1,
                            "data.mixture.synthetic_fraction": 0.5})
    state_path = root / "tune_state.json"
    written: set = set()
    for call in range(200):
        main(args)
        state = json.loads(state_path.read_text())
        if state["status"] == "certified":
            break
        pending = [line.split("run.name=")[1].split()[0]
                   for line in (root / "tune_configs" / "pending.sh").read_text().splitlines() if "run.name=" in line]
        assert pending
        override_file = root / "tune_configs" / f"{pending[0]}.txt"
        assert "scale=demo" in override_file.read_text().splitlines()
        by_name = {s.run_name(i): i for i in itertools.product(*(range(len(v)) for v in s.axes.values()))}
        for name in pending[: 1 + call % 3]:  # finish 1-3 runs, then "crash"
            write_metrics(s, by_name[name], written)
    assert state["status"] == "certified"
    reference = T.new_state(s)  # an uninterrupted search over the same (now finished) runs
    assert T.step(s, reference).certified
    assert state["certificate"]["name"] == reference["certificate"]["name"]
    assert state["path"] == reference["path"]
    assert "certified after" in capsys.readouterr().out
    # a changed spec refuses the old state
    with pytest.raises(SystemExit, match="different tuning spec"):
        main([*args[:-1], "scale=paper_300m"])


def test_launch_trains_each_point_once(tmp_path):
    """--launch runs a (fake) training script per point until certified; no point twice."""
    fake = tmp_path / "fake_train.py"
    log = tmp_path / "launches.txt"
    fake.write_text(textwrap.dedent(f"""
        import json, math, sys
        from pathlib import Path
        args = dict(a.split("=", 1) for a in sys.argv[3:])
        assert sys.argv[1:3] == ["--recipe", "baseline_real"], sys.argv
        with open({str(log)!r}, "a") as f:
            f.write(args["run.name"] + "\\n")
        e, lr = float(args["data.mixture.real_epochs"]), float(args["train.lr"])
        loss = 3 + 0.01 * (math.log2(e) - 3) ** 2 + 0.02 * (math.log10(lr) + 2.5) ** 2
        d = Path(args["run.root"]) / args["run.name"]
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps({{"val/iid/loss": loss}}))
    """))
    spec_file = tmp_path / "tune.yaml"
    spec_file.write_text(textwrap.dedent(f"""
        recipe: baseline_real
        grid: real
        axes: {{train.weight_decay: null}}
        centre: {{data.mixture.real_epochs: 1, train.lr: 0.0001}}
        root: {tmp_path / 'runs'}
        train_script: {fake}
    """))
    main = load_script("tools/tune.py").main
    main(["--spec", str(spec_file), "--launch"])
    names = log.read_text().split()
    assert len(names) == len(set(names))
    state = json.loads((tmp_path / "runs" / "tune_state.json").read_text())
    assert state["status"] == "certified"
    assert state["certificate"]["centre"] == {"data.mixture.real_epochs": 8, "train.lr": 3e-3}
    # calling again launches nothing
    main(["--spec", str(spec_file), "--launch"])
    assert log.read_text().split() == names


def test_spec_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="not on the grid"):
        T.TuneSpec(recipe="r", axes={"train.lr": [1e-3, 3e-3]}, centre={"train.lr": 2e-3})
    with pytest.raises(ValueError, match="unknown tuning-spec keys"):
        T.load_spec(None, recipe="r", bogus=1)
    with pytest.raises(ValueError, match="needs a recipe"):
        T.load_spec(None)
    s = T.TuneSpec(recipe="r", axes={"train.lr": [1e-3, 3e-3]}, centre={"train.lr": 1e-3}, root=str(tmp_path))
    d = tmp_path / s.run_name((0,))
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"val/long/loss": 3.0}))
    with pytest.raises(ValueError, match="no objective key 'val/iid/loss'"):
        T.step(s, T.new_state(s))


def test_default_grid_is_the_megadocs_synthetic_grid():
    s = T.load_spec(None, recipe="rephrase", centre={"data.mixture.real_epochs": 16, "train.lr": 3e-3,
                                                     "train.weight_decay": 0.4,
                                                     "data.mixture.synthetic_fraction": 0.75})
    assert s.axes == T.GRIDS["synthetic"]
    assert T.GRIDS["synthetic"]["data.mixture.synthetic_fraction"] == [0.5, 0.75, 0.9]
    assert T.GRIDS["real"]["train.weight_decay"] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]
    assert sys.executable  # launch uses this interpreter


def test_default_grid_and_centre_follow_the_recipe():
    pytest.importorskip("megadoc_pl.recipes")
    s = T.load_spec(None, recipe="baseline_real")  # view real: the real-only grid, tuned values as centre
    assert s.axes == T.GRIDS["real"]
    assert s.centre == {"data.mixture.real_epochs": 16, "train.lr": 3e-3, "train.weight_decay": 1.6}


def test_a_widened_axis_keeps_the_state_and_reopens_the_search(tmp_path):
    """Certified at a grid edge, then the axis gains values: the old runs are kept, re-indexed by
    value, and only the new neighbour is asked for. Losing or reordering old values is refused."""
    def spec(lrs):
        return T.TuneSpec(recipe="baseline_real", axes={"train.lr": lrs}, centre={"train.lr": 0.01},
                          root=str(tmp_path), prefix="p")

    s = spec([0.001, 0.01])
    path = tmp_path / "state.json"
    state = T.load_state(path, s)
    loss = {"p-lr0.001": 3.0, "p-lr0.01": 2.5, "p-lr0.1": 2.4}
    assert T.step(s, state, read=lambda sp, name: loss[name]).certified
    atomic_write_json(path, state)
    wide = spec([0.001, 0.01, 0.1])
    state = T.load_state(path, wide)
    assert state["status"] == "running" and state["centre"] == [1] and state["widened"] == [{"train.lr": [0.1]}]
    read: list = []
    st = T.step(wide, state, read=lambda sp, name: read.append(name) or None)
    assert st.pending == [(2,)] and read == ["p-lr0.1"]  # the two old runs are not read again
    st = T.step(wide, state, read=lambda sp, name: loss[name])
    assert st.certified and state["certificate"]["name"] == "p-lr0.1"
    for bad in ([0.01, 0.001, 0.1], [0.01, 0.1]):
        with pytest.raises(ValueError, match="an axis lost or reordered values"):
            T.load_state(path, spec(bad))
