"""AdamW with a no-decay set, and per-step learning-rate schedules (docs/training.md, "Optimizer and schedule").

Weight decay is torch's decoupled AdamW decay: every step shrinks a decayed parameter by
``lr * weight_decay`` before the Adam update (Levanter adds ``wd * theta`` before scaling by
``-lr``, which is the same thing). Parameters whose name contains one of the ``no_decay``
substrings (norms, embeddings and biases by default) are not decayed.

Schedules are plain functions of the optimizer step ``s`` (0-based: the lr used by the
``s``-th optimizer step) and the total step count ``T``, returned as multipliers of the peak lr:

- ``cosine``: linear warmup from 0 to 1 over ``W = floor(warmup_fraction * T)`` steps, then cosine
  from 1 at ``s = W`` to 0 at ``s = T`` (optax/Levanter: ``min_lr_ratio = 0``, no cooldown).
- ``wsd``: the same warmup, then constant 1, then linear decay from 1 at ``s = T - D`` to 0 at
  ``s = T`` with ``D = floor(decay_fraction * T)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, get_args

import torch
from torch import nn

from megadoc_pl.config import Schedule

SCHEDULES = get_args(Schedule)


def split_no_decay(
    named_params: Iterable[tuple[str, nn.Parameter]], no_decay: Sequence[str]
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decayed, not decayed) trainable parameters, by name.

    A parameter is not decayed when its fully qualified name contains any of the ``no_decay``
    substrings, compared case-insensitively.
    """
    keys = [s.lower() for s in no_decay]
    decay: list[tuple[str, nn.Parameter]] = []
    keep: list[tuple[str, nn.Parameter]] = []
    for name, p in named_params:
        if p.requires_grad:
            (keep if any(k in name.lower() for k in keys) else decay).append((name, p))
    return decay, keep


def build_adamw(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    eps: float,
    no_decay: Sequence[str],
    fused: Optional[bool] = None,
) -> torch.optim.AdamW:
    """AdamW with two groups: group 0 decayed by ``weight_decay``, group 1 not decayed.

    ``fused`` (None: when every parameter is on a CUDA device) runs torch's fused kernel, one
    launch for all parameters instead of several per tensor; the GPU benchmark times it so, and a
    run must match what was measured. The CPU keeps the for-each implementation, whose numbers
    the golden curves and the bitwise resume tests hold.
    """
    if len(betas) != 2:
        raise ValueError(f"train.betas must have two values (beta1, beta2), got {list(betas)}")
    decay, keep = split_no_decay(named_params, no_decay)
    if not decay and not keep:
        raise ValueError("the model has no trainable parameters")
    # both groups always exist (possibly empty) so group indices mean the same in every run
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in keep], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = all(p.is_cuda for _, p in decay + keep)
    return torch.optim.AdamW(groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, fused=fused or None)


def warmup_steps(total_steps: int, warmup_fraction: float) -> int:
    """W = floor(warmup_fraction * T): steps of linear warmup."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"train.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    return int(math.floor(warmup_fraction * total_steps))


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """D = floor(decay_fraction * T): steps of the final linear decay (wsd)."""
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"train.decay_fraction must be in (0, 1], got {decay_fraction}")
    return max(1, int(math.floor(decay_fraction * total_steps)))


@dataclass
class LRSchedule:
    """Multiplier of the peak lr at optimizer step ``s`` (a picklable LambdaLR callable).

    LambdaLR stores a callable object's ``__dict__`` in its state, so a resumed run keeps the
    schedule it started with.
    """

    kind: str
    total_steps: int
    warmup: int
    decay: int = 0

    def __call__(self, step: int) -> float:
        T, W = self.total_steps, self.warmup
        if step < W:
            return step / W
        if self.kind == "cosine":
            if step >= T:
                return 0.0
            progress = (step - W) / max(1, T - W)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        # wsd: stable until the decay starts, then linear to 0 at T
        start = T - self.decay
        if step < start:
            return 1.0
        return max(0.0, (T - step) / self.decay)


def make_schedule(kind: str, total_steps: int, warmup_fraction: float, decay_fraction: float) -> LRSchedule:
    """The schedule named by ``train.schedule`` over ``total_steps`` optimizer steps."""
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    if total_steps < 1:
        raise ValueError(f"the run has {total_steps} optimizer steps; it needs at least 1 (check train.max_steps)")
    W = warmup_steps(total_steps, warmup_fraction)
    if kind == "cosine":
        return LRSchedule("cosine", total_steps, W)
    D = decay_steps(total_steps, decay_fraction)
    if W + D > total_steps:
        raise ValueError(
            f"wsd: warmup ({W} steps) + decay ({D} steps) exceed the {total_steps} steps of the run; "
            "lower train.warmup_fraction or train.decay_fraction"
        )
    return LRSchedule("wsd", total_steps, W, D)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR (Lightning steps it after every optimizer step with interval='step')."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
