"""DownstreamEvalCallback in a real Trainer: interval and end scoring, logged and kept for metrics.json."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from megadoc_pl.data.tokenizer import load_tokenizer
from megadoc_pl.eval.callbacks import DownstreamEvalCallback
from megadoc_pl.eval.multiple_choice import MultipleChoiceScorer, evaluate_tasks, load_task
from megadoc_pl.eval.scoring import causal_rows_batch

from helpers import tiny_llama

T = 16


class TinyLM(pl.LightningModule):
    def __init__(self, vocab: int):
        super().__init__()
        self.model = tiny_llama(vocab, seed=0).train()

    def training_step(self, batch, batch_idx):
        return self.model.loss(self.model(batch["input_ids"]), batch["targets"])

    def validation_step(self, batch, batch_idx):
        self.log("val/x/loss", self.model.loss(self.model(batch["input_ids"]), batch["targets"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def rows(vocab: int, n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, vocab, (n, T + 1), generator=g)
    b = causal_rows_batch(tokens[:, :-1], tokens[:, 1:])
    return [{"input_ids": b["input_ids"][i], "targets": b["targets"][i]} for i in range(n)]


@pytest.fixture()
def task_file(tmp_path):
    qs = [("Who founded Brindle?", ["Alice", "the fox", "a dog"], 0),
          ("What jumps?", ["the mill", "the quick brown fox"], 1),
          ("Megadocs stitch", ["rephrases", "windows", "nothing"], 0)]
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"question": q, "choices": c, "label": l}) + "\n" for q, c, l in qs))
    return path


@pytest.mark.parametrize("with_validation", [True, False])
def test_interval_and_end_scores_are_logged_and_match_a_direct_evaluation(tmp_path, tiny_tokenizer_path, task_file,
                                                                          with_validation):
    tok = load_tokenizer(tiny_tokenizer_path)
    module = TinyLM(tok.vocab_size)
    cb = DownstreamEvalCallback({"toy": str(task_file)}, tokenizer=str(tiny_tokenizer_path), max_length=T,
                                every_n_steps=2, batch_size=4)
    logger = TensorBoardLogger(str(tmp_path), name="run", version=0)
    trainer = pl.Trainer(max_steps=5, logger=logger, callbacks=[cb], accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, val_check_interval=2 if with_validation else None,
                         limit_val_batches=1 if with_validation else 0, log_every_n_steps=1)
    train = DataLoader(rows(tok.vocab_size, 10, 1), batch_size=2)
    val = DataLoader(rows(tok.vocab_size, 2, 2), batch_size=2) if with_validation else None
    trainer.fit(module, train, val)
    if with_validation:  # like train/run.py: the end-of-training validation after fit
        trainer.validate(module, val, verbose=False)

    expect, _ = evaluate_tasks(module.model.eval(), {"toy": load_task(task_file)},
                               MultipleChoiceScorer(tok, add_bos=True, max_length=T))
    assert cb.last_step == 5 and cb.last_metrics == expect
    assert set(expect) == {"downstream/toy/acc", "downstream/toy/acc_norm", "downstream/avg_error"}
    for key, value in expect.items():
        assert float(trainer.callback_metrics[key]) == pytest.approx(value)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    ea.Reload()
    events = ea.Scalars("downstream/toy/acc")
    assert [e.step for e in events] == [2, 4, 5]  # every 2 steps, then once at the end
    assert events[-1].value == pytest.approx(expect["downstream/toy/acc"])


def test_from_recipe_reads_the_eval_section(tiny_tokenizer_path, task_file):
    from omegaconf import OmegaConf

    from megadoc_pl.config import RecipeConfig

    cfg = OmegaConf.structured(RecipeConfig)
    cfg.eval.tasks = {"toy": str(task_file)}
    cfg.eval.downstream_every = 7
    cfg.eval.downstream_limit = 2
    cfg.data.tokenizer = str(tiny_tokenizer_path)
    cfg.data.seq_len = 64
    cb = DownstreamEvalCallback.from_recipe(cfg)
    assert cb.every_n_steps == 7 and cb.max_length == 64 and cb.add_bos is True
    assert len(cb.tasks["toy"]) == 2
