"""Window assembly against a simple oracle, and the batch contract on constructed windows."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from megadoc_pl.data import batch as batch_mod
from megadoc_pl.data.mixture import paper_plan
from megadoc_pl.data.views import ViewOptions, build_view, documents_units, real_units
from megadoc_pl.data.windows import StreamWindows, Windows, pass_seed

from test_views import HELDOUT, make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_path) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer_path)


def _oracle_stream(units, seed: int, name: str, passes: int, shuffle: bool = True):
    """Tokens, doc-start / unit-start flags and doc positions of the first passes, by plain loops."""
    toks, newdoc, newunit, docpos = [], [], [], []
    for p in range(passes):
        order = (np.random.default_rng(pass_seed(seed, name, p)).permutation(units.num_units)
                 if shuffle else range(units.num_units))
        for u in order:
            for j, (s, d, a, n, nd, dp) in enumerate(units.unit(int(u))):
                src = units.sources[s]
                toks += src.tokens(d)[a:a + n].tolist()
                newdoc += [nd] + [False] * (n - 1)
                newunit += [j == 0] + [False] * (n - 1)
                docpos += list(range(dp, dp + n))
    return np.array(toks), np.array(newdoc), np.array(newunit), np.array(docpos)


def _oracle_batch(stream, j: int, T: int, scope: str) -> dict:
    toks, newdoc, newunit, docpos = stream
    sl = slice(j * T, j * T + T + 1)
    flags = {"window": np.zeros(T + 1, bool), "document": newdoc[sl], "megadoc": newunit[sl]}[scope][:T].copy()
    flags[0] = True
    seg = np.cumsum(flags) - 1
    pos = np.array([t - max(i for i in range(t + 1) if flags[i]) for t in range(T)])
    return {"tokens": toks[sl], "segment_ids": seg, "position_ids": pos, "doc_positions": docpos[sl][:T]}


@pytest.mark.parametrize("gather", ["runs", "fancy_index"])
@pytest.mark.parametrize("scope", ["window", "document", "megadoc"])
@pytest.mark.parametrize("view", ["stitch", "stretch"])
def test_stream_windows_match_the_oracle_across_passes(corpus, scope, view, gather, monkeypatch):
    # tokens are copied run by run (few runs) or by one fancy-index read (many): both are exact
    monkeypatch.setattr(batch_mod, "LOOP_RUNS_PER_TOKEN", 1.0 if gather == "runs" else 0.0)
    units = build_view(corpus["real"], corpus["synth"], ViewOptions(view=view, generations=2, short_pool="drop"),
                       HELDOUT, encode=corpus["info"].encode)
    T = 23  # windows straddle units, pieces and pass boundaries
    st = StreamWindows(units, T, data_seed=7, name="synthetic", window_order="sequential")
    passes = 4
    oracle = _oracle_stream(units, 7, "synthetic", passes)
    n = (len(oracle[0]) - 1) // T
    w = Windows([st], _single(st), T, scope, None)
    idx = np.random.default_rng(0).permutation(n)  # random access, in any order
    batch = w.batch(idx)
    for row, j in enumerate(idx):
        o = _oracle_batch(oracle, int(j), T, scope)
        assert batch["input_ids"][row].tolist() == o["tokens"][:T].tolist()
        assert batch["targets"][row].tolist() == o["tokens"][1:].tolist()
        assert batch["segment_ids"][row].tolist() == o["segment_ids"].tolist()
        assert batch["position_ids"][row].tolist() == o["position_ids"].tolist()
        assert batch["doc_positions"][row].tolist() == o["doc_positions"].tolist()
    assert batch["window_index"].tolist() == idx.tolist()
    # cu_seqlens / max_seqlen agree with segment_ids over the flattened batch.
    seg = batch["segment_ids"]
    new = torch.ones_like(seg, dtype=torch.bool)
    new[:, 1:] = seg[:, 1:] != seg[:, :-1]
    starts = torch.nonzero(new.flatten()).flatten()
    assert batch["cu_seqlens"].tolist() == starts.tolist() + [seg.numel()]
    assert batch["max_seqlen"] == int(torch.diff(batch["cu_seqlens"]).max())


@pytest.mark.parametrize("gather", ["runs", "fancy_index"])
def test_windows_over_consecutive_documents_copy_whole_runs(corpus, gather, monkeypatch):
    # Validation reads real documents in store order: a window's clips follow each other in the
    # token file and are copied as one run. Both copy paths equal the oracle.
    monkeypatch.setattr(batch_mod, "LOOP_RUNS_PER_TOKEN", 1.0 if gather == "runs" else 0.0)
    units = real_units(corpus["real"], HELDOUT)
    T = 37
    w = Windows.sequential(units, T, "document")
    toks = _oracle_stream(units, 0, units.name, 1, shuffle=False)[0]
    idx = np.arange(len(w))[::-1]
    clips = w.clips(idx)
    first = np.array([units.sources[s].offsets_full[d] + a for s, d, a in zip(clips.src, clips.doc, clips.start)])
    assert ((clips.src[1:] == clips.src[:-1]) & (first[1:] == first[:-1] + clips.n[:-1])).any()  # some run of 2+ clips
    batch = w.batch(idx)
    for row, j in enumerate(idx):
        assert batch["input_ids"][row].tolist() == toks[j * T:j * T + T].tolist()
        assert batch["targets"][row].tolist() == toks[j * T + 1:j * T + T + 1].tolist()


def _single(st):
    from fractions import Fraction

    from megadoc_pl.data.mixture import StreamDrawer

    return StreamDrawer([st.name], [Fraction(1)])


def test_window_longer_than_a_pass_spans_several_passes(corpus):
    units = real_units(corpus["real"], HELDOUT)
    T = units.num_tokens + 5  # one window covers more than a whole pass
    st = StreamWindows(units, T, data_seed=3, name="real", window_order="sequential")
    oracle = _oracle_stream(units, 3, "real", 8)
    got = Windows([st], _single(st), T, "document").tokens([2, 0, 1])
    for row, j in enumerate([2, 0, 1]):
        assert got[row].tolist() == oracle[0][j * T: j * T + T + 1].tolist()


def test_batch_contract_exact_for_a_constructed_window(corpus):
    """Two stitched megadocs [g0 g1 r] in order; check every field by hand."""
    R, S = corpus["real"], corpus["synth"]
    units = build_view(R, S, ViewOptions(view="stitch", generations=2, short_pool="drop"), HELDOUT)
    lens = [[int(n) for (_, _, _, n, _, _) in units.unit(u)] for u in range(2)]
    a0, a1, a2 = lens[0]
    b0 = lens[1][0]
    T = a0 + a1 + a2 + b0 + 3  # the window covers megadoc 0 and the first 4 tokens of megadoc 1's g1
    w = Windows.sequential(units, T, "document")
    batch = w.batch([0])
    cuts = np.cumsum([0, a0, a1, a2, b0])  # document starts inside the window
    exp_doc = np.zeros(T, int)
    for c in cuts[1:]:
        exp_doc[c:] += 1
    assert batch["segment_ids"][0].tolist() == exp_doc.tolist()
    assert batch["cu_seqlens"].tolist() == [0, a0, a0 + a1, a0 + a1 + a2, a0 + a1 + a2 + b0, T]
    assert batch["max_seqlen"] == max(a0, a1, a2, b0, 3)
    exp_pos = np.concatenate([np.arange(a0), np.arange(a1), np.arange(a2), np.arange(b0), np.arange(3)])
    assert batch["position_ids"][0].tolist() == exp_pos.tolist()
    assert batch["doc_positions"][0].tolist() == exp_pos.tolist()
    # megadoc scope: one boundary, at the start of megadoc 1.
    mb = w.batch([0], scope="megadoc")
    unit1 = a0 + a1 + a2
    assert mb["segment_ids"][0].tolist() == [0] * unit1 + [1] * (T - unit1)
    assert mb["cu_seqlens"].tolist() == [0, unit1, T]
    assert mb["position_ids"][0].tolist() == list(range(unit1)) + list(range(T - unit1))
    assert mb["doc_positions"][0].tolist() == exp_pos.tolist()  # document positions ignore the scope
    # window scope: one segment, positions 0..T-1.
    wb = w.batch([0], scope="window")
    assert wb["segment_ids"][0].tolist() == [0] * T and wb["cu_seqlens"].tolist() == [0, T]
    assert wb["position_ids"][0].tolist() == list(range(T)) and wb["max_seqlen"] == T
    # The second window starts mid-document: positions restart, document positions do not.
    b2 = Windows.sequential(units, 4, "document").batch([1])
    assert b2["position_ids"][0].tolist() == [0, 1, 2, 3] and b2["doc_positions"][0].tolist() == [4, 5, 6, 7]
    for key, dtype in (("input_ids", torch.int64), ("targets", torch.int64), ("segment_ids", torch.int32),
                       ("cu_seqlens", torch.int32), ("position_ids", torch.int64), ("doc_positions", torch.int64),
                       ("window_index", torch.int64)):
        assert batch[key].dtype == dtype, key


def test_mixture_windows_determinism_and_seed(corpus):
    R, S = corpus["real"], corpus["synth"]
    ru = real_units(R, HELDOUT)
    su = build_view(R, S, ViewOptions(view="stitch", generations=2, short_pool="drop"), HELDOUT)
    T = 16
    plan = paper_plan(ru.num_tokens, 2, 0.75, 2, T, su.num_tokens)

    def make(seed):
        streams = {"real": StreamWindows(ru, T, seed, "real"), "synthetic": StreamWindows(su, T, seed, "synthetic")}
        return Windows.from_plan(streams, plan, "document")

    a, b, c = make(1), make(1), make(2)
    idx = np.arange(plan.windows)
    ta = a.tokens(idx)
    assert np.array_equal(ta, b.tokens(idx))
    assert not np.array_equal(ta, c.tokens(idx))
    # Window k is the same whether fetched alone, in a batch, or after others (no hidden state).
    for k in (0, 5, plan.windows - 1):
        assert np.array_equal(make(1).tokens([k])[0], ta[k])
    # Each stream's windows are its own oracle stream's windows, in the order of its window permutation.
    stream, local = plan.drawer().locate(idx)
    for s, (name, units) in enumerate((("synthetic", su), ("real", ru))):
        read = a.streams[s].stream_window(local[stream == s])
        assert read.tolist() != local[stream == s].tolist()  # the default order is shuffled
        oracle = _oracle_stream(units, 1, name, -(-((int(read.max()) + 1) * T + 1) // units.num_tokens))[0]
        for k, j in zip(np.flatnonzero(stream == s), read.tolist()):
            assert ta[k].tolist() == oracle[j * T: j * T + T + 1].tolist()
    with pytest.raises(IndexError):
        a.tokens([plan.windows])


def test_describe_names_sources_and_spans(corpus):
    R = corpus["real"]
    units = documents_units(R, np.array([0, 1]), "iid")
    n0 = int(R.lengths[0])
    w = Windows.sequential(units, n0, "document")
    d = w.describe(0)
    assert d["stream"] == "iid" and d["stream_window"] == d["stream_draw"] == 0
    assert [(p["source_id"], p["doc_start"], p["doc_end"], p["window_start"], p["window_end"]) for p in d["pieces"]] == [
        ("d0", 0, n0, 0, n0), ("d1", 0, 1, n0, n0 + 1)]
    assert len(w) == (n0 + int(R.lengths[1]) - 1) // n0


def test_workers_get_a_picklable_dataset(corpus):
    import pickle

    units = real_units(corpus["real"], HELDOUT)
    w = Windows.sequential(units, 8, "document")
    clone = pickle.loads(pickle.dumps(w))
    assert np.array_equal(clone.tokens([0, 3]), w.tokens([0, 3]))
    assert len(pickle.dumps(w)) < 100_000  # stores travel as paths, not as token arrays


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unpack_on_the_gpu_equals_the_cpu(corpus):
    # The datamodule unpacks on the training device: the contract must not depend on where.
    from megadoc_pl.data.batch import unpack

    units = build_view(corpus["real"], corpus["synth"], ViewOptions(view="stitch", generations=2, short_pool="drop"),
                       HELDOUT, encode=corpus["info"].encode)
    st = StreamWindows(units, 23, data_seed=7, name="synthetic")
    for scope in ("window", "document", "megadoc"):
        w = Windows([st], _single(st), 23, scope, None)
        packed = w.packed(np.arange(16))
        cpu = unpack(packed)
        gpu = unpack({k: v.cuda() if torch.is_tensor(v) else v for k, v in packed.items()})
        for k, v in cpu.items():
            if torch.is_tensor(v):
                assert gpu[k].device.type == "cuda" and gpu[k].dtype == v.dtype and torch.equal(gpu[k].cpu(), v), k
            else:
                assert gpu[k] == v, k


class _WideStore:
    """A memory-mapped-like source (has a path) whose dtype decides the packed token width."""

    def __init__(self, tokens: np.ndarray, lengths: list[int]):
        from megadoc_pl.data.views import LiteralTokens

        lit = LiteralTokens([[0] * n for n in lengths], [f"d{i}" for i in range(len(lengths))])
        self.offsets_full, self.names, self.token_array = lit.offsets_full, lit.names, tokens
        self.path = "not-opened"

    num_documents = property(lambda self: len(self.names))
    lengths = property(lambda self: np.diff(self.offsets_full))

    def tokens(self, i: int) -> np.ndarray:
        return self.token_array[self.offsets_full[i]:self.offsets_full[i + 1]]


@pytest.mark.parametrize("gather", ["runs", "fancy_index"])
@pytest.mark.parametrize("dtype, top, width", [(np.uint16, 65535, 2), (np.uint32, 200_000, 4), (np.int64, 65535, 4)])
def test_packed_tokens_keep_every_id_in_either_width(dtype, top, width, gather, monkeypatch):
    """Tokens travel in 2 bytes when the sources allow it (ids up to 65535, past int16's sign bit)
    and in 4 otherwise; unpack gives back every id, and the byte buffer's fields round-trip."""
    from megadoc_pl.data.views import documents_units

    monkeypatch.setattr(batch_mod, "LOOP_RUNS_PER_TOKEN", 1.0 if gather == "runs" else 0.0)
    from megadoc_pl.data.batch import PACKED, packed_fields, token_width, unpack

    rng = np.random.default_rng(0)
    lengths = [40, 7, 95, 30]
    ids = rng.integers(top - 40_000, top + 1, sum(lengths)).astype(dtype)
    ids[:3] = [top, 32768, 0]
    src = _WideStore(ids, lengths)
    st = StreamWindows(documents_units(src), 19, name="d", shuffle=False, repeat=False, window_order="sequential")
    w = Windows([st], _single(st), 19, "document", st.num_windows)
    assert token_width([src]) == width
    packed = w.packed(np.arange(len(w)))
    assert packed["buffer"].dtype == torch.uint8 and packed[PACKED][-1] == width
    batch = unpack(packed)
    T = 19
    flat = ids.astype(np.int64)
    for row in range(len(w)):
        assert batch["input_ids"][row].tolist() == flat[row * T:row * T + T].tolist()
        assert batch["targets"][row].tolist() == flat[row * T + 1:row * T + T + 1].tolist()
    f = packed_fields(w.packed(np.arange(len(w)), tensors=False))
    assert f["tokens"].dtype == (np.uint16 if width == 2 else np.int32)
    assert f["window_index"].tolist() == list(range(len(w)))
    assert f["cu_seqlens"].tolist() == batch["cu_seqlens"].tolist()


@pytest.mark.parametrize("gather", ["runs", "fancy_index"])
def test_a_batch_from_sources_of_two_widths_reads_each_window_from_its_stream(gather, monkeypatch):
    """Rows of one batch read a uint16 and a uint32 store (the fancy-index read scatters each
    source's tokens into its rows): every row equals its stream's tokens, in 2-byte-wide
    buffers' 4-byte form, for any order of the indices."""
    from fractions import Fraction

    from megadoc_pl.data.mixture import StreamDrawer
    from megadoc_pl.data.views import documents_units
    from megadoc_pl.data.batch import unpack

    monkeypatch.setattr(batch_mod, "LOOP_RUNS_PER_TOKEN", 1.0 if gather == "runs" else 0.0)
    rng = np.random.default_rng(3)
    T, flats, streams = 11, [], []
    for name, dtype, top, lengths in (("a", np.uint16, 65535, [5, 17, 3, 40, 9]), ("b", np.uint32, 300_000, [23, 2, 31])):
        ids = rng.integers(0, top + 1, sum(lengths)).astype(dtype)
        flats.append(np.tile(ids.astype(np.int64), 40))  # the stream repeats its documents pass after pass
        streams.append(StreamWindows(documents_units(_WideStore(ids, lengths)), T, name=name, shuffle=False,
                                     window_order="sequential"))
    w = Windows(streams, StreamDrawer(["a", "b"], [Fraction(1, 3), Fraction(2, 3)]), T, "document", None)
    idx = rng.permutation(60)
    stream, local = w.drawer.locate(idx)
    assert set(stream.tolist()) == {0, 1}
    batch = unpack(w.packed(idx))
    for row, (s, j) in enumerate(zip(stream.tolist(), local.tolist())):
        expect = flats[s][j * T:j * T + T + 1]
        assert batch["input_ids"][row].tolist() == expect[:T].tolist()
        assert batch["targets"][row].tolist() == expect[1:].tolist()



def test_one_piece_units_share_their_offsets_and_read_the_same_windows(corpus):
    """A stream of one piece a unit (the real stream) keeps the piece lengths as its unit lengths
    and one offsets array for units and pieces: the same values as the general case, the same
    pass-order names, and the windows of the oracle."""
    from megadoc_pl.data.units import running_offsets

    units = real_units(corpus["real"], HELDOUT)
    assert units.num_pieces == units.num_units
    st = StreamWindows(units, 23, data_seed=3, name="real", window_order="sequential")
    assert st.unit_tokens is units.piece_len and st.piece_key.base is st.canon_start
    assert np.array_equal(st.unit_tokens, units.unit_tokens)
    assert np.array_equal(st.canon_start, running_offsets(units.unit_tokens))
    assert np.array_equal(st.piece_key, running_offsets(units.piece_len)[:-1])
    wide = np.asarray(units.unit_tokens, np.int64)
    h = hashlib.blake2b(wide.tobytes(), digest_size=12)
    h.update(b"3/real/True")
    assert st.order_name == f"order-{h.hexdigest()}"  # shared pass files keep their names
    oracle = _oracle_stream(units, 3, "real", 2)[0]
    n = (len(oracle) - 1) // 23
    w = Windows([st], _single(st), 23, "window", None)
    b = w.batch(np.arange(n))
    for j in range(n):
        assert b["input_ids"][j].tolist() == oracle[j * 23:j * 23 + 23].tolist()
