"""Validation split: determinism, disjointness, thresholds, the held-out cap, the split file."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from megadoc_pl.config import ValConfig
from megadoc_pl.data.split import (
    ensure_split,
    load_heldout_ids,
    load_split,
    make_split,
    split_from_store,
    train_ids,
)
from megadoc_pl.utils import stable_hash


def corpus(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"doc-{i}" for i in range(n)], rng.integers(1, 4000, size=n)


def oracle_order(ids, seed):
    return sorted(ids, key=lambda i: stable_hash(f"{seed}:{i}"))


def test_uncapped_sets_are_exact_prefixes_of_the_hash_order():
    ids, lengths = corpus(5000)
    val = ValConfig(num_iid=100, num_long=40, num_short=30, long_threshold=3000, short_threshold=200, split_seed=7)
    s = make_split(ids, lengths, val)
    length_of = dict(zip(ids, lengths.tolist()))
    order = oracle_order(ids, 7)
    assert s["sets"]["iid"] == order[:100]
    assert s["sets"]["long"] == [i for i in order if length_of[i] >= 3000][:40]
    assert s["sets"]["short"] == [i for i in order if length_of[i] < 200][:30]
    union = set(s["sets"]["iid"]) | set(s["sets"]["long"]) | set(s["sets"]["short"])
    assert set(s["heldout"]) == union and len(s["heldout"]) == len(union) == s["counts"]["heldout"]
    assert s["heldout"] == [i for i in order if i in union]  # listed in hash order
    assert not s["scaled"] and s["counts"]["iid"] == 100 and s["counts"]["long"] == 40 and s["counts"]["short"] == 30
    assert all(length_of[i] >= 3000 for i in s["sets"]["long"]) and all(length_of[i] < 200 for i in s["sets"]["short"])


def test_independent_of_input_order_and_seeded():
    ids, lengths = corpus(2000)
    val = ValConfig(num_iid=50, num_long=20, num_short=20)
    a = make_split(ids, lengths, val)
    perm = list(range(len(ids)))
    random.Random(3).shuffle(perm)
    b = make_split([ids[i] for i in perm], lengths[perm], val)
    assert a == b
    c = make_split(ids, lengths, ValConfig(num_iid=50, num_long=20, num_short=20, split_seed=99))
    assert c["heldout"] != a["heldout"]


def test_train_and_heldout_are_disjoint_and_cover_the_corpus(tmp_path):
    ids, lengths = corpus(1000)
    s = make_split(ids, lengths, ValConfig(num_iid=40, num_long=10, num_short=10))
    train = train_ids(s, ids)
    assert set(train).isdisjoint(s["heldout"])
    assert sorted(train + s["heldout"]) == sorted(ids)
    assert train == [i for i in ids if i not in set(s["heldout"])]  # caller's order kept


def test_small_corpus_holds_out_at_most_the_cap():
    ids, lengths = corpus(3000)  # demo scale with the default request (1000 + 500 + 500)
    s = make_split(ids, lengths, ValConfig())
    assert s["scaled"] and 0 < s["scale"] < 1
    assert s["counts"]["heldout"] == len(s["heldout"]) == 300  # exactly 10% of 3000
    assert s["counts"]["long"] >= 1 and s["counts"]["short"] >= 1
    tiny = make_split(["a", "b", "c", "d", "e"], [5, 5, 5, 5, 5], ValConfig())
    assert len(tiny["heldout"]) == 1  # at least one, never most of the corpus
    assert make_split(["only"], [3], ValConfig())["heldout"] == []
    half = make_split(ids, lengths, ValConfig(max_heldout_fraction=0.5))
    assert not half["scaled"] and half["counts"]["iid"] == 1000


def test_heldout_fraction_adds_documents():
    ids, lengths = corpus(1000)
    s = make_split(ids, lengths, ValConfig(num_iid=10, num_long=0, num_short=0, heldout_fraction=0.05))
    assert s["heldout"] == oracle_order(ids, 1234)[:50] and s["sets"]["iid"] == oracle_order(ids, 1234)[:10]


def test_bad_inputs():
    with pytest.raises(ValueError, match="not unique"):
        make_split(["a", "a"], [1, 2], ValConfig())
    with pytest.raises(ValueError, match="must be in"):
        make_split(["a", "b"], [1, 2], ValConfig(max_heldout_fraction=2.0))


def test_split_file_round_trip_and_store(tmp_path, tiny_tokenizer_path):
    from megadoc_pl.data.store_build import build_store

    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": "word " * (1 + i)}) + "\n" for i in range(40)))
    store = build_store(src, tiny_tokenizer_path, tmp_path / "store", progress=False)
    val = ValConfig(num_iid=3, num_long=2, num_short=2, long_threshold=30, short_threshold=5, max_heldout_fraction=0.5)
    path = tmp_path / "splits" / "split.json"
    s = ensure_split(store, val, path)
    assert path.is_file() and load_split(path) == json.loads(path.read_text())
    lengths = dict(zip(store.source_ids.tolist(), store.content_lengths.tolist()))
    assert all(lengths[i] >= 30 for i in s["sets"]["long"]) and all(lengths[i] < 5 for i in s["sets"]["short"])
    assert s == split_from_store(store, val)
    assert load_heldout_ids(path) == set(s["heldout"])
    # an existing file is what the pipeline uses (decided once, before generation)
    again = ensure_split(store, ValConfig(split_seed=5), path)
    assert again["heldout"] == s["heldout"]
    # training documents of the store = everything not held out
    keep = store.indices(load_heldout_ids(path), exclude=True)
    assert set(store.source_ids[keep].tolist()) == set(train_ids(path, store.source_ids.tolist()))


def test_malformed_split_files(tmp_path):
    p = tmp_path / "s.json"
    with pytest.raises(ValueError, match="no such split file"):
        load_split(p)
    p.write_text("{oops")
    with pytest.raises(ValueError, match=r"s.json:1: split file is not valid JSON"):
        load_split(p)
    p.write_text(json.dumps({"heldout": ["a"], "sets": {"iid": ["a", "b"]}}))
    with pytest.raises(ValueError, match="set 'iid' has ids that are not held out, e.g. 'b'"):
        load_heldout_ids(p)


TRICKY_IDS = ["doc-1", "é", "中文", "😀 grin", 'quote"d', "back\\slash", "new\nline", "tab\t", "nul\x00", "a", "a\x00",
              "\u2028", "Z", "zz" * 40, "123", "-1", "ǅ", "\U0010fffd"] + [f"w{i}" for i in range(60)]


@pytest.mark.parametrize("arrow", [False, True, "large"])
def test_vectorised_split_equals_the_rule_on_python_strings(arrow, monkeypatch):
    """make_split keeps its ids in Arrow (no Python object per document for a 100M-document
    corpus): the hash order, the sorted-ids fingerprint and the sets equal the per-id rule on
    Python strings, in small chunks and with ties forced by a coarse hash."""
    import pyarrow as pa

    from megadoc_pl.data import split as split_mod
    from megadoc_pl.utils import json_fingerprint

    monkeypatch.setattr(split_mod, "_CHUNK", 7)
    if arrow == "large":  # a column of more than 2 GB of ids: read as one large_string array
        from megadoc_pl.data import hygiene

        monkeypatch.setattr(hygiene, "_LARGE_BYTES", 0)
    ids = list(TRICKY_IDS)
    random.Random(0).shuffle(ids)
    lengths = np.arange(len(ids)) * 100
    given = pa.chunked_array([pa.array(ids[:30]), pa.array(ids[30:])]) if arrow else ids
    val = ValConfig(num_iid=9, num_long=5, num_short=4, max_heldout_fraction=1.0)
    for coarse in (False, True):
        if coarse:  # only 5 distinct keys: ties everywhere, broken by id
            monkeypatch.setattr(split_mod, "stable_hash", lambda text: stable_hash(text) % 5)
        key = split_mod.stable_hash
        for seed in (0, 1234):
            want = sorted(range(len(ids)), key=lambda i: (key(f"{seed}:{ids[i]}"), ids[i]))
            assert split_mod.hash_order(given, seed).tolist() == want
        s = make_split(given, lengths, val)
        want = sorted(range(len(ids)), key=lambda i: (key(f"1234:{ids[i]}"), ids[i]))
        assert s["ids_fingerprint"] == json_fingerprint(sorted(ids))
        assert s["sets"]["iid"] == [ids[i] for i in want[:9]]
        assert s["sets"]["long"] == [ids[i] for i in want if lengths[i] >= 2048][:5]
        assert s["sets"]["short"] == [ids[i] for i in want if lengths[i] < 512][:4]
        rank = {i: k for k, i in enumerate(want)}
        held = {ids[i] for i in want[:9]} | set(s["sets"]["long"]) | set(s["sets"]["short"])
        assert s["heldout"] == sorted(held, key=lambda x: rank[ids.index(x)])
    with pytest.raises(ValueError, match="not unique \\('w3' repeats\\)"):
        make_split(ids + ["w3"], np.arange(len(ids) + 1), val)


def test_missing_heldout_ids_reads_arrow_ids(tmp_path):
    import pyarrow as pa

    from megadoc_pl.data.split import missing_heldout_ids

    ids = pa.array(["a", "b", "c", "b"])
    assert missing_heldout_ids(tmp_path / "s.json", {"a", "b", "zz"}, ids) == 1
    assert missing_heldout_ids(tmp_path / "s.json", {"a"}, ["a", "b"]) == 0
    with pytest.raises(ValueError, match="none of its 1 held-out ids.*ids like 'a'"):
        missing_heldout_ids(tmp_path / "s.json", {"q"}, ids)
