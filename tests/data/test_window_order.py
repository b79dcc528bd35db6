"""Window order (data.window_order): a seeded permutation of every pass's windows, O(1) per window."""

from __future__ import annotations

import numpy as np
import pytest

from megadoc_pl.data.datamodule import TrainBatchSampler
from megadoc_pl.data.mixture import paper_plan
from megadoc_pl.data.views import ViewOptions, build_view, real_units
from megadoc_pl.data import windows as windows_mod
from megadoc_pl.data.windows import StreamWindows, Windows, feistel_permute

from test_views import HELDOUT, make_corpus

T = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_path) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer_path)


@pytest.fixture(scope="module")
def units(corpus) -> tuple:
    R, S = corpus["real"], corpus["synth"]
    return real_units(R, HELDOUT), build_view(R, S, ViewOptions(view="stitch", generations=2, short_pool="drop"), HELDOUT)


def _perm(n: int, key: int) -> list[int]:
    return feistel_permute(np.arange(n), np.full(n, n), np.full(n, key, np.uint64)).tolist()


def test_feistel_is_a_bijection_of_every_size():
    for n in list(range(1, 130)) + [255, 256, 257, 1000]:  # powers of four and their neighbours included
        for key in (0, 7, 2**63 + 5):
            assert sorted(_perm(n, key)) == list(range(n)), (n, key)
    assert _perm(100, 1) != _perm(100, 2) and _perm(100, 1) != list(range(100))
    # Far into a pass of a billion windows: still O(1) per window, distinct and in range.
    r = np.array([0, 1, 999_999_998, 999_999_999, 123_456_789])
    out = feistel_permute(r, np.full(5, 10**9), np.full(5, 3, np.uint64))
    assert len(set(out.tolist())) == 5 and out.min() >= 0 and out.max() < 10**9
    n = 2**60 + 3  # bit widths are exact integers, not float logarithms
    out = feistel_permute(np.array([0, 1, n - 2, n - 1, 2**60]), np.full(5, n), np.full(5, 3, np.uint64))
    assert len(set(out.tolist())) == 5 and out.min() >= 0 and out.max() < n


def test_each_pass_visits_its_windows_exactly_once(units):
    for st_units, name in ((units[0], "real"), (units[1], "synthetic")):
        for seq_len in (T, 7, st_units.num_tokens + 3):  # a window longer than a pass too
            st = StreamWindows(st_units, seq_len, 5, name)
            passes = 5
            first, n = st.pass_windows(np.arange(passes + 1))
            assert first[0] == 0 and np.array_equal(first[1:], first[:-1] + n[:-1])  # the passes tile the windows
            # a pass's windows are those whose first token lies in it
            assert np.array_equal((np.arange(first[passes]) * seq_len) // st.pass_tokens,
                                  np.repeat(np.arange(passes), n[:passes]))
            read = st.stream_window(np.arange(first[passes]))
            for p in range(passes):
                block = read[first[p]:first[p] + n[p]]
                assert sorted(block.tolist()) == list(range(first[p], first[p] + n[p]))
            if seq_len == T:
                assert read.tolist() != sorted(read.tolist())
                seq = StreamWindows(st_units, seq_len, 5, name, window_order="sequential")
                assert seq.stream_window(np.arange(first[passes])).tolist() == list(range(first[passes]))


def test_tabulated_window_order_equals_the_walked_one(units, monkeypatch):
    # Passes up to TABULATE_WINDOWS windows look their permutation up in a cached table; larger
    # ones cycle-walk the Feistel network per draw. Both give the same windows, in any order of draws.
    st_units = units[1]
    st = StreamWindows(st_units, 7, 5, "synthetic", cache_passes=1)  # an LRU of one pass: refills
    first, _ = st.pass_windows(np.arange(6))
    draws = np.random.default_rng(0).permutation(int(first[5]))
    tabulated = np.concatenate([st.stream_window(d) for d in np.array_split(draws, 9)])
    assert len(st._window_cache) == 1
    monkeypatch.setattr(windows_mod, "TABULATE_WINDOWS", 0)
    walked = StreamWindows(st_units, 7, 5, "synthetic").stream_window(draws)
    assert tabulated.tolist() == walked.tolist()


def _windows(units, seed=1, order="shuffled"):
    ru, su = units
    plan = paper_plan(ru.num_tokens, 4, 0.75, 4, T, su.num_tokens)
    streams = {"real": StreamWindows(ru, T, seed, "real", window_order=order),
               "synthetic": StreamWindows(su, T, seed, "synthetic", window_order=order)}
    return Windows.from_plan(streams, plan, "document"), plan


def test_order_is_deterministic_seeded_and_keeps_the_fraction_rule(units):
    w, plan = _windows(units)
    idx = np.arange(plan.windows)
    tokens = w.tokens(idx)
    assert np.array_equal(tokens, _windows(units)[0].tokens(idx))
    assert not np.array_equal(tokens, _windows(units, seed=2)[0].tokens(idx))
    sequential = _windows(units, order="sequential")[0]
    assert not np.array_equal(tokens, sequential.tokens(idx))
    # Stream membership is the drawer's, untouched: floor(n w) synthetic windows after every prefix n.
    synthetic = np.array([w.describe(int(k))["stream"] == "synthetic" for k in idx])
    assert np.array_equal(np.cumsum(synthetic), (np.arange(1, plan.windows + 1) * 3) // 4)
    # Each window is its stream's sequential window at the permuted position.
    names = [st.name for st in w.streams]
    for k in (0, 1, 17, plan.windows - 1):
        d = w.describe(k)
        s = names.index(d["stream"])
        assert d["stream_window"] == int(w.streams[s].stream_window([d["stream_draw"]])[0])
        want = sequential.streams[s].clips(np.array([d["stream_window"]]))
        got = w.streams[s].clips(np.array([d["stream_draw"]]))
        assert np.array_equal(want.doc, got.doc) and np.array_equal(want.start, got.start)


def test_resume_mid_pass_and_rank_shards(units):
    w, plan = _windows(units)
    G, micro = plan.global_batch_size, 1
    full = [b for b in TrainBatchSampler(lambda: 0, plan.steps, G, G)]
    reference = np.concatenate([w.tokens(b) for b in full])
    # Resuming at a step inside the first real pass reproduces the rest exactly.
    mid = plan.steps_per_epoch // 2
    assert 0 < mid
    resumed = _windows(units)[0]
    rest = np.concatenate([resumed.tokens(b) for b in TrainBatchSampler(lambda: mid * G, plan.steps, G, G)])
    assert np.array_equal(rest, reference[mid * G:])
    # Ranks: disjoint, complete, and together the same windows per step as one process.
    for world in (2, 4):
        shards = [[b for b in TrainBatchSampler(lambda: 0, plan.steps, G, micro, r, world)] for r in range(world)]
        seen = sorted(i for s in shards for b in s for i in b)
        assert seen == list(range(plan.windows))
        for r, s in enumerate(shards):
            for b in s:
                assert np.array_equal(w.tokens(b), reference[b])
