"""Ensembles of K models scored as one (megadocs appendix: K seeds, logits averaged).

``mode='logit'`` (default, the predecessor paper's method) averages the K members' logits and
takes the softmax of the mean; ``mode='prob'`` averages the K next-token distributions
(a mixture: ``log p = logsumexp_k log p_k - log K``). The LM head is evaluated ``chunk_tokens``
tokens at a time, so K x (B, T, V) logits are never alive at once.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megadoc_pl.eval.scoring import IGNORE, hidden_states

MODES = ("logit", "prob")


class Ensemble(nn.Module):
    """K Llamas behind the ``token_losses(batch)`` interface of one model."""

    def __init__(self, members: Sequence[nn.Module], mode: str = "logit", chunk_tokens: int = 1024) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if mode not in MODES:
            raise ValueError(f"unknown ensemble mode {mode!r}; choose one of {', '.join(MODES)}")
        vocabs = {m.lm_head.weight.shape[0] for m in members}
        if len(vocabs) != 1:
            raise ValueError(f"ensemble members disagree on the vocabulary size: {sorted(vocabs)}")
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.chunk_tokens = max(1, chunk_tokens)

    def combined_logprobs(self, logits_KBcV: Tensor) -> Tensor:
        """(K, B, c, V) member logits -> (B, c, V) log-probabilities of the ensemble."""
        logits_KBcV = logits_KBcV.float()
        if self.mode == "logit":
            return F.log_softmax(logits_KBcV.mean(0), dim=-1)
        K = logits_KBcV.shape[0]
        return torch.logsumexp(F.log_softmax(logits_KBcV, dim=-1), dim=0) - math.log(K)

    def token_losses(self, batch: Mapping[str, Any]) -> Tensor:
        """(B, T) cross-entropy of the ensemble's next-token distribution (0 at ignored targets)."""
        hiddens = [hidden_states(m, batch) for m in self.members]  # each member's mask for its own backend
        targets_BT = batch["targets"]
        B, T = targets_BT.shape
        step = max(1, self.chunk_tokens // B)
        out_BT = torch.zeros(B, T, dtype=torch.float32, device=targets_BT.device)
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            logits_KBcV = torch.stack([m.logits(h[:, t0:t1]) for m, h in zip(self.members, hiddens)])
            logp_BcV = self.combined_logprobs(logits_KBcV)
            tgt_Bc = targets_BT[:, t0:t1]
            keep_Bc = tgt_Bc != IGNORE
            nll_Bc = -logp_BcV.gather(-1, tgt_Bc.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out_BT[:, t0:t1] = torch.where(keep_Bc, nll_Bc, torch.zeros_like(nll_Bc))
        return out_BT
