"""The Python API (megadoc_pl/api.py, docs/python-api.md) with real Lightning Trainers on the CPU.

Each half works with a counterpart of the user's: our datamodule feeds a LightningModule of the
user's (it receives the batch contract, windows in the documented order), and ``MegadocLM``
trains and validates on a DataModule of the user's that yields only the keys the docs require.
The API is the training path, not a copy: one recipe fitted both ways gives the same numbers.
The README's example is run as it is written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import megadoc_pl
from megadoc_pl.errors import BadInput
from helpers import QUIET, REPO, build_tiny_tokenizer, one_thread, tiny_overrides, tiny_recipe, write_corpus

CONTRACT = {"input_ids", "targets", "segment_ids", "cu_seqlens", "max_seqlen", "position_ids", "doc_positions",
            "window_index"}
STEPS = 3
G, M = 4, 2  # tiny_overrides: train.global_batch_size, train.micro_batch_size
# a model small enough for a user's own data: MegadocLM only needs the recipe's model and train keys
TINY_MODEL = ["model.size=nano", "model.overrides={d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, d_mlp: 64}",
              "train.accelerator=cpu", "train.devices=1", "train.global_batch_size=4", "train.micro_batch_size=2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return write_corpus(root / "corpus.jsonl"), build_tiny_tokenizer(root / "tok"), root


def _trainer(dm_or_cfg, root: Path, **kw) -> pl.Trainer:
    return pl.Trainer(**{**megadoc_pl.trainer_kwargs(dm_or_cfg), "default_root_dir": str(root), "logger": False,
                         **QUIET, **kw})


def test_import_megadoc_pl_stays_light():
    """The API is imported on first use (``megadoc_pl.datamodule``), not by ``import megadoc_pl``."""
    code = ("import sys, megadoc_pl; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert {'datamodule', 'lightning_module', 'trainer_kwargs', 'recipe'} <= set(dir(megadoc_pl))")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    assert megadoc_pl.datamodule is megadoc_pl.api.datamodule
    with pytest.raises(AttributeError, match="no attribute 'datamodules'"):
        megadoc_pl.datamodules


def test_the_api_trains_what_fit_trains(inputs, tmp_path):
    """``megadoc-pl fit``'s path (``train``) and the API with a plain Trainer: same losses, bit for bit."""
    from megadoc_pl.train.run import train

    corpus, tok, root = inputs
    cfg = tiny_recipe(corpus, tok, tmp_path, "fit", steps=STEPS)
    with one_thread():
        metrics = json.loads((train(cfg, QUIET) / "metrics.json").read_text())
        dm = megadoc_pl.datamodule(cfg)
        model = megadoc_pl.lightning_module(dm)
        trainer = _trainer(dm, tmp_path / "api")
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == STEPS and trainer.accumulate_grad_batches == G // M
    assert dm.cfg.model.vocab_size == dm.vocab_size and dm.cfg.train.max_steps == STEPS
    assert model.last_train["train/loss"] == metrics["train/loss"]
    assert set(model.last_val) == {"val/iid/loss", "val/long/loss", "val/short/loss"}
    assert all(model.last_val[k] == metrics[k] for k in model.last_val)


class ForeignLM(pl.LightningModule):
    """A user's module: a bigram model on the contract's input_ids/targets."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab_size, vocab_size)
        self.windows: list[int] = []
        self.val_sets: set[int] = set()

    def training_step(self, batch, batch_idx):
        assert isinstance(batch, dict) and CONTRACT <= set(batch), sorted(batch)
        assert batch["input_ids"].shape == batch["targets"].shape == (M, 32)
        self.windows += batch["window_index"].tolist()
        logits = self.emb(batch["input_ids"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        assert CONTRACT <= set(batch)
        self.val_sets.add(dataloader_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_our_datamodule_feeds_a_foreign_module(inputs, tmp_path):
    corpus, tok, root = inputs
    dm = megadoc_pl.datamodule("baseline_real", tiny_overrides(corpus, tok, root, "unused", steps=STEPS))
    model = ForeignLM(dm.vocab_size)
    with one_thread():
        trainer = _trainer(dm, tmp_path)
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == STEPS
    assert model.windows == list(range(STEPS * G))  # step s trains on global windows [s*G, (s+1)*G)
    assert model.val_sets == set(range(len(dm.val_set_names)))


def test_a_trainer_that_accumulates_otherwise_is_refused(inputs, tmp_path):
    """Windows are counted per optimizer step: a Trainer stepping every micro-batch would train other windows."""
    corpus, tok, root = inputs
    dm = megadoc_pl.datamodule("baseline_real", tiny_overrides(corpus, tok, root, "unused", steps=STEPS))
    assert megadoc_pl.trainer_kwargs(dm)["accumulate_grad_batches"] == G // M != 1
    trainer = _trainer(dm, tmp_path, accumulate_grad_batches=1)
    with pytest.raises(BadInput, match=rf"needs {G // M} \(fix: Trainer\(accumulate_grad_batches={G // M}\)"):
        trainer.fit(ForeignLM(dm.vocab_size), datamodule=dm)


class ForeignData(pl.LightningDataModule):
    """A user's data: random tokens, with only the keys docs/python-api.md requires."""

    val_set_names = ["mine"]

    def __init__(self, vocab: int, T: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train_rows = [self._batch(torch.randint(0, vocab, (M, T + 1), generator=g), k) for k in range(8)]
        self.val_rows = [{**self._batch(torch.randint(0, vocab, (M, T + 1), generator=g), 0),
                          "doc_positions": torch.arange(T).expand(M, T)}]

    @staticmethod
    def _batch(tokens, k: int) -> dict:
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "window_index": torch.arange(k * M, (k + 1) * M)}

    def train_dataloader(self):
        return DataLoader(self.train_rows, batch_size=None)

    def val_dataloader(self):
        return [DataLoader(self.val_rows, batch_size=None)]


def test_megadoc_lm_trains_on_a_foreign_datamodule(tmp_path):
    cfg = megadoc_pl.recipe("baseline_real", TINY_MODEL + ["model.vocab_size=64", f"train.max_steps={STEPS}",
                                                           "data.seq_len=16", "data.val.interval=0"])
    with one_thread():
        model = megadoc_pl.lightning_module(cfg)
        trainer = _trainer(cfg, tmp_path)
        trainer.fit(model, datamodule=ForeignData(64))
    assert trainer.global_step == STEPS
    assert set(model.last_val) == {"val/mine/loss"} and 3.0 < model.last_val["val/mine/loss"] < 6.0  # ln 64 = 4.16
    assert 3.0 < model.last_train["train/loss"] < 6.0


def test_what_the_api_refuses():
    with pytest.raises(BadInput, match=r"model.vocab_size is not set.*megadoc_pl.datamodule"):
        megadoc_pl.lightning_module("baseline_real")
    with pytest.raises(BadInput, match="train.max_steps is not set.*megadoc_pl.datamodule"):
        megadoc_pl.lightning_module(megadoc_pl.recipe("baseline_real", ["model.vocab_size=64",
                                                                        "train.max_steps=null"]))
    with pytest.raises(BadInput, match="carries no recipe"):
        megadoc_pl.lightning_module(ForeignData(8))
    with pytest.raises(BadInput, match="train.max_steps is not set"):
        megadoc_pl.trainer_kwargs(megadoc_pl.recipe("baseline_real", ["train.max_steps=null"]))
    with pytest.raises(ValueError, match="train.lr=-1"):  # validated like every entry point
        megadoc_pl.recipe({"train": {"lr": -1}})
    cfg = megadoc_pl.recipe("baseline_real", TINY_MODEL + ["train.max_steps=5", "train.devices=[0,1]",
                                                         "data.val.interval=0"])
    assert megadoc_pl.trainer_kwargs(cfg)["accumulate_grad_batches"] == 1  # 4 / (2 x 2 devices)
    kw = megadoc_pl.trainer_kwargs(cfg, world_size=1)
    assert kw["accumulate_grad_batches"] == 2 and kw["val_check_interval"] == 10  # at the end: 5 steps x 2
    assert kw["use_distributed_sampler"] is False and kw["max_steps"] == 5


def _readme_example() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Use it from Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, monkeypatch):
    code = _readme_example()
    assert len(code.splitlines()) <= 25
    monkeypatch.chdir(tmp_path)  # the demo's cache and the run land here
    namespace: dict = {}
    with one_thread():
        exec(compile(code, "README.md (Use it from Python)", "exec"), namespace)
    model, trainer = namespace["model"], namespace["trainer"]
    assert trainer.global_step == model.cfg.train.max_steps
    assert {"val/iid/loss", "val/long/loss", "val/short/loss"} <= set(model.last_val)
