"""Chunked cross-entropy over the LM head: (B, T, V) fp32 logits are never materialised.

With a 128k vocabulary the LM head dominates memory at 150M-300M parameters: the logits of one
4096 x 8 micro-batch in fp32 are 16 GiB. ``chunked_cross_entropy`` takes the hidden states and
the head weight and walks over ``chunk_size`` tokens at a time, keeping only one chunk's logits
alive, in forward and in backward.

Two gradient strategies (both exact):

- scalar losses (``mean`` / ``sum``) compute the gradients during the forward walk, as Liger's
  fused linear cross-entropy does; backward only scales them by the incoming scalar. The head's
  matmul runs twice per chunk (logits, then dL/dh and dL/dW) instead of three times.
- ``reduction='none'`` saves the per-token log-sum-exp and recomputes each chunk's logits in
  backward, because per-token upstream gradients are known only then.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def chunked_cross_entropy(
    hidden_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, like ``F.cross_entropy``.

    ``mean`` averages over targets that are not ``ignore_index``; ``none`` returns (B, T)
    per-token losses (0 at ignored targets). Logits are computed in the autocast dtype when
    autocast is on (else the hidden dtype) and reduced in fp32.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if chunk_size < 1:
        raise ValueError(f"loss chunk_size must be >= 1, got {chunk_size}")
    lead = hidden_BTD.shape[:-1]
    if tuple(targets_BT.shape) != tuple(lead):
        raise ValueError(f"targets shape {tuple(targets_BT.shape)} does not match hidden {tuple(hidden_BTD.shape)}")
    dev = hidden_BTD.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden_BTD.dtype
    h_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    t_N = targets_BT.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (hidden_BTD.requires_grad or weight_VD.requires_grad)
    if reduction == "none":
        return _ChunkedCENone.apply(h_ND, weight_VD, t_N, ignore_index, chunk_size, dtype).view(lead)
    out = _ChunkedCEScalar.apply(h_ND, weight_VD, t_N, ignore_index, chunk_size, dtype, needs_grad)
    if reduction == "mean":
        # Same convention as F.cross_entropy: nan when every target is ignored.
        out = out / (t_N != ignore_index).sum()
    return out


def _chunk_logits(h_cD: torch.Tensor, w_VD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (h_cD.to(dtype) @ w_VD.to(dtype).t()).float()


def _nll_and_dlogits(logits_cV: torch.Tensor, t_c: torch.Tensor, ignore_index: int, want_grad: bool):
    """Per-token loss (0 where ignored), log-sum-exp, and (softmax - onehot) with ignored rows zeroed."""
    valid_c = t_c != ignore_index
    safe_t = torch.where(valid_c, t_c, torch.zeros_like(t_c))
    lse_c = torch.logsumexp(logits_cV, dim=-1)
    nll_c = (lse_c - logits_cV.gather(1, safe_t[:, None]).squeeze(1)) * valid_c
    if not want_grad:
        return nll_c, lse_c, None
    # In place on the logits buffer: it is not needed any more.
    d_cV = logits_cV.sub_(lse_c[:, None]).exp_()
    d_cV.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse_c)[:, None])
    d_cV.mul_(valid_c[:, None])
    return nll_c, lse_c, d_cV


class _ChunkedCEScalar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, ignore_index, chunk_size, dtype, needs_grad):
        with torch.autocast(h_ND.device.type, enabled=False):
            total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
            dh_ND = torch.empty_like(h_ND) if needs_grad else None
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if needs_grad else None
            w = w_VD.to(dtype)
            for s in range(0, h_ND.shape[0], chunk_size):
                h_c = h_ND[s : s + chunk_size].to(dtype)
                nll_c, _, d_cV = _nll_and_dlogits(_chunk_logits(h_c, w, dtype), t_N[s : s + chunk_size], ignore_index, needs_grad)
                total += nll_c.sum()
                if needs_grad:
                    d_cV = d_cV.to(dtype)
                    dh_ND[s : s + chunk_size] = (d_cV @ w).to(h_ND.dtype)
                    _accumulate(dw_VD, d_cV, h_c)
        ctx.save_for_backward(dh_ND, dw_VD)
        ctx.w_dtype = w_VD.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        dh_ND, dw_VD = ctx.saved_tensors
        if dh_ND is None:
            raise RuntimeError("chunked_cross_entropy: forward ran without grad; cannot backpropagate")
        return dh_ND * g.to(dh_ND.dtype), (dw_VD * g).to(ctx.w_dtype), None, None, None, None, None


class _ChunkedCENone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, ignore_index, chunk_size, dtype):
        with torch.autocast(h_ND.device.type, enabled=False):
            nll_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
            lse_N = torch.empty_like(nll_N)
            w = w_VD.to(dtype)
            for s in range(0, h_ND.shape[0], chunk_size):
                nll_c, lse_c, _ = _nll_and_dlogits(
                    _chunk_logits(h_ND[s : s + chunk_size], w, dtype), t_N[s : s + chunk_size], ignore_index, False
                )
                nll_N[s : s + chunk_size], lse_N[s : s + chunk_size] = nll_c, lse_c
        ctx.save_for_backward(h_ND, w_VD, t_N, lse_N)
        ctx.ignore_index, ctx.chunk_size, ctx.dtype = ignore_index, chunk_size, dtype
        return nll_N

    @staticmethod
    def backward(ctx, g_N):
        h_ND, w_VD, t_N, lse_N = ctx.saved_tensors
        dtype, cs, ii = ctx.dtype, ctx.chunk_size, ctx.ignore_index
        with torch.autocast(h_ND.device.type, enabled=False):
            dh_ND = torch.empty_like(h_ND)
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
            w = w_VD.to(dtype)
            for s in range(0, h_ND.shape[0], cs):
                h_c, t_c = h_ND[s : s + cs].to(dtype), t_N[s : s + cs]
                valid_c = t_c != ii
                safe_t = torch.where(valid_c, t_c, torch.zeros_like(t_c))
                d_cV = _chunk_logits(h_c, w, dtype).sub_(lse_N[s : s + cs, None]).exp_()
                d_cV.scatter_add_(1, safe_t[:, None], -torch.ones_like(t_c, dtype=d_cV.dtype)[:, None])
                d_cV.mul_((g_N[s : s + cs].float() * valid_c)[:, None])
                d_cV = d_cV.to(dtype)
                dh_ND[s : s + cs] = (d_cV @ w).to(h_ND.dtype)
                _accumulate(dw_VD, d_cV, h_c)
        return dh_ND, dw_VD.to(w_VD.dtype), None, None, None, None


def _accumulate(dw_VD: torch.Tensor, d_cV: torch.Tensor, h_cD: torch.Tensor) -> None:
    """dW += d^T h, accumulated in fp32 across chunks."""
    if d_cV.dtype == torch.float32:
        dw_VD.addmm_(d_cV.t(), h_cD)
    else:
        dw_VD.add_((d_cV.t() @ h_cD).float())


def reference_cross_entropy(
    hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, targets_BT: torch.Tensor, reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """The oracle: full logits then F.cross_entropy (tests and small vocabularies)."""
    logits = (hidden_BTD @ weight_VD.t()).float()
    return F.cross_entropy(logits.flatten(0, -2), targets_BT.flatten(), reduction=reduction,
                           ignore_index=ignore_index).view(targets_BT.shape if reduction == "none" else ())
