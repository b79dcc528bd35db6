"""Run directory naming, resume lookup and provenance (no training)."""

from __future__ import annotations

import os
import re
import time

import pytest
from omegaconf import OmegaConf

from megadoc_pl.errors import BadInput
from megadoc_pl.config import RecipeConfig
from megadoc_pl.train import rundir
from megadoc_pl.train.run import resolve_precision


def _cfg(tmp_path, **run):
    cfg = OmegaConf.structured(RecipeConfig)
    cfg.recipe, cfg.scale = "megadoc_stitch", "demo"
    cfg.run.root = str(tmp_path)
    for k, v in run.items():
        cfg.run[k] = v
    return cfg


@pytest.fixture(autouse=True)
def _no_launch_env(monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", rundir.RUN_DIR_ENV):
        monkeypatch.delenv(var, raising=False)


def _with_last(path):
    (path / "checkpoints").mkdir(parents=True)
    (path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return path


def test_default_name_is_recipe_scale_timestamp_and_never_reused(tmp_path):
    p = rundir.resolve_run_dir(_cfg(tmp_path))
    assert re.fullmatch(r"megadoc_stitch-demo-\d{8}-\d{6}", p.name) and p.parent == tmp_path
    assert rundir.is_generated_name(_cfg(tmp_path)) and not rundir.is_generated_name(_cfg(tmp_path, name="mine"))
    first = rundir.claim_run_dir(p, unique=True)
    second = rundir.claim_run_dir(p, unique=True)  # the same second: the claim adds a suffix
    assert first.path == p and first.created and second.path == tmp_path / f"{p.name}-2" and second.created
    assert sorted(x.name for x in first.path.iterdir()) == [rundir.LOCK_FILE]
    first.release(remove_if_unused=True)
    second.release()
    assert not p.exists() and second.path.is_dir()  # an unused claim is given back, a released one stays
    assert rundir.resolve_run_dir(_cfg(tmp_path, name="mine")) == tmp_path / "mine"


def test_multi_process_launches_share_a_name(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(BadInput, match="set run.name=NAME"):
        rundir.resolve_run_dir(_cfg(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc-1")
    assert rundir.resolve_run_dir(_cfg(tmp_path)).name == "megadoc_stitch-demo-rdzvabc-1"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert rundir.resolve_run_dir(_cfg(tmp_path)).name == "megadoc_stitch-demo-job4242"
    monkeypatch.setenv(rundir.RUN_DIR_ENV, str(tmp_path / "inherited"))
    assert rundir.resolve_run_dir(_cfg(tmp_path)) == tmp_path / "inherited"


def test_resume_last_finds_the_newest_matching_run(tmp_path):
    old = _with_last(tmp_path / "megadoc_stitch-demo-20260101-000000")
    time.sleep(0.02)
    new = _with_last(tmp_path / "megadoc_stitch-demo-20250101-000000")  # older name, newer checkpoint
    _with_last(tmp_path / "rephrase-demo-20270101-000000")
    os.utime(old / "checkpoints" / "last.ckpt", (1, 1))
    cfg = _cfg(tmp_path, resume="last")
    d = rundir.resolve_run_dir(cfg)
    assert d == new
    assert rundir.resume_checkpoint(cfg, d) == new / "checkpoints" / "last.ckpt"


def test_resume_errors_and_auto(tmp_path):
    with pytest.raises(BadInput, match="no run 'megadoc_stitch-demo-\\*'"):
        rundir.resolve_run_dir(_cfg(tmp_path, resume="last"))
    fresh = rundir.resolve_run_dir(_cfg(tmp_path, resume="auto"))  # nothing to resume: a new run
    assert fresh.name.startswith("megadoc_stitch-demo-")
    assert rundir.resume_checkpoint(_cfg(tmp_path, resume="auto"), fresh) is None
    with pytest.raises(BadInput, match="does not exist"):
        rundir.resume_checkpoint(_cfg(tmp_path, name="x", resume="last"), tmp_path / "x")
    with pytest.raises(BadInput, match="no such checkpoint file"):
        rundir.resume_checkpoint(_cfg(tmp_path, resume=str(tmp_path / "nope.ckpt")), tmp_path / "x")
    assert rundir.resume_checkpoint(_cfg(tmp_path), tmp_path / "x") is None


def test_provenance_and_flat_keys(tmp_path):
    info = rundir.provenance(_cfg(tmp_path))
    flat = rundir.flat_provenance(info)
    assert flat["seed"] == 0 and flat["data_seed"] == 42
    assert flat["version/torch"] and flat["version/lightning"] and flat["version/python"]
    assert "git_revision" in flat
    rundir.save_metrics(tmp_path, {"a": 1})
    assert (tmp_path / "metrics.json").read_text() == '{\n  "a": 1\n}\n'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_precision_auto_is_per_device():
    cfg = OmegaConf.structured(RecipeConfig)
    cfg.train.accelerator = "cpu"
    assert resolve_precision(cfg) == "32-true"
    cfg.train.accelerator = "gpu"
    assert resolve_precision(cfg) == "bf16-mixed"
    cfg.train.precision = "16-mixed"
    assert resolve_precision(cfg) == "16-mixed"
