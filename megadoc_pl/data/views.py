"""Corpus views (docs/data-corpus.md): token stores -> units of pieces (:mod:`megadoc_pl.data.units`).

A *piece* is a token span ``[start, start + length)`` of one document of a token source (a
:class:`~megadoc_pl.data.store.TokenStore`, or the small :class:`LiteralTokens` table holding
delimiter tokens). A *unit* is a list of pieces that stay contiguous in the training stream; a
stream's pass is its units shuffled as wholes and concatenated.

Notation: source s has real text r(s) (one document of the real store) and generations
g_1(s)..g_P(s) (documents of the synthetic store with ``source_id`` s), of which a view uses the
first G by ``gen_index``.

Chunked sources (``synthesize --long-sources chunk``): a source longer than the prompt budget was
rewritten chunk by chunk, and its rows carry ``chunk_index`` k (``gen_index = k * P + g``). Each
chunk is a pool of its own: a view takes the first G of *every* chunk, in chunk order, so every
chunk reaches training. ``stitch`` / ``maga_stitch`` build one megadoc per source from chunk 0's
G generations, then chunk 1's, ..., with r(s) placed as configured; ``rephrase`` / ``maga`` make
one unit per generation of every chunk. A source is short when any of its chunks is.

==============  ==========================================================================
view            units
==============  ==========================================================================
real            one per source: r(s)
rephrase        one per piece: each g_i(s), plus r(s) once when ``include_real``
stitch          one per source: g_1..g_G (generation order or shuffled, seeded), r(s) placed
                ``last`` | ``first`` | ``none``; every piece keeps its own BOS/EOS, so each
                is its own document for attention scope ``document``
stretch         one per source: r(s) cut into G+1 equal-token segments (equal_token_split),
                rationale i (task ``rationale``, split_index i) after segment i, wrapped in
                open/close delimiter tokens; BOS/EOS of the rationales are stripped so the
                whole megadoc is ONE document
stitch_stretch  hybrid: the stitch megadoc with the stretched r(s) in place of r(s)
maga            one per (genre, audience) reformulation (task ``maga``), optionally only
                those with ``judge_score >= judge_min_score``
maga_stitch     one per source: its reformulations stitched, r(s) placed as in ``stitch``
self_distill    as ``rephrase``, over the teacher's continuations (task ``self_distill``)
==============  ==========================================================================

Document identity of a piece: ``newdoc`` marks a document boundary at its first token (every
stored document starts one, except the parts of a stretched megadoc after its first) and
``docpos`` is the position of its first token inside that document. Unit identity is the unit
itself (scope ``megadoc``). Source ids come from the token source of each piece.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable, Optional, Sequence, get_args

import numpy as np

from megadoc_pl.config import Order, RealPosition, ShortPool, View
from megadoc_pl.data.hygiene import IdSet, arrow_column, id_set, member_mask, one_string_array
from megadoc_pl.data.units import (POS_DTYPE, SRC_DTYPE, Groups, Units, concat_groups, running_offsets,
                                   to_units)

VIEWS = get_args(View)
# The generation tasks each view reads (the table above), its megadocs' pool first; a view's
# generation files are tokenized in this order. Rationales are wrapped in the stretch delimiters.
VIEW_TASKS: dict[str, tuple[str, ...]] = {
    "real": (),
    "rephrase": ("rephrase",),
    "stitch": ("rephrase",),
    "stretch": ("rationale",),
    "stitch_stretch": ("rephrase", "rationale"),
    "maga": ("maga",),
    "maga_stitch": ("maga",),
    "self_distill": ("self_distill",),
}
assert tuple(VIEW_TASKS) == VIEWS, "one row per view of config.View"
REAL_POSITIONS = get_args(RealPosition)
ORDERS = get_args(Order)
SHORT_POOL = get_args(ShortPool)


def uses_delimiters(view: str) -> bool:
    """Whether ``view`` wraps rationales in ``data.stretch_open`` / ``stretch_close`` tokens."""
    return "rationale" in VIEW_TASKS.get(view, ())


class LiteralTokens:
    """A tiny in-memory token source (delimiters) with the TokenStore attributes windows use."""

    def __init__(self, token_lists: Sequence[Sequence[int]], names: Sequence[str]):
        lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        self.offsets_full = running_offsets(lengths)
        flat = [int(x) for t in token_lists for x in t]
        self.token_array = np.array(flat, dtype=np.int64)
        self.names = list(names)
        self.path = None

    @property
    def num_documents(self) -> int:
        return len(self.names)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets_full)

    def tokens(self, i: int) -> np.ndarray:
        return self.token_array[self.offsets_full[i] : self.offsets_full[i + 1]]

    def source_id(self, i: int) -> str:
        return self.names[i]

    def task(self, i: int) -> str:
        return "delimiter"

    def gen_index(self, i: int) -> int:
        return -1


# ---------------------------------------------------------------------------------------------
# Source pools


@dataclass
class _Pools:
    """Training sources (real store order) and their first-G generation pools of one task."""

    real_docs: np.ndarray  # (S,) real store document of each training source
    ids: np.ndarray  # (S,) source ids
    gens: Groups  # per source: its selected generations, in gen_index order
    stats: dict


def _train_docs(real, heldout: set[str]) -> tuple[np.ndarray, dict]:
    """The real documents that are not held out, and their counts (no Python object per document)."""
    held = member_mask(arrow_column(real, "source_id"), heldout)
    docs = np.flatnonzero(~held)
    return docs, {"sources": int(len(docs)), "heldout_sources_excluded": int(held.sum())}


def _train_sources(real, heldout: set[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    docs, stats = _train_docs(real, heldout)
    return docs, real.source_ids[docs], stats


def _pools(real, synth, task: str, heldout: set[str], generations: int, short_pool: str,
           judge_min_score: Optional[float] = None, keep_all: bool = False) -> _Pools:
    """First-G generations (by gen_index) of ``task`` for every training source; for a chunked
    source, the first G of every chunk, in chunk order."""
    real_docs, ids, stats = _train_sources(real, heldout)
    if synth is None:
        raise ValueError(f"view needs generations of task '{task}' but data.synthetic is not set "
                         "(fix: point data.synthetic at tools/synthesize.py output)")
    import pyarrow.compute as pc

    tasks = arrow_column(synth, "task")
    is_task = pc.equal(tasks, task)
    gen_docs = np.flatnonzero(is_task.to_numpy(zero_copy_only=False))
    if not len(gen_docs):
        have = sorted(pc.unique(tasks).to_pylist())
        raise ValueError(f"{synth.path}: no generations of task '{task}' (the store has tasks {have}) "
                         f"(fix: generate them with tools/synthesize.py --task {task}, or pick another data.view)")
    # The real document of each generation's source: one hash join in Arrow, no per-row Python,
    # over this task's rows only (a store of several tasks is several times larger).
    sids = arrow_column(synth, "source_id").filter(is_task)
    del is_task
    src_doc = pc.index_in(sids, value_set=one_string_array(arrow_column(real, "source_id"))).fill_null(-1)
    src_doc = src_doc.to_numpy(zero_copy_only=False).astype(np.int64)
    unknown = src_doc < 0
    if unknown.any():
        first = synth.source_id(int(gen_docs[np.flatnonzero(unknown)[0]]))
        raise ValueError(
            f"{synth.path}: {int(unknown.sum())} '{task}' generations name sources that are not in the "
            f"real corpus (e.g. source_id={first!r}) (fix: point data.real at the corpus they were generated from)"
        )
    held = member_mask(sids, heldout)
    del sids
    stats["heldout_generations_excluded"] = int(held.sum())
    gen_docs, src_doc = gen_docs[~held], src_doc[~held]
    # Position of each generation's source among the training sources (real store order).
    pos_of_doc = np.full(real.num_documents, -1, np.int64)
    pos_of_doc[real_docs] = np.arange(len(real_docs))
    pos = pos_of_doc[src_doc]
    # A chunked source (--long-sources chunk) has one pool per chunk: rank within (source, chunk).
    chunk = np.maximum(synth.column("chunk_index")[gen_docs], 0)
    order = np.lexsort((synth.gen_indices[gen_docs], chunk, pos))
    gen_docs, pos, chunk = gen_docs[order], pos[order], chunk[order]
    first = np.ones(len(pos), bool)
    first[1:] = (pos[1:] != pos[:-1]) | (chunk[1:] != chunk[:-1])
    group_start = np.flatnonzero(first)
    rank = np.arange(len(pos)) - group_start[np.cumsum(first) - 1]
    # Per source, its smallest pool (0 for a source without generations).
    counts = np.zeros(len(real_docs), np.int64)
    group_pos = pos[group_start]
    counts[group_pos] = np.iinfo(np.int64).max
    np.minimum.at(counts, group_pos, np.diff(np.append(group_start, len(pos))))
    chunked = np.zeros(len(real_docs), bool)
    chunked[pos[chunk > 0]] = True
    stats["chunked_sources"] = int(chunked.sum())
    short = counts < generations
    stats["pool_min"] = int(counts.min()) if len(counts) else 0
    if short.any():
        if short_pool == "error":
            k = int(np.flatnonzero(short)[0])
            where = " in one of its chunks" if chunked[k] else ""
            raise ValueError(
                f"source {ids[k]!r} has {int(counts[k])} '{task}' generations{where} but the recipe uses G={generations} "
                f"({int(short.sum())} of {len(short)} sources are short) (fix: lower data.generations, generate "
                f"more, or set data.short_pool=drop)"
            )
        if short_pool != "drop":
            raise ValueError(f"data.short_pool must be one of {SHORT_POOL}, got {short_pool!r}")
    stats["short_pool_sources_dropped"] = int(short.sum())
    sel = np.ones(len(pos), bool) if keep_all else rank < generations
    if judge_min_score is not None:
        score = synth.column("judge_score")[gen_docs]
        passed = score >= judge_min_score  # NaN (never judged) fails the filter
        stats["judge_filtered"] = int((sel & ~passed).sum())
        sel &= passed
    gen_docs, pos = gen_docs[sel], pos[sel]
    gcounts = np.bincount(pos, minlength=len(real_docs))
    ptr = running_offsets(gcounts)
    gens = Groups(ptr, np.ones(len(gen_docs), SRC_DTYPE), gen_docs.astype(POS_DTYPE), np.zeros(len(gen_docs), POS_DTYPE),
                  synth.lengths[gen_docs].astype(POS_DTYPE), np.ones(len(gen_docs), bool))
    keep = ~short
    stats["sources_kept"] = int(keep.sum())
    stats["generations_used"] = int(gcounts[keep].sum())
    return _Pools(real_docs[keep], ids[keep], gens.take(keep), stats)


def _shuffle_within(g: Groups, seed: int) -> Groups:
    """Permute the pieces inside every group (seeded; the same every pass)."""
    rng = np.random.default_rng(seed)
    key = rng.random(len(g.length))
    grp = np.repeat(np.arange(len(g.counts)), g.counts)
    order = np.lexsort((key, grp))
    return Groups(g.ptr, g.src[order], g.doc[order], g.start[order], g.length[order], g.newdoc[order])


# ---------------------------------------------------------------------------------------------
# Stretch: rationales inside the original


def split_counts(num_tokens: np.ndarray, generations: int) -> np.ndarray:
    """Split points of each document: G, capped at ``n - 1`` (every segment keeps a token)."""
    if generations < 0:
        raise ValueError(f"generations must be >= 0, got {generations}")
    return np.minimum(generations, np.maximum(np.asarray(num_tokens, np.int64) - 1, 0))


def stretch_cuts(num_tokens: np.ndarray, generations: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`equal_token_split` of many documents at once, flattened.

    Returns ``(g, owner, cut)``: ``g[k]`` split points of document k (G capped at ``n - 1``), and
    for every split point its document and offset ``(i * n) // (g + 1)``, i = 1..g, documents in
    order. Exactly the offsets of ``equal_token_split(n[k], generations)`` concatenated.
    """
    n = np.asarray(num_tokens, np.int64)
    g = split_counts(n, generations)
    owner = np.repeat(np.arange(len(n)), g)
    i = np.arange(len(owner)) - np.repeat(np.cumsum(g) - g, g) + 1
    return g, owner, (i * n[owner]) // (g[owner] + 1)


def _stretch(real, synth, pools: _Pools, generations: int, open_ids: Sequence[int], close_ids: Sequence[int],
             lit_src: int, short_pool: str) -> tuple[Groups, np.ndarray]:
    """Per source: r(s) in G+1 equal-token segments with rationale i after segment i (vectorised).

    Returns the groups and a keep mask over pools' sources (short pools dropped when asked).
    The original's segments tile the stored document exactly (verbatim, checked); the
    rationale for split i is the first of the pool (gen_index order) with split_index i
    (gen_index when it has none).
    """
    bos, eos = int(real.add_bos), int(real.add_eos)
    sbos, seos = int(synth.add_bos), int(synth.add_eos)
    d = pools.real_docs.astype(np.int64)
    r_len = real.offsets_full[d + 1] - real.offsets_full[d]
    n = r_len - bos - eos  # content tokens
    # The per-rationale checks run in a function of their own: their temporaries (a few arrays
    # per generation) are gone before the layout allocates the view.
    keep, g, rats = _stretch_rationales(real, synth, pools, n, generations, short_pool)
    gk, nk, dk, lk = g[keep], n[keep], d[keep], r_len[keep]
    rat_start = running_offsets(gk)
    counts = gk * (2 + (len(open_ids) > 0) + (len(close_ids) > 0)) + 1
    ptr = running_offsets(counts)
    n_pieces = int(ptr[-1])
    cols = [np.empty(n_pieces, SRC_DTYPE)] + [np.empty(n_pieces, POS_DTYPE) for _ in range(3)] + [np.empty(n_pieces, bool)]
    # Blocks of sources: the per-piece temporaries stay a few block sizes, not ~15 x the view.
    for lo in range(0, len(gk), STRETCH_BLOCK_SOURCES):
        hi = min(len(gk), lo + STRETCH_BLOCK_SOURCES)
        layout = _stretch_layout(gk[lo:hi], nk[lo:hi], dk[lo:hi], lk[lo:hi], rats[rat_start[lo]:rat_start[hi]],
                                 synth, bos, sbos, seos, len(open_ids), len(close_ids), lit_src)
        for col, part in zip(cols, layout):
            col[ptr[lo]:ptr[hi]] = part
    return Groups(ptr, *cols), keep


def _stretch_rationales(real, synth, pools: _Pools, n: np.ndarray, generations: int,
                        short_pool: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keep mask over the pools' sources, split points per source, the rationale of every split
    point of the kept sources in order); raises the first problem in source order."""
    S = len(pools.ids)
    g = split_counts(n, generations)

    # Distinct split indices of each pool and the first rationale (pool order) of each. Each
    # temporary is dropped as soon as it is used: there are a few per generation (5M at G=32).
    pool = pools.gens.doc
    grp = np.repeat(np.arange(S, dtype=np.int32), pools.gens.counts)
    sidx = synth.column("split_index")[pool]
    sidx = np.where(sidx >= 0, sidx, synth.gen_indices[pool])
    order = np.lexsort((sidx, grp))  # stable: within (source, split), pool order
    grp, sidx = grp[order], sidx[order]
    first = np.ones(len(order), bool)
    first[1:] = (grp[1:] != grp[:-1]) | (sidx[1:] != sidx[:-1])
    u_grp, u_sidx, u_doc = grp[first], sidx[first], pool[order[first]]
    del grp, sidx, order, first
    distinct = np.bincount(u_grp, minlength=S)
    in_range = np.bincount(u_grp[(u_sidx >= 0) & (u_sidx < g[u_grp])], minlength=S)
    negative = np.bincount(u_grp[u_sidx < 0], minlength=S) > 0
    short = (g > 0) & ((in_range < g) | negative)
    extra = ~short & (distinct > g)
    ok = ~(short | extra)  # accepted pools hold exactly the split indices 0..g-1
    rats = u_doc[ok[u_grp]]  # (sum g[ok],) rationale i of each kept source, sources in order
    del u_doc
    kept = np.flatnonzero(ok)
    _, owner, cut = stretch_cuts(n[kept], generations)  # owner: the kept source's number in ``kept``
    bad = np.flatnonzero(~_split_points_ok(synth, rats, cut, real.manifest.get("tokenizer_fingerprint")))
    bad_pool = np.flatnonzero(~ok) if short_pool != "drop" else np.zeros(0, np.int64)
    # The first source in order with a problem decides the error (as a per-source loop would).
    if len(bad) and (not len(bad_pool) or kept[owner[bad[0]]] < bad_pool[0]):
        j = int(bad[0])
        i = j - int(np.searchsorted(owner, owner[j]))
        _raise_split_point(synth, int(rats[j]), i, int(cut[j]), pools.ids[int(kept[owner[j]])],
                           real.manifest.get("tokenizer_fingerprint"))
    if len(bad_pool):
        k = int(bad_pool[0])
        _raise_stretch_pool(pools.ids[k], u_sidx[u_grp == k], int(g[k]), generations, bool(short[k]))
    return ok, g, rats


# Sources laid out at a time by _stretch (G=32: ~130 pieces per source).
STRETCH_BLOCK_SOURCES = 8192


def _stretch_layout(gk, nk, dk, lk, rats, synth, bos: int, sbos: int, seos: int, n_open: int, n_close: int,
                    lit_src: int) -> tuple[np.ndarray, ...]:
    """(src, doc, start, length, newdoc) of consecutive stretched sources: per source g blocks of
    [segment, open?, rationale, close?], then the last segment; ``rats`` are their rationales."""
    has_open, has_close = n_open > 0, n_close > 0
    m = 2 + has_open + has_close
    counts = gk * m + 1
    ptr = running_offsets(counts)
    src_of = np.repeat(np.arange(len(gk)), counts)
    q = np.arange(int(ptr[-1])) - ptr[:-1][src_of]  # piece number inside its source
    block, role = q // m, q % m  # role 0: real segment; then open?, rationale, close?
    del q
    role = np.where(role == 0, 0, role + (not has_open))  # 1 open, 2 rationale, 3 close
    gq, nq = gk[src_of], nk[src_of]
    seg_lo = np.where(block == 0, 0, bos + (block * nq) // (gq + 1))
    seg_hi = np.where(block == gq, lk[src_of], bos + ((block + 1) * nq) // (gq + 1))
    del gq, nq
    rat_start = running_offsets(gk)[:-1]
    rat = np.zeros(len(block), np.int64)
    is_rat = role == 2
    rat[is_rat] = rats[rat_start[src_of[is_rat]] + block[is_rat]]
    rat_len = synth.offsets_full[rat + 1] - synth.offsets_full[rat] - sbos - seos
    src = np.select([role == 0, role == 2], [0, 1], lit_src).astype(np.int64)
    doc = np.select([role == 0, role == 2, role == 1], [dk[src_of], rat, 0], 1).astype(np.int64)
    start = np.select([role == 0, role == 2], [seg_lo, sbos], 0).astype(np.int64)
    length = np.select([role == 0, role == 2, role == 1], [seg_hi - seg_lo, rat_len, n_open], n_close).astype(np.int64)
    newdoc = (role == 0) & (block == 0)
    # Invariant: the real segments tile the stored document exactly, in order.
    real_seg = role == 0
    assert np.array_equal(np.bincount(src_of[real_seg], weights=length[real_seg], minlength=len(gk)), lk)
    return src, doc, start, length, newdoc


def _raise_stretch_pool(source: str, split_indices: np.ndarray, cuts: int, generations: int, short: bool) -> None:
    uniq = np.unique(split_indices)
    if short:
        raise ValueError(
            f"source {source!r} has rationales for split points {uniq.tolist()[:8]} but stretch with "
            f"G={generations} needs split_index 0..{cuts - 1} (fix: generate rationales with "
            f"--generations {generations}, or set data.short_pool=drop)"
        )
    raise ValueError(
        f"source {source!r} has rationales for {len(uniq)} split points but stretch with "
        f"G={generations} splits it at {cuts}: rationales are tied to the split they were "
        f"generated for (fix: set data.generations={len(uniq)} or regenerate with --generations {generations})"
    )


def _split_ok(meta: dict, cut: int, ours: str) -> bool:
    made_for, offset = meta.get("split_tokenizer"), meta.get("split_token_offset")
    return (made_for is None or made_for == ours) and (offset is None or int(offset) == int(cut))


def _split_points_ok(synth, rats: np.ndarray, cuts: np.ndarray, fingerprint: Optional[str]) -> np.ndarray:
    """(len(rats),) bool: rationale ``rats[j]``'s recorded split offset and tokenizer (when its row
    has them) are the training tokenization's ``cuts[j]``.

    Vectorised over the generation rows' JSON fields, a record batch at a time: a row mentioning
    each key at most once is read with a regular expression; a row that does not pass that way
    (a key twice, a value that is not a plain integer / string, or a real mismatch) is decided by
    ``json.loads``, so the answer is exactly the per-row one.
    """
    import json

    import pyarrow.compute as pc

    ours = f"tokens:{str(fingerprint)[:16]}"
    out = np.ones(len(rats), bool)
    for rows, meta in synth.meta_batches(rats):
        fast = np.ones(len(rows), bool)
        for key, pattern in (("split_token_offset", r'"split_token_offset": (?P<v>-?[0-9]{1,15})[,}]'),
                             ("split_tokenizer", r'"split_tokenizer": "(?P<v>[^"\\\\]*)"')):
            mentions = pc.count_substring(meta, f'"{key}"').to_numpy(zero_copy_only=False)
            match = pc.extract_regex(meta, pattern)
            value = pc.struct_field(match, [0])
            if key == "split_tokenizer":
                same = pc.equal(value, ours).fill_null(False).to_numpy(zero_copy_only=False)
            else:  # a row the pattern does not match gets -1, never a cut, and goes to json.loads
                found = pc.if_else(pc.is_valid(match), value, "-1")
                same = pc.cast(found, "int64").to_numpy(zero_copy_only=False) == cuts[rows]
            fast &= (mentions == 0) | ((mentions == 1) & same)
        for j in np.flatnonzero(~fast):  # the exact check, for the rows the fast one cannot certify
            out[rows[j]] = _split_ok(json.loads(meta[int(j)].as_py() or "{}"), int(cuts[rows[j]]), ours)
    return out


def _raise_split_point(synth, r: int, i: int, cut: int, source: str, fingerprint: Optional[str]) -> None:
    meta = synth.meta(r)
    made_for, offset = meta.get("split_tokenizer"), meta.get("split_token_offset")
    raise ValueError(
        f"source {source!r}: rationale {i} was generated for the split at token {offset} ({made_for}) but stretch "
        f"splits the training tokenization (tokens:{str(fingerprint)[:16]}) at token {cut} (fix: regenerate the "
        "rationales with tools/synthesize.py --task rationale --tokenizer <data.tokenizer>, or train with the "
        "tokenizer they were made for)"
    )


# ---------------------------------------------------------------------------------------------
# Public entry point


@dataclass
class ViewOptions:
    """The data.* keys a view reads (see config.DataConfig)."""

    view: str = "real"
    generations: int = 0
    include_real: bool = True
    real_position: str = "last"
    order: str = "generation"
    stretch_open: str = "<think>"
    stretch_close: str = "</think>"
    judge_min_score: Optional[float] = None
    short_pool: str = "error"
    seed: int = 42  # data seed (shuffled order within megadocs)

    @classmethod
    def from_config(cls, data: Any, seed: int) -> "ViewOptions":
        return cls(view=data.view, generations=int(data.generations), include_real=bool(data.include_real),
                   real_position=data.real_position, order=data.order, stretch_open=data.stretch_open,
                   stretch_close=data.stretch_close, judge_min_score=data.judge_min_score,
                   short_pool=data.short_pool, seed=seed)

    def validate(self) -> None:
        for key, value, allowed in (("view", self.view, VIEWS), ("real_position", self.real_position, REAL_POSITIONS),
                                    ("order", self.order, ORDERS), ("short_pool", self.short_pool, SHORT_POOL)):
            if value not in allowed:
                raise ValueError(f"data.{key}={value!r} is not one of {', '.join(allowed)}")
        if self.view != "real" and self.generations < 1:
            raise ValueError(f"data.view={self.view} needs data.generations >= 1 (G generations per source), got {self.generations}")


def real_fraction_excluded(real, heldout: Iterable[str], fraction: float, seed: int) -> IdSet:
    """Ids of the training sources that ``data.real_fraction`` leaves out (none at 1).

    The training sources (real store minus held out) are ranked by a seeded hash of their id and
    the first ``ceil(fraction * S)`` kept, so a subset is deterministic, does not depend on store
    order, and a smaller fraction keeps a subset of a larger one (nested, for a D-sweep). The
    hashes are one numpy array and the ids stay in Arrow (an :class:`IdSet`).
    """
    return document_ids(real, real_fraction_left_out(real, heldout, fraction, seed))


def document_ids(store, docs: np.ndarray) -> IdSet:
    """The ids of documents ``docs`` of a document store, as an :class:`IdSet` (a store's ids are
    unique: no ``unique`` pass)."""
    return IdSet(arrow_column(store, "source_id").take(docs), distinct=True)


def real_fraction_left_out(real, heldout: Iterable[str], fraction: float, seed: int) -> np.ndarray:
    """The real documents (ascending) whose ids :func:`real_fraction_excluded` leaves out."""
    from megadoc_pl.data.split import hash_keys

    if not 0 < fraction <= 1:
        raise ValueError(f"data.real_fraction must be in (0, 1], got {fraction}")
    docs, _ = _train_docs(real, id_set(heldout))
    keep = math.ceil(Fraction(str(fraction)) * len(docs))
    if keep >= len(docs):
        return np.zeros(0, np.int64)
    keys = hash_keys(arrow_column(real, "source_id").take(docs), f"megadoc_pl/real_fraction/{seed}/")
    return np.sort(docs[np.argsort(keys, kind="stable")[keep:]])


def real_units(real, heldout: Iterable[str] = ()) -> Units:
    """The real stream: one unit per training source, r(s) (its stored BOS/EOS included)."""
    docs, stats = _train_docs(real, id_set(heldout))
    g = Groups.single(0, docs, real.lengths[docs])
    return to_units(g, (real,), "real", stats)


def documents_units(store, docs: Optional[np.ndarray] = None, name: str = "documents") -> Units:
    """One unit per listed document of a store, in the given order (validation sets)."""
    docs = np.arange(store.num_documents) if docs is None else np.asarray(docs, np.int64)
    return to_units(Groups.single(0, docs, store.lengths[docs]), (store,), name, {"documents": int(len(docs))})


def build_view(real, synth, opts: ViewOptions, heldout: Iterable[str] = (),
               encode: Optional[Callable[[str], list[int]]] = None) -> Units:
    """The synthetic stream of ``opts.view`` (``real`` gives the real stream itself).

    Token sources of the result: 0 = real store, 1 = synthetic store, 2 = delimiter literals.
    ``encode`` (text -> token ids, no specials) is needed by the stretch views' delimiters.
    """
    units = _build_view(real, synth, opts, heldout, encode)
    if units.num_units == 0:
        raise ValueError(
            f"data.view={opts.view} with G={opts.generations} kept no source ({units.stats}) "
            "(fix: check data.generations against the generated pools, or data.judge_min_score)"
        )
    return units


def _build_view(real, synth, opts: ViewOptions, heldout: Iterable[str],
                encode: Optional[Callable[[str], list[int]]]) -> Units:
    opts.validate()
    heldout = id_set(heldout)
    if opts.view == "real":
        return real_units(real, heldout)
    task = VIEW_TASKS[opts.view][0]
    judge = opts.judge_min_score if opts.view in ("maga", "maga_stitch") else None
    name = opts.view
    if opts.view == "stretch":
        pools = _pools(real, synth, "rationale", heldout, 0, opts.short_pool, keep_all=True)
    else:
        pools = _pools(real, synth, task, heldout, opts.generations, opts.short_pool, judge)
    stats = dict(pools.stats)
    gens = pools.gens
    if opts.order == "shuffled":
        gens = _shuffle_within(gens, opts.seed)

    lit = None
    if uses_delimiters(opts.view):
        if encode is None:
            raise ValueError("stretch views need the tokenizer to encode data.stretch_open/stretch_close")
        lit = LiteralTokens([encode(opts.stretch_open), encode(opts.stretch_close)],
                            ["<stretch_open>", "<stretch_close>"])
    sources = (real, synth) + ((lit,) if lit is not None else ())

    if opts.view in ("rephrase", "maga", "self_distill"):
        parts = [gens]
        if opts.view in ("rephrase", "self_distill") and opts.include_real:
            parts.append(Groups.single(0, pools.real_docs, real.lengths[pools.real_docs]))
        return to_units(concat_groups(parts), sources, name, stats, split_each=True)

    if opts.view == "stretch" or opts.view == "stitch_stretch":
        if opts.view == "stretch":
            rat_pools = pools
        else:
            rat_pools = _pools(real, synth, "rationale", heldout, 0, opts.short_pool, keep_all=True)
            stats["rationale_sources_kept"] = rat_pools.stats["sources_kept"]
        stretched, ok = _stretch(real, synth, rat_pools, opts.generations, lit.tokens(0).tolist(),
                                 lit.tokens(1).tolist(), 2, opts.short_pool)
        stats["stretch_sources_dropped"] = int((~ok).sum())
        if opts.view == "stretch":
            stats["sources_kept"] = int(ok.sum())
            return to_units(stretched, sources, name, stats)
        # Hybrid: align the rephrase pools and the stretched originals on common sources.
        stretched_docs = rat_pools.real_docs[ok]
        both = np.intersect1d(pools.real_docs, stretched_docs)
        gens = gens.take(np.isin(pools.real_docs, both))
        real_part = stretched.take(np.isin(stretched_docs, both))
        del stretched, rat_pools, pools  # the view's peak is the concatenation below: hold no more than its parts
        stats["sources_kept"] = int(len(both))
    else:
        real_part = Groups.single(0, pools.real_docs, real.lengths[pools.real_docs])

    # stitch / maga_stitch / stitch_stretch: one megadoc per source.
    parts = {"last": [gens, real_part], "first": [real_part, gens], "none": [gens]}[opts.real_position]
    del gens, real_part
    for store in (real, synth):  # nothing below reads an index column: the concatenation is the peak
        store.release_columns()
    megadocs = concat_groups(parts)
    del parts
    return to_units(megadocs, sources, name, stats)
