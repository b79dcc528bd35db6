"""The validation split: which real documents are held out, decided once, before generation.

Rule (pure function of document ids, token lengths and the config; file order does not matter):

1. Order all documents by ``stable_hash(f"{seed}:{id}")``.
2. ``iid`` = the first ``num_iid`` documents in that order; ``long`` = the first ``num_long`` of the
   documents with ``content length >= long_threshold`` tokens; ``short`` = the first
   ``num_short`` with ``content length < short_threshold``; plus the first
   ``heldout_fraction * N`` documents as extra held-out (no set of its own). The sets are
   prefixes of the same order, so they overlap naturally (a long document in ``iid`` is also
   the first candidate for ``long``). Held out = the union.
3. Cap: the union may hold at most ``max_heldout_fraction`` of the corpus (at least one document
   when the corpus has two or more). When the requested sets would exceed it, every requested
   count is multiplied by the same factor, the largest one that fits, then ``iid`` is topped up
   (next documents in the order) until exactly the cap is held out; the file records
   ``"scaled": true`` with the factor. So a 3000-document demo holds out 300 documents, not 2000.

Lengths are content lengths (without BOS/EOS), so the split does not depend on those settings.
``split.json`` is written atomically; the generator calls :func:`load_heldout_ids` to refuse
held-out seeds, and training uses :func:`train_ids` / the store's ``indices(..., exclude=True)``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from megadoc_pl.data.hygiene import one_string_array
from megadoc_pl.utils import atomic_write_json, stable_hash

PathLike = Union[str, os.PathLike]
SPLIT_FORMAT_VERSION = 1
SET_NAMES = ("iid", "long", "short")
DEFAULT_MAX_HELDOUT_FRACTION = 0.1


def _val_get(val: Any, key: str, default: Any = None) -> Any:
    """Read a ValConfig / DictConfig / dict field."""
    if isinstance(val, Mapping):
        return val.get(key, default)
    return getattr(val, key, default)


_CHUNK = 1 << 20  # ids turned into Python strings at a time (a 100M-document corpus stays in Arrow)


def _chunks(arr) -> Iterable[list[str]]:
    for lo in range(0, len(arr), _CHUNK):
        yield arr.slice(lo, _CHUNK).to_pylist()


def hash_keys(ids: Any, prefix: str) -> np.ndarray:
    """(n,) uint64 ``stable_hash(prefix + id)`` of every id, a chunk of ids at a time."""
    arr = one_string_array(ids)
    return np.fromiter((stable_hash(prefix + i) for chunk in _chunks(arr) for i in chunk), np.uint64, len(arr))


def hash_order(ids: Any, seed: int) -> np.ndarray:
    """Indices of ``ids`` sorted by their seeded stable hash, ties (impossible in practice) by id.

    Vectorised for large corpora: the 64-bit keys are computed a chunk of ids at a time into one
    array and sorted by numpy; only equal keys, if any, are ordered by their ids.
    """
    arr = one_string_array(ids)
    keys = hash_keys(arr, f"{seed}:")
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    del keys
    tied = np.flatnonzero(ranked[1:] == ranked[:-1])
    if len(tied):
        starts = tied[np.r_[True, np.diff(tied) > 1]]  # first position of each run of equal keys
        for a in starts.tolist():
            b = a + 1
            while b < len(ranked) and ranked[b] == ranked[a]:
                b += 1
            group = order[a:b]
            names = arr.take(group).to_pylist()
            order[a:b] = group[sorted(range(len(group)), key=names.__getitem__)]
    return order.astype(np.int64, copy=False)


def _sorted_ids_fingerprint(arr) -> tuple[str, Optional[str]]:
    """``json_fingerprint(sorted(ids))`` without a Python list of all ids, and the first repeated
    id (None when every id is unique). Arrow sorts UTF-8 bytes, which is code point order: the
    order of Python's ``sorted``."""
    import hashlib

    import pyarrow.compute as pc

    ranked = arr.take(pc.sort_indices(arr))
    same = pc.equal(ranked.slice(1), ranked.slice(0, max(len(ranked) - 1, 0)))
    repeated = None
    if len(ranked) > 1 and pc.any(same).as_py():
        repeated = ranked[int(np.flatnonzero(same.to_numpy(zero_copy_only=False))[0])].as_py()
    h = hashlib.sha256(b"[")
    for k, chunk in enumerate(_chunks(ranked)):  # json.dumps of the whole list, one chunk at a time
        h.update((b"," if k else b"") + json.dumps(chunk, separators=(",", ":")).encode()[1:-1])
    h.update(b"]")
    return h.hexdigest(), repeated


def make_split(ids: Any, lengths: Sequence[int], val: Any) -> dict:
    """The split of documents ``ids`` (strings, or an Arrow string array: a 100M-document corpus
    holds no Python object per document) with content token ``lengths`` under ``val``
    (ValConfig-like)."""
    ids = one_string_array(ids)
    lengths_np = np.asarray(lengths, dtype=np.int64)
    if len(ids) != len(lengths_np):
        raise ValueError(f"make_split: {len(ids)} ids but {len(lengths_np)} lengths")
    ids_fingerprint, repeated = _sorted_ids_fingerprint(ids)
    if repeated is not None:
        raise ValueError(f"make_split: document ids are not unique ({repeated!r} repeats) "
                         "(fix: give every document a unique id)")
    seed = int(_val_get(val, "split_seed", 1234))
    long_t = int(_val_get(val, "long_threshold", 2048))
    short_t = int(_val_get(val, "short_threshold", 512))
    cap_frac = float(_val_get(val, "max_heldout_fraction", DEFAULT_MAX_HELDOUT_FRACTION))
    extra_frac = float(_val_get(val, "heldout_fraction", 0.0))
    if not 0.0 <= cap_frac <= 1.0 or not 0.0 <= extra_frac <= 1.0:
        raise ValueError(
            f"data.val.max_heldout_fraction={cap_frac} / heldout_fraction={extra_frac} must be in [0, 1] (fix: use a fraction)"
        )
    n = len(ids)
    requested = {
        "iid": int(_val_get(val, "num_iid", 1000)),
        "long": int(_val_get(val, "num_long", 500)),
        "short": int(_val_get(val, "num_short", 500)),
        "extra": int(math.floor(extra_frac * n)),
    }
    if any(v < 0 for v in requested.values()):
        raise ValueError(f"data.val set sizes must be >= 0, got {requested} (fix: use non-negative counts)")
    budget = max(1, int(math.floor(cap_frac * n))) if n >= 2 and cap_frac > 0 else 0

    order = hash_order(ids, seed)
    ordered_len = lengths_np[order]
    pools = {
        "iid": order,
        "extra": order,
        "long": order[ordered_len >= long_t],
        "short": order[ordered_len < short_t],
    }

    def choose(scale: float) -> dict[str, np.ndarray]:
        return {k: pools[k][: int(math.floor(requested[k] * scale))] for k in requested}

    def union_size(sets: dict[str, np.ndarray]) -> int:
        return len(np.unique(np.concatenate(list(sets.values())))) if sets else 0

    scale, scaled = 1.0, False
    chosen = choose(1.0)
    if union_size(chosen) > budget:
        # The union only grows with the scale: bisect for the largest factor that fits.
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if union_size(choose(mid)) <= budget:
                lo = mid
            else:
                hi = mid
        scale, scaled = lo, True
        chosen = choose(lo)
        # Flooring leaves the union a little under the cap: top iid up so exactly the cap is held out.
        n_iid = len(chosen["iid"])
        while union_size(chosen) < budget and n_iid < n:
            n_iid += 1
            chosen["iid"] = pools["iid"][:n_iid]
    heldout_idx = np.unique(np.concatenate(list(chosen.values())))
    # Keep sets and held-out ids in hash order: a deterministic, file-order-free listing.
    heldout_sorted = order[np.isin(order, heldout_idx)]
    return {
        "format_version": SPLIT_FORMAT_VERSION,
        "seed": seed,
        "num_documents": n,
        "long_threshold": long_t,
        "short_threshold": short_t,
        "max_heldout_fraction": cap_frac,
        "heldout_fraction": extra_frac,
        "requested": requested,
        "scaled": scaled,
        "scale": scale,
        "counts": {**{k: int(len(chosen[k])) for k in SET_NAMES}, "heldout": int(len(heldout_sorted))},
        "ids_fingerprint": ids_fingerprint,
        "heldout": ids.take(heldout_sorted).to_pylist(),
        "sets": {k: ids.take(chosen[k]).to_pylist() for k in SET_NAMES},
    }


def split_from_store(store: Any, val: Any) -> dict:
    """make_split over a real-document TokenStore (ids and content lengths)."""
    return make_split(store.arrow_column("source_id"), store.content_lengths, val)


def write_split(path: PathLike, split: dict, extra_sets: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``split`` atomically; ``extra_sets`` (name -> file) is recorded for reference."""
    out = dict(split)
    if extra_sets:
        out["extra_sets"] = {str(k): str(v) for k, v in extra_sets.items()}
    atomic_write_json(path, out)
    return Path(path)


def load_split(path: PathLike) -> dict:
    """Read and check a split file; one-line errors for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such split file (fix: check data.val.split_file, or let the pipeline compute one)")
    try:
        split = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}:{e.lineno}: split file is not valid JSON ({e.msg}) (fix: regenerate it)") from None
    if not isinstance(split, dict) or not isinstance(split.get("heldout"), list):
        raise ValueError(f"{p}: split file has no 'heldout' list (fix: regenerate it)")
    sets = split.setdefault("sets", {})
    if not isinstance(sets, dict):
        raise ValueError(f"{p}: split file 'sets' is not an object (fix: regenerate it)")
    heldout = set(split["heldout"])
    for name, members in sets.items():
        outside = [m for m in members if m not in heldout]
        if outside:
            raise ValueError(f"{p}: set '{name}' has ids that are not held out, e.g. {outside[0]!r} (fix: add them to 'heldout')")
    return split


def ensure_split(store: Any, val: Any, path: PathLike) -> dict:
    """The split at ``path``: loaded when the file exists, else computed from ``store`` and written."""
    p = Path(path)
    if p.exists():
        return load_split(p)
    split = split_from_store(store, val)
    write_split(p, split, _val_get(val, "extra", None) or None)
    return split


def missing_heldout_ids(path: PathLike, heldout: set[str], ids: Any) -> int:
    """How many held-out ids of a split file the corpus (``ids``: strings or an Arrow string
    array) lacks; refuses a file matching none."""
    if not heldout:
        return 0
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = one_string_array(ids)
    found = pc.count_distinct(ids.filter(pc.is_in(ids, value_set=pa.array(sorted(heldout), pa.string())))).as_py()
    if found == 0:
        example = ids[0].as_py() if len(ids) else None
        raise ValueError(
            f"{path}: none of its {len(heldout)} held-out ids is a document of the real corpus (e.g. "
            f"{sorted(heldout)[0]!r}; the corpus has ids like {example!r}) (fix: this split belongs to another corpus "
            "or data.id_field; give the matching data.val.split_file, or remove it to compute a new split)"
        )
    return len(heldout) - found


def load_heldout_ids(path: PathLike) -> set[str]:
    """Ids of every held-out document (what the generator must refuse as seeds)."""
    return set(load_split(path)["heldout"])


def train_ids(split: Union[dict, PathLike], ids: Iterable[str]) -> list[str]:
    """The ids among ``ids`` that are not held out, in the given order."""
    heldout = set((split if isinstance(split, dict) else load_split(split))["heldout"])
    return [i for i in ids if i not in heldout]
