"""Run directories and checkpoints under real faults: concurrent starts, refused resumes, torn and
non-finite checkpoints, a kill during a save, read-only and full filesystems (issue 15).

Every case asserts the one ``error:`` line (no traceback), the exit code of ``megadoc-pl``, and that
no other run's files changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from megadoc_pl.errors import BadInput
from megadoc_pl.train import rundir
from megadoc_pl.train.callbacks import NonFiniteLossError
from megadoc_pl.train.checkpoint import TMP_SUFFIX, write_checkpoint
from megadoc_pl.train.checkpoint_io import AtomicCheckpointIO
from megadoc_pl.train.cli import main
from megadoc_pl.train.run import train

from helpers import REPO, build_tiny_tokenizer, fill_filesystem, one_thread
from helpers import QUIET, scalars_per_file, tiny_overrides, tiny_recipe, write_corpus

QUIET_FLAGS = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", rundir.RUN_DIR_ENV):
        monkeypatch.delenv(var, raising=False)
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_path):
    """A finished 4-step run ``done`` (checkpoints at steps 2 and 4) to copy and damage."""
    root = tmp_path_factory.mktemp("faults")
    w = {"root": root, "tok": tiny_tokenizer_path, "corpus": write_corpus(root / "corpus.jsonl")}
    with one_thread():
        w["done"] = train(tiny_recipe(w["corpus"], w["tok"], root, "done", 4, ["train.ckpt_every=2"]), QUIET)
    return w


def _copy_run(world, name: str) -> Path:
    dst = world["root"] / "runs" / name
    shutil.copytree(world["done"], dst)
    return dst


def _snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of a run (the lock file holds the pid of whoever held it last)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != rundir.LOCK_FILE}


def _fit(world, name: str, *sets: str, steps: int = 4, root: Path | None = None) -> list[str]:
    over = tiny_overrides(world["corpus"], world["tok"], root or world["root"], name, steps)
    return ["fit", "--recipe", "baseline_real", *[a for o in [*over, *sets] for a in ("--set", o)], *QUIET_FLAGS]


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, the one error line) of ``megadoc-pl`` in process."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) <= 1, err
    return rc, errors[0] if errors else ""


# ------------------------------------------------------------------------- claiming a directory


def _claim_in_child(args):
    base, barrier = args
    barrier.wait()
    claim = rundir.claim_run_dir(Path(base), unique=True)
    return claim.path.name


def test_concurrent_claims_of_one_name_get_distinct_directories(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = 6
    with ctx.Manager() as manager:
        barrier = manager.Barrier(n)
        with ctx.Pool(n) as pool:
            names = pool.map(_claim_in_child, [(str(tmp_path / "r-20260101-000000"), barrier)] * n)
    assert sorted(names) == sorted(["r-20260101-000000"] + [f"r-20260101-000000-{k}" for k in range(2, n + 1)])


_SAME_SECOND = """
import sys, time
from pathlib import Path
from megadoc_pl.train import rundir
from megadoc_pl.train.run import train
from helpers import QUIET, tiny_recipe

rundir.default_run_name = lambda recipe, scale, stamp=None: f"{recipe}-{scale}-20260101-000000"
corpus, tok, root, lr, go = sys.argv[1:]
cfg = tiny_recipe(Path(corpus), Path(tok), Path(root), "x", 2, ["run.name=null", f"train.lr={lr}"])
Path(go + lr).touch()
while not Path(go).exists():
    time.sleep(0.01)
train(cfg, QUIET)
"""


def test_two_runs_started_in_the_same_second_never_share_a_directory(world, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _SAME_SECOND, str(world["corpus"]), str(world["tok"]),
                               str(tmp_path), lr, str(go)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for lr in ("0.001", "0.002")]
    deadline = time.time() + 120
    while not all(Path(f"{go}{lr}").exists() for lr in ("0.001", "0.002")) and time.time() < deadline:
        time.sleep(0.05)
    go.touch()  # both resolve the same timestamp name now
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted((tmp_path / "runs").iterdir())
    base = runs[0].name
    assert base.endswith("-20260101-000000") and [r.name for r in runs] == [base, base + "-2"]
    lrs = set()
    for r in runs:
        cfg = (r / "config.yaml").read_text()
        assert f"name: {r.name}\n" in cfg
        ckpt = torch.load(r / "checkpoints" / "last.ckpt", weights_only=False)
        assert ckpt["hyper_parameters"]["cfg"]["run"]["name"] == r.name  # hparams from the same run
        lrs.add(ckpt["hyper_parameters"]["cfg"]["train"]["lr"])
        assert f"lr: {ckpt['hyper_parameters']['cfg']['train']['lr']}\n" in cfg
        assert json.loads((r / "metrics.json").read_text())["status"] == "finished"
    assert lrs == {0.001, 0.002}


_HOLDER = """
import sys, time
from pathlib import Path
from megadoc_pl.train import rundir
rundir.claim_run_dir(Path(sys.argv[1]), unique=False)
print("claimed", flush=True)
time.sleep(300)
"""


def test_a_run_directory_in_use_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "named"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(BadInput) as e:
            rundir.claim_run_dir(run_dir, unique=False)
        assert str(e.value) == (f"{run_dir} is in use by another run (pid {holder.pid}) (fix: wait for it "
                                "to end, or pick another run.name)")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    claim = rundir.claim_run_dir(run_dir, unique=False)  # the kernel dropped the dead holder's lock
    assert claim.path == run_dir and not claim.created
    claim.release()
    # a process that claims a new directory and exits before writing anything leaves none
    abandoned = tmp_path / "abandoned"
    subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(300)", ""), str(abandoned)], cwd=REPO,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert not abandoned.exists()


# ------------------------------------------------------------------------- refused resumes


@pytest.mark.parametrize("fault", ["data_seed", "vocabulary"])
def test_a_refused_resume_changes_nothing_in_the_finished_run(world, capsys, fault, tmp_path):
    run_dir = _copy_run(world, f"refused-{fault}")
    before = _snapshot(run_dir)
    if fault == "data_seed":
        change, words = ["train.data_seed=7"], "dataset fingerprint"
    else:
        tok = build_tiny_tokenizer(tmp_path / "tok400", vocab_size=400)
        change, words = [f"data.tokenizer={tok}", "model.vocab_size=null"], "another tokenizer vocabulary"
    rc, line = _cli(_fit(world, run_dir.name, "run.resume=last", *change, steps=6), capsys)
    assert rc == 2 and "cannot resume" in line and words in line and "fix:" in line, line
    assert _snapshot(run_dir) == before
    assert _snapshot(world["done"]) == _snapshot(world["root"] / "runs" / "done")


# ------------------------------------------------------------------------- damaged checkpoints


def test_a_torn_last_checkpoint_falls_back_to_the_newest_intact_one(world, capsys):
    run_dir = _copy_run(world, "torn")
    ckpts = run_dir / "checkpoints"
    last = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(last[: len(last) * 8 // 10])  # the full-disk copy of the issue
    step4 = bytearray((ckpts / "step-000004.ckpt").read_bytes())
    step4[len(step4) // 2: len(step4) // 2 + 512] = os.urandom(512)  # bit rot in the middle
    (ckpts / "step-000004.ckpt").write_bytes(bytes(step4))
    capsys.readouterr()
    assert main(_fit(world, "torn", "run.resume=last", "train.ckpt_every=2", steps=4)) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"{ckpts / 'last.ckpt'} is truncated or not a checkpoint" in err
            and "resuming from step-000002.ckpt, the newest intact checkpoint" in err), err
    segments = [sorted(p) for p in scalars_per_file(run_dir, "train/loss")]
    assert segments[-1] == [2, 3]  # steps 2 and 3 trained again from the step-2 checkpoint
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("damage", ["empty", "garbage_tail"])
def test_no_intact_checkpoint_is_one_line_and_changes_nothing(world, capsys, damage):
    run_dir = _copy_run(world, f"broken-{damage}")
    for p in (run_dir / "checkpoints").glob("*.ckpt"):
        data = p.read_bytes()
        p.write_bytes(b"" if damage == "empty" else data[:-1024] + os.urandom(1024))
    before = _snapshot(run_dir)
    rc, line = _cli(_fit(world, run_dir.name, "run.resume=last", steps=6), capsys)
    assert rc == 2 and line.startswith(f"error: cannot resume: {run_dir / 'checkpoints' / 'last.ckpt'} is "), line
    assert "no intact step-*.ckpt is beside it" in line and "fix:" in line
    assert _snapshot(run_dir) == before


_KILLED_SAVE = """
import os, sys, time, torch
from pathlib import Path
from megadoc_pl.train.checkpoint_io import AtomicCheckpointIO

def hang(fd):
    print("writing", flush=True)
    time.sleep(300)

os.fsync = hang
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(512, 512)}}, Path(sys.argv[1]))
"""


def test_a_kill_during_a_save_keeps_last_and_the_next_start_removes_the_temp_file(tmp_path, capsys):
    last = tmp_path / "run" / rundir.CKPT_DIR / rundir.LAST_CKPT
    write_checkpoint({"state_dict": {"w": torch.zeros(4)}}, last)
    good = last.read_bytes()
    saver = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(last)], cwd=REPO, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert saver.stdout.readline().strip() == "writing"  # the new checkpoint is written, not yet renamed
    saver.send_signal(signal.SIGKILL)
    saver.wait()
    leftovers = list(last.parent.glob(f".*{TMP_SUFFIX}"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 512 * 512 * 4
    assert last.read_bytes() == good  # never a torn last.ckpt
    capsys.readouterr()
    rundir.claim_run_dir(tmp_path / "run", unique=False).release()
    assert not list(last.parent.glob(".*")) and last.read_bytes() == good
    assert f"removed {leftovers[0]}, left by an interrupted save" in capsys.readouterr().err


class _DivergeAfter(pl.Callback):
    """The optimizer step that makes ``global_step`` = ``step`` leaves NaN weights (a blow-up at high lr);
    the checkpoint callbacks run after this one."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                pl_module.model.norm.weight.fill_(float("nan"))


def test_nonfinite_weights_are_never_saved_and_last_stays_the_last_good_checkpoint(world, capsys):
    cfg = tiny_recipe(world["corpus"], world["tok"], world["root"], "nan", 4, ["train.ckpt_every=1"])
    with pytest.raises(NonFiniteLossError):
        train(cfg, {**QUIET, "callbacks": [_DivergeAfter(2)]})
    assert "not saving" in capsys.readouterr().err
    ckpts = world["root"] / "runs" / "nan" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step-000001.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # the advised fix (resume, here without the blow-up) trains on from step 1 instead of hitting NaN again
    rc, line = _cli(_fit(world, "nan", "run.resume=last", "train.ckpt_every=1", steps=4), capsys)
    assert rc == 0 and line == ""
    assert json.loads((ckpts.parent / "metrics.json").read_text())["status"] == "finished"


def test_nonfinite_weights_are_refused_by_the_checkpoint_io(tmp_path, capsys):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("inf")])}}, path)
    assert not path.exists() and "1 weight tensors hold NaN/inf (e.g. w)" in capsys.readouterr().err


# ------------------------------------------------------------------------- read-only and full filesystems


def test_read_only_run_root_is_one_line_before_any_data_work(world, tmpfs, capsys, tmp_path):
    ro = tmpfs("ro", ro=True)
    argv = _fit(world, "ro-run", f"run.root={ro / 'runs'}", f"data.cache_dir={tmp_path / 'fresh-cache'}")
    rc, line = _cli(argv, capsys)
    assert rc == 2 and line.startswith(f"error: cannot create the run directory {ro / 'runs' / 'ro-run'}: "
                                       "Read-only file system (fix:"), line
    assert not (tmp_path / "fresh-cache").exists()  # refused before preparing any data


def test_full_run_root_fails_the_checkpoint_in_one_line_and_leaves_no_temp_file(world, tmpfs, capsys):
    full = tmpfs("full")
    fill_filesystem(full, leave=64 * 1024)  # room for config, provenance and events, not for a checkpoint
    rc, line = _cli(_fit(world, "full-run", f"run.root={full}", "train.ckpt_every=1", steps=2), capsys)
    ckpts = full / "full-run" / "checkpoints"
    assert rc == 2 and line.startswith(f"error: cannot write checkpoint {ckpts / 'step-000001.ckpt'}: "
                                       "No space left on device (fix: free space"), line
    assert not ckpts.exists() or not list(ckpts.iterdir())
    assert _snapshot(world["done"]) == _snapshot(world["root"] / "runs" / "done")


def test_a_full_run_root_under_tensorboard_is_one_line_from_the_command_line(world, tmpfs):
    """TensorBoard's writer thread meets the full disk first: still no traceback, one line, exit 2."""
    full = tmpfs("full-tb")
    fill_filesystem(full, leave=64 * 1024)  # validation figures at the end do not fit
    argv = [sys.executable, "-m", "megadoc_pl.train.cli", *_fit(world, "tb", f"run.root={full}", steps=2)]
    r = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: cannot write {full / 'tb'}") and "No space left on device (fix:" in errors[0]


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_full_or_read_only_cache_dir_is_one_line(world, tmpfs, capsys, fault):
    cache = tmpfs(f"cache-{fault}", ro=fault == "read-only")
    if fault == "full":
        fill_filesystem(cache, leave=4096)
    rc, line = _cli(_fit(world, f"cache-{fault}", f"data.cache_dir={cache}"), capsys)
    assert rc == 2 and line.startswith(f"error: data.cache_dir={cache}: "), line
    words = ("No space left on device", "the filesystem is full") if fault == "full" else ("Read-only file system",)
    assert any(w in line for w in words) and "fix:" in line, line
    assert not (world["root"] / "runs" / f"cache-{fault}").exists()  # the claimed directory is given back
