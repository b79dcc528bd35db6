"""Real two-process FSDP runs on CPU (gloo, loopback) through the ``megadoc-pl`` CLI.

``train.strategy=fsdp`` (megadoc_pl.train.fsdp.MegadocFSDPStrategy: every Block one FSDP unit,
use_orig_params, full-state-dict checkpoints) must optimise what a one-process run with the same
global batch (accumulation 2 instead of 2 ranks) optimises, up to floating-point summation order.

Two launches, like a real job: run ``fsdp_nan`` gets a NaN loss on rank 1 only in step 2 and must
stop both ranks there (the flag travels in the step's all-reduce); run ``fsdp`` resumes from its
step-2 FSDP checkpoint (model and Adam state gathered in full, resharded on load) and finishes. Together they must give the
one-process run's per-step losses and pre-clip gradient norms (clipping is active at every step,
so FSDP's own clip_grad_norm_ is exercised), its validation losses (also the one after fit, where
Lightning would rebuild the wrapper), and a full-state-dict checkpoint that a plain Llama loads
and that computes what the sharded model computed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megadoc_pl.checkpoints import load_model_from_checkpoint
from megadoc_pl.train.fsdp import MegadocFSDPStrategy
from megadoc_pl.train.run import build_strategy, train

from helpers import one_thread
from helpers import QUIET, scalars, tiny_overrides, tiny_recipe, write_corpus

STEPS = 4
CLIP = 0.2  # below every step's gradient norm: the clip changes every update
# validation at step 3 in the loop and at step 4 after fit (TrainingRun._final_validation)
EXTRA = [f"train.grad_clip={CLIP}", "data.val.interval=3", "train.ckpt_every=2"]

_PROBES = textwrap.dedent('''
    """Test helpers that run inside the FSDP ranks."""
    import lightning.pytorch as pl
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    class FinalLogits(pl.Callback):
        """Rank 0 saves the logits the trained, still sharded model gives on fixed tokens."""

        def __init__(self, out_file: str):
            self.out_file = out_file

        def on_train_end(self, trainer, pl_module):
            root = trainer.strategy.model
            ids = torch.arange(24).reshape(2, 12) * 7 % pl_module.model.cfg.vocab_size
            with torch.no_grad():
                hidden = root({"input_ids": ids})  # through the FSDP units, on every rank
                with FSDP.summon_full_params(root, recurse=False):  # the head belongs to the root unit
                    logits = pl_module.model.logits(hidden)
            units = sum(isinstance(m, FSDP) for m in root.modules())
            if trainer.global_rank == 0:
                torch.save({"input_ids": ids, "logits": logits.clone(), "fsdp_units": units}, self.out_file)

    class NanOnRank1(pl.Callback):
        """The loss of rank 1's micro-batch in optimizer step 2 is NaN; rank 0's stays finite."""

        def __init__(self):
            self.hook = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2 and trainer.global_rank == 1:
                self.hook = pl_module.model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if self.hook is not None:
                self.hook.remove()
                self.hook = None
''')


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer_path) -> dict:
    """The one-process oracle, the FSDP run stopped by a NaN, and the FSDP run resumed from it."""
    root = tmp_path_factory.mktemp("train_fsdp")
    (root / "helpers").mkdir()
    (root / "helpers" / "fsdp_probes.py").write_text(_PROBES)
    world = {"root": root, "tok": tiny_tokenizer_path, "corpus": write_corpus(root / "corpus.jsonl")}
    # downstream multiple choice at the end: under FSDP1 it calls the inner model outside the root's forward
    task = root / "toy.jsonl"
    task.write_text("".join(json.dumps({"question": f"Who built the mill of Osk in {1800 + i}?",
                                        "choices": ["Alice", "Bob", "Carol"], "label": i % 3}) + "\n" for i in range(6)))
    tasks = [f"eval.tasks.toy={task}"]
    with one_thread():
        one = train(tiny_recipe(world["corpus"], world["tok"], root, "one", STEPS, EXTRA + tasks), QUIET)
    nan_proc = launch_fsdp(world, "fsdp_nan", tasks, ["--trainer.callbacks+=fsdp_probes.NanOnRank1"], 0)
    step2 = root / "runs" / "fsdp_nan" / "checkpoints" / "step-000002.ckpt"
    probe = root / "fsdp_logits.pt"
    proc = launch_fsdp(world, "fsdp", [f"run.resume={step2}"] + tasks, [
        "--trainer.callbacks+=fsdp_probes.FinalLogits", f"--trainer.callbacks.out_file={probe}"], 1)
    return {"world": world, "one": one, "nan": root / "runs" / "fsdp_nan", "nan_proc": nan_proc, "step2": step2,
            "fsdp": root / "runs" / "fsdp", "proc": proc, "probe": probe}


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def launch_fsdp(world: dict, name: str, sets: list[str], callbacks: list[str],
                port_offset: int) -> subprocess.CompletedProcess:
    """``megadoc-pl fit`` on 2 CPU processes with train.strategy=fsdp (Lightning spawns rank 1)."""
    overrides = tiny_overrides(world["corpus"], world["tok"], world["root"], name, STEPS) + EXTRA + sets
    cmd = [sys.executable, "-m", "megadoc_pl.train.cli", "fit", "--recipe", "baseline_real",
           *[a for o in overrides for a in ("--set", o)],
           "--trainer.devices", "2", "--trainer.strategy", "fsdp", "--trainer.accelerator", "cpu",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *callbacks]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(world["root"] / "helpers"), os.environ.get("PYTHONPATH", "")]),
               MASTER_PORT=str(20000 + (os.getpid() * 3 + port_offset) % 20000))
    env.pop("MEGADOC_RUN_DIR", None)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_strategy_contract():
    """The recipe's fsdp is our subclass (Lightning accepts it on the CPU) with fp32 buffers in mixed precision."""
    import lightning.pytorch as pl
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from omegaconf import OmegaConf
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from megadoc_pl.config import RecipeConfig
    from megadoc_pl.model.llama import Block

    cfg = OmegaConf.structured(RecipeConfig)
    cfg.train.strategy = "fsdp"
    strategy = build_strategy(cfg)
    assert isinstance(strategy, MegadocFSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {Block}
    assert strategy.kwargs["use_orig_params"] is True and strategy._state_dict_type == "full"
    # Lightning refuses the name 'fsdp' on the CPU; our subclass is accepted
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        pl.Trainer(strategy="fsdp", accelerator="cpu", devices=2, logger=False)
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    assert trainer.strategy is strategy
    for precision, low in (("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)):
        strategy.precision_plugin = FSDPPrecision(precision)
        mp = strategy.mixed_precision_config
        assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (low, low, torch.float32)
    strategy.precision_plugin = FSDPPrecision("bf16-true")
    assert strategy.mixed_precision_config.buffer_dtype == torch.bfloat16  # whole model in bf16: untouched


def test_nan_on_one_rank_stops_both_ranks_at_that_step(runs):
    assert runs["nan_proc"].returncode != 0
    m = metrics(runs["nan"])
    # rank 0's own losses were finite: it learns of rank 1's NaN from the step's all-reduce and stops
    # at that step (without the shared flag it would only see NaN weights one step later)
    assert m["status"] == "nonfinite_loss" and m["steps"] == 2
    assert m["error"].startswith("non-finite training loss (nan) at optimizer step 3 (global_step=2): "
                                 "the non-finite micro-batch was on another rank (this is rank 0)")
    assert "error: non-finite training loss" in runs["nan_proc"].stderr
    assert runs["step2"].is_file()


def test_resumed_fsdp_run_finishes_sharded(runs):
    assert runs["proc"].returncode == 0, runs["proc"].stderr[-4000:]
    m1, m2 = metrics(runs["one"]), metrics(runs["fsdp"])
    assert m2["status"] == "finished" and m2["error"] is None and m2["steps"] == STEPS
    assert m2["resumed_from"] == str(runs["step2"])
    assert (m1["world_size"], m1["accumulate_grad_batches"]) == (1, 2)
    assert (m2["world_size"], m2["accumulate_grad_batches"]) == (2, 1)
    # really sharded: the root unit and one unit per Block (n_layers=2 in tiny_overrides)
    assert torch.load(runs["probe"], weights_only=False)["fsdp_units"] == 1 + 2
    assert m2["tokens_seen"] == m1["tokens_seen"] == STEPS * 4 * 32  # counters restored from the checkpoint
    assert m2["parameters"] == m1["parameters"]  # counted from the config, not from this rank's shards
    cfg = (runs["fsdp"] / "config.yaml").read_text()
    assert "strategy: fsdp" in cfg and "devices: 2" in cfg and "accelerator: cpu" in cfg


def test_losses_grad_norms_and_validation_match_one_process(runs):
    assert runs["proc"].returncode == 0, runs["proc"].stderr[-4000:]
    one, nan, fsdp = runs["one"], runs["nan"], runs["fsdp"]
    assert sorted(scalars(nan, "train/loss")) == [0, 1] and sorted(scalars(fsdp, "train/loss")) == [2, 3]
    for tag in ("train/loss", "train/grad_norm"):
        a, b = scalars(one, tag), {**scalars(nan, tag), **scalars(fsdp, tag)}
        assert sorted(a) == sorted(b) == list(range(STEPS)), tag
        for s in range(STEPS):
            assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (tag, s, a, b)
        if tag == "train/grad_norm":
            assert min(b.values()) > 2 * CLIP
    m1, m2 = metrics(one), metrics(fsdp)
    for name in ("iid", "long", "short"):
        assert m2[f"val/{name}/loss"] == pytest.approx(m1[f"val/{name}/loss"], rel=1e-5)
        assert m2[f"val/{name}/loss_best"] == pytest.approx(m1[f"val/{name}/loss_best"], rel=1e-5)
    # downstream scoring gathers the root unit's embeddings and head ("'weight' must be 2-D" before)
    downstream = {k: v for k, v in m1.items() if k.startswith("downstream/")}
    assert set(downstream) == {"downstream/toy/acc", "downstream/toy/acc_norm", "downstream/avg_error"}
    assert {k: m2[k] for k in downstream} == downstream


def test_checkpoint_is_a_plain_llama_computing_what_fsdp_computed(runs):
    assert runs["proc"].returncode == 0, runs["proc"].stderr[-4000:]
    saved = torch.load(runs["probe"], weights_only=False)
    model, ckpt_cfg = load_model_from_checkpoint(runs["fsdp"] / "checkpoints" / "last.ckpt")
    assert ckpt_cfg["train"]["strategy"] == "fsdp"
    with torch.no_grad():
        logits = model.logits(model(saved["input_ids"]))
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)
    w1 = torch.load(runs["one"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    w2 = torch.load(runs["fsdp"] / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_checkpoint_resumes_in_one_process(runs):
    """The full checkpoint (Adam state keyed in FSDP's parameter order) is not tied to FSDP."""
    w = runs["world"]
    extra = EXTRA + [f"run.resume={runs['step2']}"]
    single = train(tiny_recipe(w["corpus"], w["tok"], w["root"], "single_from_fsdp", STEPS, extra), QUIET)
    a, b = scalars(runs["one"], "train/loss"), scalars(single, "train/loss")
    assert sorted(b) == [2, 3]
    for s in (2, 3):
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), (s, a, b)
