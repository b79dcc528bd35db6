"""Corpus views on a small hand-made corpus: exact units for every view and option (docs/data-corpus.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megadoc_pl.data.segments import equal_token_split
from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.tokenizer import load_tokenizer
from megadoc_pl.data.views import ViewOptions, build_view, documents_units, real_units

REAL, SYN, LIT = 0, 1, 2
HELDOUT = {"d4"}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_corpus(root: Path, tokenizer_path: Path) -> dict:
    """Six sources d0..d5 (d4 held out). Rephrases: 4 each, d5 only 1 (a short pool).

    Rationales: 2 split points each (split_index 0, 1), d3 has 3 (generated for another G).
    MAGA reformulations: 3 each with judge scores 5, 2, 4.
    Generations are written in a scrambled order so the views must sort by gen_index.
    """
    root.mkdir(parents=True, exist_ok=True)
    docs = [{"id": f"d{i}", "text": f"Alice founded the town of Brindle {i} and built its first mill. " * (1 + i % 3)}
            for i in range(6)]
    gens = []
    for i in range(6):
        for g in reversed(range(1 if i == 5 else 4)):
            gens.append({"source_id": f"d{i}", "task": "rephrase", "gen_index": g, "text": f"Rephrase {g} of document {i}."})
        for s in range(3 if i == 3 else 2):
            gens.append({"source_id": f"d{i}", "task": "rationale", "gen_index": s, "split_index": s,
                         "text": f"Thought {s} about {i}."})
        for g, score in enumerate((5, 2, 4)):
            gens.append({"source_id": f"d{i}", "task": "maga", "gen_index": g, "genre": f"genre{g}",
                         "audience": "kids", "judge_score": score, "text": f"Story {g} for kids about {i}."})
    real = build_store(_write_jsonl(root / "real.jsonl", docs), tokenizer_path, root / "real_store", progress=False)
    synth = build_store(_write_jsonl(root / "gen.jsonl", gens), tokenizer_path, root / "gen_store",
                        kind="generations", progress=False)
    info = load_tokenizer(tokenizer_path)
    return {"real": real, "synth": synth, "info": info, "root": root}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_tokenizer_path) -> dict:
    return make_corpus(tmp_path_factory.mktemp("corpus"), tiny_tokenizer_path)


def _gen_doc(synth, source: str, task: str, gen_index: int) -> int:
    hits = [i for i in synth.find(source) if synth.task(i) == task and synth.gen_index(i) == gen_index]
    assert len(hits) == 1
    return hits[0]


def _real_doc(real, source: str) -> int:
    (i,) = real.find(source)
    return i


def _units(u) -> list[list[tuple[int, int]]]:
    """Units as lists of (source, doc) of their pieces."""
    return [[(p[0], p[1]) for p in u.unit(k)] for k in range(u.num_units)]


def view(corpus, **kw):
    opts = ViewOptions(**kw)
    return build_view(corpus["real"], corpus["synth"], opts, HELDOUT, encode=corpus["info"].encode)


TRAIN = ["d0", "d1", "d2", "d3", "d5"]


def test_real_view_one_unit_per_training_source(corpus):
    R = corpus["real"]
    u = real_units(R, HELDOUT)
    assert _units(u) == [[(REAL, _real_doc(R, s))] for s in TRAIN]
    assert [p[2:] for k in range(u.num_units) for p in u.unit(k)] == [
        (0, int(R.lengths[_real_doc(R, s)]), True, 0) for s in TRAIN]
    assert u.stats["heldout_sources_excluded"] == 1
    assert u.num_tokens == sum(int(R.lengths[_real_doc(R, s)]) for s in TRAIN)


def test_rephrase_units_are_single_pieces_with_one_real_copy(corpus):
    R, S = corpus["real"], corpus["synth"]
    u = view(corpus, view="rephrase", generations=2, include_real=True, short_pool="drop")
    expected = []
    for s in ["d0", "d1", "d2", "d3"]:  # d5 has 1 < G=2 rephrases: dropped
        expected += [[(SYN, _gen_doc(S, s, "rephrase", 0))], [(SYN, _gen_doc(S, s, "rephrase", 1))], [(REAL, _real_doc(R, s))]]
    assert _units(u) == expected
    assert u.stats["short_pool_sources_dropped"] == 1
    no_real = view(corpus, view="rephrase", generations=2, include_real=False, short_pool="drop")
    assert _units(no_real) == [x for x in expected if x[0][0] == SYN]


def test_stitch_real_positions_and_generation_order(corpus):
    R, S = corpus["real"], corpus["synth"]
    srcs = ["d0", "d1", "d2", "d3"]
    gens = {s: [(SYN, _gen_doc(S, s, "rephrase", g)) for g in range(3)] for s in srcs}
    real = {s: (REAL, _real_doc(R, s)) for s in srcs}
    last = view(corpus, view="stitch", generations=3, real_position="last", short_pool="drop")
    assert _units(last) == [gens[s] + [real[s]] for s in srcs]
    first = view(corpus, view="stitch", generations=3, real_position="first", short_pool="drop")
    assert _units(first) == [[real[s]] + gens[s] for s in srcs]
    none = view(corpus, view="stitch", generations=3, real_position="none", short_pool="drop")
    assert _units(none) == [gens[s] for s in srcs]
    # Every piece is a whole stored document with its own BOS/EOS: a document boundary each.
    for k in range(last.num_units):
        for src, doc, start, n, newdoc, docpos in last.unit(k):
            store = R if src == REAL else S
            assert (start, n, newdoc, docpos) == (0, int(store.lengths[doc]), True, 0)
            assert store.tokens(doc)[0] == store.bos_id and store.tokens(doc)[-1] == store.eos_id


def test_stitch_shuffled_within_unit_is_seeded(corpus):
    S = corpus["synth"]
    base = view(corpus, view="stitch", generations=4, real_position="last", short_pool="drop")
    a = view(corpus, view="stitch", generations=4, real_position="last", order="shuffled", seed=1, short_pool="drop")
    b = view(corpus, view="stitch", generations=4, real_position="last", order="shuffled", seed=1, short_pool="drop")
    assert _units(a) == _units(b)
    for ua, ub in zip(_units(a), _units(base)):
        assert sorted(ua[:-1]) == sorted(ub[:-1]) and ua[-1] == ub[-1]  # same pieces, real still last
    orders = {tuple(tuple(x) for x in _units(view(corpus, view="stitch", generations=4, order="shuffled", seed=s,
                                                   short_pool="drop"))) for s in range(6)}
    assert len(orders) > 1  # the seed matters
    assert any(ua != ub for ua, ub in zip(_units(a), _units(base)))
    assert {S.source_id(d) for unit in _units(a) for s, d in unit if s == SYN} == {"d0", "d1", "d2", "d3"}


def test_short_pool_error_names_the_source(corpus):
    with pytest.raises(ValueError, match=r"source 'd5' has 1 'rephrase' generations but the recipe uses G=2"):
        view(corpus, view="stitch", generations=2)
    with pytest.raises(ValueError, match="G=5"):
        view(corpus, view="rephrase", generations=5)  # every pool has 4 < 5


def test_stretch_inserts_rationales_and_keeps_original_verbatim(corpus):
    R, S, info = corpus["real"], corpus["synth"], corpus["info"]
    u = view(corpus, view="stretch", generations=2, stretch_open="<t>", stretch_close="</t>", short_pool="drop")
    # d3 has rationales for 3 split points (another G): dropped with the drop policy.
    assert u.stats["stretch_sources_dropped"] == 1
    open_ids, close_ids = info.encode("<t>"), info.encode("</t>")
    for k, s in enumerate(["d0", "d1", "d2", "d5"]):
        d = _real_doc(R, s)
        content = R.content_tokens(d).tolist()
        cuts = [0] + equal_token_split(len(content), 2) + [len(content)]
        expected = [R.bos_id]
        for i in range(3):
            expected += content[cuts[i]:cuts[i + 1]]
            if i < 2:
                rat = S.content_tokens(_gen_doc(S, s, "rationale", i)).tolist()
                expected += open_ids + rat + close_ids
        expected += [R.eos_id]
        assert u.unit_tokens_of(k).tolist() == expected
        pieces = u.unit(k)
        real_parts = [p for p in pieces if p[0] == REAL]
        assert np.concatenate([R.tokens(d)[a:a + n] for _, _, a, n, _, _ in real_parts]).tolist() == R.tokens(d).tolist()
        # ONE document: a boundary only at the first piece; positions run on across pieces.
        assert [p[4] for p in pieces] == [True] + [False] * (len(pieces) - 1)
        assert [p[5] for p in pieces] == np.concatenate([[0], np.cumsum([p[3] for p in pieces])[:-1]]).tolist()
        # Rationale pieces carry no BOS/EOS of their own.
        assert all(p[2] == 1 and p[3] == int(S.lengths[p[1]]) - 2 for p in pieces if p[0] == SYN)


def test_stretch_pool_mismatch_errors(corpus):
    with pytest.raises(ValueError, match=r"source 'd3' has rationales for 3 split points but stretch with G=2"):
        view(corpus, view="stretch", generations=2)
    with pytest.raises(ValueError, match=r"needs split_index 0\.\.3"):
        view(corpus, view="stretch", generations=4)


def test_maga_views_and_judge_filter(corpus):
    R, S = corpus["real"], corpus["synth"]
    m = view(corpus, view="maga", generations=3)
    assert _units(m) == [[(SYN, _gen_doc(S, s, "maga", g))] for s in TRAIN for g in range(3)]
    judged = view(corpus, view="maga", generations=3, judge_min_score=3)
    assert _units(judged) == [[(SYN, _gen_doc(S, s, "maga", g))] for s in TRAIN for g in (0, 2)]
    assert judged.stats["judge_filtered"] == len(TRAIN)
    ms = view(corpus, view="maga_stitch", generations=2, judge_min_score=3)
    # First G=2 by gen_index, then the judge drops gen 1 (score 2).
    assert _units(ms) == [[(SYN, _gen_doc(S, s, "maga", 0)), (REAL, _real_doc(R, s))] for s in TRAIN]


def test_hybrid_stitch_of_rephrases_with_stretched_original(corpus):
    R, S = corpus["real"], corpus["synth"]
    u = view(corpus, view="stitch_stretch", generations=2, short_pool="drop")
    plain = view(corpus, view="stretch", generations=2, short_pool="drop")
    # d3 (rationale mismatch) and d5 (short rephrase pool) are dropped.
    for k, s in enumerate(["d0", "d1", "d2"]):
        pieces = u.unit(k)
        assert [(p[0], p[1]) for p in pieces[:2]] == [(SYN, _gen_doc(S, s, "rephrase", g)) for g in range(2)]
        assert u.unit_tokens_of(k).tolist() == np.concatenate(
            [S.tokens(_gen_doc(S, s, "rephrase", 0)), S.tokens(_gen_doc(S, s, "rephrase", 1)),
             plain.unit_tokens_of(k)]).tolist()
        assert [p[4] for p in pieces] == [True, True, True] + [False] * (len(pieces) - 3)
    assert u.num_units == 3


def test_heldout_sources_never_in_training_units(corpus):
    R, S = corpus["real"], corpus["synth"]
    for kw in (dict(view="rephrase", generations=1), dict(view="stitch", generations=1),
               dict(view="stretch", generations=2, short_pool="drop"), dict(view="maga", generations=3),
               dict(view="maga_stitch", generations=3), dict(view="stitch_stretch", generations=2, short_pool="drop")):
        u = view(corpus, **kw)
        seen = {(R if s == REAL else S).source_id(d) for s, d in zip(u.piece_src, u.piece_doc) if s != LIT}
        assert "d4" not in seen and seen, kw
    assert view(corpus, view="maga", generations=3).stats["heldout_generations_excluded"] == 3
    with pytest.raises(ValueError, match="kept no source"):  # every rationale pool was made for G=2
        view(corpus, view="stitch_stretch", generations=1, short_pool="drop")


def test_generations_of_unknown_sources_are_refused(tmp_path, tiny_tokenizer_path, corpus):
    gen = _write_jsonl(tmp_path / "g.jsonl", [{"source_id": "elsewhere", "task": "rephrase", "gen_index": 0, "text": "x y"}])
    S = build_store(gen, tiny_tokenizer_path, tmp_path / "s", kind="generations", progress=False)
    with pytest.raises(ValueError, match="not in the real corpus.*'elsewhere'"):
        build_view(corpus["real"], S, ViewOptions(view="rephrase", generations=1))


def test_bad_options_are_one_line_errors(corpus):
    for kw, msg in ((dict(view="nope"), "data.view='nope'"), (dict(view="stitch", real_position="middle"), "real_position"),
                    (dict(view="stitch", generations=0), "generations >= 1"), (dict(view="maga", generations=1, short_pool="x"), "short_pool")):
        with pytest.raises(ValueError, match=msg):
            view(corpus, **kw)


def test_missing_task_names_the_tasks_present(tmp_path, tiny_tokenizer_path, corpus):
    gen = _write_jsonl(tmp_path / "g.jsonl", [{"source_id": "d0", "task": "rephrase", "gen_index": 0, "text": "x y"}])
    S = build_store(gen, tiny_tokenizer_path, tmp_path / "s", kind="generations", progress=False)
    with pytest.raises(ValueError, match=r"no generations of task 'rationale' \(the store has tasks \['rephrase'\]\)"):
        build_view(corpus["real"], S, ViewOptions(view="stretch", generations=1), encode=corpus["info"].encode)
    with pytest.raises(ValueError, match="data.synthetic is not set"):
        build_view(corpus["real"], None, ViewOptions(view="stitch", generations=1))


def test_documents_units_in_given_order(corpus):
    R = corpus["real"]
    u = documents_units(R, np.array([3, 1]), name="iid")
    assert _units(u) == [[(0, 3)], [(0, 1)]] and u.name == "iid"


def test_chunked_sources_use_every_chunk_also_from_a_store_built_before_chunk_index_was_promoted(
        tmp_path, tiny_tokenizer_path):
    """Rows of --long-sources chunk carry chunk_index; each chunk is a pool of its own. A store
    whose index predates the chunk_index column reads it from the generation fields."""
    import pyarrow.parquet as pq

    from megadoc_pl.data.store import TokenStore

    docs = [{"id": f"s{i}", "text": f"Alice founded the town {i}."} for i in range(2)]
    gens = [{"source_id": "s0", "task": "rephrase", "gen_index": 2 * k + g, "chunk_index": k, "num_chunks": 3,
             "text": f"Chunk {k} rephrase {g}."} for k in range(3) for g in range(2)]
    gens += [{"source_id": "s1", "task": "rephrase", "gen_index": g, "text": f"Whole {g}."} for g in range(2)]
    real = build_store(_write_jsonl(tmp_path / "real.jsonl", docs), tiny_tokenizer_path, tmp_path / "real",
                       progress=False)
    new = build_store(_write_jsonl(tmp_path / "gen.jsonl", gens), tiny_tokenizer_path, tmp_path / "gen",
                      kind="generations", progress=False)
    shutil.copytree(tmp_path / "gen", tmp_path / "old")  # a store built before chunk_index was promoted
    index = pq.read_table(tmp_path / "old" / "index.parquet")
    pq.write_table(index.drop(["chunk_index"]), tmp_path / "old" / "index.parquet")
    old = TokenStore.open(tmp_path / "old")
    assert old.column("chunk_index").tolist() == new.column("chunk_index").tolist() == [0, 0, 1, 1, 2, 2, -1, -1]
    for synth in (new, old):
        one = build_view(real, synth, ViewOptions(view="stitch", generations=1))
        pieces = [[synth.gen_index(d) for s, d, *_ in one.unit(u) if s == SYN] for u in range(one.num_units)]
        assert sorted(pieces) == [[0], [0, 2, 4]]  # the first of every chunk, in chunk order
        two = build_view(real, synth, ViewOptions(view="rephrase", generations=2, include_real=False))
        assert two.num_units == 8  # every row
    with pytest.raises(ValueError, match="has 1 'rephrase' generations in one of its chunks but the recipe uses G=2"):
        short = build_store(_write_jsonl(tmp_path / "short.jsonl", gens[:-3]), tiny_tokenizer_path,
                            tmp_path / "short", kind="generations", progress=False)
        build_view(real, short, ViewOptions(view="stitch", generations=2))
