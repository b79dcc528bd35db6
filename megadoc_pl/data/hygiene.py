"""Held-out hygiene: a validation set must share no document with the run's training sources.

``train_source_ids`` are the ids of everything the training streams were built from: the ids of
the real training documents *and* the ``source_id`` of every generation used (a rephrase of a
held-out document leaks it just as well as the document itself). Ids are compared as strings.
"""

from __future__ import annotations

from typing import Iterable, Mapping


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


def units_source_ids(units) -> set[str]:
    """Source ids of every stored document a stream's units draw tokens from.

    ``units`` is a ``megadoc_pl.data.views.Units``; token sources without ``source_ids``
    (delimiter literals) are skipped. For a generation store the source id is the id of the
    real document the generation was made from.
    """
    import numpy as np

    ids: set[str] = set()
    for s, src in enumerate(units.sources):
        if not hasattr(src, "source_ids"):
            continue
        docs = np.unique(units.piece_doc[units.piece_src == s])
        ids.update(str(x) for x in np.asarray(src.source_ids)[docs])
    return ids


def check_units_disjoint(train_units, val_units: Mapping[str, object]) -> None:
    """:func:`check_disjoint` on units: training streams (None entries skipped) vs named sets."""
    train: set[str] = set()
    for units in train_units:
        if units is not None:
            train |= units_source_ids(units)
    check_disjoint(train, {name: units_source_ids(u) for name, u in val_units.items()})
