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


def hidden_states(model: Any, batch: Mapping[str, Any]) -> Tensor:
    """(B, T, D) final hidden states of a Llama on a contract batch, attention within its segments.

    The attention mask is built here, from the batch's ``segment_ids`` (and ``cu_seqlens`` /
    ``max_seqlen`` when present), before the model's possibly compiled forward runs. A batch of
    ``input_ids`` alone is rows of one causal sequence each (the model's default mask).
    """
    mask = None
    if "segment_ids" in batch:
        mask = model.segment_mask(batch["segment_ids"], batch.get("cu_seqlens"), batch.get("max_seqlen"))
    return model(batch["input_ids"], batch.get("position_ids"), mask)


def token_losses(model: Any, batch: Mapping[str, Any]) -> Tensor:
    """(B, T) per-token cross-entropy in nats of a Llama or anything with ``token_losses``."""
    if hasattr(model, "token_losses"):
        return model.token_losses(batch)
    return model.loss(hidden_states(model, batch), batch["targets"], reduction="none")


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
