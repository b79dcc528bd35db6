"""A real two-process DDP run on CPU (gloo, loopback) through the ``megadoc-pl`` CLI.

Ranks must read disjoint windows that together make each step's global batch, and the loss
curve must match a one-process run with the same global batch (accumulation 2 instead of 2
ranks) up to floating-point summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from megadoc_pl.train.run import train

from helpers import one_thread
from helpers import QUIET, scalars, tiny_overrides, tiny_recipe, write_corpus

STEPS = 4

_RECORDER = textwrap.dedent('''
    """Test helper: each rank writes the global window indices it trained on."""
    import json, os
    import lightning.pytorch as pl

    class WindowRecorder(pl.Callback):
        def __init__(self, out_dir: str):
            self.out_dir, self.seen = out_dir, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append([trainer.global_step] + [int(w) for w in batch["window_index"]])

        def on_train_end(self, trainer, pl_module):
            path = os.path.join(self.out_dir, f"rank{trainer.global_rank}.json")
            with open(path, "w") as f:
                json.dump({"world": trainer.world_size, "batches": self.seen}, f)
''')


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_two_process_ddp_matches_one_process(tmp_path, tiny_tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    one = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "one", STEPS), QUIET)

    (tmp_path / "helpers").mkdir()
    (tmp_path / "helpers" / "window_recorder.py").write_text(_RECORDER)
    sets = [a for o in tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "ddp", STEPS) for a in ("--set", o)]
    cmd = [sys.executable, "-m", "megadoc_pl.train.cli", "fit", "--recipe", "baseline_real", *sets,
           "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.callbacks+=window_recorder.WindowRecorder",
           f"--trainer.callbacks.out_dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "helpers"), os.environ.get("PYTHONPATH", "")]),
               MASTER_PORT=str(20000 + os.getpid() % 20000), OMP_NUM_THREADS="1")
    env.pop("MEGADOC_RUN_DIR", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "runs" / "ddp"

    # each rank read its own windows; together they are exactly step s's global batch [4s, 4s+4)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    per_rank = [{w for b in r["batches"] for w in b[1:]} for r in ranks]
    assert not per_rank[0] & per_rank[1]
    for s in range(STEPS):
        step = sorted(w for r in ranks for b in r["batches"] if b[0] == s for w in b[1:])
        assert step == list(range(4 * s, 4 * s + 4))

    a, b = scalars(one, "train/loss"), scalars(ddp, "train/loss")
    assert sorted(a) == sorted(b) == list(range(STEPS))
    for s in range(STEPS):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a, b)

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, ddp))
    assert (m1["world_size"], m1["accumulate_grad_batches"]) == (1, 2)
    assert (m2["world_size"], m2["accumulate_grad_batches"]) == (2, 1)
    assert m2["tokens_seen"] == m1["tokens_seen"] == STEPS * 4 * 32
    assert m2["val/iid/loss"] == pytest.approx(m1["val/iid/loss"], rel=1e-5)
    # the CLI wrote the trainer flags it was given back into the recipe
    cfg = (ddp / "config.yaml").read_text()
    assert "devices: 2" in cfg and "strategy: ddp" in cfg and "accelerator: cpu" in cfg
