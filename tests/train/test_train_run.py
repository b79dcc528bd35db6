"""End-to-end CPU training runs through the real pipeline: learning, run directory, exact resume, NaN stop."""

from __future__ import annotations

import json
import signal

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf

from megadoc_pl.errors import BadInput
from megadoc_pl.config import RecipeConfig
from megadoc_pl.checkpoints import load_model_from_checkpoint
from megadoc_pl.train.callbacks import NonFiniteLossError
from megadoc_pl.train.run import train

from helpers import one_thread
from helpers import QUIET, scalars, scalars_per_file, tiny_recipe, write_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_path):
    root = tmp_path_factory.mktemp("train_run")
    return {"root": root, "tok": tiny_tokenizer_path, "corpus": write_corpus(root / "corpus.jsonl")}


def recipe(world, name, steps=6, extra=()):
    return tiny_recipe(world["corpus"], world["tok"], world["root"], name, steps, extra)


def test_loss_goes_down_and_run_directory(world):
    cfg = recipe(world, "learn", steps=24, extra=["train.ckpt_every=10", "data.val.interval=12"])
    run_dir = train(cfg, QUIET)

    losses = scalars(run_dir, "train/loss")
    assert sorted(losses) == list(range(24))  # one value per optimizer step
    first, last = sum(losses[s] for s in range(3)) / 3, sum(losses[s] for s in range(21, 24)) / 3
    assert last < first - 0.5, (first, last)

    # layout (docs/training.md, "Run directory")
    for rel in ("config.yaml", "metrics.json", "provenance.json", "checkpoints/last.ckpt",
                "checkpoints/step-000010.ckpt", "checkpoints/step-000020.ckpt"):
        assert (run_dir / rel).is_file(), rel
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert not (run_dir / "lightning_logs").exists() and not list(run_dir.glob("version_*"))

    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "finished" and m["error"] is None
    assert m["steps"] == 24 and m["max_steps"] == 24
    assert m["train/loss"] == pytest.approx(losses[23], rel=1e-6)
    assert m["tokens_seen"] == m["train/tokens"] == m["train/tokens/real"] == 24 * 4 * 32
    plan_real = json.loads(json.dumps(m))  # keys exist for every stream of the plan
    assert set(k for k in plan_real if k.startswith("train/passes/")) == {"train/passes/real"}
    assert 0 < m["train/passes/real"] < 4
    names = {k.split("/")[1] for k in m if k.startswith("val/") and k.endswith("/loss")}
    assert names == {"iid", "long", "short"}
    for n in names:  # validated at steps 12 and 24: best <= last
        assert m[f"val/{n}/loss_best"] <= m[f"val/{n}/loss"]
    assert m["parameters"] == sum(p.numel() for p in load_model_from_checkpoint(run_dir / "checkpoints/last.ckpt")[0].parameters())
    for key in ("wall_time_s", "git_revision", "version/torch", "version/lightning", "seed", "data_seed",
                "train/tokens_per_s", "world_size", "accumulate_grad_batches"):
        assert key in m, key
    assert m["accumulate_grad_batches"] == 2 and m["world_size"] == 1
    assert "train/mfu" not in m  # CPU: no peak to compare with

    # config.yaml round trip: the schema accepts it and it is the run's resolved recipe
    saved = OmegaConf.load(run_dir / "config.yaml")
    again = OmegaConf.merge(OmegaConf.structured(RecipeConfig), saved)
    assert again.run.name == "learn" and again.train.max_steps == 24 and again.model.vocab_size == 300
    model, ckpt_cfg = load_model_from_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert ckpt_cfg == OmegaConf.to_container(again, resolve=True)

    # a second run into the same directory without resume is refused
    with pytest.raises(BadInput, match="already holds a trained run"):
        train(cfg, QUIET)


class _InterruptAt(pl.Callback):
    """Ctrl-C during optimizer step ``step`` (after the checkpoint of the step before)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption_is_bitwise(world):
    extra = ["train.ckpt_every=3", "data.val.interval=2"]
    straight = train(recipe(world, "straight", 6, extra), QUIET)

    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a Ctrl-C
    try:
        with pytest.raises(SystemExit):
            train(recipe(world, "cut", 6, extra), {**QUIET, "callbacks": [_InterruptAt(4)]})
    finally:
        signal.signal(signal.SIGINT, handler)
    cut_dir = world["root"] / "runs" / "cut"
    m = json.loads((cut_dir / "metrics.json").read_text())
    assert m["status"] == "interrupted" and m["steps"] == 4
    assert sorted(scalars(cut_dir, "train/loss")) == [0, 1, 2, 3]

    resumed = train(recipe(world, "cut", 6, extra + ["run.resume=last"]), QUIET)
    # the second process segment really started from the step-3 checkpoint
    assert [sorted(p) for p in scalars_per_file(resumed, "train/loss")] == [[0, 1, 2, 3], [3, 4, 5]]
    a, b = scalars(straight, "train/loss"), scalars(resumed, "train/loss")
    assert sorted(a) == list(range(6))
    assert [a[s] for s in range(6)] == [b[s] for s in range(6)]  # exactly, steps 3..5 recomputed after resume
    wa = torch.load(straight / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)["state_dict"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert mb["status"] == "finished" and mb["resumed_from"].endswith("last.ckpt")
    for key in ("train/loss", "tokens_seen", "train/tokens/real", "train/passes/real", "val/iid/loss",
                "val/iid/loss_best", "steps"):
        assert ma[key] == mb[key], key


class _PoisonAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.norm.weight.fill_(float("nan"))


def test_nonfinite_loss_stops_with_step_and_sources(world):
    with pytest.raises(NonFiniteLossError) as err:
        train(recipe(world, "nan", 6), {**QUIET, "callbacks": [_PoisonAt(2)]})
    msg = str(err.value)
    assert "\n" not in msg
    assert "non-finite training loss (nan) at optimizer step 3 (global_step=2) on rank 0" in msg
    # step 2 trains on global windows 8..11; rank 0's first micro-batch is 8, 9
    assert "windows [8, 9, 10, 11]" in msg
    assert "window 8 (real): doc" in msg and "fix:" in msg
    m = json.loads((world["root"] / "runs" / "nan" / "metrics.json").read_text())
    assert m["status"] == "nonfinite_loss" and m["error"] == msg and m["steps"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
def test_gpu_bf16_run_logs_mfu(world, strategy):
    cfg = recipe(world, f"gpu-{strategy}", 4, [f"train.strategy={strategy}", "train.accelerator=gpu"])
    run_dir = train(cfg, QUIET)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "finished" and m["precision"] == "bf16-mixed"
    peak_known = any(k.lower() in torch.cuda.get_device_name().lower() for k, _ in __import__(
        "megadoc_pl.model.flops", fromlist=["PEAK_BF16_FLOPS"]).PEAK_BF16_FLOPS)
    if peak_known:
        assert 0 < m["train/mfu"] < 1
    assert m["train/loss"] == m["train/loss"]  # finite
    model, _ = load_model_from_checkpoint(run_dir / "checkpoints/last.ckpt")  # full state dict, also from FSDP
    assert model.num_params() == m["parameters"]
