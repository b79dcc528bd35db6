"""Pieces and units in columnar form, shared by the views that make them and the windows that read them.

A *piece* is a token span ``[start, start + length)`` of one document of a token source (a
:class:`~megadoc_pl.data.store.TokenStore`, or a :class:`~megadoc_pl.data.views.LiteralTokens`
table of delimiter tokens). :class:`Groups` holds pieces grouped per source (CSR over sources),
the building block every view composes; :func:`to_units` turns groups into :class:`Units` (CSR
over units), what a stream of windows reads. :func:`running_offsets` and :func:`ranges` are the
vectorised offset helpers both sides use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# Piece columns: the token source as int8 (a view has at most three), documents, offsets and
# lengths inside a document as int32 (a store's documents and a document's tokens stay below
# 2^31, checked when units are made): 18 bytes a piece instead of 41 (paper-scale stretch: 21M pieces).
SRC_DTYPE, POS_DTYPE = np.int8, np.int32


@dataclass
class Units:
    """Units of one stream in columnar form: pieces in unit order, CSR over units."""

    sources: tuple  # token sources referenced by piece_src (TokenStore / LiteralTokens)
    piece_src: np.ndarray  # (P,) int8 index into sources
    piece_doc: np.ndarray  # (P,) int32 document in that source
    piece_start: np.ndarray  # (P,) int32 first token of the span inside the document
    piece_len: np.ndarray  # (P,) int32 tokens in the span (> 0)
    piece_newdoc: np.ndarray  # (P,) bool: a document boundary at the span's first token
    piece_docpos: np.ndarray  # (P,) int32 position of the span's first token in its document
    unit_ptr: np.ndarray  # (U + 1,) int64: unit u is pieces unit_ptr[u]:unit_ptr[u + 1]
    name: str = ""
    stats: dict = field(default_factory=dict)  # sources kept / dropped / held out, filters

    @property
    def num_units(self) -> int:
        return len(self.unit_ptr) - 1

    @property
    def num_pieces(self) -> int:
        return len(self.piece_len)

    @property
    def unit_tokens(self) -> np.ndarray:
        cum = running_offsets(self.piece_len)
        return cum[self.unit_ptr[1:]] - cum[self.unit_ptr[:-1]]

    @property
    def num_tokens(self) -> int:
        return int(self.piece_len.sum())

    def unit(self, u: int) -> list[tuple]:
        """Unit u as (source index, doc, start, length, newdoc, docpos) tuples (tests, tools)."""
        lo, hi = self.unit_ptr[u], self.unit_ptr[u + 1]
        return [
            (int(self.piece_src[k]), int(self.piece_doc[k]), int(self.piece_start[k]),
             int(self.piece_len[k]), bool(self.piece_newdoc[k]), int(self.piece_docpos[k]))
            for k in range(lo, hi)
        ]

    def unit_tokens_of(self, u: int) -> np.ndarray:
        """The concatenated tokens of unit u (reference path for tests and tools)."""
        parts = [
            np.asarray(self.sources[s].token_array[self.sources[s].offsets_full[d] + a :
                                                   self.sources[s].offsets_full[d] + a + n])
            for s, d, a, n, _, _ in self.unit(u)
        ]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# Pieces grouped per source (CSR), the building block every view composes.


@dataclass
class Groups:
    """Pieces grouped per source; all groups of one view share the same source order."""

    ptr: np.ndarray  # (S + 1,) int64
    src: np.ndarray
    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    newdoc: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.ptr)

    @staticmethod
    def single(src: int, docs: np.ndarray, lengths: np.ndarray) -> "Groups":
        """One whole stored document per source."""
        n = len(docs)
        return Groups(np.arange(n + 1, dtype=np.int64), np.full(n, src, SRC_DTYPE), docs.astype(POS_DTYPE),
                      np.zeros(n, POS_DTYPE), lengths.astype(POS_DTYPE), np.ones(n, bool))

    def take(self, keep: np.ndarray) -> "Groups":
        """The groups of the sources where ``keep`` is True (itself when all are: no copy)."""
        if keep.all():
            return self
        counts = self.counts[keep]
        idx = ranges(self.ptr[:-1][keep], counts)
        ptr = running_offsets(counts)
        return Groups(ptr, self.src[idx], self.doc[idx], self.start[idx], self.length[idx], self.newdoc[idx])


def running_offsets(lengths) -> np.ndarray:
    """(n + 1,) int64 offsets ``[0, l0, l0 + l1, ...]`` of n lengths, in one allocation (a
    paper-scale view's 21M piece lengths: 168 MB, not three copies of it)."""
    lengths = np.asarray(lengths)
    out = np.empty(len(lengths) + 1, np.int64)
    out[0] = 0
    np.cumsum(lengths, out=out[1:])
    return out


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + n) for each (s, n), vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    keep = lengths > 0
    starts, lengths = np.asarray(starts, np.int64)[keep], lengths[keep]
    ends = np.cumsum(lengths)
    out = np.ones(total, dtype=np.int64)
    out[0] = starts[0]
    out[ends[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1] - 1)
    return np.cumsum(out)


def concat_groups(parts: Sequence[Groups], block: int = 1 << 14) -> Groups:
    """Per source, the pieces of parts[0], then parts[1], ... (vectorised CSR interleave, a block
    of sources at a time so the destination indices never cover the whole view)."""
    counts = np.stack([p.counts for p in parts])  # (K, S)
    total = counts.sum(axis=0)
    ptr = running_offsets(total)
    n = int(ptr[-1])
    cols = {k: np.empty(n, dtype=getattr(parts[0], k).dtype) for k in ("src", "doc", "start", "length", "newdoc")}
    for lo in range(0, len(total), block):
        hi = min(len(total), lo + block)
        before = np.zeros(hi - lo, np.int64)
        for p, c in zip(parts, counts[:, lo:hi]):
            dest = ranges(ptr[lo:hi] + before, c)
            a, b = int(p.ptr[lo]), int(p.ptr[hi])
            for k, arr in cols.items():
                arr[dest] = getattr(p, k)[a:b]
            before += c
    return Groups(ptr, cols["src"], cols["doc"], cols["start"], cols["length"], cols["newdoc"])


def to_units(g: Groups, sources: tuple, name: str, stats: dict, split_each: bool = False) -> Units:
    """Groups -> Units: one unit per non-empty group, or one per piece with ``split_each``.

    Empty spans (an empty delimiter) are dropped; every unit starts a document.
    """
    for store in sources:  # the int32 piece columns held every document number and offset exactly
        n = store.num_documents
        if n >= 2**31 or (store.offsets_full[-1] >= 2**31 and int(np.diff(store.offsets_full).max()) >= 2**31):
            raise ValueError(f"{getattr(store, 'path', store)}: views index documents and their tokens with int32 and "
                             f"this store has {n} documents of up to {int(np.diff(store.offsets_full).max())} tokens "
                             "(fix: split the corpus into stores below 2^31 documents, documents below 2^31 tokens)")
    keep = g.length > 0
    if keep.all():  # the common case: no copies of the piece arrays (paper scale: ~20M pieces)
        src, doc, start, length, newdoc = g.src, g.doc, g.start, g.length, g.newdoc.copy()
        first = np.ones(len(length), bool)
        if not split_each:
            first[:] = False
            first[g.ptr[:-1][g.counts > 0]] = True
    else:
        unit_of = np.arange(len(g.length)) if split_each else np.repeat(np.arange(len(g.counts)), g.counts)
        unit_of = unit_of[keep]
        src, doc, start, length = g.src[keep], g.doc[keep], g.start[keep], g.length[keep]
        newdoc = g.newdoc[keep].copy()
        first = np.ones(len(unit_of), bool)
        first[1:] = unit_of[1:] != unit_of[:-1]
        del unit_of
    newdoc |= first
    ptr = np.concatenate([np.flatnonzero(first), [len(length)]]).astype(np.int64)
    return Units(sources, src, doc, start, length, newdoc, piece_docpos(length, newdoc), ptr, name, stats)


def piece_docpos(length: np.ndarray, newdoc: np.ndarray, block: int = 1 << 22) -> np.ndarray:
    """Position of each piece's first token inside its document (documents start at newdoc),
    a block of pieces at a time (int64 temporaries of a block, not of the view)."""
    out = np.empty(len(length), POS_DTYPE)
    base = doc_start = 0  # stream offset of the block's first piece; start of the open document
    for lo in range(0, len(length), block):
        n = length[lo:lo + block]
        cum = np.cumsum(n, dtype=np.int64)
        cum -= n
        cum += base  # the stream offset of each piece's first token
        starts = np.where(newdoc[lo:lo + block], cum, doc_start)
        np.maximum.accumulate(starts, out=starts)
        out[lo:lo + block] = cum - starts
        base, doc_start = int(cum[-1] + n[-1]), int(starts[-1])
    return out

