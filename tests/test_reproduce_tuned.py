"""tools/reproduce.py with tuned groups (sweep_tune.py): the tuner's rounds through a sweep, resumed
after a kill, seeds at the optimum only, certificates in results.json, the data law from tuned
points, and a cluster's launch list written round by round."""

from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, load_script
from megadoc_pl.analysis import sweep, sweep_tune

TINY_TUNED = """
description: a tiny tuned sweep
scale: demo
seeds: [0, 1]
overrides: [demo.num_documents=120, data.seq_len=64, data.val.num_iid=6, data.val.num_long=4, data.val.num_short=0,
            data.val.long_threshold=100, data.val.max_windows=4, train.global_batch_size=2, train.micro_batch_size=2,
            train.max_steps=3, train.accelerator=cpu, data.cache_dir={cache}]
groups:
  rephrase:
    recipe: rephrase
    axes: {data.generations: [1]}
    tune:
      axes: {train.lr: [0.001, 0.01], train.weight_decay: [0.1, 0.4]}
      centre: {train.lr: 0.001, train.weight_decay: 0.1}
"""
FIXED_GROUP = """
  real: {recipe: baseline_real, role: baseline, seeds: [0], axes: {data.mixture.real_epochs: [1]}}
"""


def _write_spec(tmp_path: Path, text: str = TINY_TUNED) -> Path:
    spec = tmp_path / "tiny_tuned.yaml"
    spec.write_text(text.replace("{cache}", str(tmp_path / "cache")))
    return spec


@pytest.mark.slow
def test_tuned_group_certifies_resumes_after_a_kill_and_seeds_only_the_optimum(tmp_path, capsys):
    # A fixed group beside the tuned one: both kinds of run share the pool, the results and the figures.
    spec, out = _write_spec(tmp_path, TINY_TUNED.rstrip() + FIXED_GROUP), tmp_path / "out"
    state = out / "tune" / "rephrase-G1.json"
    cmd = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--preset", str(spec), "--out", str(out),
           "--jobs", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # Kill the whole sweep (driver and its training run) as soon as round 1 (centre + 2 neighbours)
    # has been evaluated: the driver has then started the next run.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads(state.read_text())["results"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = json.loads(state.read_text())
    assert len(first["results"]) >= 3, first  # round 1 evaluated before the kill
    finished = {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")
                if json.loads(p.read_text()).get("status") == "finished"}
    assert len(finished) >= 3

    reproduce = load_script("tools/reproduce.py")
    assert reproduce.main(["--preset", str(spec), "--out", str(out), "--jobs", "2"]) == 0
    # Nothing finished was trained again, and the kill left work to do (at least seed 1).
    assert {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in finished} == finished
    assert {p.parent.name for p in (out / "runs").glob("*/metrics.json")} - set(finished)
    results = json.loads((out / "results.json").read_text())
    (fam,) = results["tuning"]
    cert = fam["certificate"]
    assert fam["status"] == "certified" and cert["runs"] == len(json.loads(state.read_text())["results"])
    # The certificate: the optimum is at least as good as each of its neighbours, every one listed
    # with its loss; the corners of a 2 x 2 grid leave one neighbour per axis beyond the grid.
    assert len(cert["neighbours"]) == 2 and len(cert["grid_edges"]) == 2
    assert all(n["objective"] >= cert["objective"] for n in cert["neighbours"])
    # Seed 1 trained at the optimum only; the orderings use the optimum's mean over both seeds.
    seeded = [r for r in results["runs"] if r["seed"] == 1]
    assert [r["cell"] for r in seeded] == [fam["optimum_cell"]] and seeded[0]["status"] == "finished"
    assert fam["seed_spread"]["val/iid/loss"]["n"] == 2
    best = next(v for v in results["best"]["iid"] if v["name"] == "rephrase G=1")
    assert best["cell"] == fam["optimum_cell"] and best["loss"]["n"] == 2
    losses = [r["val/iid/loss"] for r in results["runs"] if r["cell"] == fam["optimum_cell"]]
    assert best["loss"]["mean"] == pytest.approx(sum(losses) / 2)
    optimum_s0 = next(r for r in results["runs"] if r["cell"] == fam["optimum_cell"] and r["seed"] == 0)
    assert optimum_s0["val/iid/loss"] == cert["objective"]
    assert {c["cell"]: c["candidate"] for c in results["cells"]}[fam["optimum_cell"]] is True
    md = (out / "tuning.md").read_text()
    assert md.count("| beyond the grid: ") == 2 and md.count("| train.") == 0 and "over 2 seeds" in md
    assert sum(c["candidate"] for c in results["cells"]) == 2  # the optimum and the fixed real-only cell
    assert results["finished"] == results["total"] == cert["runs"] + 2  # + seed 1 and the fixed run
    assert sorted(v["name"] for v in results["best"]["long"]) == ["real-only", "rephrase G=1"]
    assert results["efficiency"]["skipped"].startswith("1 data sizes; the 3-parameter law needs at least 4")
    assert results["figures"] == ["loss_vs_G_iid.png", "loss_vs_G_long.png", "loss_by_position_long.png",
                                  "certificates.png"]
    for name in results["figures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A third call trains nothing.
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")}
    capsys.readouterr()
    assert reproduce.main(["--preset", str(spec), "--out", str(out), "--jobs", "1"]) == 0
    assert "1 of 1 fixed runs already finished; 0 to train now" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/metrics.json")} == stamp


# --------------------------------------------------------------------------- without training


LAW_SWEEP = """
description: tuned law, no training
scale: demo
seeds: [0, 1]
groups:
  real:  # the methods' D is a quarter of the corpus; the law's points lie below and above it
    recipe: baseline_real
    role: baseline
    axes: {data.real_fraction: [0.25]}
    tune: &real {axes: {data.mixture.real_epochs: [2, 4, 8, 16], train.weight_decay: [0.1, 0.4, 1.6]},
                 centre: {data.mixture.real_epochs: 2, train.weight_decay: 0.1}}
  real_D:
    recipe: baseline_real
    role: data
    axes: {data.real_fraction: [0.125, 0.5, 1.0]}
    tune: *real
  stitch:
    recipe: megadoc_stitch
    axes: {data.generations: [8], data.real_fraction: [0.25]}
    tune:
      axes: {data.mixture.real_epochs: [2, 4, 8], data.mixture.synthetic_fraction: [0.5, 0.75, 0.9]}
      centre: {data.mixture.real_epochs: 2, data.mixture.synthetic_fraction: 0.5}
"""
D_FULL = 80_000.0


def _law(d: float) -> float:
    return 2.0 + 100.0 / d**0.5


def _fake_metrics(run: sweep.SweepRun, loss: float, out: Path) -> None:
    """What a finished training run leaves for the analysis (the keys collect() reads)."""
    d = D_FULL * float(run.value("data.real_fraction", 1.0))
    passes = float(run.value("data.mixture.real_epochs", 1))
    m = {"status": "finished", "val/iid/loss": loss, "val/long/loss": loss, "val/iid/loss_best": loss,
         "val/long/loss_best": loss, "train/passes/real": passes, "train/tokens/real": d * passes,
         "tokens_seen": d * passes, "wall_time_s": 1.0}
    (out / "runs" / run.name).mkdir(parents=True, exist_ok=True)
    (out / "runs" / run.name / "metrics.json").write_text(json.dumps(m))


def _penalty(run: sweep.SweepRun, best: dict) -> float:
    """A bowl on log2 of each tuned value, zero at ``best``; seed 1 is 0.002 worse than seed 0."""
    p = sum(0.01 * abs(math.log2(float(run.value(k)) / float(v))) for k, v in best.items())
    return p + 0.002 * run.seed


def _drive(spec: sweep.SweepSpec, out: Path, objective) -> list:
    """Run the families to the end as a cluster would: write each pending run's metrics, step again."""
    fams = sweep_tune.families(spec, out)
    for _ in range(50):
        todo = [r for f in fams for r in sweep_tune.advance(f, spec, out)]
        if not todo:
            return fams
        for r in todo:
            _fake_metrics(r, objective(r), out)
    raise AssertionError("the tuner did not finish")


def test_the_law_from_tuned_points_recovers_a_known_multiplier(tmp_path):
    spec_path = tmp_path / "law.yaml"
    spec_path.write_text(LAW_SWEEP)
    spec, out = sweep.load_sweep(str(spec_path)), tmp_path / "out"
    real_best = {"data.mixture.real_epochs": 8, "train.weight_decay": 0.4}
    stitch_best = {"data.mixture.real_epochs": 4, "data.mixture.synthetic_fraction": 0.75}

    def objective(r: sweep.SweepRun) -> float:
        if r.role in ("baseline", "data"):  # real-only: the law at its D at the tuned optimum
            return _law(D_FULL * float(r.value("data.real_fraction", 1.0))) + _penalty(r, real_best)
        return _law(2 * D_FULL / 4) + _penalty(r, stitch_best)  # stitch at its optimum: worth 2x its real data

    fams = _drive(spec, out, objective)
    results = sweep_tune.collect(spec, [], out, fams)
    tuning = {t["family"]: t for t in results["tuning"]}
    assert all(t["status"] == "certified" for t in tuning.values()) and len(tuning) == 5
    assert tuning["real-D0.25"]["certificate"]["centre"] == real_best
    assert tuning["stitch-G8-D0.25"]["certificate"]["centre"] == stitch_best
    assert tuning["stitch-G8-D0.25"]["certificate"]["rounds"] == 3  # two moves (one axis at a time), then certified
    # The law's 4 points are the tuned optima, each the mean over its 2 seeds (+0.001 from seed 1);
    # the multiplier is D_eff over the methods' D (the baseline's), not over the law's largest D.
    eff = results["efficiency"]
    assert [p["tokens"] for p in eff["points"]] == [D_FULL / 8, D_FULL / 4, D_FULL / 2, D_FULL]
    assert [p["loss"] for p in eff["points"]] == pytest.approx([_law(p["tokens"]) + 0.001 for p in eff["points"]])
    (mult,) = eff["multipliers"]
    assert mult["name"] == "stitch G=8" and mult["multiplier"] == pytest.approx(2.0, rel=1e-3)
    assert mult["d_real"] == D_FULL / 4 and eff["d_real"] == D_FULL / 4
    # Against real-only's own loss (the predecessor's definition): its seed-mean sits 0.001 above the
    # law, as stitch's does, so the ratio is 2x within that offset.
    assert mult["vs_baseline_loss"] == pytest.approx(2.0, rel=2e-2)
    assert mult["multiplier_lo"] <= mult["multiplier"] <= mult["multiplier_hi"]
    # Tuning points that are not an optimum stay out of the comparison.
    assert [v["cell"] for v in results["best"]["iid"]] == ["stitch-G8-D0.25-E4-w0.75", "real-D0.25-E8-wd0.4"]
    # Seed by seed against real-only: stitch's seed 1 and real-only's are both 0.002 worse than seed 0.
    (pair,) = results["paired"]["iid"]
    assert pair["name"] == "stitch G=8" and pair["n"] == 2 and pair["wins"] == 2 and pair["std"] == pytest.approx(0)
    assert pair["mean"] == pytest.approx(_law(D_FULL / 2) - _law(D_FULL / 4))
    text = sweep.summary(results)
    assert "tuned stitch-G8-D0.25: certified at E=4, w=0.75" in text and "data efficiency stitch G=8: 2.00" in text and "(D_eff / D)" in text
    made = sweep.figures(results, tmp_path)
    assert sorted(p.name for p in made) == ["certificates.png", "data_efficiency.png", "data_law.png",
                                            "loss_vs_G_iid.png", "loss_vs_G_long.png"]
    md = sweep.certificates_markdown(results["tuning"])
    assert "## stitch-G8-D0.25" in md and "| **E=4, w=0.75** (optimum) |" in md and "| E=8, w=0.75 |" in md
    assert "beyond the grid" not in md  # every optimum here is an inner grid point


def test_launch_list_writes_round_one_then_round_two(tmp_path, capsys):
    spec_path = _write_spec(tmp_path)
    reproduce = load_script("tools/reproduce.py")
    out, cmds, array = tmp_path / "out", tmp_path / "runs.txt", tmp_path / "array.sh"
    args = ["--preset", str(spec_path), "--out", str(out), "--launch-list", str(cmds), "--slurm", str(array)]
    assert reproduce.main(args) == 0
    round1 = [line.split("run.name=")[1].split()[0] for line in cmds.read_text().splitlines()]
    assert round1 == ["rephrase-G1-lr0.001-wd0.1-s0", "rephrase-G1-lr0.01-wd0.1-s0", "rephrase-G1-lr0.001-wd0.4-s0"]
    assert "#SBATCH --array=0-2" in array.read_text()
    assert reproduce.main(args) == 0 and cmds.read_text().count("\n") == 3  # nothing ran: the same round
    # Round 1's metrics come back from the cluster: lr 0.01 is best, so the centre moves there and
    # round 2 is its one new neighbour (lr 0.01, wd 0.4).
    spec = sweep.load_sweep(str(spec_path))
    (fam,) = sweep_tune.families(spec, out)
    loss = {"rephrase-G1-lr0.001-wd0.1-s0": 3.0, "rephrase-G1-lr0.01-wd0.1-s0": 2.5, "rephrase-G1-lr0.001-wd0.4-s0": 2.9}
    for idx in [(0, 0), (1, 0), (0, 1)]:
        r = fam.tuning_run(idx, spec)
        _fake_metrics(r, loss[r.name], out)
    assert reproduce.main(args) == 0
    assert [line.split("run.name=")[1].split()[0] for line in cmds.read_text().splitlines()] == \
        ["rephrase-G1-lr0.01-wd0.4-s0"]
    assert "#SBATCH --array=0-0" in array.read_text()
    _fake_metrics(fam.tuning_run((1, 1), spec), 2.6, out)
    # Certified at lr 0.01, wd 0.1: what is left is seed 1 there.
    assert reproduce.main(args) == 0
    assert [line.split("run.name=")[1].split()[0] for line in cmds.read_text().splitlines()] == \
        ["rephrase-G1-lr0.01-wd0.1-s1"]
    capsys.readouterr()
    assert reproduce.main(["--preset", str(spec_path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "rephrase-G1" in text and "certified" in text and "pending   rephrase-G1-lr0.01-wd0.1-s1" in text
    # The optimum sits at the weight-decay grid's first value: widening that axis keeps the state,
    # reopens the search and asks for the one new neighbour only.
    spec_path.write_text(spec_path.read_text().replace("[0.1, 0.4]", "[0.05, 0.1, 0.4]"))
    assert reproduce.main(args) == 0
    assert [line.split("run.name=")[1].split()[0] for line in cmds.read_text().splitlines()] == \
        ["rephrase-G1-lr0.01-wd0.05-s0"]
    state = json.loads((out / "tune" / "rephrase-G1.json").read_text())
    assert state["status"] == "running" and state["widened"] == [{"train.weight_decay": [0.05]}]
    assert len(state["results"]) == 4 and state["centre"] == [1, 1]  # lr 0.01, wd 0.1: re-indexed by value
    # A changed tune: entry refuses the old search's state, in one line, before anything runs.
    spec_path.write_text(spec_path.read_text().replace("[0.05, 0.1, 0.4]", "[0.1, 0.8]"))
    assert reproduce.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rephrase-G1.json: this state was made with a different tuning spec" in err
    assert "(fix: another --out, or delete" in err


def test_paper_presets_dry_run_counts_rounds_and_gpu_hours(capsys, tmp_path):
    reproduce = load_script("tools/reproduce.py")
    assert reproduce.main(["--preset", "maga_budgets", "--dry-run", "--out", str(tmp_path / "none")]) == 0
    text = capsys.readouterr().out
    fams = sweep_tune.families(sweep.load_sweep("maga_budgets"), tmp_path)
    assert [f.name for f in fams] == ["real", "entireset-real2-synthetic2", "subset-real1-synthetic1", "maga-G5"]
    # real: E=10 of [2, 4, 10, 14] and wd 0.1 of [0, .1, .4, 1.6]: centre + 4; the mixes: centre + 4;
    # maga: E=2 of [1, 2, 4], w=0.8 is the last of 3, wd 0.4 the middle of 3: centre + 5.
    assert [sweep_tune.worst_case(f)["round1"] for f in fams] == [5, 5, 5, 6]
    total = next(line for line in text.splitlines() if line.startswith("total:"))
    assert total.startswith("total: round 1 21 runs, worst case 61 runs; GPU-hours round 1 ")
    cost = sweep.load_sweep("maga_budgets").extra["cost"]
    h = sweep_tune.gpu_hours(fams[0], sweep.load_sweep("maga_budgets"), cost)
    # GPU-hours scale with trained tokens: the costliest real-only point (E=14) over the centre (E=10).
    centre = fams[0].run(fams[0].spec.centre, 0, sweep.load_sweep("maga_budgets"))
    assert h["costliest_run"] / sweep_tune.run_gpu_hours(centre, cost) == pytest.approx(1.4, rel=1e-3)
    assert not (tmp_path / "none").exists()


def test_megadocs_tuned_preset_writes_round_one_for_slurm(tmp_path):
    reproduce = load_script("tools/reproduce.py")
    out, cmds, array = tmp_path / "out", tmp_path / "runs.txt", tmp_path / "array.sh"
    assert reproduce.main(["--preset", "megadocs_300m_tuned", "--out", str(out), "--launch-list", str(cmds),
                           "--slurm", str(array), "--set", "data.real=real/"]) == 0
    lines = cmds.read_text().splitlines()
    # 4 real-only families x 7 (E=16, lr 3e-3, wd 1.6 on the real grid: every neighbour exists),
    # rephrase 5 x 9, stitch and stretch 10 x 7 (w=0.9 is the grid's last, lr 1e-3 its first).
    assert len(lines) == 4 * 7 + 5 * 9 + 10 * 7 and f"#SBATCH --array=0-{len(lines) - 1}" in array.read_text()
    assert all(line.split("run.name=")[1].split()[0].endswith("-s0") for line in lines)
    assert sum("run.name=stitch-G32-E32-lr0.001-wd0.4-w0.9-s0" in line for line in lines) == 1


def test_bad_tune_entries_fail_in_one_line(tmp_path):
    reproduce = load_script("tools/reproduce.py")
    cases = {
        "tune: {axez: {train.lr: [1]}}": "tune has unknown key(s) ['axez']",
        "tune: {axes: {train.lrr: [0.1, 0.2]}, centre: {train.lrr: 0.1}}": "grid axis train.lrr is not a key",
        "tune: {axes: {train.lr: [0.1, 0.2]}, centre: {train.lr: 0.3}}": "centre train.lr=0.3 is not on the grid",
        "axes: {train.lr: [0.1]}\n    tune: {axes: {train.lr: [0.1, 0.2]}, centre: {train.lr: 0.1}}":
            "is both a fixed axis and a tuned one",
    }
    for entry, message in cases.items():
        p = tmp_path / "bad.yaml"
        p.write_text(f"scale: demo\ngroups:\n  g:\n    recipe: rephrase\n    {entry}\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            sweep_tune.families(sweep.load_sweep(str(p)), tmp_path / "out")
        assert reproduce.main(["--preset", str(p), "--dry-run"]) == 2
