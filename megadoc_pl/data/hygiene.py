"""Held-out hygiene: a validation set must share no document with the run's training sources.

``train_source_ids`` are the ids of everything the training streams were built from: the ids of
the real training documents *and* the ``source_id`` of every generation used (a rephrase of a
held-out document leaks it just as well as the document itself). Ids are compared as strings.

Ids are not enough: a corpus may hold the same text under two ids. Documents are therefore also
compared by a hash of their normalised text (:func:`text_hashes`: NFKC, case-folded, whitespace
collapsed), recorded by a document store while it is built (decoded from the tokens, once and
cached, for a store built before that). A training document whose text
equals a held-out one is excluded like the held-out document itself
(:func:`heldout_duplicates`), and an extra validation set that shares text with the training
documents is refused (:func:`check_content_disjoint`).
"""

from __future__ import annotations

import hashlib
import io
import unicodedata
from collections import abc
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

from megadoc_pl.utils import NotCached, atomic_write_bytes, json_fingerprint


class HeldoutOverlapError(ValueError):
    """A validation set shares documents with the training sources; ``str(e)`` is one line."""

    def __init__(self, message: str, overlaps: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.overlaps = overlaps  # set name -> sorted overlapping ids


def check_disjoint(
    train_source_ids: Iterable[str],
    val_sets: Mapping[str, Iterable[str]],
    max_examples: int = 3,
) -> None:
    """Raise :class:`HeldoutOverlapError` naming every set that shares ids with training.

    The message names each offending set, how many of its documents are training sources and
    a few example ids, and says how to fix it.
    """
    train = {str(i) for i in train_source_ids}
    overlaps: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for name, ids in val_sets.items():
        val = {str(i) for i in ids}
        sizes[name] = len(val)
        shared = sorted(val & train)
        if shared:
            overlaps[name] = shared
    if not overlaps:
        return
    parts = []
    for name, shared in overlaps.items():
        examples = ", ".join(repr(i) for i in shared[:max_examples])
        more = ", ..." if len(shared) > max_examples else ""
        parts.append(f"'{name}' shares {len(shared)} of {sizes[name]} documents (e.g. {examples}{more})")
    raise HeldoutOverlapError(
        "held-out hygiene: validation set "
        + "; ".join(parts)
        + " with the training sources of this run (fix: evaluate on documents held out by the run's "
        "split file, or rebuild the training data so it excludes them)",
        overlaps,
    )


def units_source_ids(units, among: Optional[Iterable[str]] = None) -> set[str]:
    """Source ids of every stored document a stream's units draw tokens from (only those in
    ``among``, when given).

    ``units`` is a ``megadoc_pl.data.units.Units``; token sources without ``source_ids``
    (delimiter literals) are skipped. For a generation store the source id is the id of the
    real document the generation was made from. Read from the store's Arrow index (no Python
    string per document: a paper-scale generation store has millions).
    """
    import pyarrow.compute as pc

    ids: set[str] = set()
    for s, src in enumerate(units.sources):
        if not hasattr(type(src), "source_ids"):  # on the class: the property itself builds an array
            continue
        used = np.zeros(src.num_documents, dtype=bool)  # documents drawn from (a mask: O(pieces), no sort)
        used[units.piece_doc[units.piece_src == s]] = True
        column = arrow_column(src, "source_id")
        if among is not None:
            used &= member_mask(column, among)
        ids.update(pc.unique(column.filter(used)).to_pylist())
    return ids


def arrow_column(store, name: str):
    """A store's index column as Arrow (no Python object per row); any object with ``column``."""
    return store.arrow_column(name) if hasattr(store, "arrow_column") else arrow_strings(store.column(name))


def arrow_strings(values):
    """Ids as Arrow strings: an Arrow array or column as it is, else each value's ``str``."""
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    return pa.array([str(v) for v in np.asarray(values, dtype=object)], pa.string())


_LARGE_BYTES = 1 << 31  # strings past this many bytes in one array need 64-bit offsets (large_string)


def one_string_array(values):
    """:func:`arrow_strings` as one contiguous array (value sets and sorts take one); a column of
    more than 2 GB of strings becomes one large_string array."""
    arr = arrow_strings(values)
    if not hasattr(arr, "combine_chunks"):
        return arr
    if arr.nbytes >= _LARGE_BYTES:
        import pyarrow as pa

        arr = arr.cast(pa.large_string())
    return arr.combine_chunks()


class IdSet(abc.Set):
    """A set of ids held as one Arrow string array of unique values: the ids ``data.real_fraction``
    leaves out of a 100M-document corpus are tens of millions (a Python set of them: ~5 GB).
    ``distinct=True`` says the given ids are already unique (a store's own ids), which skips
    Arrow's ``unique`` (~2 s for 5M ids). Unions with it (``ids | id_set``) stay in Arrow;
    :func:`member_mask` and :func:`~megadoc_pl.data.view_cache.ids_hash` read the array itself.
    Iterating yields Python strings, a chunk at a time (tests, small sets)."""

    def __init__(self, ids: Any = (), distinct: bool = False):
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(ids, IdSet):
            self.arrow = ids.arrow
            return
        arr = one_string_array(ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else list(ids))
        self.arrow = arr if distinct else pc.unique(arr)

    def __len__(self) -> int:
        return len(self.arrow)

    def __iter__(self) -> Iterator[str]:
        for lo in range(0, len(self.arrow), 1 << 20):
            yield from self.arrow.slice(lo, 1 << 20).to_pylist()

    def __contains__(self, value: object) -> bool:
        return bool(member_mask([str(value)], self)[0])

    def __or__(self, other: Iterable[str]) -> "IdSet":
        """The union; the larger side is scanned against the smaller one's values (a hash table of
        the few held-out ids, not of the millions left out)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        big, small = self.arrow, IdSet(other).arrow
        if len(small) > len(big):
            big, small = small, big
        if not len(small):
            return IdSet(big, distinct=True)
        small = small.cast(big.type)
        repeated = pc.is_in(big, value_set=small)
        if pc.any(repeated).as_py():
            big = big.filter(pc.invert(repeated))
        return IdSet(pa.chunked_array([big, small]), distinct=True)

    __ror__ = __or__


def id_set(ids: Iterable[str]):
    """``ids`` as a set: an :class:`IdSet` stays one (no Python string per id), anything else
    becomes a Python set."""
    return ids if isinstance(ids, IdSet) else set(ids)


def member_mask(values, members: Iterable[str]) -> np.ndarray:
    """Boolean mask of ``values`` (ids: an Arrow string column or an array of str) that are in
    ``members`` (ids, or an :class:`IdSet`), computed by Arrow (no Python object per value)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = arrow_strings(values)
    if isinstance(members, IdSet):
        value_set = members.arrow
    else:
        value_set = pa.array([str(m) for m in members], pa.string())
    if not len(value_set):
        return np.zeros(len(arr), dtype=bool)
    return pc.is_in(arr, value_set=value_set).to_numpy(zero_copy_only=False)


def check_units_disjoint(train_units, val_units: Mapping[str, object]) -> None:
    """:func:`check_disjoint` on units: training streams (None entries skipped) vs named sets.
    Only the training ids that some set lists are collected (Arrow finds them among all): a
    100M-document stream's ids as Python strings would take ~20 GB."""
    val = {name: units_source_ids(u) for name, u in val_units.items()}
    listed = set().union(*val.values())
    train: set[str] = set()
    for units in train_units:
        if units is not None:
            train |= units_source_ids(units, among=listed)
    check_disjoint(train, val)


# ------------------------------------------------------------------------------ content


def _nfkc(text: str) -> str:
    """unicodedata.normalize("NFKC", text), normalising only the lines that need it: a newline is a
    starter that decomposes to itself and composes with nothing, so NFKC works on each line alone.
    A web document with one ellipsis in 300 lines costs the quick check instead of a full
    normalisation (0.14 ms instead of 0.8 ms for 65k characters)."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    return "\n".join(line if unicodedata.is_normalized("NFKC", line) else unicodedata.normalize("NFKC", line)
                     for line in text.split("\n"))


def normalised_text_hash(text: str) -> int:
    """64-bit hash of a text after NFKC, case folding and whitespace collapsing."""
    text = _nfkc(text)
    norm = " ".join((text.lower() if text.isascii() else text.casefold()).split())  # the same on ASCII, 2x faster
    return int.from_bytes(hashlib.blake2b(norm.encode("utf-8"), digest_size=8).digest(), "little")


def text_hashes(store: Any, decode_batch: Callable[[list[list[int]]], list[str]],
                cache_dir: Optional[Path] = None, chunk: int = 4096, cached_only: bool = False) -> np.ndarray:
    """(num_documents,) uint64 normalised-text hashes of a token store's documents.

    A document store records them while it is built (column ``text_hash``, from the source text).
    For a store built before that, the texts are decoded from the stored tokens (``decode_batch``:
    token id lists -> texts); with ``cache_dir`` that result is kept there, named by the store and
    its content fingerprint. ``cached_only`` raises :class:`~megadoc_pl.utils.NotCached` instead
    of decoding.
    """
    if "text_hash" in getattr(getattr(store, "_index", None), "column_names", ()):
        return store.column("text_hash").astype(np.uint64)
    key = json_fingerprint({k: store.manifest.get(k) for k in ("inputs", "tokenizer_fingerprint", "num_tokens",
                                                                "num_documents")})[:16]
    cached = Path(cache_dir) / f"{Path(store.path).name}-{key}.npy" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        out = np.load(cached)
        if len(out) == store.num_documents:
            return out
    if cached_only:
        raise NotCached(f"text hashes of {store.path}")
    out = np.empty(store.num_documents, dtype=np.uint64)
    for lo in range(0, store.num_documents, chunk):
        hi = min(lo + chunk, store.num_documents)
        texts = decode_batch([store.content_tokens(i).tolist() for i in range(lo, hi)])
        out[lo:hi] = [normalised_text_hash(t) for t in texts]
    if cached is not None:
        buf = io.BytesIO()
        np.save(buf, out)
        atomic_write_bytes(cached, buf.getvalue())
    return out


def heldout_duplicates(ids: Any, hashes: np.ndarray, heldout: set[str]) -> set[str]:
    """Ids of documents that are not held out but whose normalised text equals a held-out
    document's (``ids``: an Arrow string column or an array of str)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    held = member_mask(ids, heldout)
    hashes = np.asarray(hashes, dtype=np.uint64)
    # a hash set of the held-out texts (a few thousand), probed by every document's hash
    dup = ~held & pc.is_in(pa.array(hashes), value_set=pa.array(hashes[held])).to_numpy(zero_copy_only=False)
    return set(arrow_strings(ids).filter(pa.array(dup)).to_pylist()) if dup.any() else set()


def check_content_disjoint(train_ids: np.ndarray, train_hashes: np.ndarray,
                           val_sets: Mapping[str, tuple[np.ndarray, np.ndarray]], max_examples: int = 3) -> None:
    """Refuse validation sets (name -> (ids, hashes)) sharing a normalised text with training documents."""
    # The first training document of every text, as arrays (a training corpus of 100M documents
    # holds no Python object per document): its hash, sorted, and its position.
    text, first = np.unique(np.asarray(train_hashes, dtype=np.uint64), return_index=True)
    train_ids = arrow_strings(train_ids)
    overlaps: dict[str, list[str]] = {}
    parts = []
    for name, (ids, hashes) in val_sets.items():
        hashes = np.asarray(hashes, dtype=np.uint64)
        at = np.minimum(np.searchsorted(text, hashes), max(len(text) - 1, 0))
        hit = np.flatnonzero(text[at] == hashes) if len(text) else np.zeros(0, np.int64)
        firsts = train_ids.take(first[at[hit]]).to_pylist()
        pairs = [(str(v), t) for v, t in zip(np.asarray(ids)[hit], firsts)]
        if pairs:
            overlaps[name] = [v for v, _ in pairs]
            examples = ", ".join(f"{v!r} = training {t!r}" for v, t in pairs[:max_examples])
            more = ", ..." if len(pairs) > max_examples else ""
            parts.append(f"'{name}' shares {len(pairs)} of {len(ids)} documents by text ({examples}{more})")
    if overlaps:
        raise HeldoutOverlapError(
            "held-out hygiene: validation set " + "; ".join(parts) + " with the training documents of this run "
            "(fix: evaluate on texts that are not in data.real, or remove those documents from data.real)",
            overlaps,
        )


def check_heldout_generations(source_ids: np.ndarray, heldout: set[str], drop: bool, split_file: Any) -> int:
    """Generations made from held-out documents: a one-line error, or (``drop``) their count to drop.

    A generation of a held-out document carries that document's text into training; the view
    excludes such generations, so they are an error unless dropping them is asked for.
    """
    import pyarrow.compute as pc

    held = member_mask(source_ids, heldout)
    n = int(held.sum())
    if n and not drop:
        sources = sorted(pc.unique(arrow_strings(source_ids).filter(held)).to_pylist())
        raise ValueError(
            f"data.synthetic holds {n} generations of {len(sources)} held-out documents (e.g. source {sources[0]!r}, "
            f"held out by {split_file}) (fix: generate with tools/synthesize.py --split-file {split_file}, which "
            "refuses held-out seeds, or set data.drop_heldout_generations=true to drop them)"
        )
    return n
