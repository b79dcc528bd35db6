"""Built corpus views cached beside the token stores, so a relaunch loads them in seconds.

A view's units are a pure function of the two stores' contents, the view options (seed
included), the excluded source ids and the delimiter tokens; the cache directory is named by a
hash of exactly those (``views/<view>-<key>``). It holds one ``.npy`` per column of
:class:`~megadoc_pl.data.units.Units` and ``view.json`` (name, statistics, delimiter tokens),
built under a temporary name and renamed (:func:`megadoc_pl.utils.atomic_dir`), so a killed
build leaves nothing a later run could read. Columns load with ``mmap_mode='r'``: a relaunch
reads no array until windows touch it, and DataLoader workers forked from the loader share the
pages instead of copying them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from megadoc_pl.data.hygiene import IdSet, id_set
from megadoc_pl.data.units import Units
from megadoc_pl.data.views import (LiteralTokens, ViewOptions, build_view, document_ids, real_fraction_left_out,
                                  real_units, uses_delimiters)
from megadoc_pl.utils import NotCached, atomic_dir, atomic_open, get_logger, json_fingerprint

CACHE_VERSION = 2  # bump when the meaning or layout of a cached view changes (2: int8/int32 piece columns)
COLUMNS = ("piece_src", "piece_doc", "piece_start", "piece_len", "piece_newdoc", "piece_docpos", "unit_ptr")
_log = get_logger("data")


def store_key(store) -> dict:
    """What identifies a token store's contents: input hashes, counts, options, block checksums."""
    m = store.manifest
    key = {k: m.get(k) for k in ("format_version", "kind", "tokenizer_fingerprint", "dtype", "add_bos", "add_eos",
                                 "num_documents", "num_tokens", "skip_bad_rows", "text_field", "id_field")}
    key["inputs"] = [(f.get("sha256"), f.get("size")) for f in m.get("inputs", [])]
    key["crc32"] = {name: f.get("crc32") for name, f in (m.get("checksums") or {}).get("files", {}).items()}
    return key


def ids_hash(ids: Iterable[str]) -> str:
    """sha256 of a set of ids (order-free): each id and a newline, in sorted order. An
    :class:`IdSet` is sorted by Arrow (UTF-8 byte order, which is code point order: the same
    digest) and hashed a chunk at a time."""
    h = hashlib.sha256()
    if isinstance(ids, IdSet):
        import pyarrow.compute as pc

        ranked = ids.arrow.take(pc.sort_indices(ids.arrow))
        for lo in range(0, len(ranked), 1 << 20):
            chunk = ranked.slice(lo, 1 << 20).to_pylist()
            h.update(("\n".join(chunk) + "\n").encode("utf-8"))
        return h.hexdigest()
    for i in sorted(str(i) for i in ids):
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def exclusion_key(real, excluded: Iterable[str], fraction: float, seed: int) -> dict:
    """What identifies the real sources a run leaves out of training: the store, the excluded ids
    (held out, and their text duplicates) and the ``data.real_fraction`` subset's fraction and seed.
    The subset is a function of these, so its ids (tens of millions at 100M documents: 50M took
    7.9 s to sort and hash) are not hashed themselves."""
    return {"real": store_key(real), "excluded": ids_hash(id_set(excluded)), "fraction": str(fraction),
            "seed": int(seed)}


def view_key(real, synth, opts: ViewOptions, heldout: Iterable[str], delimiters: Optional[list] = None,
             heldout_key: Optional[dict] = None) -> str:
    """The cache key of a view: everything its units depend on (``heldout`` by ``heldout_key``
    when given, see :func:`cached_view`)."""
    return json_fingerprint({"version": CACHE_VERSION, "real": store_key(real),
                             "synthetic": store_key(synth) if synth is not None else None,
                             "options": dataclasses.asdict(opts),
                             "excluded": ids_hash(heldout) if heldout_key is None else heldout_key,
                             "delimiters": delimiters})


def cached_view(cache_dir: Path, real, synth, opts: ViewOptions, heldout: Iterable[str] = (),
                encode: Optional[Callable[[str], list[int]]] = None, rebuild: bool = False,
                cached_only: bool = False, heldout_key: Optional[dict] = None) -> Units:
    """:func:`build_view`, loaded from ``cache_dir/views`` when built before with the same inputs.

    ``heldout_key`` names ``heldout`` in the cache key instead of a hash of its ids (an
    :func:`exclusion_key` for a ``data.real_fraction`` below 1); it must determine them. A cache
    that cannot be written (no room, read-only) costs a warning, not the run. ``cached_only``
    raises :class:`~megadoc_pl.utils.NotCached` instead of building.
    """
    heldout = id_set(heldout)
    delimiters = None
    if uses_delimiters(opts.view) and encode is not None:
        delimiters = [list(map(int, encode(opts.stretch_open))), list(map(int, encode(opts.stretch_close)))]
    key = view_key(real, synth, opts, heldout, delimiters, heldout_key)
    out = Path(cache_dir) / "views" / f"{opts.view}-{key[:16]}"
    if not rebuild and (out / "view.json").is_file():
        return load_units(out, real, synth)
    if cached_only:
        raise NotCached(f"{opts.view} view {out}")
    units = build_view(real, synth, opts, heldout, encode=encode)
    return _saved(out, units, real, synth, f"the {opts.view} view", rebuild)


def cached_real_units(cache_dir: Path, real, excluded: Iterable[str], fraction: float, seed: int,
                      left_out: Iterable[str] = (), cached_only: bool = False) -> Units:
    """The real stream, :func:`~megadoc_pl.data.views.real_units` of ``real`` without ``excluded``
    and ``left_out`` (the ``data.real_fraction`` subset of ``fraction`` and ``seed``, see
    :func:`cached_real_fraction`), cached like a view in ``cache_dir/views/real-<key>``: a relaunch
    maps its columns instead of computing them, and the ranks of a node share their pages (a
    100M-document stream is ~2.6 GB). Keyed by :func:`exclusion_key`, not by the left-out ids
    themselves."""
    key = json_fingerprint({"version": CACHE_VERSION, **exclusion_key(real, excluded, fraction, seed)})[:16]
    out = Path(cache_dir) / "views" / f"real-{key}"
    if (out / "view.json").is_file():
        return load_units(out, real, None)
    if cached_only:
        raise NotCached(f"real stream {out}")
    return _saved(out, real_units(real, id_set(excluded) | IdSet(left_out)), real, None, "the real stream")


def _saved(out: Path, units: Units, real, synth, what: str, overwrite: bool = False) -> Units:
    """``units`` saved at ``out`` and mapped back: the first run then holds them as a relaunch
    does (pages shared with loader workers and ranks, read on use) instead of the fresh arrays.
    A cache that cannot be written costs a warning and the fresh arrays."""
    try:
        save_units(out, units, overwrite=overwrite)
    except FileExistsError:
        pass  # another process saved the same units first
    except OSError as e:
        _log.warning(f"could not cache {what} in {out} ({e.strerror or e}): it is built again next launch")
        return units
    return load_units(out, real, synth)


def save_units(out: Path, units: Units, overwrite: bool = False) -> None:
    """Write ``units`` as a view cache directory (atomically)."""
    literals = [s for s in units.sources if isinstance(s, LiteralTokens)]
    assert len(units.sources) <= 3 and all(isinstance(s, LiteralTokens) for s in units.sources[2:]), \
        "views have sources (real, synthetic[, delimiters])"
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for c in COLUMNS:
            np.save(tmp / f"{c}.npy", np.ascontiguousarray(getattr(units, c)))
        meta = {"version": CACHE_VERSION, "name": units.name, "stats": units.stats, "num_sources": len(units.sources),
                "literals": [{"tokens": [s.tokens(i).tolist() for i in range(s.num_documents)], "names": s.names}
                             for s in literals]}
        (tmp / "view.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def load_units(path: Path, real, synth) -> Units:
    """A cached view's units, columns memory-mapped read-only."""
    meta = json.loads((path / "view.json").read_text(encoding="utf-8"))
    literals = [LiteralTokens(lit["tokens"], lit["names"]) for lit in meta["literals"]]
    sources = ((real, synth) + tuple(literals))[: meta["num_sources"]]
    # Plain ndarray views of the maps: np.memmap results pay a subclass hook on every operation.
    cols = {c: np.load(path / f"{c}.npy", mmap_mode="r").view(np.ndarray) for c in COLUMNS}
    return Units(sources, **cols, name=meta["name"], stats=meta["stats"])


def cached_real_fraction(cache_dir: Path, real, heldout: Iterable[str], fraction: float, seed: int,
                         cached_only: bool = False) -> IdSet:
    """:func:`~megadoc_pl.data.views.real_fraction_excluded`, its documents kept in
    ``cache_dir/real_fraction`` (named by the store's contents, the excluded ids, the fraction and
    the seed): ranking 100M ids by their hash takes ~2 minutes, and every launch and rank needs it.
    A cache that cannot be written costs a warning; one that cannot be read is computed again
    (``cached_only``: :class:`~megadoc_pl.utils.NotCached` is raised instead)."""
    if fraction == 1:
        return IdSet()
    key = json_fingerprint(exclusion_key(real, heldout, fraction, seed))[:16]
    path = Path(cache_dir) / "real_fraction" / f"{key}.npy"
    docs = None
    if path.is_file():
        try:
            docs = np.load(path)
        except (OSError, ValueError) as e:
            _log.warning(f"{path}: unreadable ({e}): the real_fraction subset is computed again")
    if docs is None or docs.dtype != np.int64 or docs.ndim != 1 or (len(docs) and int(docs[-1]) >= real.num_documents):
        if cached_only:
            raise NotCached(f"real_fraction subset {path}")
        docs = real_fraction_left_out(real, heldout, fraction, seed)
        try:
            with atomic_open(path) as f:
                np.save(f, docs, allow_pickle=False)
        except OSError as e:
            _log.warning(f"could not cache the real_fraction subset in {path} ({e.strerror or e}): "
                         "it is computed again next launch")
    return document_ids(real, docs)
