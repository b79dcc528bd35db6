"""Causal self-attention restricted to segments, behind one function with four backends.

The data side decides the attention scope (`window`, `document`, `megadoc`; SPEC 3.4) and
describes it per batch as ``segment_ids`` (B, T) and/or ``cu_seqlens`` (S + 1,) over the
flattened (B * T) tokens plus ``max_seqlen``. The model only has to respect those segments: a
query attends to keys at or before it *in the same segment*. Segment ids increase along a row
(batch contract), so every segment is a contiguous span and both descriptions are equivalent.

Backends (``backend=``):

- ``flash_attn``   flash_attn_varlen_func over the packed (B * T) tokens (CUDA, bf16/fp16)
- ``torch_varlen`` torch.nn.attention.varlen.varlen_attn, PyTorch's built-in varlen flash
                   kernel (CUDA, bf16/fp16; torch >= 2.10)
- ``flex``         flex_attention with a document block mask (compiled on CUDA; eager on CPU)
- ``sdpa``         dense F.scaled_dot_product_attention with an explicit (B, 1, T, T) mask;
                   the oracle. Rows that are one segment each use ``is_causal=True`` instead.
- ``auto``         CUDA + bf16/fp16: flash_attn > torch_varlen > flex > sdpa; otherwise sdpa.

A backend that cannot honour the segmentation raises; none silently drops the mask. The mask is
built once per forward pass (``make_mask``) and shared by all layers.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash_attn", "torch_varlen", "flex", "sdpa")
_HALF = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# segment descriptions


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T) int32 segment index of every token from cumulative lengths over the flat batch."""
    _check_cu_seqlens(cu_seqlens, B, T)
    starts = torch.zeros(B * T + 1, dtype=torch.int32, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = 1
    return starts[:-1].cumsum(0, dtype=torch.int32).view(B, T)


def cu_seqlens_from_segment_ids(segment_ids_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative segment lengths over the flattened batch (row ends always cut) and the longest.

    Raises if a row's segment ids are not non-decreasing: varlen kernels need contiguous
    segments, and a segment id that reappears later in the row cannot be expressed that way.
    """
    B, T = segment_ids_BT.shape
    if T > 1 and bool((segment_ids_BT[:, 1:] < segment_ids_BT[:, :-1]).any()):
        raise ValueError(
            "segment_ids must be non-decreasing along each row (batch contract) for the varlen "
            "backends; use backend='sdpa' or 'flex' for arbitrary segment ids"
        )
    new_BT = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    new_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    starts = new_BT.flatten().nonzero().flatten().to(torch.int32)
    total = torch.tensor([B * T], dtype=torch.int32, device=segment_ids_BT.device)
    cu = torch.cat([starts, total])
    return cu, int((cu[1:] - cu[:-1]).max().item())


def positions_from_segment_ids(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 positions restarting at 0 at each segment start (RoPE per segment)."""
    B, T = segment_ids_BT.shape
    t_BT = torch.arange(T, device=segment_ids_BT.device).expand(B, T)
    new_BT = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    new_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    start_BT = torch.where(new_BT, t_BT, torch.zeros_like(t_BT)).cummax(dim=1).values
    return t_BT - start_BT


def _check_cu_seqlens(cu: torch.Tensor, B: int, T: int) -> None:
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of S + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    row_ends = torch.arange(0, B * T + 1, T, device=cu.device, dtype=cu.dtype)
    ends_ok = (cu[0] == 0) & (cu[-1] == B * T)
    increasing = (cu[1:] > cu[:-1]).all()
    rows_cut = torch.isin(row_ends, cu).all()
    if bool(ends_ok & increasing & rows_cut):  # one host sync when the batch is well formed
        return
    if not bool(ends_ok):
        raise ValueError(f"cu_seqlens must start at 0 and end at B*T = {B * T}, got {int(cu[0])}..{int(cu[-1])}")
    if not bool(increasing):
        raise ValueError("cu_seqlens must be strictly increasing (no empty segments)")
    raise ValueError("cu_seqlens must cut at every row boundary (a segment cannot span two rows)")


# ---------------------------------------------------------------------------------------------
# backend selection


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` ('auto' picks by availability) on this device/dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda and dtype in _HALF:
            if has_flash_attn():
                return "flash_attn"
            if has_torch_varlen():
                return "torch_varlen"
            return "flex"
        return "sdpa"
    if backend in ("flash_attn", "torch_varlen"):
        if not cuda:
            raise ValueError(f"attention backend {backend!r} needs a CUDA device (got {device}); use 'sdpa' or 'flex'")
        if dtype not in _HALF:
            raise ValueError(
                f"attention backend {backend!r} needs bf16/fp16 activations (got {dtype}); "
                "train with bf16-mixed precision or use 'flex'/'sdpa'"
            )
        if backend == "torch_varlen" and not has_torch_varlen():
            raise ValueError(f"this torch ({torch.__version__}) has no torch.nn.attention.varlen; use 'flash_attn' or 'flex'")
    return backend


# ---------------------------------------------------------------------------------------------
# the mask, built once per forward


@dataclass
class AttentionMask:
    """What one backend needs to honour the segmentation of a (B, T) batch."""

    backend: str
    B: int
    T: int
    single_segment_rows: bool  # every row is one segment: plain causal attention is exact
    dense_B1TT: Optional[torch.Tensor] = None  # sdpa: bool, True = attend
    block_mask: Any = None  # flex: BlockMask
    cu_seqlens: Optional[torch.Tensor] = None  # varlen: int32 (S + 1,)
    max_seqlen: int = 0


@torch.compiler.disable  # data-dependent host logic; runs eagerly under torch.compile
def make_mask(
    backend: str,
    B: int,
    T: int,
    device: torch.device,
    dtype: torch.dtype,
    segment_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> AttentionMask:
    """Resolve the backend and build its mask from whichever segment description is given.

    With neither ``segment_ids`` nor ``cu_seqlens`` every row is one causal segment (`window`).
    If both are given they must describe the same segmentation (the batch contract guarantees
    it); ``segment_ids`` drives sdpa/flex, ``cu_seqlens`` drives the varlen kernels.
    """
    backend = resolve_backend(backend, device, dtype)
    if segment_ids is not None:
        if tuple(segment_ids.shape) != (B, T):
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected (B, T) = {(B, T)}")
        segment_ids = segment_ids.to(device)
    if backend in ("flash_attn", "torch_varlen"):
        cu, max_len = varlen_metadata(B, T, device, segment_ids, cu_seqlens, max_seqlen)
        return AttentionMask(backend, B, T, single_segment_rows=cu.numel() == B + 1, cu_seqlens=cu, max_seqlen=max_len)
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)

    if segment_ids is None and cu_seqlens is None:
        single = True
    elif segment_ids is not None:
        single = bool((segment_ids == segment_ids[:, :1]).all())
    else:
        _check_cu_seqlens(cu_seqlens, B, T)
        single = cu_seqlens.numel() == B + 1
    mask = AttentionMask(backend=backend, B=B, T=T, single_segment_rows=single)
    if single:
        if backend == "flex":
            mask.block_mask = _flex_block_mask(None, B, T, device)
        return mask
    if segment_ids is None:
        segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, B, T)
    if backend == "flex":
        mask.block_mask = _flex_block_mask(segment_ids, B, T, device)
    else:
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        same_BTT = segment_ids[:, :, None] == segment_ids[:, None, :]
        mask.dense_B1TT = (same_BTT & causal_TT)[:, None]
    return mask


def varlen_metadata(
    B: int,
    T: int,
    device: torch.device,
    segment_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32, max_seqlen) for the varlen kernels from either segment description."""
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        _check_cu_seqlens(cu_seqlens, B, T)
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        return cu_seqlens, int(max_seqlen)
    if segment_ids is None:
        return torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device), T
    return cu_seqlens_from_segment_ids(segment_ids.to(device))


def _flex_block_mask(segment_ids: Optional[torch.Tensor], B: int, T: int, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    if segment_ids is None:
        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return create_block_mask(mask_mod, None, None, T, T, device=device, _compile=device.type == "cuda")

    def doc_mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    # Compiled on CUDA: eager construction evaluates the mask over all B * T * T pairs.
    return create_block_mask(doc_mask_mod, B, None, T, T, device=device, _compile=device.type == "cuda")


# ---------------------------------------------------------------------------------------------
# the function


def attention(
    q_BTHD: torch.Tensor,
    k_BTHD: torch.Tensor,
    v_BTHD: torch.Tensor,
    segment_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    backend: str = "auto",
    mask: Optional[AttentionMask] = None,
) -> torch.Tensor:
    """Causal attention within segments; k/v may have fewer heads than q (GQA). Returns (B, T, H, D).

    Pass a prebuilt ``mask`` (from ``make_mask``) to share it across layers; otherwise it is
    built here from the segment arguments and ``backend``.
    """
    B, T, H, D = q_BTHD.shape
    KV = k_BTHD.shape[2]
    if H % KV != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({KV})")
    if mask is None:
        mask = make_mask(backend, B, T, q_BTHD.device, q_BTHD.dtype, segment_ids, cu_seqlens, max_seqlen)
    elif (mask.B, mask.T) != (B, T):
        raise ValueError(f"mask was built for (B, T) = {(mask.B, mask.T)}, got {(B, T)}")

    if mask.backend == "sdpa":
        return _sdpa(q_BTHD, k_BTHD, v_BTHD, mask)
    if mask.backend == "flex":
        return _flex(q_BTHD, k_BTHD, v_BTHD, mask)
    if mask.backend == "flash_attn":
        return _flash_attn(q_BTHD, k_BTHD, v_BTHD, mask)
    if mask.backend == "torch_varlen":
        return _torch_varlen(q_BTHD, k_BTHD, v_BTHD, mask)
    raise AssertionError(mask.backend)


def _sdpa(q_BTHD, k_BTHD, v_BTHD, mask: AttentionMask) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BTHD, v_BTHD))
    gqa = q.shape[1] != k.shape[1]
    if mask.single_segment_rows:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        assert mask.dense_B1TT is not None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense_B1TT, enable_gqa=gqa)
    return out.transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex materialises the full score matrix; compiled it is a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q_BTHD, k_BTHD, v_BTHD, mask: AttentionMask) -> torch.Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (x.transpose(1, 2) for x in (q_BTHD, k_BTHD, v_BTHD))
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(q, k, v, block_mask=mask.block_mask, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def _flash_attn(q_BTHD, k_BTHD, v_BTHD, mask: AttentionMask) -> torch.Tensor:
    from megadoc_pl.utils import require

    fa = require("flash_attn", "gpu", "the flash_attn attention backend")
    B, T, H, D = q_BTHD.shape
    q, k, v = (x.reshape(B * T, x.shape[2], D) for x in (q_BTHD, k_BTHD, v_BTHD))
    out = fa.flash_attn_varlen_func(
        q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, causal=True
    )
    return out.view(B, T, H, D)


def _torch_varlen(q_BTHD, k_BTHD, v_BTHD, mask: AttentionMask) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    B, T, H, D = q_BTHD.shape
    q, k, v = (x.reshape(B * T, x.shape[2], D) for x in (q_BTHD, k_BTHD, v_BTHD))
    out = varlen_attn(
        q, k, v, mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen,
        window_size=(-1, 0), enable_gqa=H != k.shape[1],
    )
    return out.view(B, T, H, D)
