"""Per-token losses of a model (or an ensemble) on a contract batch: the one scoring primitive.

Validation losses, multiple-choice log-likelihoods and ensembles all reduce to
``token_losses(model, batch) -> (B, T)``: the cross-entropy of predicting ``targets[b, t]``,
0 where the target is ``IGNORE`` (-100).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

IGNORE = -100  # target id that is not scored

_FORWARD_KEYS = ("position_ids", "segment_ids", "cu_seqlens", "max_seqlen")


def forward_kwargs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The attention-structure keys of a contract batch that ``Llama.forward`` takes."""
    return {k: batch[k] for k in _FORWARD_KEYS if k in batch}


def token_losses(model: Any, batch: Mapping[str, Any]) -> Tensor:
    """(B, T) per-token cross-entropy in nats of a Llama or anything with ``token_losses``."""
    if hasattr(model, "token_losses"):
        return model.token_losses(batch)
    hidden_BTD = model(batch["input_ids"], **forward_kwargs(batch))
    return model.loss(hidden_BTD, batch["targets"], reduction="none")


def causal_rows_batch(input_ids_BT: Tensor, targets_BT: Tensor) -> dict[str, Any]:
    """A contract batch whose rows are independent sequences with plain causal attention.

    Rows may be right-padded: padding comes after every real token, so causal attention keeps
    it from influencing them; its targets must be ``IGNORE``.
    """
    B, T = input_ids_BT.shape
    dev = input_ids_BT.device
    pos_BT = torch.arange(T, device=dev).expand(B, T).contiguous()
    return {
        "input_ids": input_ids_BT,
        "targets": targets_BT,
        "segment_ids": torch.zeros(B, T, dtype=torch.int32, device=dev),
        "cu_seqlens": torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=dev),
        "max_seqlen": T,
        "position_ids": pos_BT,
        "doc_positions": pos_BT,
    }
