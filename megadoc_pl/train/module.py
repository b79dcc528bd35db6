"""The LightningModule: Llama + AdamW + per-step schedule, step bookkeeping, named validation.

Contract with the rest of the package (docs/ARCHITECTURE.md):

- ``hparams['cfg']`` is the resolved recipe as a plain dict and the model is ``self.model``
  (``megadoc_pl.checkpoints.load_model`` relies on both).
- Training batches follow the batch contract, packed by the loader; ``window_index`` and the
  segment offsets are read from the packed header on the CPU before the batch moves to the
  device, so counting tokens per stream and attention pairs (MFU) never waits for the GPU.
- Validation loaders come in the order of ``datamodule.val_set_names``; per-token losses go to
  :class:`megadoc_pl.eval.validation.ValidationMetrics`.

Every optimizer step does one small collective (loss sum, micro-batch count, non-finite flag and
per-stream token counts, summed over ranks), so ``train/loss`` is the mean over the whole global
batch and a NaN/inf stops every rank at the same step with a clear message.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from megadoc_pl.data.batch import packed_counts
from megadoc_pl.eval.scoring import hidden_states
from megadoc_pl.model.hf import load_hf_weights
from megadoc_pl.model.llama import Llama, LlamaConfig
from megadoc_pl.train.callbacks import NonFiniteLossError, StreamCounter, nonfinite_message
from megadoc_pl.train.metrics import scalar_metrics, throughput_metrics
from megadoc_pl.train.optim import build_adamw, build_scheduler, make_schedule

_CKPT_KEY = "megadoc_pl"  # our extra state inside Lightning checkpoints


class MegadocLM(pl.LightningModule):
    """Causal LM training on megadoc_pl batches.

    Args:
        cfg: the resolved recipe (``config.RecipeConfig`` as a plain dict) with
            ``model.vocab_size`` and ``train.max_steps`` filled in.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        self.save_hyperparameters({"cfg": cfg})
        self.cfg: DictConfig = OmegaConf.create(cfg)
        model_cfg = LlamaConfig.from_recipe(cfg)
        if self.cfg.train.strategy == "fsdp2":  # built empty; each rank materialises its shards (configure_model)
            with torch.device("meta"):
                self.model = Llama(model_cfg)
        else:
            self.model = Llama(model_cfg)
        if self.cfg.model.init_from:
            load_hf_weights(self.model, self.cfg.model.init_from)
        self.val_set_names: list[str] = []
        self.val_metrics: Optional[torch.nn.Module] = None
        self.counter: Optional[StreamCounter] = None
        self.best_val: dict[str, float] = {}  # val/<name>/loss -> lowest value seen
        self.last_val: dict[str, float] = {}  # the latest validation's values
        self.last_val_step: Optional[int] = None
        self.last_train: dict[str, float] = {}  # the latest step's train/* scalars
        self._micro_losses: list[torch.Tensor] = []
        self._micro_windows: list[np.ndarray] = []
        self._pending_windows: Optional[np.ndarray] = None
        self._restored: dict[str, Any] = {}
        self._compiled = False
        self._sharded = False
        self._attn_pairs = self._attn_tokens = 0
        self._time_base = 0.0  # training seconds before this fit (restored from checkpoints)
        self._fit_t0: Optional[float] = None

    # ------------------------------------------------------------------------------ setup

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None:
            return
        if self.val_metrics is None:
            self.val_set_names = list(getattr(dm, "val_set_names", []) or [])
            if self.val_set_names:
                self.val_metrics = _make_val_metrics(self.val_set_names, self.cfg)
        if self.counter is None and getattr(dm, "plan", None) is not None:
            plan = dm.plan
            drawer = plan.drawer()
            self.counter = StreamCounter(
                [s.name for s in plan.streams],
                {s.name: s.pass_tokens for s in plan.streams},
                lambda k: drawer.locate(k)[0],
            )
            if "counter" in self._restored:
                self.counter.load_state_dict(self._restored.pop("counter"))

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)  # set by ModelParallelStrategy (train.strategy=fsdp2)
        if self.cfg.train.strategy == "fsdp2" and not self._sharded:
            from megadoc_pl.train.fsdp import shard_and_materialise

            shard_and_materialise(self.model, mesh["data_parallel"], self.device, seed=int(self.cfg.train.seed),
                                  bf16_params="bf16" in str(self.trainer.precision),
                                  activation_checkpointing=bool(self.cfg.train.activation_checkpointing))
            self._sharded = True
        elif self.cfg.train.activation_checkpointing:
            for block in self.model.layers:
                block.checkpoint = True
        # in place, so state-dict keys stay ``model.*`` (no ``_orig_mod``)
        if self.cfg.train.compile and not self._compiled:
            self.model.compile()
            self._compiled = True

    def configure_optimizers(self) -> dict:
        t = self.cfg.train
        opt = build_adamw(self.named_parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=list(t.betas),
                          eps=t.eps, no_decay=list(t.no_decay))
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else int(t.max_steps)
        sched = build_scheduler(opt, make_schedule(t.schedule, total, t.warmup_fraction, t.decay_fraction))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------------------ forward

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Final hidden states (B, T, D) of a batch; attention follows its segments."""
        return hidden_states(self.model, batch)  # the mask is built here, outside the compiled model

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Still on the CPU: read what the step bookkeeping needs (window numbers for the stream
        # counts, segment lengths for MFU) from the packed header, so no step waits for the device.
        if not (self.trainer.training and isinstance(batch, Mapping)):
            return batch
        counts = packed_counts(batch)
        if counts is None and "window_index" in batch:  # an unpacked contract batch
            counts = (np.asarray(batch["window_index"], dtype=np.int64),
                      np.asarray(batch["cu_seqlens"]) if batch.get("cu_seqlens") is not None else None)
        if counts is not None:
            self._pending_windows, cu = counts
            if cu is not None:
                lengths = np.diff(cu.astype(np.int64))
                self._attn_pairs += int((lengths * (lengths + 1) // 2).sum())
                self._attn_tokens += int(lengths.sum())
        return batch

    def take_attention_stats(self) -> tuple[int, int]:
        """(causal query-key pairs, tokens) of the training batches since the last call (for MFU)."""
        out = (self._attn_pairs, self._attn_tokens)
        self._attn_pairs = self._attn_tokens = 0
        return out

    # ------------------------------------------------------------------------------ training

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model.loss(self(batch), batch["targets"])
        windows = self._pending_windows
        if windows is None:  # a batch that bypassed on_before_batch_transfer
            windows = np.asarray(batch["window_index"].cpu(), dtype=np.int64)
        self._pending_windows = None
        self._micro_losses.append(loss.detach())
        self._micro_windows.append(windows)
        if self.counter is not None:
            self.counter.add_batch(windows, batch["input_ids"].shape[1])
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Close the optimizer step: global loss, token counts, NaN/inf check, scalars."""
        step = self.trainer.global_step
        losses = torch.stack(self._micro_losses).float()
        finite = torch.isfinite(losses)
        counts = self.counter.take_pending() if self.counter is not None else np.zeros(0, dtype=np.int64)
        local = torch.cat([
            torch.stack([torch.where(finite, losses, 0.0).sum(), torch.tensor(float(len(losses)), device=losses.device),
                         (~finite).sum().float()]).double(),
            torch.as_tensor(counts, dtype=torch.float64, device=losses.device),
        ])
        total = self.trainer.strategy.reduce(local, reduce_op="sum") if self.trainer.world_size > 1 else local
        total = total.cpu().numpy()  # the one host sync of the step
        loss_sum, n_micro, n_bad = float(total[0]), float(total[1]), int(total[2])
        bad_windows = [int(w) for ok, ws in zip(finite.tolist(), self._micro_windows) if not ok for w in ws]
        self._micro_losses, self._micro_windows = [], []
        if n_bad:
            bad_loss = float(losses[~finite][0]) if bad_windows else float("nan")
            raise NonFiniteLossError(
                nonfinite_message(step, self.global_rank, bad_loss, bad_windows, _describer(self.trainer.datamodule))
            )
        scalars = {"train/loss": loss_sum / n_micro, "train/lr": optimizer.param_groups[0]["lr"]}
        if self.counter is not None:
            self.counter.commit(total[3:].round().astype(np.int64))
            scalars.update(self.counter.metrics())
        self.last_train = scalars
        for k, v in scalars.items():
            self.log(k, float(v), on_step=True, on_epoch=False, prog_bar=k == "train/loss")

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Optional[float] = None,
                                    gradient_clip_algorithm: Optional[str] = None) -> None:
        """Clip the global gradient norm (also under FSDP) and log it before clipping."""
        if gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        max_norm = float(gradient_clip_val) if gradient_clip_val else math.inf
        root = self.trainer.strategy.model
        if hasattr(root, "clip_grad_norm_"):  # FSDP: norms of sharded gradients need its own method
            norm = root.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------ validation

    def on_validation_epoch_start(self) -> None:
        if self.val_metrics is not None:
            self.val_metrics.reset()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.val_metrics is None:
            raise RuntimeError("validation needs a datamodule with val_set_names")
        tok_loss_BT = self.model.loss(self(batch), batch["targets"], reduction="none")
        if batch.get("padding"):  # keeps this rank in step with the others; its windows count elsewhere
            return
        self.val_metrics.update(self.val_set_names[dataloader_idx], tok_loss_BT, batch)

    def on_validation_epoch_end(self) -> None:
        if self.val_metrics is None:
            return
        # logs val/<name>/loss and writes the loss-by-position CSVs/images into the run directory
        # (default_root_dir: known on every rank; trainer.log_dir would be a collective)
        results = self.val_metrics.log_to(self, out_dir=self.trainer.default_root_dir)
        if self.trainer.sanity_checking:
            return
        self.last_val = {f"val/{name}/loss": float(r.loss) for name, r in results.items()}
        self.last_val_step = self.trainer.global_step
        for k, v in self.last_val.items():
            if math.isfinite(v) and v < self.best_val.get(k, math.inf):
                self.best_val[k] = v

    # ------------------------------------------------------------------------------ time

    def on_train_start(self) -> None:
        self._fit_t0 = time.perf_counter()
        # After a restore the optimizer holds the LR the checkpoint's schedule set last; the next
        # step must use this run's schedule (the same value unless train.max_steps changed).
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            if isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
                for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
                    group["lr"] = base * fn(sched.last_epoch)

    def on_train_end(self) -> None:
        self._time_base, self._fit_t0 = self.train_time_s(), None

    def train_time_s(self) -> float:
        """Seconds spent in training loops, summed over resumed segments of the run."""
        now = time.perf_counter()
        return self._time_base + (now - self._fit_t0 if self._fit_t0 is not None else 0.0)

    # ------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = {
            "counter": self.counter.state_dict() if self.counter is not None else None,
            "best_val": dict(self.best_val),
            "train_time_s": self.train_time_s(),
            # the last step's train/* scalars, so a resume that trains no step (a requeue of a
            # finished run) reports them again in metrics.json
            "last_train": {**scalar_metrics(self.trainer.callback_metrics, "train/"),
                           **throughput_metrics(self.trainer), **self.last_train},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # The LR schedule is this run's (configure_optimizers: over train.max_steps), not the
        # checkpoint's: LambdaLR would restore the old schedule's fields (its total steps) over it,
        # so a run resumed with a larger train.max_steps would continue on the old, finished curve.
        for sched in checkpoint.get("lr_schedulers") or []:
            if "lr_lambdas" in sched:
                sched["lr_lambdas"] = [None] * len(sched["lr_lambdas"])
        state = checkpoint.get(_CKPT_KEY) or {}
        self.best_val = dict(state.get("best_val") or {})
        self._time_base = float(state.get("train_time_s", 0.0))
        self.last_train = dict(state.get("last_train") or {})
        if state.get("counter") is not None:
            if self.counter is not None:
                self.counter.load_state_dict(state["counter"])
            else:
                self._restored["counter"] = state["counter"]


def _make_val_metrics(names: list[str], cfg: DictConfig) -> torch.nn.Module:
    from megadoc_pl.eval.validation import ValidationMetrics

    kw = {}
    if cfg.eval.get("doc_position_buckets") is not None:
        kw["doc_position_buckets"] = int(cfg.eval.doc_position_buckets)
    return ValidationMetrics(names, position_buckets=int(cfg.eval.position_buckets), seq_len=int(cfg.data.seq_len), **kw)


def _describer(dm: Any):
    """``windows -> one string per window`` (stream and source ids) if the datamodule can decode windows."""
    fn = getattr(dm, "describe_windows", None)
    if not callable(fn):
        return None

    def describe(windows):
        out = []
        for d in fn(windows):
            if isinstance(d, Mapping):
                ids = [str(p.get("source_id")) for p in d.get("pieces", [])]
                out.append(f"window {d.get('index')} ({d.get('stream')}): {', '.join(ids)}")
            else:
                out.append(str(d))
        return out

    return describe
