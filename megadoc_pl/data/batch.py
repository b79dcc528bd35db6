"""The batch contract (docs/data-corpus.md, docs/ARCHITECTURE.md): clips of windows -> packed
buffer -> the batch a model reads.

A batch of windows is given as *clips* (the parts of pieces that fall in each window, in order;
:class:`Clips`, made by :mod:`megadoc_pl.data.windows`). :func:`pack` turns them into what a
loader ships (the tokens plus per-segment and per-clip offsets, one byte buffer) and
:func:`unpack`, on the batch's device, into the batch dict of the contract: ``input_ids``,
``targets``, ``segment_ids``, ``cu_seqlens``, ``max_seqlen``, ``position_ids``,
``doc_positions``, ``window_index``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, get_args

import numpy as np

from megadoc_pl.config import Scope
from megadoc_pl.data.units import ranges, running_offsets

SCOPES = get_args(Scope)
PACKED = "packed"  # marks a batch from :func:`pack`; :func:`unpack` turns it into the contract
SLOT = "slot"  # a packed batch in a loader worker's reused buffer: (pool, slot) to release once unpacked


@dataclass
class Clips:
    """Parts of pieces inside a batch of windows, sorted by (row, offset in window)."""

    row: np.ndarray  # window row in the batch
    wpos: np.ndarray  # offset of the clip's first token inside the window
    src: np.ndarray  # token source (index into the owner's ``sources``)
    doc: np.ndarray  # document in that source
    start: np.ndarray  # first token inside the document
    n: np.ndarray  # tokens
    newdoc: np.ndarray  # the clip's first token starts a document
    newunit: np.ndarray  # the clip's first token starts a unit
    docpos: np.ndarray  # position of the clip's first token inside its document

    @staticmethod
    def concat(parts: Sequence["Clips"], sort: bool = True) -> "Clips":
        if len(parts) == 1 and not sort:
            return parts[0]
        cols = {k: np.concatenate([getattr(p, k) for p in parts]) for k in Clips.__dataclass_fields__}
        if not sort:
            return Clips(**cols)
        order = np.argsort((cols["row"] << 32) | cols["wpos"])  # (row, offset) pairs are distinct
        return Clips(**{k: v[order] for k, v in cols.items()})


# A slice copy per run (one np.concatenate) beats one fancy-index read below this many runs per
# token: measured on a 1 GB store, 64 x 4097 tokens, 4k scattered runs take ~2.5 ms either way,
# and real rephrase batches of ~3.9k runs 3.0 ms by slices vs 4.5 ms by index.
LOOP_RUNS_PER_TOKEN = 1 / 48


def gather_tokens(clips: Clips, sources: Sequence, B: int, L: int, dtype=np.int64,
                  out: Optional[np.ndarray] = None) -> np.ndarray:
    """(B, L) tokens of the clips (written into ``out``, (B * L,), when given).

    Clips that follow each other in their token file are merged into runs (a window over
    consecutive documents of one store is a handful of runs): few runs are copied slice by
    slice, like a bare memmap slicer; many runs (a scattered store) by one fancy-index read.
    """
    if out is None:
        out = np.empty(B * L, dtype=dtype)
    first = np.empty(len(clips.n), dtype=np.int64)
    used = np.unique(clips.src)
    arrays = {}
    for s in used:
        m = slice(None) if len(used) == 1 else clips.src == s
        src = sources[int(s)]
        first[m] = src.offsets_full[clips.doc[m]] + clips.start[m]
        arrays[int(s)] = np.asarray(src.token_array).view(np.ndarray)  # a plain view: memmap indexing is slower
    # The clips tile the batch in order, so a clip continues a run when its tokens follow the last one's.
    cont = np.zeros(len(first), dtype=bool)
    cont[1:] = (clips.src[1:] == clips.src[:-1]) & (first[1:] == first[:-1] + clips.n[:-1])
    head = np.flatnonzero(~cont)
    if len(head) <= LOOP_RUNS_PER_TOKEN * B * L:
        dest = running_offsets(clips.n)
        runs = dest[np.append(head[1:], len(first))] - dest[head]  # the runs tile the batch in order
        np.concatenate([arrays[s][f:f + n] for f, n, s in zip(first[head].tolist(), runs.tolist(),
                                                              clips.src[head].tolist())],
                       out=out, casting="unsafe")  # ids fit the buffer's width: token_width checked the sources
        return out.reshape(B, L)
    for s in used:
        m = slice(None) if len(used) == 1 else clips.src == s
        if len(used) == 1:  # the clips tile the batch in order: no scatter
            out[:] = arrays[int(s)][ranges(first, clips.n)]
        else:
            out[ranges(clips.row[m] * L + clips.wpos[m], clips.n[m])] = arrays[int(s)][ranges(first[m], clips.n[m])]
    return out.reshape(B, L)


def pack(clips: Clips, sources: Sequence, window_index: np.ndarray, seq_len: int, scope: str,
         tensors: bool = True, token_bytes: int = 4, alloc: Optional[Callable[[int], Any]] = None) -> dict:
    """The loader's half of the batch contract: the tokens, and the document structure as
    per-segment and per-clip offsets (kilobytes, not B x T arrays), all in one byte buffer.
    :func:`unpack` expands it on the batch's device. A loader ships ~2 bytes a token instead of
    the contract's 36 and does no per-token work beyond copying the tokens, and a DataLoader
    worker hands its batch to the main process as one tensor (each tensor costs ~0.25 ms there,
    each MB ~0.6 ms). Tokens travel in 2 bytes when every source's ids fit (``token_bytes=2``,
    see :func:`token_width`), else in 4.

    ``{PACKED: (B, L, S + 1, C, token bytes), "buffer": (N,) uint8, "max_seqlen": int}``;
    :func:`packed_fields` reads the buffer as ``window_index`` (B,) int64, ``cu_seqlens``
    (S + 1,) int32 over the flattened (B * T) inputs, ``clip_start`` / ``clip_docpos`` (C,)
    int32: where each clip starts in the flattened (B * L) tokens and the position of its first
    token in its document, and ``tokens`` (B, L = T + 1). ``tensors=False`` leaves the buffer a
    numpy array (a dry run, which imports no torch). ``alloc(nbytes)`` may give the buffer (a
    uint8 torch tensor, such as a DataLoader worker's reused shared-memory slot) or None.
    """
    if scope not in SCOPES:
        raise ValueError(f"attention scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    B, T = len(window_index), seq_len
    L = T + 1
    if B * L >= 2**31:
        raise ValueError(f"a batch of {B} x {L} tokens is past 2^31 (fix: use smaller batches per device)")
    dest0 = clips.row * L + clips.wpos
    assert len(dest0) and dest0[0] == 0 and np.array_equal(dest0[1:], dest0[:-1] + clips.n[:-1]) \
        and int(dest0[-1] + clips.n[-1]) == B * L, "windows must be full"
    # Segments start at every row and, unless the scope is window, at each clip that starts a
    # document (unit) inside the inputs (a clip at offset T only holds the last target).
    starts = clips.wpos == 0
    if scope != "window":
        starts |= clips.newdoc if scope == "document" else clips.newunit
    starts &= clips.wpos < T
    cu_seqlens = np.append(clips.row[starts] * T + clips.wpos[starts], B * T)  # sorted: clips are in (row, offset) order
    if token_bytes not in (2, 4):
        raise ValueError(f"token_bytes must be 2 or 4, got {token_bytes}")
    layout = (B, L, len(cu_seqlens), len(dest0), token_bytes)
    given = alloc(_buffer_bytes(*layout)) if alloc is not None else None
    buf = np.empty(_buffer_bytes(*layout), dtype=np.uint8) if given is None else given.numpy()
    f = packed_fields({PACKED: layout, "buffer": buf})
    f["window_index"][:] = window_index
    f["cu_seqlens"][:] = cu_seqlens
    f["clip_start"][:] = dest0
    f["clip_docpos"][:] = clips.docpos  # < 2^31: views check document positions when they make units
    gather_tokens(clips, sources, B, L, out=f["tokens"].reshape(-1))
    if given is not None:
        buf = given
    elif tensors:
        import torch

        buf = torch.from_numpy(buf)
    return {PACKED: layout, "buffer": buf, "max_seqlen": int(np.diff(cu_seqlens).max())}


def token_width(sources: Sequence) -> int:
    """2 when every source's token ids fit in 16 bits (uint8/uint16 stores; the ids of an
    in-memory source, such as the delimiters, are checked), else 4."""
    for src in sources:
        arr = src.token_array
        if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
            continue
        in_memory = getattr(src, "path", None) is None
        if in_memory and (arr.size == 0 or (arr.min() >= 0 and arr.max() <= 0xFFFF)):
            continue
        return 4
    return 2


def _buffer_bytes(B: int, L: int, S1: int, C: int, token_bytes: int) -> int:
    return 8 * B + 4 * (S1 + 2 * C) + token_bytes * B * L


def packed_bytes(batch: dict) -> int:
    """The size of a :func:`pack`-ed batch's buffer."""
    return _buffer_bytes(*batch[PACKED])


def packed_fields(batch: dict) -> dict:
    """The fields of a :func:`pack`-ed batch's buffer: views of a numpy buffer (tokens uint16 or
    int32, as packed) or, for a torch buffer on any device, views with the tokens as int64."""
    B, L, S1, C, width = batch[PACKED]
    buf = batch["buffer"]
    assert buf.shape[0] == _buffer_bytes(B, L, S1, C, width), "not a packed buffer of this layout"
    a, b, c, d = np.cumsum([8 * B, 4 * S1, 4 * C, 4 * C]).tolist()  # int64 first, so every field is aligned
    if isinstance(buf, np.ndarray):
        i32, i64, tok = np.int32, np.int64, np.uint16 if width == 2 else np.int32
    else:
        import torch

        i32, i64, tok = torch.int32, torch.int64, torch.int16 if width == 2 else torch.int32
    tokens = buf[d:].view(tok).reshape(B, L)
    if not isinstance(buf, np.ndarray):
        tokens = tokens.long() & 0xFFFF if width == 2 else tokens.long()  # torch has no uint16 arithmetic
    return {"buffer": buf, "window_index": buf[:a].view(i64), "cu_seqlens": buf[a:b].view(i32),
            "clip_start": buf[b:c].view(i32), "clip_docpos": buf[c:d].view(i32), "tokens": tokens}


def packed_counts(batch: dict) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(window_index int64 (B,), cu_seqlens int32 (S + 1,))`` of a :func:`pack`-ed batch whose
    buffer is still on the CPU, as fresh numpy arrays (a worker may reuse the buffer's slot); no
    token is read. None for a batch that is not packed or already on a device: what the training
    step's bookkeeping reads before the batch moves, so it never waits for the device."""
    if not batch.get(PACKED):
        return None
    B, _, S1, _, _ = batch[PACKED]
    buf = batch["buffer"]
    if not isinstance(buf, np.ndarray):
        if buf.device.type != "cpu":
            return None
        buf = buf.numpy()
    return buf[:8 * B].view(np.int64).copy(), buf[8 * B:8 * B + 4 * S1].view(np.int32).copy()


def unpack(batch: dict) -> dict:
    """The whole batch contract from a :func:`pack`-ed batch, computed with torch on the batch's
    device (a batch that is not packed comes back as it is)::

        input_ids, targets      (B, T) int64     the window's tokens and the next ones
        segment_ids             (B, T) int32     segment number inside the row (attention scope)
        cu_seqlens, max_seqlen  (S + 1,) int32   segment offsets over the flattened batch
        position_ids            (B, T) int64     position inside the token's segment
        doc_positions           (B, T) int64     position inside the token's document
        window_index            (B,) int64       global window numbers

    Other keys (``padding``) pass through.
    """
    if not batch.get(PACKED):
        return batch
    import torch

    f = packed_fields(batch)
    out = {k: v for k, v in batch.items() if k not in (PACKED, "buffer", SLOT)}
    tokens = f["tokens"]
    B, L = tokens.shape
    T = L - 1
    dev = tokens.device
    new_BT = torch.zeros(B * T, dtype=torch.int32, device=dev)
    new_BT[f["cu_seqlens"][:-1].long()] = 1
    new_BT = new_BT.view(B, T)
    t_BT = torch.arange(T, device=dev).expand(B, T)
    # A token's segment starts at the last start at or before it (every row starts one).
    seg_first_BT = torch.where(new_BT.bool(), t_BT, 0).cummax(dim=1).values
    clip_start = f["clip_start"].long()
    clip_n = torch.diff(clip_start, append=clip_start.new_tensor([B * L]))
    doc_BL = torch.repeat_interleave(f["clip_docpos"].long() - clip_start, clip_n, output_size=B * L)
    doc_BL += torch.arange(B * L, device=dev)
    out.update(
        input_ids=tokens[:, :T].contiguous(),
        targets=tokens[:, 1:].contiguous(),
        segment_ids=new_BT.cumsum(dim=1, dtype=torch.int32) - 1,
        cu_seqlens=f["cu_seqlens"].clone(),
        position_ids=t_BT - seg_first_BT,
        doc_positions=doc_BL.view(B, L)[:, :T].contiguous(),
        window_index=f["window_index"].clone(),
    )
    return out
