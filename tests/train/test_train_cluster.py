"""Cluster launches on loopback: two torchrun "nodes" x 2 gloo ranks, any validation size, one
preparation per cache, relaunches that hash nothing, runs that extend and requeue.

The two-node launch is the real multi-node path (c10d rendezvous on 127.0.0.1, as under SLURM
with ``srun torchrun ... --node_rank $SLURM_NODEID``): its losses and validation losses must equal
a one-process run with the same global batch, every store must be tokenized once although four
ranks start on a cold cache together, and validation sets smaller than the world (2 batches, and
1 window, on 4 ranks) must be scored completely and exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megadoc_pl.train.run import train

from helpers import one_thread
from helpers import QUIET, scalars, tiny_overrides, tiny_recipe, write_corpus

STEPS = 4
pytestmark = pytest.mark.slow

# Imported by every process of the launch (PYTHONPATH): count store builds for real, by process.
_SITECUSTOMIZE = textwrap.dedent('''
    import os
    if os.environ.get("MEGADOC_TEST_BUILD_LOG"):
        import megadoc_pl.data.store_build as _store_build
        _write = _store_build._write_store

        def _counted(tmp, files, *args, **kwargs):
            with open(os.environ["MEGADOC_TEST_BUILD_LOG"], "a") as f:
                f.write(f"{os.getpid()} {os.environ.get('RANK')} {[str(p) for p in files]}\\n")
            return _write(tmp, files, *args, **kwargs)

        _store_build._write_store = _counted
''')


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _extra_set(tmp_path: Path) -> Path:
    """A validation set of one short document: one window."""
    path = tmp_path / "one_doc.jsonl"
    path.write_text(json.dumps({"id": "extra-0", "text": "Hana built the tower of Osk in 1850. " * 3}) + "\n")
    return path


def test_two_node_loopback_launch_equals_one_process(tmp_path, tiny_tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    # micro batch 1: the global batch of 4 is one window per rank (accumulation 4 in one process)
    extra = [f"data.val.extra.one={_extra_set(tmp_path)}", "data.val.max_windows=3", "train.micro_batch_size=1"]
    one = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "one", STEPS, extra=extra), QUIET)

    # the same recipe, a cold cache of its own, 2 nodes x 2 ranks started at once
    cold = tmp_path / "cold"
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    builds = tmp_path / "builds.log"
    sets = [a for o in tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "two_nodes", STEPS) + extra
            + [f"data.cache_dir={cold}"] for a in ("--set", o)]
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(helpers), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MEGADOC_TEST_BUILD_LOG=str(builds))
    env.pop("MEGADOC_RUN_DIR", None)
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "megadoc-test", "-m", "megadoc_pl.train.cli", "fit", "--recipe", "baseline_real", *sets,
               "--trainer.num_nodes", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=420)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    run = tmp_path / "runs" / "two_nodes"
    m1, m4 = (json.loads((d / "metrics.json").read_text()) for d in (one, run))
    assert (m4["world_size"], m4["accumulate_grad_batches"]) == (4, 1)
    assert (m1["world_size"], m1["accumulate_grad_batches"]) == (1, 4)
    a, b = scalars(one, "train/loss"), scalars(run, "train/loss")
    assert sorted(a) == sorted(b) == list(range(STEPS))
    for s in range(STEPS):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a, b)
    # every set, the 1-window one included, scored completely and exactly once on 4 ranks
    names = {k for k in m1 if k.startswith("val/") and k.endswith("/loss")}
    assert names == {"val/iid/loss", "val/long/loss", "val/short/loss", "val/one/loss"}
    for k in names:
        assert m4[k] == pytest.approx(m1[k], rel=1e-5), k

    # four ranks on a cold cache: each store (real documents, the extra set) tokenized once
    lines = builds.read_text().splitlines()
    inputs = [line.split(" ", 2)[2] for line in lines]
    assert len(inputs) == len(set(inputs)) == 2, lines


def test_relaunch_hashes_no_input_file(tmp_path, tiny_tokenizer_path, monkeypatch):
    from megadoc_pl import utils
    from megadoc_pl.data.prepare import prepare_corpus

    corpus = write_corpus(tmp_path / "corpus.jsonl")
    cfg = tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "r", 2)
    first = prepare_corpus(cfg)
    hashed: list[str] = []
    real_hash = utils.sha256_file
    monkeypatch.setattr(utils, "sha256_file", lambda p: hashed.append(str(p)) or real_hash(p))
    again = prepare_corpus(cfg)
    assert again.fingerprint == first.fingerprint
    assert str(corpus) not in hashed and not any(h.endswith(".jsonl") for h in hashed), hashed
    # a changed input is hashed again and detected
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    with corpus.open("a") as f:
        f.write(json.dumps({"id": "doc-new", "text": "Erin built the mill of Velm in 1801."}) + "\n")
    changed = prepare_corpus(cfg)
    assert changed.fingerprint != first.fingerprint and changed.real.num_documents == first.real.num_documents + 1
    assert str(corpus.resolve()) in hashed


def test_a_finished_run_extends_and_a_requeue_changes_nothing(tmp_path, tiny_tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    run = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "ext", 3), QUIET)
    assert json.loads((run / "metrics.json").read_text())["steps"] == 3

    # raise max_steps and resume: training continues from step 3 to 6 on the new schedule
    run = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "ext", 6, extra=["run.resume=last"]), QUIET)
    m = json.loads((run / "metrics.json").read_text())
    assert (m["status"], m["steps"], m["tokens_seen"]) == ("finished", 6, 6 * 4 * 32)
    fresh = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "fresh6", 6), QUIET)
    lr_ext, lr_fresh = scalars(run, "train/lr"), scalars(fresh, "train/lr")
    assert sorted(lr_ext) == list(range(6))
    for s in (3, 4, 5):  # the schedule is defined over the new total
        assert lr_ext[s] == pytest.approx(lr_fresh[s], rel=1e-6)
    train_keys = {k for k in m if k.startswith("train/")}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= train_keys

    # a requeue (resume at the same max_steps) trains nothing and leaves metrics.json as it was
    before = hashlib.sha256((run / "metrics.json").read_bytes()).hexdigest()
    train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "ext", 6, extra=["run.resume=auto"]), QUIET)
    assert hashlib.sha256((run / "metrics.json").read_bytes()).hexdigest() == before
