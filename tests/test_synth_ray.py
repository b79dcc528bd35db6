"""``--executor ray`` on a local Ray cluster started by the test (2 CPUs): the same rows as the
local runner, a worker process killed mid-run, and the driver killed mid-run then rerun."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from megadoc_pl.synth.cli import main as cli_main
from megadoc_pl.synth.runner import RunConfig, Runner, synthesize
from megadoc_pl.synth.tasks import TaskConfig
from megadoc_pl.synth.tiny import build_tiny_chat_model

from test_synth_runner import keys, make_docs, read_rows, sigkill_after_rows

ray = pytest.importorskip("ray")  # the optional extra [ray]

REPO = Path(__file__).resolve().parents[1]
SHARD = "shard-00000-of-00001"


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


def _config(docs, out, **kw) -> RunConfig:
    return RunConfig(inputs=[str(docs)], out=str(out), progress=False, **kw)


def test_ray_writes_what_the_local_runner_writes(tmp_path):
    make_docs(tmp_path / "docs.jsonl", 12)
    task = TaskConfig(task="maga", judge=True, generations=3)
    local = synthesize(task, _config(tmp_path / "docs.jsonl", tmp_path / "local", backend="template", batch_size=3))
    remote = synthesize(task, _config(tmp_path / "docs.jsonl", tmp_path / "ray", backend="template", batch_size=3,
                                      executor="ray", workers=2))

    def rows(out):
        return sorted(read_rows(out), key=lambda r: (r["source_id"], r["gen_index"]))

    assert rows(tmp_path / "ray") == rows(tmp_path / "local") and len(rows(tmp_path / "local")) == 36
    for name in ("state", "dropped"):
        f = f".synth/{name}/{SHARD}.jsonl"
        local_lines = sorted((tmp_path / "local" / f).read_text().splitlines()) if (tmp_path / "local" / f).exists() else []
        ray_lines = sorted((tmp_path / "ray" / f).read_text().splitlines()) if (tmp_path / "ray" / f).exists() else []
        assert ray_lines == local_lines, name
    assert remote["run"]["executor"] == "ray" and remote["run"]["remaining_units"] == 0
    # the driver records the prompt versions although the actors rendered the prompts
    assert remote["prompt_versions"] == local["prompt_versions"] and len(remote["prompt_versions"]) == 3
    for k in ("requests", "completions", "rows_written", "completion_tokens"):
        assert remote["totals"][k] == local["totals"][k], k
    # a rerun finds nothing to do
    again = synthesize(task, _config(tmp_path / "docs.jsonl", tmp_path / "ray", backend="template", executor="ray"))
    assert again["run"]["requests"] == 0


def test_a_killed_worker_is_restarted_and_every_generation_exists_once(tmp_path, tiny_model):
    docs = make_docs(tmp_path / "docs.jsonl", 16)
    out = tmp_path / "out"
    cfg = _config(tmp_path / "docs.jsonl", out, backend="transformers", model=tiny_model, batch_size=2,
                  backend_kwargs=dict(model=tiny_model, device="cpu"), executor="ray", workers=2)
    runner = Runner(TaskConfig(task="rephrase", generations=2, max_new_tokens=12), cfg)
    victim = runner.executor.pids()[0]
    killed = threading.Event()

    def kill_when_rows_appear():
        rows = out / f"{SHARD}.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if rows.exists() and rows.read_bytes().count(b"\n") >= 4:
                os.kill(victim, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_when_rows_appear)
    watcher.start()
    stats = runner.run()
    watcher.join()
    assert killed.is_set()
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(2)]  # each exactly once
    assert stats["run"]["remaining_units"] == 0 and stats["totals"]["rows_written"] == 32


@pytest.mark.slow
def test_driver_killed_three_times_then_rerun_gives_every_generation_once(tmp_path, tiny_model):
    docs = make_docs(tmp_path / "docs.jsonl", 24)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "synthesize.py"), "--task", "rephrase", "--generations", "2",
           "--backend", "transformers", "--model", tiny_model, "--device", "cpu", "--max-new-tokens", "8",
           "--input", str(tmp_path / "docs.jsonl"), "--out", str(out), "--batch-size", "1", "--no-progress",
           "--executor", "ray", "--workers", "2",
           "--ray-address", ray.get_runtime_context().gcs_address]  # this test's cluster: nothing outlives it
    rows_file = out / f"{SHARD}.jsonl"
    for at_least in (4, 16, 30):  # killed three times, at growing progress
        left = sigkill_after_rows(cmd, rows_file, at_least)
        assert at_least <= left < 48
    assert cli_main(cmd[2:]) == 0  # the same command, here (this process's Ray cluster)
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(2)]
    assert json.loads((out / "stats.json").read_text())["totals"]["rows_written"] == 48
