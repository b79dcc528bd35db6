"""Window order and location (docs/data-corpus.md, docs/ARCHITECTURE.md), vectorised numpy.

A stream is its units shuffled per pass (seed derived from (data_seed, stream, pass)) and the
passes concatenated, repeating forever. Stream window j is the ``seq_len + 1`` tokens starting
at stream token ``j * seq_len``: consecutive windows overlap by one token, so every token after
the first is a target exactly once. Locating a window is two binary searches (unit in its
pass, piece in its unit) on per-pass cumulative offsets; nothing iterates from the start.

Window order (``data.window_order``): the j-th window *drawn* from a stream is, for
``sequential``, stream window j. For ``shuffled`` (the papers' loader shuffles packed sequences)
the draws of one pass visit that pass's windows (those whose first token lies in the pass) in a
seeded pseudo-random order: a Feistel permutation of the pass's window numbers, keyed by
(data_seed, stream, pass), cycle-walked onto the exact count. O(1) per window and a pure
function of (recipe, seed, global index); a pass drawn from again is looked up in a table of
that permutation (the same values, computed once; see ``TABULATE_WINDOWS``).

A batch of global window indices is turned into *clips* (the parts of pieces that fall in each
window, in order), which :mod:`megadoc_pl.data.batch` packs into what a loader ships and unpacks
into the batch contract.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, get_args

import numpy as np

from megadoc_pl.config import WindowOrder
from megadoc_pl.data.batch import SCOPES, Clips, gather_tokens, pack, token_width, unpack
from megadoc_pl.data.mixture import MixturePlan, StreamDrawer
from megadoc_pl.data.units import Units, ranges, running_offsets
from megadoc_pl.utils import atomic_open, file_lock, get_logger, stable_hash

WINDOW_ORDERS = get_args(WindowOrder)
_FEISTEL_ROUNDS = 4  # Luby-Rackoff: four rounds of a pseudo-random function give a strong permutation
# A pass of at most this many windows has its window permutation tabulated on its second use
# (int32, 16 MB at most, LRU like the unit order): a batch's draws are then a lookup instead of a
# cycle walk whose slowest element sets the batch's time. Larger passes (17B+ tokens at T = 4096)
# and scattered draws walk.
TABULATE_WINDOWS = 1 << 22


def pass_seed(data_seed: int, stream: str, pass_index: int) -> int:
    """The shuffle seed of one pass of one stream (independent of everything else)."""
    return stable_hash(f"megadoc_pl/pass/{data_seed}/{stream}/{pass_index}")


def window_order_key(data_seed: int, stream: str, pass_index: int) -> int:
    """The key of the window permutation of one pass of one stream (independent of the unit shuffle)."""
    return stable_hash(f"megadoc_pl/window_order/{data_seed}/{stream}/{pass_index}")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy integer arrays wrap silently)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(r: np.ndarray, n: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Position ``r`` of a seeded bijection of ``[0, n)``, element-wise (``n`` and ``key`` per element).

    A balanced Feistel network on the smallest even bit width 2h with 4^h >= n is a bijection
    of ``[0, 4^h)``; cycle-walking (apply it again while the value is >= n) restricts it to a
    bijection of ``[0, n)``. Since 4^h < 4n, a walk takes under four applications on average.
    """
    r, n = np.asarray(r, np.int64), np.asarray(n, np.int64)
    assert np.all((0 <= r) & (r < n)), "feistel_permute: r outside [0, n)"
    sizes, which = np.unique(n, return_inverse=True)
    bits = np.array([max(int(v) - 1, 1).bit_length() for v in sizes], np.int64)[which.ravel()]  # 2^bits >= n
    h = ((bits + 1) // 2).astype(np.uint64)
    mask = (np.uint64(1) << h) - np.uint64(1)
    rkeys = [_mix64(np.asarray(key, np.uint64) + np.uint64(0x9E3779B97F4A7C15 * (i + 1) % 2**64))
             for i in range(_FEISTEL_ROUNDS)]
    x = r.astype(np.uint64)
    todo = np.arange(len(x))
    while len(todo):
        v, hh, mm = x[todo], h[todo], mask[todo]
        left, right = v >> hh, v & mm
        for rk in rkeys:
            left, right = right, left ^ (_mix64(right ^ rk[todo]) & mm)
        x[todo] = (left << hh) | right
        todo = todo[x[todo] >= n[todo].astype(np.uint64)]
    return x.astype(np.int64)


def _lengths_hash(lengths: np.ndarray):
    """blake2b of an array of lengths as int64 (names its arrays among shared files)."""
    return hashlib.blake2b(memoryview(np.ascontiguousarray(lengths, np.int64)), digest_size=12)


class SharedPasses:
    """Per-pass arrays (a stream's unit order, its window table; and, as pass 0, its offsets)
    computed once and memory-mapped by every process that needs them, through ``.npy`` files in
    ``root``.

    Without it each DataLoader worker (and each rank of a node) computes and holds its own copy of
    every pass: ~0.4 s and ~66 MB for a pass of 5.2M units. The first process to need a pass
    computes it under a lock on that pass (the others wait, then map the file), writes it whole
    (a temporary name, then a rename) and never changes it. A file that does not hold what its
    name says (wrong shape or type, unreadable) is computed again; where files cannot be written
    (a full or read-only disk) the arrays are computed in memory, the same values, with one
    warning. Only the newest ``keep`` passes of each name stay on disk; a process keeps reading
    its mapping of a deleted one. The temporary files of a writer killed mid-write are removed by
    the next process to hold that pass's lock (nobody else may: a live writer holds it).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 4):
        self.root, self.keep = Path(root), int(keep)
        self.failed: Optional[str] = None  # why files could not be written (then: memory only)

    def arrays(self, name: str, p: int, shapes: Sequence[tuple[int, np.dtype]],
               compute: Callable[[], Sequence[np.ndarray]]) -> tuple[np.ndarray, ...]:
        """The arrays of pass ``p`` of ``name`` (of these lengths and types), from their files or
        ``compute()``."""
        paths = [self.root / f"{name}-p{p}-{i}.npy" for i in range(len(shapes))]
        got = self._load(paths, shapes)
        if got is not None or self.failed:
            return got if got is not None else tuple(compute())
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with file_lock(self.root / f".{name}-p{p}.lock"):
                got = self._load(paths, shapes)  # another process may have made it while this one waited
                if got is not None:
                    return got
                for stale in self.root.glob(f".{name}-p{p}-*.tmp"):  # a writer killed mid-write (this lock is free)
                    stale.unlink(missing_ok=True)
                arrays = tuple(compute())
                for path, a in zip(paths, arrays):
                    with atomic_open(path) as f:
                        np.save(f, a, allow_pickle=False)
            self._evict(name, p)
        except OSError as e:
            self.failed = f"{type(e).__name__}: {e}"
            get_logger("data").warning(f"cannot share pass arrays under {self.root} ({self.failed}); "
                                       "each loader process computes its own (the same values, more CPU and memory)")
            return tuple(compute())
        return self._load(paths, shapes) or arrays  # the files just written, mapped: their pages are shared

    @staticmethod
    def _load(paths: Sequence[Path], shapes: Sequence[tuple[int, np.dtype]]) -> Optional[tuple[np.ndarray, ...]]:
        out = []
        for path, (n, dtype) in zip(paths, shapes):
            try:
                a = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError):  # missing, truncated, not an .npy file
                return None
            if a.shape != (n,) or a.dtype != np.dtype(dtype):
                return None
            out.append(a.view(np.ndarray))  # a plain view of the map: np.memmap pays a hook on every operation
        return tuple(out)

    def _evict(self, name: str, p: int) -> None:
        pattern = re.compile(rf"\.?{re.escape(name)}-p(\d+)(-\d+\.npy|\.lock)$")
        for path in self.root.iterdir():
            m = pattern.match(path.name)
            if m and int(m.group(1)) <= p - self.keep:
                path.unlink(missing_ok=True)


class StreamWindows:
    """Windows of one stream (shuffled per pass and repeated, or in order and finite).

    ``shuffle`` permutes the units of every pass; ``window_order`` the order in which a pass's
    windows are drawn (``shuffled`` | ``sequential``, see the module docstring). ``shared`` has
    the processes of a loader compute each pass's unit order and window table once
    (:class:`SharedPasses`) instead of once each.
    """

    def __init__(self, units: Units, seq_len: int, data_seed: int = 0, name: str = "", shuffle: bool = True,
                 repeat: bool = True, cache_passes: int = 2, window_order: str = "shuffled",
                 shared: Optional[SharedPasses] = None):
        if units.num_units == 0 or units.num_tokens == 0:
            raise ValueError(f"stream '{name or units.name}' has no tokens (every source was held out or dropped)")
        if window_order not in WINDOW_ORDERS:
            raise ValueError(f"data.window_order must be one of {', '.join(WINDOW_ORDERS)}, got {window_order!r}")
        assert repeat or window_order == "sequential", "a finite stream (validation) is read in order"
        self.units, self.seq_len, self.data_seed = units, int(seq_len), int(data_seed)
        self.name = name or units.name
        self.shuffle, self.repeat, self.window_order = shuffle, repeat, window_order
        self.shared = shared  # pass orders and window tables shared by a loader's processes (files)
        self._order_name: Optional[str] = None
        ptr = units.unit_ptr
        one_piece = units.num_pieces == units.num_units and bool((ptr[1:] > ptr[:-1]).all())
        # One piece a unit (the real stream, rephrases): a unit's tokens are its piece's and the
        # piece offsets are the unit offsets. 16 bytes a unit less (1.6 GB a rank at 100M
        # documents), and the lengths stay the cached view's shared pages.
        self.unit_tokens = units.piece_len if one_piece else units.unit_tokens
        units_hash = _lengths_hash(self.unit_tokens) if shared is not None else None
        if units_hash is not None:  # the pass orders are named now, before loader workers fork
            self._order_name = self._name_orders(units_hash)
        self.canon_start = self._offsets("units", self.unit_tokens, units_hash)
        self.piece_key = self.canon_start[:-1] if one_piece else self._offsets("pieces", units.piece_len)[:-1]
        self.pass_tokens = int(self.unit_tokens.sum())
        self._cache: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._window_cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._window_seen: set[int] = set()  # passes drawn from once: tabulated on the next draw
        self._cache_size = cache_passes

    def _offsets(self, what: str, lengths: np.ndarray, lengths_hash: Any = None) -> np.ndarray:
        """Running offsets of the units' or pieces' ``lengths`` in view order; with ``shared``
        computed once a node and mapped (8 bytes a unit: 0.8 GB a process at 100M documents),
        named by the hash of the lengths (``lengths_hash`` when already made)."""
        if self.shared is None:
            return running_offsets(lengths)
        name = f"{what}-{(lengths_hash or _lengths_hash(lengths)).hexdigest()}"
        return self.shared.arrays(name, 0, [(len(lengths) + 1, np.int64)], lambda: (running_offsets(lengths),))[0]

    @property
    def num_windows(self) -> int:
        """Windows available without repeating (finite streams: validation)."""
        return max((self.pass_tokens - 1) // self.seq_len, 0)

    def pass_windows(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first stream window, number of windows) of passes ``p``: the windows whose first token
        lies in the pass, i.e. ``j`` with ``floor(j * seq_len / pass_tokens) == p``."""
        p = np.asarray(p, np.int64)
        T, P = self.seq_len, self.pass_tokens
        first = -((-p * P) // T)  # ceil(p * P / T)
        return first, -((-(p + 1) * P) // T) - first

    def stream_window(self, j: np.ndarray) -> np.ndarray:
        """The stream window read by draw ``j`` of this stream (vectorised): ``j`` itself in
        ``sequential`` order, else the seeded permutation of ``j``'s pass applied to it."""
        j = np.asarray(j, np.int64)
        if self.window_order == "sequential" or len(j) == 0:
            return j
        p = (j * self.seq_len) // self.pass_tokens
        first, n = self.pass_windows(p)
        out = np.empty_like(j)
        walk = np.ones(len(j), bool)
        for q in np.unique(p).tolist():
            m = p == q
            table = self._window_permutation(q, int(n[m][0]))
            if table is not None:
                out[m] = first[m] + table[j[m] - first[m]]
                walk[m] = False
        if walk.any():
            passes, inverse = np.unique(p[walk], return_inverse=True)
            keys = np.array([window_order_key(self.data_seed, self.name, int(q)) for q in passes], np.uint64)
            out[walk] = first[walk] + feistel_permute(j[walk] - first[walk], n[walk], keys[inverse.ravel()])
        return out

    def _window_permutation(self, p: int, n: int) -> Optional[np.ndarray]:
        """The window permutation of pass p (its n windows) as a table, cached (LRU); None for a
        pass too large to tabulate or met for the first time (a dry run's or an inspection's
        scattered windows are walked; training comes back to a pass thousands of times)."""
        hit = self._window_cache.get(p)
        if hit is not None:
            self._window_cache.move_to_end(p)
            return hit
        if n > TABULATE_WINDOWS or p not in self._window_seen:
            self._window_seen.add(p)
            return None
        key = window_order_key(self.data_seed, self.name, p)

        def tabulate() -> tuple[np.ndarray]:
            return (feistel_permute(np.arange(n), np.full(n, n), np.full(n, key, np.uint64)).astype(np.int32),)

        if self.shared is not None:  # a table is a function of (seed, stream, pass, its size n): n is checked
            name = f"windows-{stable_hash(f'{self.data_seed}/{self.name}'):016x}"
            (table,) = self.shared.arrays(name, p, [(n, np.int32)], tabulate)
        else:
            (table,) = tabulate()
        self._window_cache[p] = table
        if len(self._window_cache) > self._cache_size:
            self._window_cache.popitem(last=False)
        return table

    @property
    def order_name(self) -> str:
        """The name of this stream's pass orders among shared files: they depend on the seed, the
        stream's name, whether it shuffles, and its units' lengths (hashed once, when first needed)."""
        if self._order_name is None:
            self._order_name = self._name_orders(_lengths_hash(self.unit_tokens))
        return self._order_name

    def _name_orders(self, units_hash) -> str:
        h = units_hash.copy()
        h.update(f"{self.data_seed}/{self.name}/{self.shuffle}".encode())
        return f"order-{h.hexdigest()}"

    def pass_order(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit permutation, cumulative token starts) of pass p, cached (LRU; a batch touches at
        most two consecutive passes unless a pass is shorter than a window)."""
        hit = self._cache.get(p)
        if hit is not None:
            self._cache.move_to_end(p)
            return hit
        U = self.units.num_units
        index_type = np.int32 if U < 2**31 else np.int64  # ~5M units per pass at G=32: halve the cache

        def order() -> tuple[np.ndarray, np.ndarray]:
            if self.shuffle:
                perm = np.random.default_rng(pass_seed(self.data_seed, self.name, p)).permutation(U)
            else:
                perm = np.arange(U)
            perm = perm.astype(index_type)
            return perm, running_offsets(self.unit_tokens[perm])

        if self.shared is not None:
            perm, starts = self.shared.arrays(self.order_name, p, [(U, index_type), (U + 1, np.int64)], order)
        else:
            perm, starts = order()
        self._cache[p] = (perm, starts)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return perm, starts

    def clips(self, j: np.ndarray, rows: Optional[np.ndarray] = None) -> Clips:
        """Clips of draws ``j`` of the stream (vectorised; each reads ``stream_window(j)``); ``rows``
        are their rows in the batch. Grouped by pass, not sorted: :meth:`Windows.clips` sorts."""
        j = np.asarray(j, dtype=np.int64)
        rows = np.arange(len(j)) if rows is None else np.asarray(rows, np.int64)
        if not self.repeat and len(j) and (j.min() < 0 or int(j.max()) >= self.num_windows):
            raise IndexError(f"stream '{self.name}' has {self.num_windows} windows, asked for {int(j.max())}")
        L, P = self.seq_len + 1, self.pass_tokens
        a = self.stream_window(j) * self.seq_len
        b = a + L
        p0, p1 = a // P, (b - 1) // P
        nseg = p1 - p0 + 1
        seg_win = np.repeat(np.arange(len(j)), nseg)
        seg_pass = ranges(p0, nseg)
        seg_lo = np.maximum(a[seg_win] - seg_pass * P, 0)
        seg_hi = np.minimum(b[seg_win] - seg_pass * P, P)
        seg_wpos = seg_pass * P + seg_lo - a[seg_win]
        parts = []
        for p in np.unique(seg_pass):
            m = np.flatnonzero(seg_pass == p)
            parts.append(self._clip_pass(int(p), seg_lo[m], seg_hi[m], seg_wpos[m], rows[seg_win[m]]))
        return Clips.concat(parts, sort=False)  # the caller sorts the clips of all streams once

    def _clip_pass(self, p: int, lo: np.ndarray, hi: np.ndarray, wpos: np.ndarray, row: np.ndarray) -> Clips:
        U = self.units
        perm, starts = self.pass_order(p)
        # Units overlapping each [lo, hi) of the pass.
        u_lo = np.searchsorted(starts, lo, side="right") - 1
        u_hi = np.searchsorted(starts, hi, side="left")
        cnt = u_hi - u_lo
        seg = np.repeat(np.arange(len(lo)), cnt)
        pos = ranges(u_lo, cnt)
        u = perm[pos]
        ustart = starts[pos]
        x_lo = np.maximum(lo[seg] - ustart, 0)
        x_hi = np.minimum(hi[seg] - ustart, self.unit_tokens[u])
        # Pieces overlapping [x_lo, x_hi) of each unit, found on the canonical piece offsets.
        g_lo = self.canon_start[u] + x_lo
        g_hi = self.canon_start[u] + x_hi
        # A unit read from its start begins at its first piece and one read to its end stops at
        # its last (pieces are never empty): only the units cut by a window's edges are searched.
        k_first = U.unit_ptr[u].astype(np.int64)
        k_last = U.unit_ptr[u + 1] - 1
        cut = x_lo > 0
        k_first[cut] = np.searchsorted(self.piece_key, g_lo[cut], side="right") - 1
        cut = x_hi < self.unit_tokens[u]
        k_last[cut] = np.searchsorted(self.piece_key, g_hi[cut] - 1, side="right") - 1
        kc = k_last - k_first + 1
        own = np.repeat(np.arange(len(u)), kc)
        k = ranges(k_first, kc)
        p_lo = self.piece_key[k]
        c_lo = np.maximum(g_lo[own], p_lo)
        c_hi = np.minimum(g_hi[own], p_lo + U.piece_len[k])
        skip = c_lo - p_lo
        s = seg[own]
        # Offset in the window: segment offset + (clip start in pass - segment start in pass).
        in_pass = ustart[own] + (c_lo - self.canon_start[u[own]])
        return Clips(
            row=row[s], wpos=wpos[s] + in_pass - lo[s], src=U.piece_src[k], doc=U.piece_doc[k],
            start=U.piece_start[k] + skip, n=c_hi - c_lo, newdoc=U.piece_newdoc[k] & (skip == 0),
            newunit=(k == U.unit_ptr[u[own]]) & (skip == 0), docpos=U.piece_docpos[k] + skip,
        )


class _SourceTable:
    """Token sources of several streams merged into one list (each stream's indices remapped)."""

    def __init__(self, streams: Sequence[StreamWindows]):
        self.sources: list = []
        self.remap: list[np.ndarray] = []
        for st in streams:
            idx = []
            for src in st.units.sources:
                for k, have in enumerate(self.sources):
                    if have is src:
                        idx.append(k)
                        break
                else:
                    self.sources.append(src)
                    idx.append(len(self.sources) - 1)
            self.remap.append(np.asarray(idx, np.int64))
        self.token_bytes = token_width(self.sources)

    def __getstate__(self) -> dict:
        # Token stores reopen from their paths in worker processes instead of pickling memmaps.
        state = dict(self.__dict__)
        state["sources"] = [("store", str(s.path)) if getattr(s, "path", None) is not None else s for s in self.sources]
        return state

    def __setstate__(self, state: dict) -> None:
        from megadoc_pl.data.store import TokenStore

        state["sources"] = [TokenStore.open(s[1]) if isinstance(s, tuple) else s for s in state["sources"]]
        self.__dict__.update(state)


class Windows:
    """Map-style windows: a pure function of (streams, plan, seed, global window index).

    ``windows[list_of_indices]`` returns a batch of the contract (one vectorised call per batch);
    ``windows.describe(k)`` gives the sources of window k.
    """

    def __init__(self, streams: Sequence[StreamWindows], drawer: StreamDrawer, seq_len: int, scope: str,
                 length: Optional[int] = None):
        if scope not in SCOPES:
            raise ValueError(f"attention scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.streams = list(streams)
        self.drawer = drawer
        self.seq_len, self.scope = int(seq_len), scope
        self.length = length  # number of windows (None: unbounded)
        self.table = _SourceTable(self.streams)
        names = [s.name for s in self.streams]
        if names != list(drawer.names):
            raise ValueError(f"streams {names} do not match the mixture's {list(drawer.names)}")

    @classmethod
    def from_plan(cls, streams: dict[str, StreamWindows], plan: MixturePlan, scope: str,
                  length: Optional[int] = None) -> "Windows":
        order = [s.name for s in plan.streams]
        missing = [n for n in order if n not in streams]
        if missing:
            raise ValueError(f"the mixture plan needs stream(s) {missing} but only {sorted(streams)} were built")
        return cls([streams[n] for n in order], plan.drawer(), plan.seq_len, scope,
                   plan.windows if length is None else length)

    @classmethod
    def sequential(cls, units: Units, seq_len: int, scope: str, max_windows: Optional[int] = None) -> "Windows":
        """A finite, unshuffled single stream (validation: held-out documents in order)."""
        from fractions import Fraction

        st = StreamWindows(units, seq_len, name=units.name or "val", shuffle=False, repeat=False,
                           window_order="sequential")
        n = st.num_windows if max_windows is None else min(st.num_windows, int(max_windows))
        return cls([st], StreamDrawer([st.name], [Fraction(1)]), seq_len, scope, n)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("this window set is unbounded")
        return self.length

    def clips(self, index: np.ndarray) -> Clips:
        index = np.asarray(index, np.int64)
        if len(index) and (index.min() < 0 or (self.length is not None and index.max() >= self.length)):
            raise IndexError(f"window index out of range [0, {self.length})")
        stream, local = self.drawer.locate(index)
        parts = []
        for s in np.unique(stream):
            m = np.flatnonzero(stream == s)
            c = self.streams[int(s)].clips(local[m], rows=m)
            c.src = self.table.remap[int(s)][c.src]
            parts.append(c)
        return Clips.concat(parts)

    def packed(self, index: Sequence[int], scope: Optional[str] = None, tensors: bool = True,
               alloc: Optional[Callable[[int], Any]] = None) -> dict:
        """The windows as a :func:`~megadoc_pl.data.batch.pack`-ed batch (what the loaders ship;
        :func:`~megadoc_pl.data.batch.unpack` expands it)."""
        index = np.asarray(index, np.int64)
        return pack(self.clips(index), self.table.sources, index, self.seq_len, scope or self.scope, tensors,
                    self.table.token_bytes, alloc)

    def batch(self, index: Sequence[int], scope: Optional[str] = None) -> dict:
        """The windows as a batch of the contract (see :func:`~megadoc_pl.data.batch.unpack`), on the CPU."""
        return unpack(self.packed(index, scope))

    def __getitem__(self, index) -> dict:
        if np.isscalar(index):
            return self.batch([int(index)])
        return self.batch(index)

    def tokens(self, index: Sequence[int]) -> np.ndarray:
        """(B, seq_len + 1) tokens of the windows, without the rest of the batch contract."""
        index = np.asarray(index, np.int64)
        return gather_tokens(self.clips(index), self.table.sources, len(index), self.seq_len + 1)

    def describe(self, k: int) -> dict:
        """Window k: its stream and, per clip, the source id, task, gen_index and token span."""
        c = self.clips(np.array([k]))
        stream, local = self.drawer.locate(np.array([k]))
        pieces = []
        for i in range(len(c.n)):
            src = self.table.sources[int(c.src[i])]
            d = int(c.doc[i])
            pieces.append({
                "source_id": src.source_id(d), "task": src.task(d), "gen_index": src.gen_index(d),
                "doc": d, "doc_start": int(c.start[i]), "doc_end": int(c.start[i] + c.n[i]),
                "window_start": int(c.wpos[i]), "window_end": int(c.wpos[i] + c.n[i]),
                "store": str(src.path) if getattr(src, "path", None) is not None else "<literal>",
            })
        st = self.streams[int(stream[0])]
        return {"index": int(k), "stream": st.name, "stream_draw": int(local[0]),
                "stream_window": int(st.stream_window(local)[0]), "pieces": pieces}


def window_rows(windows: Windows, start: int, count: int, decode: Callable[[np.ndarray], str]) -> list[dict]:
    """Windows [start, start + count) as JSON-able rows: tokens, decoded text, and the sources of every piece."""
    stop = min(start + count, len(windows))
    if start < 0 or start >= stop:
        raise ValueError(f"--start {start} is outside the {len(windows)} windows")
    idx = np.arange(start, stop)
    tokens = windows.tokens(idx)
    rows = []
    for row, k in enumerate(idx):
        d = windows.describe(int(k))
        rows.append({"index": int(k), "stream": d["stream"], "stream_window": d["stream_window"],
                     "tokens": tokens[row].tolist(), "text": decode(tokens[row]), "sources": d["pieces"]})
    return rows
