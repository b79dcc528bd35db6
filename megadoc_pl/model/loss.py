"""LM-head cross-entropy without (B, T, V) fp32 logits: a chunked walk, eager or compiled, or Liger's kernel.

With a 128k vocabulary the LM head dominates memory at 150M-300M parameters: the logits of one
4096 x 8 micro-batch in fp32 are 16 GiB. ``cross_entropy`` takes the hidden states and
the head weight and walks over ``chunk_size`` tokens at a time, keeping only one chunk's logits
alive, in forward and in backward.

Two gradient strategies (both exact):

- scalar losses (``mean`` / ``sum``) compute the gradients during the forward walk, as Liger's
  fused linear cross-entropy does; backward only scales them by the incoming scalar. The head's
  matmul runs twice per chunk (logits, then dL/dh and dL/dW) instead of three times.
- ``reduction='none'`` recomputes each chunk's logits in backward, because per-token upstream
  gradients are known only then.

Implementations (``LOSS_IMPLS``, the recipe's ``model.loss_impl``), all with the same reductions,
``ignore_index`` and autocast rule (logits in the autocast dtype, reductions in fp32):

- ``chunked``: the walk in eager PyTorch. The CPU path, and the peer the others are tested against
  (with ``reference_cross_entropy``, full logits, as the oracle of all).
- ``compiled``: the same walk; each chunk's work after the matmul (log-sum-exp, loss, softmax
  minus one-hot, masking, cast) is fused by ``torch.compile`` into a few kernels instead of ~6
  eager fp32 passes over the chunk's logits. Every chunk has one static shape (the last one is
  padded with ignored targets), so one compile serves every batch size; fewer tokens than one
  chunk still cost a whole chunk.
- ``liger``: Liger-Kernel's fused linear cross-entropy (Triton; CUDA only; extra ``liger``).
  ``reduction='none'`` runs ``compiled`` instead: per-token losses serve validation, and ours is
  the path tested against the oracle (Liger's per-token weight gradient was wrong before 0.8.2).
- ``auto``: ``compiled`` on CUDA, ``chunked`` elsewhere.
"""

from __future__ import annotations

import functools
from typing import Optional, get_args

import torch
import torch.nn.functional as F

from megadoc_pl.config import LossImpl

REDUCTIONS = ("mean", "sum", "none")
LOSS_IMPLS = get_args(LossImpl)


def cross_entropy(
    hidden_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_BT: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int = 1024,
    impl: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets``, like ``F.cross_entropy``.

    ``mean`` averages over targets that are not ``ignore_index``; ``none`` returns (B, T)
    per-token losses (0 at ignored targets). Logits are computed in the autocast dtype when
    autocast is on (else the hidden dtype) and reduced in fp32. ``impl`` is one of ``LOSS_IMPLS``
    (see the module's docstring); ``liger`` picks its own chunks and ignores ``chunk_size``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    if chunk_size < 1:
        raise ValueError(f"loss chunk_size must be >= 1, got {chunk_size}")
    lead = hidden_BTD.shape[:-1]
    if tuple(targets_BT.shape) != tuple(lead):
        raise ValueError(f"targets shape {tuple(targets_BT.shape)} does not match hidden {tuple(hidden_BTD.shape)}")
    impl = resolve_loss_impl(impl, hidden_BTD.device)
    h_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    t_N = targets_BT.reshape(-1)
    if impl == "liger" and reduction != "none":
        return _liger_cross_entropy(h_ND, weight_VD, t_N, reduction, ignore_index)
    dev = hidden_BTD.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden_BTD.dtype
    compiled = impl != "chunked"
    if reduction == "none":
        return _ChunkedCENone.apply(h_ND, weight_VD, t_N, ignore_index, chunk_size, dtype, compiled).view(lead)
    needs_grad = torch.is_grad_enabled() and (hidden_BTD.requires_grad or weight_VD.requires_grad)
    out = _ChunkedCEScalar.apply(h_ND, weight_VD, t_N, ignore_index, chunk_size, dtype, needs_grad, compiled)
    if reduction == "mean":
        # Same convention as F.cross_entropy: nan when every target is ignored.
        out = out / (t_N != ignore_index).sum()
    return out


def resolve_loss_impl(impl: str, device: torch.device | str) -> str:
    """``auto`` -> ``compiled`` on CUDA, ``chunked`` elsewhere; ``liger`` off CUDA is an error."""
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss implementation {impl!r}; choose one of {', '.join(LOSS_IMPLS)}")
    dev = torch.device(device).type
    if impl == "auto":
        return "compiled" if dev == "cuda" else "chunked"
    if impl == "liger" and dev != "cuda":
        raise ValueError(f"model.loss_impl='liger' needs CUDA (Liger-Kernel is Triton) but the loss runs on {dev} "
                         "(fix: set model.loss_impl=auto or chunked)")
    return impl


# ---------------------------------------------------------------------------------------------
# one chunk: eager (the oracle's steps) or fused by torch.compile


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


def _nll(h_cD: torch.Tensor, w_VD: torch.Tensor, t_c: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-token loss of one chunk (0 where ignored), eager or under torch.compile."""
    return _nll_and_dlogits(_chunk_logits(h_cD, w_VD, h_cD.dtype), t_c, ignore_index, False)[0]


def _fused_grad(h_cD: torch.Tensor, w_VD: torch.Tensor, t_c: torch.Tensor, g_c: torch.Tensor, ignore_index: int):
    """Loss, (softmax - onehot) * g in the logits dtype, and its product with W, for torch.compile.

    Out of place, and the one-hot is a comparison with an index range rather than a scatter, so
    inductor fuses the whole softmax gradient into the kernels that read the logits.
    """
    logits_cV = _chunk_logits(h_cD, w_VD, h_cD.dtype)
    nll_c, lse_c, _ = _nll_and_dlogits(logits_cV, t_c, ignore_index, False)
    onehot_cV = torch.arange(logits_cV.shape[1], device=t_c.device)[None, :] == t_c[:, None]
    scale_c = g_c * (t_c != ignore_index)
    d_cV = ((torch.exp(logits_cV - lse_c[:, None]) - onehot_cV) * scale_c[:, None]).to(h_cD.dtype)
    return nll_c, d_cV, d_cV @ w_VD


@functools.cache
def _compiled(fn):
    """One compiled wrapper per function for the process: chunks have static shapes, so it compiles once."""
    return torch.compile(fn, dynamic=False)


def _static(x: torch.Tensor, rows: int, value) -> torch.Tensor:
    """``x`` contiguous with dim 0 padded to ``rows`` by ``value``: the compiled function sees one
    shape and one layout (a last partial chunk or an expanded upstream gradient would recompile)."""
    n = x.shape[0]
    return x.contiguous() if n == rows else F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - n), value=value)


def _chunk_nll(compiled: bool, chunk_size: int, h_cD, w_VD, t_c, ignore_index: int) -> torch.Tensor:
    """Per-token loss of one chunk (0 where ignored); ``h`` and ``w`` are in the logits dtype."""
    if not compiled:
        return _nll(h_cD, w_VD, t_c, ignore_index)
    n = h_cD.shape[0]
    nll_c = _compiled(_nll)(_static(h_cD, chunk_size, 0), w_VD, _static(t_c, chunk_size, ignore_index), ignore_index)
    return nll_c[:n]


def _chunk_grad(compiled: bool, chunk_size: int, h_cD, w_VD, t_c, g_c: Optional[torch.Tensor], ignore_index: int):
    """Loss, dL/dlogits (scaled per token by ``g``, None = 1) in the logits dtype, and dL/dh of one chunk."""
    if not compiled:
        nll_c, _, d_cV = _nll_and_dlogits(_chunk_logits(h_cD, w_VD, h_cD.dtype), t_c, ignore_index, True)
        if g_c is not None:
            d_cV.mul_(g_c.float()[:, None])
        d_cV = d_cV.to(h_cD.dtype)
        return nll_c, d_cV, d_cV @ w_VD
    n = h_cD.shape[0]
    g_c = torch.ones(n, dtype=torch.float32, device=h_cD.device) if g_c is None else g_c.float()
    out = _compiled(_fused_grad)(_static(h_cD, chunk_size, 0), w_VD, _static(t_c, chunk_size, ignore_index),
                                 _static(g_c, chunk_size, 0.0), ignore_index)
    return tuple(x[:n] for x in out)


# ---------------------------------------------------------------------------------------------
# the walk over chunks, forward and backward


class _ChunkedCEScalar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, ignore_index, chunk_size, dtype, needs_grad, compiled):
        with torch.autocast(h_ND.device.type, enabled=False):
            total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
            dh_ND = torch.empty_like(h_ND) if needs_grad else None
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if needs_grad else None
            w = w_VD.detach().to(dtype)
            for s in range(0, h_ND.shape[0], chunk_size):
                h_c, t_c = h_ND[s : s + chunk_size].detach().to(dtype), t_N[s : s + chunk_size]
                if needs_grad:
                    nll_c, d_cV, dh_cD = _chunk_grad(compiled, chunk_size, h_c, w, t_c, None, ignore_index)
                    dh_ND[s : s + chunk_size] = dh_cD.to(h_ND.dtype)
                    _accumulate(dw_VD, d_cV, h_c)
                else:
                    nll_c = _chunk_nll(compiled, chunk_size, h_c, w, t_c, ignore_index)
                total += nll_c.sum()
        ctx.save_for_backward(dh_ND, dw_VD)
        ctx.w_dtype = w_VD.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        dh_ND, dw_VD = ctx.saved_tensors
        if dh_ND is None:
            raise RuntimeError("cross_entropy: forward ran without grad; cannot backpropagate")
        return dh_ND * g.to(dh_ND.dtype), (dw_VD * g).to(ctx.w_dtype), None, None, None, None, None, None


class _ChunkedCENone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, ignore_index, chunk_size, dtype, compiled):
        with torch.autocast(h_ND.device.type, enabled=False):
            nll_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
            w = w_VD.detach().to(dtype)
            for s in range(0, h_ND.shape[0], chunk_size):
                h_c = h_ND[s : s + chunk_size].detach().to(dtype)
                nll_N[s : s + chunk_size] = _chunk_nll(compiled, chunk_size, h_c, w, t_N[s : s + chunk_size],
                                                       ignore_index)
        ctx.save_for_backward(h_ND, w_VD, t_N)
        ctx.ignore_index, ctx.chunk_size, ctx.dtype, ctx.compiled = ignore_index, chunk_size, dtype, compiled
        return nll_N

    @staticmethod
    def backward(ctx, g_N):
        h_ND, w_VD, t_N = ctx.saved_tensors
        dtype, cs, ii = ctx.dtype, ctx.chunk_size, ctx.ignore_index
        with torch.autocast(h_ND.device.type, enabled=False):
            dh_ND = torch.empty_like(h_ND)
            dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
            w = w_VD.detach().to(dtype)
            for s in range(0, h_ND.shape[0], cs):
                h_c = h_ND[s : s + cs].detach().to(dtype)
                _, d_cV, dh_cD = _chunk_grad(ctx.compiled, cs, h_c, w, t_N[s : s + cs], g_N[s : s + cs], ii)
                dh_ND[s : s + cs] = dh_cD.to(h_ND.dtype)
                _accumulate(dw_VD, d_cV, h_c)
        return dh_ND, dw_VD.to(w_VD.dtype), None, None, None, None, None


def _accumulate(dw_VD: torch.Tensor, d_cV: torch.Tensor, h_cD: torch.Tensor) -> None:
    """dW += d^T h, accumulated in fp32 across chunks."""
    if d_cV.dtype == torch.float32:
        dw_VD.addmm_(d_cV.t(), h_cD)
    elif _mm_accumulates_fp32(dw_VD.device):
        # cuBLAS adds the bf16 product into fp32 dW itself: no (V, D) temporaries per chunk
        torch.addmm(dw_VD, d_cV.t(), h_cD, out_dtype=torch.float32, out=dw_VD)
    else:
        dw_VD.add_((d_cV.t() @ h_cD).float())


@functools.cache
def _mm_accumulates_fp32(device: torch.device) -> bool:
    """Whether ``addmm(..., out_dtype=float32)`` takes 16-bit operands here (CUDA sm80+, torch >= 2.8)."""
    return (device.type == "cuda" and torch.torch_version.TorchVersion(torch.__version__) >= "2.8"
            and torch.cuda.get_device_capability(device)[0] >= 8)


# ---------------------------------------------------------------------------------------------
# Liger-Kernel


def _liger_cross_entropy(h_ND, w_VD, t_N, reduction: str, ignore_index: int) -> torch.Tensor:
    """Liger's fused linear cross-entropy for ``mean`` / ``sum`` (its matmuls follow the caller's autocast)."""
    from megadoc_pl.utils import require

    liger = require("liger_kernel.transformers.functional", "liger", "model.loss_impl=liger")
    if not torch.is_autocast_enabled(h_ND.device.type):
        w_VD = w_VD.to(h_ND.dtype)
    # accum_dtype: the weight gradient is summed over chunks in fp32, as in the chunked walk.
    return liger.liger_fused_linear_cross_entropy(h_ND.contiguous(), w_VD, t_N.contiguous(), ignore_index=ignore_index,
                                                  reduction=reduction, accum_dtype=torch.float32)


def reference_cross_entropy(
    hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, targets_BT: torch.Tensor, reduction: str = "mean",
    ignore_index: int = -100,
) -> torch.Tensor:
    """The oracle: full logits then F.cross_entropy (tests and small vocabularies)."""
    logits = (hidden_BTD @ weight_VD.t()).float()
    return F.cross_entropy(logits.flatten(0, -2), targets_BT.flatten(), reduction=reduction,
                           ignore_index=ignore_index).view(targets_BT.shape if reduction == "none" else ())
