"""``--executor ray`` (Ray Data) on a local Ray cluster started by the test (2 CPUs): every row and
resume file as the local runner writes them, a backend that cannot load (nothing left behind), a
worker process killed mid-run, and five kills of a worker or the driver at random moments, each
followed by a rerun, ending with the rows of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megadoc_pl.synth.cli import main as cli_main
from megadoc_pl.synth.runner import SynthRunConfig, Runner, synthesize
from megadoc_pl.synth.tasks import TaskConfig
from megadoc_pl.synth.tiny import build_tiny_chat_model

from test_synth_runner import keys, make_docs, read_rows

ray = pytest.importorskip("ray")  # the optional extra [ray]
pytest.importorskip("ray.data")

REPO = Path(__file__).resolve().parents[2]
SHARD = "shard-00000-of-00001"
WORKER_TITLE = b"MapWorker(MapBatches(GenerationWorker))"  # the actor processes' title (setproctitle)


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


def _config(docs, out, **kw) -> SynthRunConfig:
    return SynthRunConfig(inputs=[str(docs)], out=str(out), progress=False, **kw)


def _by_key(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["source_id"], r["gen_index"]))


def _lines(out: Path, name: str) -> list[str]:
    f = out / ".synth" / name / f"{SHARD}.jsonl"
    return sorted(f.read_text().splitlines()) if f.exists() else []


def worker_pids() -> list[int]:
    """The Ray Data actor processes of GenerationWorker in this test's cluster (descendants of
    this process: the raylet it started forks them)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                if WORKER_TITLE in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                continue
    return found


@pytest.mark.parametrize("task_kw", [dict(task="maga", judge=True, generations=3),
                                     dict(task="rephrase", generations=2, long_sources="chunk",
                                          max_source_tokens=40)], ids=["maga-judge", "rephrase-chunks"])
def test_ray_writes_what_the_local_runner_writes(tmp_path, task_kw):
    make_docs(tmp_path / "docs.jsonl", 12, long_every=4)
    task = TaskConfig(**task_kw)
    local = synthesize(task, _config(tmp_path / "docs.jsonl", tmp_path / "local", backend="template", batch_size=3))
    remote = synthesize(task, _config(tmp_path / "docs.jsonl", tmp_path / "ray", backend="template", batch_size=3,
                                      executor="ray", workers=2))
    rows = _by_key(read_rows(tmp_path / "local"))
    assert _by_key(read_rows(tmp_path / "ray")) == rows and len(rows) == local["totals"]["rows_written"] > 24
    for name in ("state", "dropped", "errors", "judged"):
        assert _lines(tmp_path / "ray", name) == _lines(tmp_path / "local", name), name
    run = remote["run"]
    assert run["executor"] == "ray" and run["remaining_units"] == 0 and run["model"] == local["run"]["model"]
    assert sum(run["batches_by_worker"].values()) == -(-local["units"] // 3)  # every batch came back once
    # the driver records the prompt versions although the actors rendered the prompts
    assert remote["prompt_versions"] == local["prompt_versions"]
    for k in ("requests", "completions", "rows_written", "completion_tokens", "units_done"):
        assert remote["totals"][k] == local["totals"][k], k
    # a rerun finds nothing to do and starts no actors
    again = synthesize(task, _config(tmp_path / "docs.jsonl", tmp_path / "ray", backend="template", executor="ray"))
    assert again["run"]["requests"] == 0 and again["run"]["batches_by_worker"] == {}


def test_a_backend_that_cannot_load_fails_the_start_in_one_line_and_leaves_nothing(tmp_path, capsys):
    make_docs(tmp_path / "docs.jsonl", 4)
    out = tmp_path / "out"
    argv = ["--task", "rephrase", "--backend", "transformers", "--model", str(tmp_path / "no_model"),
            "--input", str(tmp_path / "docs.jsonl"), "--out", str(out), "--executor", "ray", "--no-progress"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the Ray workers failed before the first batch came back: ValueError: --model")
    assert not out.exists()  # no run.json, lock or empty files: the corrected command starts afresh


def test_a_killed_worker_is_restarted_and_every_generation_exists_once(tmp_path, tiny_model):
    docs = make_docs(tmp_path / "docs.jsonl", 16)
    out = tmp_path / "out"
    cfg = _config(tmp_path / "docs.jsonl", out, backend="transformers", model=tiny_model, batch_size=2,
                  backend_kwargs=dict(model=tiny_model, device="cpu"), executor="ray", workers=2)
    runner = Runner(TaskConfig(task="rephrase", generations=2, max_new_tokens=12), cfg)
    killed: list[int] = []

    def kill_a_worker_once_rows_appear():
        rows = out / f"{SHARD}.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            pids = worker_pids()
            if pids and rows.exists() and rows.read_bytes().count(b"\n") >= 4:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_a_worker_once_rows_appear)
    watcher.start()
    stats = runner.run()
    watcher.join()
    assert killed
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(2)]  # each exactly once
    assert stats["run"]["remaining_units"] == 0 and stats["totals"]["rows_written"] == 32


@pytest.mark.slow
def test_five_kills_of_a_worker_or_the_driver_then_rerun_give_the_uninterrupted_rows(tmp_path):
    """maga with a judge on the template backend: every row is a pure function of (source_id,
    gen_index) (per-request seeds, stage-1 pairs kept as state), so the rows must equal an
    uninterrupted run's whatever the kills cut."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    docs = make_docs(tmp_path / "docs.jsonl", 60)
    out = tmp_path / "out"
    argv = ["--task", "maga", "--judge", "--generations", "3", "--backend", "template",
            "--input", str(tmp_path / "docs.jsonl"), "--out", str(out), "--batch-size", "1", "--no-progress",
            "--executor", "ray", "--workers", "2",
            "--ray-address", ray.get_runtime_context().gcs_address]  # this test's cluster: nothing outlives it
    cmd = [sys.executable, str(REPO / "tools" / "synthesize.py"), *argv, "--limit", "10"]
    rows_file = out / f"{SHARD}.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for kill in ("worker", "driver", "worker", "driver", "worker"):
        deadline = time.time() + 60
        while worker_pids() and time.time() < deadline:  # the actors of a killed driver are gone
            time.sleep(0.05)
        before = rows_file.read_bytes().count(b"\n") if rows_file.exists() else 0
        target = before + rng.randint(1, 9)  # at a random moment in the first 3 of this run's 10 units
        log = open(tmp_path / "driver.log", "w+b")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        victim = None
        while proc.poll() is None and time.time() < deadline + 120:
            pids = worker_pids() if kill == "worker" else [proc.pid]
            if pids and rows_file.exists() and rows_file.read_bytes().count(b"\n") >= target:
                victim = pids[0]
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.005)
        rc = proc.wait(timeout=120)
        log.seek(0)
        context = f"seed {seed}, {kill} kill at {target} rows: {log.read().decode()[-2000:]}"
        assert victim is not None, f"the run ended before the kill ({context})"
        # a killed worker is restarted and its batch run again: the limited run still succeeds
        assert rc == (0 if kill == "worker" else -signal.SIGKILL), context
    assert cli_main(argv) == 0  # the rerun, here (this process's Ray cluster)
    assert cli_main(argv) == 0  # and one that finds nothing left
    uninterrupted = tmp_path / "uninterrupted"
    synthesize(TaskConfig(task="maga", judge=True, generations=3),
               _config(tmp_path / "docs.jsonl", uninterrupted, backend="template"))
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(3)], seed  # each exactly once
    assert _by_key(rows) == _by_key(read_rows(uninterrupted)), seed
    assert _lines(out, "state") == _lines(uninterrupted, "state"), seed
    assert json.loads((out / "stats.json").read_text())["totals"]["rows_written"] == 180
