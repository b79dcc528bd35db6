"""The vectorised views against per-source loops, and the view cache (issue 12).

The oracle is the per-source stretch loop the package used before it was vectorised: every
source's ``equal_token_split`` cut and pieces built one by one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megadoc_pl.data.segments import equal_token_split
from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.tokenizer import load_tokenizer
from megadoc_pl.data.units import Groups, concat_groups, piece_docpos, to_units
import megadoc_pl.data.views as views_mod
from megadoc_pl.data.views import ViewOptions, _pools, _stretch, build_view, stretch_cuts

WORDS = ["mill", "town", "river", "Alice", "founded", "built", "the", "of", "and", "first"]


def _oracle_stretch(real, synth, pools, generations: int, open_ids, close_ids, lit_src: int):
    """Per source: r(s) in G+1 equal-token segments, rationale i after segment i (plain loop);
    sources whose pool is not exactly split indices 0..g-1 are dropped (short_pool=drop), and a
    rationale recorded for another split offset or tokenizer is an error."""
    bos, eos = int(real.add_bos), int(real.add_eos)
    sbos, seos = int(synth.add_bos), int(synth.add_eos)
    cols = {k: [] for k in ("src", "doc", "start", "length", "newdoc")}
    ptr, keep = [0], np.ones(len(pools.ids), bool)

    def add(*piece):
        for k, v in zip(cols, piece):
            cols[k].append(v)

    for k in range(len(pools.ids)):
        d = int(pools.real_docs[k])
        n = int(real.lengths[d]) - bos - eos
        cuts = equal_token_split(n, generations)
        pool = pools.gens.doc[pools.gens.ptr[k]: pools.gens.ptr[k + 1]]
        sidx = synth.column("split_index")[pool]
        sidx = np.where(sidx >= 0, sidx, synth.gen_indices[pool])
        uniq, first = np.unique(sidx, return_index=True)
        if len(uniq) != len(cuts) or (len(cuts) and not np.array_equal(uniq, np.arange(len(cuts)))):
            keep[k] = False
            ptr.append(len(cols["src"]))
            continue
        rats = pool[first]
        ours = f"tokens:{str(real.manifest.get('tokenizer_fingerprint'))[:16]}"
        for i, r in enumerate(rats):
            meta = synth.meta(int(r))
            made_for, offset = meta.get("split_tokenizer"), meta.get("split_token_offset")
            if (made_for is not None and made_for != ours) or (offset is not None and int(offset) != cuts[i]):
                raise ValueError(f"source {pools.ids[k]!r}: rationale {i} was generated for the split at token "
                                 f"{offset} ({made_for}) but stretch splits the training tokenization ({ours}) at "
                                 f"token {cuts[i]}")
        bounds = [0] + [bos + c for c in cuts] + [n + bos + eos]
        for i in range(len(bounds) - 1):
            add(0, d, bounds[i], bounds[i + 1] - bounds[i], i == 0)
            if i < len(rats):
                r = int(rats[i])
                if open_ids:
                    add(lit_src, 0, 0, len(open_ids), False)
                add(1, r, sbos, int(synth.lengths[r]) - sbos - seos, False)
                if close_ids:
                    add(lit_src, 1, 0, len(close_ids), False)
        ptr.append(len(cols["src"]))
    g = Groups(np.asarray(ptr, np.int64), *(np.asarray(cols[k], bool if k == "newdoc" else np.int64) for k in cols))
    return g.take(keep), keep


def test_stretch_cuts_equal_equal_token_split():
    rng = np.random.default_rng(0)
    n = np.concatenate([np.arange(0, 40), rng.integers(0, 5000, 300)])
    for G in (0, 1, 2, 5, 32, 100):
        g, owner, cut = stretch_cuts(n, G)
        want = [equal_token_split(int(x), G) for x in n]
        assert g.tolist() == [len(w) for w in want]
        assert cut.tolist() == [c for w in want for c in w]
        assert owner.tolist() == [k for k, w in enumerate(want) for _ in w]
    with pytest.raises(ValueError, match="generations must be >= 0"):
        stretch_cuts(n, -1)


@pytest.fixture(scope="module")
def random_corpus(tmp_path_factory, tiny_tokenizer_path) -> dict:
    """60 sources of 1..30 words; rationale pools of random sizes, some with a repeated split
    index (the first by gen_index wins), some without split_index (gen_index stands in), some
    recording their split offset (the right one) and tokenizer."""
    root = tmp_path_factory.mktemp("random_corpus")
    rng = np.random.default_rng(1)
    info = load_tokenizer(tiny_tokenizer_path)
    docs = [{"id": f"s{i}", "text": " ".join(rng.choice(WORDS, int(rng.integers(1, 31))))} for i in range(60)]
    real_f = root / "real.jsonl"
    real_f.write_text("".join(json.dumps(d) + "\n" for d in docs))
    real = build_store(real_f, tiny_tokenizer_path, root / "real", progress=False)
    unit = f"tokens:{str(real.manifest['tokenizer_fingerprint'])[:16]}"
    rows = []
    for k, d in enumerate(docs):
        n = int(real.content_lengths[k])
        size = int(rng.integers(0, 7))
        for gi in rng.permutation(size + int(rng.integers(0, 2))):  # scrambled; maybe one extra row
            split = int(min(gi, size - 1)) if size else 0
            row = {"source_id": d["id"], "task": "rationale", "gen_index": int(gi),
                   "text": " ".join(rng.choice(WORDS, int(rng.integers(1, 6))))}
            if rng.random() < 0.8:
                row["split_index"] = split
            cuts = equal_token_split(n, size)
            if rng.random() < 0.5 and split < len(cuts) and row.get("split_index", gi) == split:
                row.update(split_token_offset=cuts[split], split_tokenizer=unit)
            rows.append(row)
    gen_f = root / "gen.jsonl"
    gen_f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    synth = build_store(gen_f, tiny_tokenizer_path, root / "gen", kind="generations", progress=False)
    return {"real": real, "synth": synth, "info": info}


@pytest.mark.parametrize("G", [1, 2, 3, 6, 40])
@pytest.mark.parametrize("delims", [("<t>", "</t>"), ("", "</t>"), ("", "")])
@pytest.mark.parametrize("block", [8192, 3])  # sources laid out at a time: one block, or many
def test_vectorised_stretch_equals_the_per_source_loop(random_corpus, G, delims, block, monkeypatch):
    monkeypatch.setattr(views_mod, "STRETCH_BLOCK_SOURCES", block)
    real, synth, info = random_corpus["real"], random_corpus["synth"], random_corpus["info"]
    pools = _pools(real, synth, "rationale", {"s3"}, 0, "drop", keep_all=True)
    open_ids, close_ids = info.encode(delims[0]), info.encode(delims[1])
    try:
        want, want_keep = _oracle_stretch(real, synth, pools, G, open_ids, close_ids, 2)
    except ValueError as e:  # a rationale made for another G's split: the same error, same source
        with pytest.raises(ValueError) as got_error:
            _stretch(real, synth, pools, G, open_ids, close_ids, 2, "drop")
        assert str(got_error.value).startswith(str(e))
        return
    got, got_keep = _stretch(real, synth, pools, G, open_ids, close_ids, 2, "drop")
    assert np.array_equal(got_keep, want_keep)
    for k in ("ptr", "src", "doc", "start", "length", "newdoc"):
        assert np.array_equal(getattr(got, k), getattr(want, k)), k
    if got_keep.any():  # and the whole view (units, document positions) builds from it
        u = build_view(real, synth, ViewOptions(view="stretch", generations=G, short_pool="drop",
                                                stretch_open=delims[0], stretch_close=delims[1]),
                       {"s3"}, encode=info.encode)
        assert u.num_units == int(got_keep.sum())


def _assert_same_units(a, b) -> None:
    from megadoc_pl.data.view_cache import COLUMNS

    for c in COLUMNS:
        assert np.array_equal(getattr(a, c), getattr(b, c)), c
    assert (a.name, a.stats, a.num_tokens) == (b.name, b.stats, b.num_tokens)
    assert all(x is y for x, y in zip(a.sources[:2], b.sources[:2]))
    for u in range(a.num_units):
        assert np.array_equal(a.unit_tokens_of(u), b.unit_tokens_of(u))


@pytest.mark.parametrize("kw", [dict(view="stitch", generations=2, short_pool="drop"),
                                dict(view="stretch", generations=2, short_pool="drop", stretch_open="<t>"),
                                dict(view="rephrase", generations=3, short_pool="drop")])
def test_cached_view_equals_a_fresh_one_and_changed_inputs_miss(tmp_path, kw):
    from test_views import HELDOUT, make_corpus

    from helpers import build_tiny_tokenizer

    from megadoc_pl.data.view_cache import cached_view

    c = make_corpus(tmp_path / "corpus", build_tiny_tokenizer(tmp_path / "tok"))
    R, S, enc = c["real"], c["synth"], c["info"].encode
    opts = ViewOptions(**kw)
    fresh = build_view(R, S, opts, HELDOUT, encode=enc)
    first = cached_view(tmp_path / "cache", R, S, opts, HELDOUT, encode=enc)
    (built,) = (tmp_path / "cache" / "views").iterdir()
    again = cached_view(tmp_path / "cache", R, S, opts, HELDOUT, encode=enc)
    assert isinstance(again.piece_doc.base, np.memmap)  # loaded, memory-mapped, not rebuilt
    _assert_same_units(first, fresh)
    _assert_same_units(again, fresh)
    # compact piece columns (18 bytes a piece), in memory and on disk
    for u in (fresh, again):
        assert [getattr(u, c).dtype for c in ("piece_src", "piece_doc", "piece_start", "piece_len", "piece_newdoc",
                                              "piece_docpos")] == [np.int8] + [np.int32] * 3 + [bool, np.int32]
    # A changed option, seed, excluded set or store is another cache entry, never the old one.
    option = {"stretch_open": "<x>"} if kw["view"] == "stretch" else {"generations": 1}
    for changed in (dict(opts=ViewOptions(**{**kw, **option})), dict(opts=ViewOptions(**kw, seed=7)),
                    dict(heldout=HELDOUT | {"d0"})):
        o, h = changed.get("opts", opts), changed.get("heldout", HELDOUT)
        _assert_same_units(cached_view(tmp_path / "cache", R, S, o, h, encode=enc), build_view(R, S, o, h, encode=enc))
    assert len(list((tmp_path / "cache" / "views").iterdir())) == 4 and built.exists()
    other = make_corpus(tmp_path / "other", build_tiny_tokenizer(tmp_path / "tok2", vocab_size=280))
    cached_view(tmp_path / "cache", other["real"], other["synth"], opts, HELDOUT, encode=other["info"].encode)
    assert len(list((tmp_path / "cache" / "views").iterdir())) == 5


def _random_groups(rng, sources: int, src: int) -> Groups:
    counts = rng.integers(0, 5, sources)
    n = int(counts.sum())
    return Groups(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.full(n, src, np.int8),
                  rng.integers(0, 1000, n).astype(np.int32), rng.integers(0, 50, n).astype(np.int32),
                  rng.integers(1, 90, n).astype(np.int32), rng.random(n) < 0.3)


@pytest.mark.parametrize("block", [1, 3, 1 << 14])
def test_blocked_concat_and_document_positions_equal_plain_loops(block):
    # The view's two whole-view passes run a block at a time (bounded temporaries): the result
    # must not depend on the block size. Oracles: per-source and per-piece Python loops.
    rng = np.random.default_rng(block)
    parts = [_random_groups(rng, 40, s) for s in range(3)]
    got = concat_groups(parts, block=block)
    cols = ("src", "doc", "start", "length", "newdoc")
    want = {k: [] for k in cols}
    for s in range(40):
        for p in parts:
            for k in cols:
                want[k] += getattr(p, k)[p.ptr[s]:p.ptr[s + 1]].tolist()
    for k in cols:
        assert getattr(got, k).tolist() == want[k], k
        assert getattr(got, k).dtype == getattr(parts[0], k).dtype
    assert np.diff(got.ptr).tolist() == sum(np.diff(p.ptr) for p in parts).tolist()
    newdoc = got.newdoc.copy()
    newdoc[0] = True  # a stream starts a document
    pos, docpos = 0, []
    for n, nd in zip(got.length.tolist(), newdoc.tolist()):
        pos = 0 if nd else pos
        docpos.append(pos)
        pos += n
    assert piece_docpos(got.length, newdoc, block=block).tolist() == docpos


def test_a_document_beyond_int32_tokens_is_refused_in_one_line():
    # Piece columns are int32: a source they cannot index exactly is an error, not a wrap-around.
    class Huge:
        path, num_documents = "huge-store", 1
        offsets_full = np.array([0, 2**31 + 5], np.int64)

    g = Groups(np.array([0, 1]), np.zeros(1, np.int8), np.zeros(1, np.int32), np.zeros(1, np.int32),
               np.ones(1, np.int32), np.ones(1, bool))
    with pytest.raises(ValueError, match=r"huge-store: views index documents .* up to 2147483653 tokens"):
        to_units(g, (Huge(),), "real", {})
