"""Held-out hygiene: validation sets overlapping the training sources are refused, clearly."""

from __future__ import annotations

import pytest

from megadoc_pl.data.hygiene import HeldoutOverlapError, check_disjoint


def test_disjoint_sets_pass():
    check_disjoint(["a", "b"], {"iid": ["c", "d"], "long": [], "ood": ("e",)})


def test_overlap_names_each_set_count_and_examples():
    train = [f"doc{i}" for i in range(10)]
    with pytest.raises(HeldoutOverlapError) as e:
        check_disjoint(train, {"iid": ["doc1", "doc2", "doc3", "doc4", "x"], "short": ["y"], "long": ["doc9"]})
    msg = str(e.value)
    assert "\n" not in msg
    assert "'iid' shares 4 of 5 documents (e.g. 'doc1', 'doc2', 'doc3', ...)" in msg
    assert "'long' shares 1 of 1 documents (e.g. 'doc9')" in msg
    assert "'short'" not in msg and "fix:" in msg
    assert e.value.overlaps == {"iid": ["doc1", "doc2", "doc3", "doc4"], "long": ["doc9"]}
    assert isinstance(e.value, ValueError)


def test_ids_compare_as_strings():
    with pytest.raises(HeldoutOverlapError, match="'iid' shares 1 of 2"):
        check_disjoint([1, 2], {"iid": ["2", "3"]})
