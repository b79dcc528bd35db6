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


def test_normalised_text_hash_ignores_case_spacing_and_unicode_forms():
    from megadoc_pl.data.hygiene import normalised_text_hash

    a = normalised_text_hash("Alice built the mill.")
    assert a == normalised_text_hash("  ALICE built\n\tthe   mill. ") == normalised_text_hash("Alice built the mill.")
    assert a != normalised_text_hash("Alice built the mill!")


def test_heldout_duplicates_and_content_overlap():
    import numpy as np

    from megadoc_pl.data.hygiene import check_content_disjoint, heldout_duplicates

    ids = np.array(["a", "b", "c", "d"], dtype=object)
    hashes = np.array([1, 2, 1, 3], dtype=np.uint64)
    assert heldout_duplicates(ids, hashes, {"a"}) == {"c"}
    assert heldout_duplicates(ids, hashes, {"a", "c"}) == set()
    check_content_disjoint(ids[1:2], hashes[1:2], {"ood": (np.array(["x"]), np.array([3], dtype=np.uint64))})
    with pytest.raises(HeldoutOverlapError) as e:
        check_content_disjoint(ids, hashes, {"ood": (np.array(["x", "y"]), np.array([3, 9], dtype=np.uint64))})
    assert "'ood' shares 1 of 2 documents by text ('x' = training 'd')" in str(e.value)
    assert e.value.overlaps == {"ood": ["x"]}
    # Arrow ids (a large corpus): each overlap names the first training document of its text
    import pyarrow as pa

    many = pa.array(["t0", "t1", "t2", "t3", "t4"])
    with pytest.raises(HeldoutOverlapError) as e:
        check_content_disjoint(many, np.array([7, 5, 7, 5, 2], dtype=np.uint64),
                               {"s": (np.array(["v", "w", "u"]), np.array([5, 8, 7], dtype=np.uint64))})
    assert "'s' shares 2 of 3 documents by text ('v' = training 't1', 'u' = training 't0')" in str(e.value)
    assert heldout_duplicates(pa.chunked_array([["a", "b"], ["c", "d"]]), hashes, {"a"}) == {"c"}
    check_content_disjoint(pa.array([], pa.string()), np.zeros(0, np.uint64), {"s": (np.array(["v"]), np.array([5]))})


def test_nfkc_line_by_line_equals_nfkc_of_the_whole_text():
    """The line-wise NFKC behind the text hash equals unicodedata's on texts built to stress it:
    combining marks right after a newline, Hangul jamo and compatibility characters on either
    side of one, ligatures, full-width forms, and random code points from the whole range."""
    import random
    import unicodedata

    from megadoc_pl.data.hygiene import _nfkc

    rng = random.Random(0)
    alphabet = ["\n", "\n", " ", "a", "e", "\u0301", "\u0327", "\u0308", "\u1100", "\u1161", "\u11a8", "\uac00",
                "\u2026", "\ufb01", "\uff21", "\u00b4", "\u00a0", "\u2163", "\u0f73", "\u0b47", "\u0b3e", "\u3099"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) if rng.random() < 0.85 else chr(rng.randrange(0x20, 0x2FFFF))
                       for _ in range(rng.randrange(1, 40)))
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a surrogate code point: not a text a reader returns
            continue
        assert _nfkc(text) == unicodedata.normalize("NFKC", text), ascii(text)
    ascii_chars = "".join(map(chr, range(128)))
    assert ascii_chars.lower() == ascii_chars.casefold()  # the hash lower()s ASCII texts instead of casefold()
