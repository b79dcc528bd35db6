"""Lightning callback: downstream multiple-choice evaluation every N steps and at the end."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping, Optional

import torch
from lightning.pytorch import Callback

from megadoc_pl.eval.multiple_choice import MCExample, MultipleChoiceScorer, evaluate_tasks, load_task


class DownstreamEvalCallback(Callback):
    """Scores local multiple-choice tasks; logs ``downstream/<task>/acc|acc_norm`` and
    ``downstream/avg_error``.

    When:
      - every ``every_n_steps`` optimizer steps (0: never in between), from ``on_train_batch_end``;
      - at the end (``at_end``): in the validation that runs at the last step (in the loop or a
        ``trainer.validate`` after ``fit``), else in ``on_train_end``.
    Values go to the loggers at ``trainer.global_step`` and into ``trainer.callback_metrics``;
    the latest stay in :attr:`last_metrics` (``trainer.validate`` clears callback_metrics, so
    metrics.json should take them from there). Ranks split the examples and sum
    exact counts, so DDP gives the single-process numbers.

    Args:
        tasks: task name -> JSONL path (or a list of already loaded examples).
        tokenizer: a ``TokenizerInfo`` or a tokenizer path (required by the time the callback is set up).
        add_bos: prefix BOS as the training store did (``data.add_bos``).
        max_length: the model's context (``data.seq_len``).
        model_attr: attribute of the LightningModule holding the Llama.
    """

    def __init__(
        self,
        tasks: Mapping[str, Any],
        tokenizer: Any = None,
        add_bos: bool = True,
        max_length: int = 4096,
        every_n_steps: int = 0,
        at_end: bool = True,
        batch_size: int = 16,
        limit: Optional[int] = None,
        model_attr: str = "model",
    ) -> None:
        super().__init__()
        self.tasks: dict[str, list[MCExample]] = {
            name: load_task(src, limit) if isinstance(src, (str, os.PathLike)) else list(src)
            for name, src in tasks.items()
        }
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        self.max_length = max_length
        self.batch_size = batch_size
        self.scorer: Optional[MultipleChoiceScorer] = None
        self.every_n_steps = every_n_steps
        self.at_end = at_end
        self.model_attr = model_attr
        self.last_step: Optional[int] = None
        self.last_metrics: dict[str, float] = {}

    @classmethod
    def from_recipe(cls, cfg: Any, tokenizer: Any = None) -> "DownstreamEvalCallback":
        """From a resolved recipe: ``eval.tasks``, ``eval.downstream_*``, ``data.add_bos``, ``data.seq_len``."""
        ev = cfg.eval
        return cls(
            dict(ev.tasks),
            tokenizer=tokenizer or cfg.data.tokenizer,
            add_bos=bool(cfg.data.add_bos),
            max_length=int(cfg.data.seq_len),
            every_n_steps=int(ev.downstream_every),
            batch_size=int(ev.downstream_batch_size),
            limit=ev.downstream_limit,
        )

    # ------------------------------------------------------------------------------ scoring

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.scorer is not None:
            return
        tok = self.tokenizer
        if tok is None:
            raise ValueError("downstream evaluation needs the training tokenizer (fix: set data.tokenizer, "
                             "or pass tokenizer= to the callback)")
        if isinstance(tok, (str, os.PathLike)):
            from megadoc_pl.data.tokenizer import load_tokenizer

            tok = load_tokenizer(tok)
        self.scorer = MultipleChoiceScorer(tok, add_bos=self.add_bos, max_length=self.max_length,
                                           batch_size=self.batch_size)

    def evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        if self.scorer is None:
            self.setup(trainer, pl_module, "fit")
        model = getattr(pl_module, self.model_attr)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), _root_unit_gathered(trainer), trainer.strategy.precision_plugin.forward_context():
                metrics, _ = evaluate_tasks(
                    model, self.tasks, self.scorer,
                    rank=trainer.global_rank, world_size=trainer.world_size,
                    reduce_sum=lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
                    device=pl_module.device,
                )
        finally:
            model.train(was_training)
        self.last_step = trainer.global_step
        self.last_metrics = metrics
        return metrics

    # ------------------------------------------------------------------------------ hooks

    def _at_end(self, trainer: Any) -> bool:
        return self.at_end and trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step

    def _publish(self, trainer: Any, metrics: Mapping[str, float], to_loggers: bool = True) -> None:
        # Straight to the loggers at this step (pl_module.log from a conditional hook would be
        # re-logged with stale values at later steps) and into callback_metrics for metrics.json.
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if to_loggers and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(dict(metrics), step=trainer.global_step)
                logger.save()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps or step == self.last_step:
            return
        self._publish(trainer, self.evaluate(trainer, pl_module))

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self._at_end(trainer):
            return
        if self.last_step != trainer.global_step:
            self._publish(trainer, self.evaluate(trainer, pl_module))
        else:  # scored at this step already: keep the values in callback_metrics, log them once only
            self._publish(trainer, self.last_metrics, to_loggers=False)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.at_end and trainer.global_step != self.last_step:
            self._publish(trainer, self.evaluate(trainer, pl_module))


def _root_unit_gathered(trainer: Any) -> Any:
    """Under FSDP1 (``train.strategy=fsdp``) the root unit's own parameters (embeddings, final
    norm, LM head) stay flat shards outside the root's forward, and scoring calls the inner model
    ("'weight' must be 2-D" on >= 2 ranks). Gather them for the duration, on every rank; the
    blocks are units of their own and gather themselves when called."""
    root = getattr(trainer.strategy, "model", None)
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(root, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False)
    return contextlib.nullcontext()
