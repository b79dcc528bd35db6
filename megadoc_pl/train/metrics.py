"""metrics.json: the flat record of one run (docs/training.md, "metrics.json"), assembled from the Trainer, module and plan."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig

from megadoc_pl.train import rundir
from megadoc_pl.train.callbacks import ThroughputMonitor


def run_metrics(trainer: Any, m: Any, cfg: DictConfig, plan: Any, *, status: str, error: Optional[str],
                run_name: str, provenance: dict, resumed_from: Optional[Path], started: float) -> dict[str, Any]:
    """Scalars of the last step and validation, per-stream counts, plan, sizes, timing, provenance.

    ``m`` is the MegadocLM; ``plan`` the data's MixturePlan (None without one).
    """
    out: dict[str, Any] = scalar_metrics(trainer.callback_metrics)  # downstream/*, grad norm, ...
    out.update({k: float(v) for k, v in m.last_train.items()})
    out.update(throughput_metrics(trainer))
    for cb in trainer.callbacks:
        # downstream scores survive the post-fit validate(), which clears callback_metrics
        out.update({k: float(v) for k, v in (getattr(cb, "last_metrics", None) or {}).items()})
    out.update(m.last_val)
    for k, v in m.best_val.items():
        out[f"{k}_best"] = v
    if m.counter is not None:
        out.update(m.counter.metrics())
        out["tokens_seen"] = int(m.counter.tokens.sum())
    else:
        out["tokens_seen"] = int(trainer.global_step * cfg.train.global_batch_size * cfg.data.seq_len)
    if plan is not None:
        out["plan/steps"] = int(plan.steps)
        out["plan/tokens"] = int(plan.tokens)
    out.update({
        "status": status,
        "error": error,
        "run_name": run_name,
        "recipe": cfg.recipe,
        "scale": cfg.scale,
        "steps": int(trainer.global_step),
        "max_steps": int(cfg.train.max_steps),
        # from the config: under FSDP the module's own parameters are this rank's shards
        "parameters": int(m.model.cfg.num_params()),
        "parameters_non_embedding": int(m.model.cfg.num_params(embeddings=False)),
        "global_batch_size": int(cfg.train.global_batch_size),
        "micro_batch_size": int(cfg.train.micro_batch_size),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "world_size": int(trainer.world_size),
        "seq_len": int(cfg.data.seq_len),
        "precision": str(trainer.precision),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "wall_time_s": round(m.train_time_s(), 3),
        "total_time_s": round(time.time() - started, 3),
    })
    out.update(rundir.flat_provenance(provenance))
    return out


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The one-element tensors of a metrics mapping (Trainer.callback_metrics) whose key starts with ``prefix``."""
    return {k: float(v) for k, v in metrics.items()
            if k.startswith(prefix) and isinstance(v, torch.Tensor) and v.numel() == 1}


def throughput_metrics(trainer: Any) -> dict[str, float]:
    """The last throughput window (tokens/s, step time, FLOPs/token, MFU) of the run's ThroughputMonitor."""
    return {k: float(v) for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor) for k, v in cb.last.items()}
