"""Causal self-attention restricted to segments, behind one mask object and four backends.

The data side decides the attention scope (`window`, `document`, `megadoc`; docs/data-corpus.md) and
describes it per batch as ``segment_ids`` (B, T), with ``cu_seqlens`` (S + 1,) over the
flattened (B * T) tokens and ``max_seqlen`` alongside. The model only has to respect those
segments: a query attends to keys at or before it *in the same segment*. Segment ids increase
along a row (batch contract), so every segment is a contiguous span and both descriptions agree.

The segmentation reaches the model as one :class:`AttentionMask`, built once per batch *outside*
the (possibly compiled) forward by :func:`segment_mask` (or :func:`causal_mask` for rows that
are one causal sequence each) and shared by all layers (torchtitan's ``get_attention_masks``).
Building it resolves the backend and prepares what that backend needs:

- ``flash_attn``   flash_attn_varlen_func over the packed (B * T) tokens (CUDA, bf16/fp16)
- ``torch_varlen`` torch.nn.attention.varlen.varlen_attn, PyTorch's built-in varlen flash
                   kernel (CUDA, bf16/fp16); its keywords are read from its signature, which
                   changed between torch releases (:func:`torch_varlen_keywords`)
- ``flex``         flex_attention with a document block mask (compiled on CUDA; eager on CPU)
- ``sdpa``         dense F.scaled_dot_product_attention with an explicit (B, 1, T, T) mask;
                   the oracle. Rows that are one segment each use ``is_causal=True`` instead.
- ``auto``         CUDA + bf16/fp16: flash_attn > torch_varlen > flex > sdpa; otherwise sdpa.

A backend that cannot honour the segmentation raises; none silently drops the mask.

Per micro-batch no host sync: with the batch's ``cu_seqlens`` and ``max_seqlen`` (made on the CPU
by the loader) every backend's mask is built from shapes and device-side ops only; see
:func:`segment_mask` for what is checked where.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Optional, get_args

import torch
import torch.nn.functional as F

from megadoc_pl.config import AttentionBackend

BACKENDS = get_args(AttentionBackend)
_HALF = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------
# segment descriptions


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


def _check_cu_seqlens(cu: torch.Tensor, B: int, T: int, validate: bool) -> None:
    """Raise unless ``cu`` are the offsets of a (B, T) batch cut at every row boundary.

    The shape is always checked (free). The values are read only where that costs no device
    sync: always for offsets on the CPU, and for offsets on a device only when ``validate``
    (one host sync). Offsets made by :func:`megadoc_pl.data.batch.pack` are correct by
    construction and reach the device that way, so they are trusted per micro-batch.
    """
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of S + 1 >= 2 offsets, got shape {tuple(cu.shape)}")
    if cu.numel() < B + 1:
        raise ValueError(f"cu_seqlens must cut at every row boundary (a segment cannot span two rows): "
                         f"{cu.numel() - 1} segments for {B} rows")
    if cu.device.type != "cpu" and not validate:
        return
    row_ends = torch.arange(0, B * T + 1, T, device=cu.device, dtype=cu.dtype)
    ends_ok = (cu[0] == 0) & (cu[-1] == B * T)
    increasing = (cu[1:] > cu[:-1]).all()
    rows_cut = torch.isin(row_ends, cu).all()
    if bool(ends_ok & increasing & rows_cut):  # on a device: the one host sync of validate=True
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


@functools.cache
def _varlen_attn_parameters() -> Optional[frozenset[str]]:
    """Parameter names of this torch's ``varlen_attn``; None when it has none."""
    if not has_torch_varlen():
        return None
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_keywords() -> dict[str, Any]:
    """The keywords that make this torch's ``varlen_attn`` causal, read from its signature.

    The signature changed between releases: the first ones take ``is_causal``, later ones
    ``window_size`` ((-1, 0) = causal) and ``enable_gqa`` (key/value with fewer heads). What is
    present is read, not assumed from the version. ``enable_gqa`` is listed (False) where it
    exists; the call sets it for GQA only (some kernels, cuDNN's, refuse it even with equal heads).
    Raises ValueError when this torch has no ``varlen_attn`` or it takes neither causal keyword.
    """
    params = _varlen_attn_parameters()
    if params is None:
        raise ValueError(f"this torch ({torch.__version__}) has no torch.nn.attention.varlen; use 'flash_attn' or 'flex'")
    if "window_size" in params:
        kw: dict[str, Any] = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        kw = {"is_causal": True}
    else:
        raise ValueError(
            f"torch {torch.__version__}: varlen_attn takes neither window_size nor is_causal "
            f"(parameters: {', '.join(sorted(params))}), so it cannot run causal attention; use 'flash_attn' or 'flex'"
        )
    if "enable_gqa" in params:
        kw["enable_gqa"] = False
    return kw


def _torch_varlen_complete() -> bool:
    """Whether ``auto`` may pick torch_varlen: causal and GQA both expressible in its signature."""
    try:
        return "enable_gqa" in torch_varlen_keywords()
    except ValueError:
        return False


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` ('auto' picks by availability) on this device/dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    cuda = device.type == "cuda"
    if backend == "auto":
        if cuda and dtype in _HALF:
            if has_flash_attn():
                return "flash_attn"
            if _torch_varlen_complete():
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
        if backend == "torch_varlen":
            torch_varlen_keywords()  # raises when this torch's signature cannot do it
    return backend


# ---------------------------------------------------------------------------------------------
# the mask, built once per batch outside the forward


@dataclass(frozen=True)
class AttentionMask:
    """A (B, T) batch's segmentation, prepared for one backend; shared by all layers.

    Build it with :func:`segment_mask` or :func:`causal_mask`, outside the compiled forward:
    they do the host-side, data-dependent work (backend choice, offsets, block masks).
    """

    backend: str  # resolved: sdpa | flex | flash_attn | torch_varlen
    positions_BT: torch.Tensor  # int64 RoPE positions restarting at 0 at each segment start
    single_segment_rows: bool  # every row is one segment: plain causal attention is exact
    segment_ids_BT: Optional[torch.Tensor] = None  # int32 (B, T); None for plain causal rows
    cu_seqlens: Optional[torch.Tensor] = None  # varlen: int32 (S + 1,) over the flattened batch
    max_seqlen: int = 0  # varlen: longest segment
    dense_B1TT: Optional[torch.Tensor] = None  # sdpa with segments: bool, True = attend
    block_mask: Any = None  # flex: BlockMask
    varlen_kwargs: tuple[tuple[str, Any], ...] = ()  # torch_varlen: causal keywords of this torch's signature

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T) the mask was built for."""
        return tuple(self.positions_BT.shape)


@torch.compiler.disable  # host logic; a compiled caller runs it eagerly
def causal_mask(backend: str, B: int, T: int, device: torch.device, dtype: torch.dtype) -> AttentionMask:
    """Every row one causal sequence (window scope, HF parity, multiple-choice rows); no host sync."""
    backend = resolve_backend(backend, device, dtype)
    positions_BT = torch.arange(T, device=device).expand(B, T)
    if backend in ("flash_attn", "torch_varlen"):
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=device)
        return _varlen_mask(backend, positions_BT, True, None, cu, T)
    block_mask = _causal_block_mask(T, device) if backend == "flex" else None
    return AttentionMask(backend, positions_BT, single_segment_rows=True, block_mask=block_mask)


@torch.compiler.disable  # data-dependent host logic; a compiled caller runs it eagerly
def segment_mask(
    backend: str,
    segment_ids_BT: torch.Tensor,
    dtype: torch.dtype,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    validate: bool = False,
) -> AttentionMask:
    """The mask of a batch cut into segments, on ``segment_ids_BT``'s device, for activations of ``dtype``.

    ``segment_ids_BT`` is the segmentation; ``cu_seqlens``/``max_seqlen``, when the batch has
    them, must describe the same segments (the batch contract guarantees it). With them the mask
    is built without a host sync: whether every row is one segment follows from the number of
    offsets alone (S == B, as the offsets cut every row), and nothing is read back from the
    device. Offsets on the CPU are checked there (free); offsets on a device are trusted, as the
    loader's are (:func:`megadoc_pl.data.batch.pack` makes them on the CPU, correct by
    construction), unless ``validate`` asks for the check (one host sync). Without
    ``cu_seqlens`` the segmentation must be read from the ids: a host sync on a device.
    """
    if segment_ids_BT.dim() != 2:
        raise ValueError(f"segment_ids must be (B, T), got shape {tuple(segment_ids_BT.shape)}")
    B, T = segment_ids_BT.shape
    device = segment_ids_BT.device
    backend = resolve_backend(backend, device, dtype)
    positions_BT = positions_from_segment_ids(segment_ids_BT)
    if backend in ("flash_attn", "torch_varlen"):
        cu, max_len = varlen_offsets(segment_ids_BT, cu_seqlens, max_seqlen, validate)
        return _varlen_mask(backend, positions_BT, cu.numel() == B + 1, segment_ids_BT, cu, max_len)
    if cu_seqlens is None:
        single = bool((segment_ids_BT == segment_ids_BT[:, :1]).all())  # reads the ids back
    else:
        _check_cu_seqlens(cu_seqlens, B, T, validate)
        single = cu_seqlens.numel() == B + 1
    if backend == "flex":
        block_mask = _flex_block_mask(None if single else segment_ids_BT, B, T, device)
        return AttentionMask(backend, positions_BT, single, segment_ids_BT, block_mask=block_mask)
    dense_B1TT = None
    if not single:
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
        dense_B1TT = (same_BTT & causal_TT)[:, None]
    return AttentionMask(backend, positions_BT, single, segment_ids_BT, dense_B1TT=dense_B1TT)


def _varlen_mask(backend: str, positions_BT: torch.Tensor, single: bool, segment_ids_BT: Optional[torch.Tensor],
                 cu: torch.Tensor, max_len: int) -> AttentionMask:
    kwargs = tuple(torch_varlen_keywords().items()) if backend == "torch_varlen" else ()
    return AttentionMask(backend, positions_BT, single, segment_ids_BT, cu_seqlens=cu, max_seqlen=max_len,
                         varlen_kwargs=kwargs)


def varlen_offsets(
    segment_ids_BT: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    validate: bool = False,
) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 on the ids' device, max_seqlen) for the varlen kernels: the batch's, or derived.

    Deriving them from the ids reads the segmentation back (host syncs). The batch's are checked
    as :func:`segment_mask` says (on the CPU always, on a device when ``validate``). A missing
    ``max_seqlen`` is computed on the CPU for offsets there; for offsets on a device it is the
    row length T, a valid upper bound (it only sizes the kernels' grid) that needs no read-back.
    """
    if cu_seqlens is None:
        return cu_seqlens_from_segment_ids(segment_ids_BT)
    B, T = segment_ids_BT.shape
    _check_cu_seqlens(cu_seqlens, B, T, validate)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.device.type == "cpu" else T
    # non_blocking: a pageable CPU source is staged before the call returns, without waiting for the stream
    cu = cu_seqlens.to(device=segment_ids_BT.device, dtype=torch.int32, non_blocking=True)
    return cu, int(max_seqlen)


@functools.cache
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    # torch's recommended way to build a block mask without evaluating all B * T * T pairs (the
    # older create_block_mask(..., _compile=True) is deprecated). Cached, like _compiled_flex, so
    # every batch reuses one compiled builder; static shapes, as the batches' are.
    return torch.compile(create_block_mask, dynamic=False)


def _flex_block_mask(segment_ids: Optional[torch.Tensor], B: int, T: int, device: torch.device) -> Any:
    """The flex BlockMask of causal rows (``segment_ids`` None) or of causal segments.

    Segment masks change every batch: built by the compiled builder on CUDA, eagerly on CPU
    (where flex runs eagerly too). Causal masks depend on (T, device) only: cached.
    """
    if segment_ids is None:
        return _causal_block_mask(T, device)

    def doc_mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (segment_ids[b, q_idx] == segment_ids[b, kv_idx])

    if device.type == "cuda":
        return _compiled_create_block_mask()(doc_mask_mod, B, None, T, T, device=device)
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(doc_mask_mod, B, None, T, T, device=device)


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@functools.lru_cache(maxsize=16)
def _causal_block_mask(T: int, device: torch.device) -> Any:
    """The BlockMask of causal rows of length T (shared by the batch: B = None), built once.

    Eager even on CUDA: it evaluates T * T pairs once per length, and leaves the compiled
    builder's recompilations to the masks that change every batch. Built outside inference
    mode, so a mask first made during validation can serve a training step's backward.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    with torch.inference_mode(False):
        return create_block_mask(_causal_mask_mod, None, None, T, T, device=device)


# ---------------------------------------------------------------------------------------------
# the function


def attention(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Causal attention within the mask's segments; k/v may have fewer heads than q (GQA). Returns (B, T, H, D)."""
    B, T, H, D = q_BTHD.shape
    KV = k_BTHD.shape[2]
    if H % KV != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({KV})")
    if mask.shape != (B, T):
        raise ValueError(f"mask was built for (B, T) = {mask.shape}, got {(B, T)}")

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


def _varlen_max(mask: AttentionMask, T: int) -> int:
    # Under torch.compile a per-batch Python int would be specialised and recompile on every new
    # value; the row length is a valid upper bound (it only sizes the kernel's grid).
    return T if torch.compiler.is_compiling() else mask.max_seqlen


def _flash_attn(q_BTHD, k_BTHD, v_BTHD, mask: AttentionMask) -> torch.Tensor:
    from megadoc_pl.utils import require

    fa = require("flash_attn", "gpu", "the flash_attn attention backend")
    B, T, H, D = q_BTHD.shape
    q, k, v = (x.reshape(B * T, x.shape[2], D) for x in (q_BTHD, k_BTHD, v_BTHD))
    max_len = _varlen_max(mask, T)
    out = fa.flash_attn_varlen_func(q, k, v, mask.cu_seqlens, mask.cu_seqlens, max_len, max_len, causal=True)
    return out.view(B, T, H, D)


def _torch_varlen(q_BTHD, k_BTHD, v_BTHD, mask: AttentionMask) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    B, T, H, D = q_BTHD.shape
    kwargs = dict(mask.varlen_kwargs)
    if H != k_BTHD.shape[2]:
        if "enable_gqa" not in kwargs:
            raise ValueError(
                f"this torch's ({torch.__version__}) varlen_attn takes no enable_gqa, so it cannot attend "
                f"{H} query heads to {k_BTHD.shape[2]} kv heads; use 'flash_attn' or 'flex'"
            )
        kwargs["enable_gqa"] = True
    q, k, v = (x.reshape(B * T, x.shape[2], D) for x in (q_BTHD, k_BTHD, v_BTHD))
    max_len = _varlen_max(mask, T)
    out = varlen_attn(q, k, v, mask.cu_seqlens, mask.cu_seqlens, max_len, max_len, **kwargs)
    return out.view(B, T, H, D)
