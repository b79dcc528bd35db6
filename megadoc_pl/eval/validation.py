"""Named validation losses and loss-by-position curves, exact across DDP ranks.

The LightningModule owns one :class:`ValidationMetrics` (an ``nn.Module``, so its torchmetrics
states move with the module) and calls, per validation batch of set ``name``::

    tok_loss_BT = model.loss(hidden_BTD, batch["targets"], reduction="none")
    self.val_metrics.update(name, tok_loss_BT, batch)

and once per validation epoch (``on_validation_epoch_end``)::

    self.val_metrics.log_to(self, out_dir=run_dir)

Every accumulator is a sum (loss sum in float64, token counts in int64) reduced with
``dist_reduce_fx="sum"``, so a run on N ranks reports the loss of the union of their batches,
the same number a single process computes over the same windows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from megadoc_pl.eval.position import (
    Curve,
    doc_bucket_edges,
    doc_bucket_index,
    plot_curves,
    window_bucket_edges,
    window_bucket_index,
    write_curves_csv,
)

DEFAULT_DOC_BUCKETS = 24  # log2 buckets: {0}, [1,2), ..., [2^21, 2^22), [2^22, inf)


def loss_key(name: str) -> str:
    """The logged scalar of a named set (also a key of metrics.json)."""
    return f"val/{name}/loss"


class _SetAccumulator(Metric):
    """Sums for one validation set: total loss/tokens and per-bucket loss/tokens."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    # state name -> dtype it must keep, whatever the LightningModule is cast to
    _STATE_DTYPES = {
        "loss_sum": torch.float64,
        "tokens": torch.int64,
        "win_sum": torch.float64,
        "win_count": torch.int64,
        "doc_sum": torch.float64,
        "doc_count": torch.int64,
    }

    def __init__(self, seq_len: int, window_buckets: int, doc_buckets: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.window_buckets = window_buckets
        self.doc_buckets = doc_buckets
        sizes = {"loss_sum": (), "tokens": (), "win_sum": (window_buckets,), "win_count": (window_buckets,),
                 "doc_sum": (doc_buckets,), "doc_count": (doc_buckets,)}
        for name, shape in sizes.items():
            self.add_state(name, torch.zeros(shape, dtype=self._STATE_DTYPES[name]), dist_reduce_fx="sum")

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> nn.Module:
        # `module.to(torch.bfloat16)` (bf16-true precision) would otherwise cast the float64 sums.
        this = super()._apply(fn, exclude_state)
        for name, dtype in self._STATE_DTYPES.items():
            setattr(this, name, getattr(this, name).to(dtype))
            this._defaults[name] = this._defaults[name].to(dtype)
        return this

    def update(self, tok_loss_BT: Tensor, doc_positions_BT: Tensor) -> None:
        loss_BT = tok_loss_BT.detach().to(torch.float64)
        B, T = loss_BT.shape
        self.loss_sum += loss_BT.sum()
        self.tokens += B * T

        win_b_T = window_bucket_index(torch.arange(T, device=loss_BT.device), self.seq_len, self.window_buckets)
        self.win_sum.index_add_(0, win_b_T, loss_BT.sum(0))
        self.win_count.index_add_(0, win_b_T, torch.full_like(win_b_T, B))

        doc_b = doc_bucket_index(doc_positions_BT.to(loss_BT.device), self.doc_buckets).reshape(-1)
        self.doc_sum.index_add_(0, doc_b, loss_BT.reshape(-1))
        self.doc_count.index_add_(0, doc_b, torch.ones_like(doc_b))

    def compute(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._STATE_DTYPES}


@dataclass
class SetResult:
    """What one named validation set measured (summed over ranks)."""

    name: str
    loss: float  # mean token cross-entropy in nats (nan when the set saw no token)
    tokens: int  # tokens scored
    window: Curve  # loss by position within the window
    document: Curve  # loss by position within the document


class ValidationMetrics(nn.Module):
    """Per-set token-loss sums and loss-by-position curves for named validation sets.

    Args:
        set_names: the validation sets, in dataloader order (e.g. iid, long, short, extras).
        position_buckets: equal buckets of the window positions ``0 .. seq_len-1``.
        seq_len: training window length T (every batch must have T <= seq_len).
        doc_position_buckets: log2 buckets of the document position (the last is open-ended).
    """

    def __init__(
        self,
        set_names: Sequence[str],
        position_buckets: int = 32,
        seq_len: int = 4096,
        doc_position_buckets: int = DEFAULT_DOC_BUCKETS,
    ) -> None:
        super().__init__()
        names = list(set_names)
        if not names:
            raise ValueError("ValidationMetrics needs at least one validation set name")
        for name in names:
            if not name or "." in name or "/" in name:
                raise ValueError(f"validation set name {name!r} must be non-empty without '.' or '/' (rename it)")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate validation set names in {names}")
        if seq_len < 1 or position_buckets < 1 or doc_position_buckets < 2:
            raise ValueError("seq_len and position_buckets must be >= 1 and doc_position_buckets >= 2")
        self.set_names = names
        self.seq_len = seq_len
        self.position_buckets = min(position_buckets, seq_len)  # more buckets than positions: empty buckets
        self.doc_position_buckets = doc_position_buckets
        self.sets = nn.ModuleDict(
            {n: _SetAccumulator(seq_len, self.position_buckets, doc_position_buckets) for n in names}
        )

    # ------------------------------------------------------------------------------ update

    def update(self, set_name: str, tok_loss_BT: Tensor, batch: Mapping[str, Any]) -> None:
        """Add one batch: ``tok_loss_BT[b, t]`` is the loss of predicting ``targets[b, t]``."""
        if set_name not in self.sets:
            raise ValueError(f"unknown validation set {set_name!r}; known: {', '.join(self.set_names)}")
        if tok_loss_BT.dim() != 2:
            raise ValueError(f"tok_loss_BT must be (B, T), got shape {tuple(tok_loss_BT.shape)}")
        if tok_loss_BT.shape[1] > self.seq_len:
            raise ValueError(f"batch has T={tok_loss_BT.shape[1]} > seq_len={self.seq_len} given to ValidationMetrics")
        if "doc_positions" not in batch:
            raise ValueError("batch has no 'doc_positions' (the batch contract of docs/ARCHITECTURE.md requires it)")
        doc_pos_BT = batch["doc_positions"]
        if tuple(doc_pos_BT.shape) != tuple(tok_loss_BT.shape):
            raise ValueError(f"doc_positions shape {tuple(doc_pos_BT.shape)} != loss shape {tuple(tok_loss_BT.shape)}")
        self.sets[set_name].update(tok_loss_BT, doc_pos_BT)

    # ------------------------------------------------------------------------------ compute

    def results(self) -> dict[str, SetResult]:
        """Sums over all ranks, per set (a collective: every rank must call it)."""
        win_edges = window_bucket_edges(self.seq_len, self.position_buckets)
        doc_edges = doc_bucket_edges(self.doc_position_buckets)
        out: dict[str, SetResult] = {}
        for name in self.set_names:
            acc = self.sets[name]
            with warnings.catch_warnings():  # a rank without batches must still join the sync
                warnings.filterwarnings("ignore", message=".*compute.*before the ``update``.*")
                synced = acc.compute()
            s = {k: v.detach().cpu().numpy() for k, v in synced.items()}
            tokens = int(s["tokens"])
            out[name] = SetResult(
                name=name,
                loss=float(s["loss_sum"] / tokens) if tokens else float("nan"),
                tokens=tokens,
                window=Curve("window", win_edges, s["win_sum"].astype(np.float64), s["win_count"].astype(np.int64)),
                document=Curve("document", doc_edges, s["doc_sum"].astype(np.float64), s["doc_count"].astype(np.int64)),
            )
        return out

    def compute(self) -> dict[str, Any]:
        """``val/<name>/loss`` (0-d tensors) plus ``val/<name>/tokens`` and the mean curves."""
        out: dict[str, Any] = {}
        for name, r in self.results().items():
            out[loss_key(name)] = torch.tensor(r.loss, dtype=torch.float64)
            out[f"val/{name}/tokens"] = r.tokens
            out[f"val/{name}/loss_by_window_position"] = torch.from_numpy(r.window.mean)
            out[f"val/{name}/loss_by_doc_position"] = torch.from_numpy(r.document.mean)
        return out

    def reset(self) -> None:
        for acc in self.sets.values():
            acc.reset()

    # ------------------------------------------------------------------------------ logging

    def log_to(self, pl_module: Any, out_dir: str | Path | None = None) -> dict[str, SetResult]:
        """Log scalars, TensorBoard images and CSV curves from ``on_validation_epoch_end``; reset.

        Scalars go through ``pl_module.log`` (already summed over ranks, so no ``sync_dist``);
        images and CSV files are written by global rank 0 only. ``out_dir`` defaults to
        ``trainer.log_dir`` (else ``trainer.default_root_dir``). The sanity-check pass is
        discarded without logging.
        """
        trainer = pl_module.trainer
        results = self.results()
        self.reset()
        if trainer.sanity_checking:
            return results
        for name, r in results.items():
            pl_module.log(loss_key(name), r.loss, add_dataloader_idx=False)
        # trainer.log_dir is a collective under DDP: every rank must read it, before the rank-0 branch
        out = Path(out_dir or trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return results
        for name, r in results.items():
            write_curves_csv(out / f"loss_by_position_{name}.csv", [r.window, r.document])
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if not hasattr(experiment, "add_figure"):  # only TensorBoard-like loggers take images
                continue
            for name, r in results.items():
                if r.tokens:
                    fig = plot_curves(f"val/{name}", [r.window, r.document])
                    experiment.add_figure(f"val/{name}/loss_by_position", fig, global_step=trainer.global_step)
        return results
