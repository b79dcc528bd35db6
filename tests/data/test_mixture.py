"""Mixture plans (paper / budget) and per-sequence drawing: exact token accounting (docs/data-corpus.md)."""

from __future__ import annotations

from fractions import Fraction

import math

import numpy as np
import pytest

from megadoc_pl.data.mixture import StreamDrawer, as_fraction, budget_plan, paper_plan

# The megadocs setup (docs/papers.md, megadocs 1.1, 1.5, 4.1): 203,867,748 real tokens, 64 x 4096.
T_REAL = 203_867_748
S32 = 3_713_048_352  # the b32/s32 synthetic stream


@pytest.mark.parametrize(
    "E, w, syn_tokens, steps, syn_passes",  # docs/papers.md, megadocs 1.5 table: real only, w2s, s8, s32, b32
    [(16, 0.0, None, 12_432, None), (4, 0.75, 398_936_730, 12_432, 6.1), (8, 0.75, 967_660_703, 24_864, 5.1),
     (16, 0.75, S32, 49_728, 2.6), (32, 0.9, S32, 248_640, 15.8)],
)
def test_paper_plan_reproduces_the_papers_steps(E, w, syn_tokens, steps, syn_passes):
    plan = paper_plan(T_REAL, E, w, 64, 4096, syn_tokens)
    assert plan.steps_per_epoch == 777
    assert plan.steps == steps == int(777 * E / (1 - w) + 1e-9)
    assert plan.windows == steps * 64 and plan.tokens == steps * 64 * 4096
    real = plan.stream("real")
    # The real stream gets exactly E epochs of 777 batches (the paper's max_train_batches epoch).
    assert real.windows == E * 777 * 64
    assert real.tokens(4096) == E * 777 * 64 * 4096
    if w:
        syn = plan.stream("synthetic")
        assert syn.windows == plan.windows - real.windows
        assert round(syn.passes(4096), 1) == syn_passes
    else:
        assert [s.name for s in plan.streams] == ["real"]


def test_paper_plan_rounding_is_floor_of_exact_rationals():
    # 10 real batches per epoch, E=3, w=0.7: 10 * 3 / 0.3 = 100 exactly (floats give 99.999...).
    plan = paper_plan(10 * 4 * 8 + 7, 3, 0.7, 4, 8, 1000)
    assert plan.steps_per_epoch == 10 and plan.steps == 100
    # Not divisible: 10 * 1 / (1 - 2/3) = 30; 10 * 1 / (1 - 0.6) = 25; 7 * 1.5 / 0.25 = 42; 7 / 0.3 = 23.33 -> 23
    assert paper_plan(320, 1, 2 / 3, 4, 8, 10).steps == 30
    assert paper_plan(320, 1, 0.6, 4, 8, 10).steps == 25
    assert paper_plan(7 * 32, 1.5, 0.75, 4, 8, 10).steps == 42
    p = paper_plan(7 * 32, 1, 0.7, 4, 8, 10)
    assert p.steps == 23
    syn, real = p.stream("synthetic"), p.stream("real")
    assert syn.windows == (92 * 7) // 10 == 64 and real.windows == 92 - 64 == 28  # 28 = E*7*4 exactly here


def test_paper_plan_errors():
    with pytest.raises(ValueError, match=r"synthetic_fraction must be in \[0, 1\), got 1"):
        paper_plan(1000, 1, 1.0, 1, 10, 100)
    with pytest.raises(ValueError, match="needs a synthetic stream"):
        paper_plan(1000, 1, 0.5, 1, 10, None)
    with pytest.raises(ValueError, match="real_epochs must be > 0"):
        paper_plan(1000, 0, 0.0, 1, 10)
    with pytest.raises(ValueError, match="less than one global batch"):
        paper_plan(100, 1, 0.0, 4, 64)
    with pytest.raises(ValueError, match=r"synthetic_fraction must be in \[0, 1\)"):
        paper_plan(1000, 1, -0.1, 1, 10, 100)


def test_budget_plan_maga_entireset_expansion():
    # EntireSet MGA-Expansion (docs/papers.md, MAGA 12.2): 50B real x 2 + 200B MGA x 2 = 500B; units of 1e9 / 1e3.
    plan = budget_plan({"real": 50_000, "synthetic": 200_000}, 10, 100, stream_epochs={"real": 2, "synthetic": 2})
    assert plan.steps == 500_000 // 1000 == 500
    assert plan.stream("real").windows == 1000 and plan.stream("synthetic").windows == 4000
    assert plan.stream("real").passes(100) == 2.0 and plan.stream("synthetic").passes(100) == 2.0
    assert plan.stream("real").share == Fraction(1, 5)
    # With the same budget stated explicitly the plan is identical.
    same = budget_plan({"real": 50_000, "synthetic": 200_000}, 10, 100, budget_tokens=500_000,
                       stream_epochs={"real": 2, "synthetic": 2})
    assert same == plan


def test_budget_plan_weights_and_errors():
    # Subset MGA-Expansion shape: real x 1 fixed, the synthetic stream weighted into the rest.
    streams = {"real": 3_000, "synthetic": 10_000}
    with pytest.raises(ValueError, match=r"stream\(s\) \['synthetic'\]"):
        budget_plan(streams, 4, 10, budget_tokens=12_000, stream_epochs={"real": 1})
    plan = budget_plan(streams, 4, 10, budget_tokens=12_000, stream_epochs={"real": 1}, stream_weights={"synthetic": 1})
    assert plan.steps == 300 and plan.stream("real").windows == 300 and plan.stream("synthetic").windows == 900
    with pytest.raises(ValueError, match="names unknown stream"):
        budget_plan(streams, 4, 10, stream_epochs={"real": 1, "fineweb": 1, "synthetic": 1})
    with pytest.raises(ValueError, match="both epochs and a weight"):
        budget_plan(streams, 4, 10, budget_tokens=10, stream_epochs={"real": 1, "synthetic": 1}, stream_weights={"real": 1})
    with pytest.raises(ValueError, match="sum to 13000 tokens but budget_tokens is 20000"):
        budget_plan(streams, 4, 10, budget_tokens=20_000, stream_epochs={"real": 1, "synthetic": 1})
    with pytest.raises(ValueError, match="more than the budget"):
        budget_plan(streams, 4, 10, budget_tokens=1_000, stream_epochs={"real": 1}, stream_weights={"synthetic": 1})
    with pytest.raises(ValueError, match="needs data.mixture.budget_tokens"):
        budget_plan(streams, 4, 10, stream_weights={"real": 1, "synthetic": 3})


@pytest.mark.parametrize("w", [0.75, 0.9, 0.5, 2 / 3, 0.123, 0.01])
def test_two_stream_drawing_matches_w_at_every_prefix(w):
    d = StreamDrawer(["synthetic", "real"], [as_fraction(w), 1 - as_fraction(w)])
    n = 5000
    stream, index = d.locate(np.arange(n))
    syn = np.cumsum(stream == 0)
    k = np.arange(1, n + 1)
    wf = as_fraction(w)
    assert np.array_equal(syn, (k * wf.numerator) // wf.denominator)  # exactly floor(n w)
    assert np.all(np.abs(syn - k * float(wf)) < 1)
    # The rule itself: window k synthetic iff floor((k+1) w) > floor(k w).
    kk = np.arange(n)
    rule = ((kk + 1) * wf.numerator) // wf.denominator > (kk * wf.numerator) // wf.denominator
    assert np.array_equal(stream == 0, rule)
    # Index inside each stream counts that stream's earlier windows (0, 1, 2, ... per stream).
    for s in (0, 1):
        assert np.array_equal(index[stream == s], np.arange(int((stream == s).sum())))
    assert d.counts(n) == [int(syn[-1]), n - int(syn[-1])]


def test_three_stream_drawing_stays_within_two_windows():
    shares = [Fraction(1, 7), Fraction(3, 5), 1 - Fraction(1, 7) - Fraction(3, 5)]
    d = StreamDrawer(["a", "b", "c"], shares)
    n = 20000
    stream, index = d.locate(np.arange(n))
    k = np.arange(1, n + 1)
    for s, f in enumerate(shares):
        c = np.cumsum(stream == s)
        assert np.all(np.abs(c - k * float(f)) < 2)
        assert np.array_equal(index[stream == s], np.arange(int(c[-1])))
        assert d.counts(n)[s] == int(c[-1])
    # Random access equals the sequential answer.
    pick = np.array([19999, 3, 777, 0, 12345])
    s2, i2 = d.locate(pick)
    assert np.array_equal(s2, stream[pick]) and np.array_equal(i2, index[pick])


def test_plan_to_dict_has_per_stream_numbers():
    plan = paper_plan(T_REAL, 16, 0.75, 64, 4096, S32, real_units=164_000, synthetic_units=5_412_000)
    d = plan.to_dict()
    assert d["steps"] == 49_728 and d["tokens"] == 49_728 * 64 * 4096
    assert d["streams"]["real"]["passes"] == pytest.approx(15.99, abs=0.01)
    assert d["streams"]["synthetic"]["units_per_pass"] == 5_412_000
    assert d["streams"]["synthetic"]["fraction_of_tokens"] == 0.75


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_real_fraction_equals_the_per_id_rule_and_stays_in_arrow(tmp_path, chunk, monkeypatch):
    """The left-out ids equal the rule on Python strings (rank by stable_hash of the seeded id,
    ties by store order), for ids with quotes, non-ASCII and NUL, hashed a few at a time."""
    from megadoc_pl.data import split as split_mod
    from megadoc_pl.data.hygiene import IdSet
    from megadoc_pl.data.views import real_fraction_excluded
    from megadoc_pl.utils import stable_hash

    monkeypatch.setattr(split_mod, "_CHUNK", chunk)
    ids = [f"d{i}" for i in range(40)] + ['q"1', "é-2", "日本", "nul\x00x", "\u2028line", "Z"]
    real = _IdStore(ids)
    heldout = {"d3", "日本"}
    train = [i for i in ids if i not in heldout]
    for f, seed in ((0.3, 1), (0.5, 2), (0.77, 2)):
        keep = math.ceil(Fraction(str(f)) * len(train))
        rank = np.argsort([stable_hash(f"megadoc_pl/real_fraction/{seed}/{i}") for i in train], kind="stable")
        expect = {train[r] for r in rank[keep:]}
        out = real_fraction_excluded(real, heldout, f, seed)
        assert isinstance(out, IdSet) and set(out) == expect and len(out) == len(expect)
    assert len(real_fraction_excluded(real, heldout, 1.0, 0)) == 0


def test_real_fraction_subset_is_cached_and_a_torn_cache_is_computed_again(tmp_path, tiny_tokenizer_path, monkeypatch,
                                                                          capsys):
    import json

    from megadoc_pl.data import view_cache
    from megadoc_pl.data.store_build import build_store
    from megadoc_pl.data.views import real_fraction_excluded

    rows = "".join(json.dumps({"id": f"d{i}", "text": f"Document {i} of the mill."}) + "\n" for i in range(50))
    (tmp_path / "real.jsonl").write_text(rows)
    real = build_store(tmp_path / "real.jsonl", tiny_tokenizer_path, tmp_path / "store", progress=False)
    heldout, cache = {"d1", "d7"}, tmp_path / "cache"
    fresh = real_fraction_excluded(real, heldout, 0.4, seed=3)
    assert set(view_cache.cached_real_fraction(cache, real, heldout, 0.4, 3)) == set(fresh)
    (saved,) = (cache / "real_fraction").glob("*.npy")
    calls = []
    real_rule = view_cache.real_fraction_left_out
    monkeypatch.setattr(view_cache, "real_fraction_left_out", lambda *a: calls.append(a) or real_rule(*a))
    assert set(view_cache.cached_real_fraction(cache, real, heldout, 0.4, 3)) == set(fresh) and not calls  # read back
    other = view_cache.cached_real_fraction(cache, real, heldout, 0.6, 3)  # another fraction: its own file
    assert len(calls) == 1 and set(other) == set(real_fraction_excluded(real, heldout, 0.6, seed=3))
    assert len(list((cache / "real_fraction").glob("*.npy"))) == 2
    saved.write_bytes(saved.read_bytes()[:20])  # torn
    capsys.readouterr()
    assert set(view_cache.cached_real_fraction(cache, real, heldout, 0.4, 3)) == set(fresh)
    assert len(calls) == 2 and "unreadable" in capsys.readouterr().err
    assert set(view_cache.cached_real_fraction(cache, real, heldout, 0.4, 3)) == set(fresh) and len(calls) == 2
    assert len(view_cache.cached_real_fraction(cache, real, heldout, 1.0, 3)) == 0


def test_the_real_stream_is_cached_and_equals_the_computed_one(tmp_path, tiny_tokenizer_path, monkeypatch):
    import json

    from megadoc_pl.data import view_cache
    from megadoc_pl.data.store_build import build_store
    from megadoc_pl.data.views import real_fraction_excluded, real_units

    rows = "".join(json.dumps({"id": f"d{i}", "text": f"Document {i} of the mill."}) + "\n" for i in range(40))
    (tmp_path / "real.jsonl").write_text(rows)
    real = build_store(tmp_path / "real.jsonl", tiny_tokenizer_path, tmp_path / "store", progress=False)
    heldout, cache = {"d1", "d7"}, tmp_path / "cache"
    for f in (1.0, 0.5):
        left = view_cache.cached_real_fraction(cache, real, heldout, f, 3)
        want = real_units(real, heldout | set(real_fraction_excluded(real, heldout, f, seed=3)))
        got = view_cache.cached_real_units(cache, real, heldout, f, 3, left)
        for c in view_cache.COLUMNS:
            assert np.array_equal(getattr(got, c), getattr(want, c)), (f, c)
        assert got.stats == want.stats and got.name == "real"
    monkeypatch.setattr(view_cache, "real_units", lambda *a: 1 / 0)  # read back, not computed
    again = view_cache.cached_real_units(cache, real, heldout, 0.5, 3, left)
    assert isinstance(again.piece_doc, np.ndarray) and not again.piece_doc.flags.owndata  # mapped from the file
    assert np.array_equal(again.piece_doc, got.piece_doc)
    assert len(list((cache / "views").glob("real-*"))) == 2  # one per fraction


def test_id_sets_union_and_hash_like_python_sets():
    import pyarrow as pa

    from megadoc_pl.data.hygiene import IdSet, member_mask
    from megadoc_pl.data.view_cache import ids_hash

    big = IdSet(pa.array(["b", "é", "a", "b", "日本", "a\x00"]))
    assert len(big) == 5 and "é" in big and "c" not in big and set(big) == {"a", "b", "é", "日本", "a\x00"}
    both = {"x", "a"} | big  # a Python set on the left: the union stays an IdSet
    assert isinstance(both, IdSet) and set(both) == {"x", "a", "b", "é", "日本", "a\x00"} and len(both) == 6
    assert set(big | {"y"}) == set(big) | {"y"} and set(IdSet() | IdSet()) == set()
    for ids in (big, both, IdSet(), IdSet({"z"})):
        assert ids_hash(ids) == ids_hash(set(ids))  # a view cached under a Python set keeps its key
    column = pa.array(["a", "zz", "日本", "b"]).cast(pa.large_string())
    assert member_mask(column, big).tolist() == [True, False, True, True]
    assert member_mask(["q"], IdSet()).tolist() == [False]


class _IdStore:
    """Just what the real-fraction rule reads of a real store: ids."""

    def __init__(self, ids):
        import pyarrow as pa

        self.ids = pa.array(ids, pa.string())

    def arrow_column(self, name):
        assert name == "source_id"
        return self.ids


def test_real_fraction_subsets_are_nested_deterministic_and_exact(tmp_path, tiny_tokenizer_path):
    import json
    import math

    from megadoc_pl.data.store_build import build_store
    from megadoc_pl.data.views import real_fraction_excluded, real_units

    rows = "".join(json.dumps({"id": f"d{i}", "text": f"Document {i} of the mill."}) + "\n" for i in range(60))
    (tmp_path / "real.jsonl").write_text(rows)
    real = build_store(tmp_path / "real.jsonl", tiny_tokenizer_path, tmp_path / "store", progress=False)
    heldout = {"d3", "d10"}
    train = {f"d{i}" for i in range(60)} - heldout
    kept = {}
    for f in (0.1, 0.25, 0.5, 0.9, 1.0):
        out = real_fraction_excluded(real, heldout, f, seed=42)
        assert out == real_fraction_excluded(real, heldout, f, seed=42) and out <= train
        kept[f] = train - out
        assert len(kept[f]) == math.ceil(f * 58)  # 6, 15, 29, 53, 58 sources
        assert real_units(real, heldout | out).num_units == len(kept[f])
    fs = sorted(kept)
    assert all(kept[a] < kept[b] for a, b in zip(fs, fs[1:]))  # nested
    assert kept[0.5] != train - real_fraction_excluded(real, heldout, 0.5, seed=7)  # the seed decides the subset
    with pytest.raises(ValueError, match="data.real_fraction must be in"):
        real_fraction_excluded(real, heldout, 0.0, seed=42)


def test_real_fraction_seed_defaults_to_the_data_seed_and_can_be_fixed():
    from megadoc_pl.data.prepare import real_fraction_seed
    from megadoc_pl.recipes import compose_recipe

    assert real_fraction_seed(compose_recipe("baseline_real", ["train.data_seed=5"])) == 5
    fixed = compose_recipe("baseline_real", ["train.data_seed=5", "data.real_fraction_seed=0"])
    assert real_fraction_seed(fixed) == 0
