"""The streamed store builder at scale: chunking does not change a store, the in-order checks
(duplicates, MAGACorpus numbering and folding) equal the row-by-row reader, memory does not grow
with per-row objects, and 64-bit offsets address past 4G tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import megadoc_pl.data.store_build as store_build
from megadoc_pl.data.readers import iter_documents, iter_generations
from megadoc_pl.data.store import FORMAT_VERSION, HEADER_BYTES, TokenStore, index_schema, token_file_header
from megadoc_pl.data.store_build import StoreSink, build_store, plain_generation_columns
from megadoc_pl.data.tokenizer import load_tokenizer

from helpers import SAMPLE_TEXTS

REPO = Path(__file__).resolve().parents[2]


def maga_row(docid: str, chunk: str, k: int, raw: str = "raw text") -> dict:
    return {"meta": {"docid": docid, "chunk_id": chunk, "genre": f"g{k}", "audience": "a", "raw_text": raw},
            "content_split": f"{SAMPLE_TEXTS[k % 5]} reformulation {k} of {docid}/{chunk}"}


def messy_generations(n: int) -> list:
    """Generation rows and MAGACorpus rows mixed, with duplicates, bad rows and promoted fields."""
    rows: list = []
    for i in range(n):
        if i % 7 == 3:
            rows.append(maga_row(f"m{i % 5}", str(i % 3), i))
        else:
            rows.append({"source_id": f"s{i // 4}", "task": "rephrase" if i % 3 else "rationale", "gen_index": i % 4,
                         "text": f"{SAMPLE_TEXTS[i % 5]} number {i}", "split_index": i % 4, "judge_score": i % 6,
                         "style": "qa"})
    rows[40] = dict(rows[8])  # a duplicate generation
    rows[41] = {"source_id": "s9", "task": "rephrase", "gen_index": -2, "text": "bad index"}
    rows[77] = {"source_id": "", "task": "rephrase", "gen_index": 0, "text": "no source"}
    rows[120] = dict(rows[9], text="same identity, other text")  # a duplicate with another text
    return rows


def write_rows(path: Path, rows) -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    return path


def store_arrays(st: TokenStore) -> dict:
    cols = ("source_id", "task", "gen_index", "file", "line", "split_index", "judge_score", "genre", "style", "chunk_index")
    out = {c: st.column(c) for c in cols if c in st.column_names}
    out.update(tokens=np.asarray(st.token_array), offsets=st.offsets_full, meta=[st.meta(i) for i in range(len(st))])
    return out


def meta_texts(st: TokenStore) -> list[str]:
    """The stored meta JSON of every document, as written (not parsed)."""
    out: list = [None] * len(st)
    for rows, metas in st.meta_batches(np.arange(len(st))):
        for r, text in zip(rows.tolist(), metas.to_pylist()):
            out[r] = text
    return out


def assert_same_store(a: TokenStore, b: TokenStore) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        if isinstance(x[k], np.ndarray) and x[k].dtype.kind == "f":
            assert np.array_equal(x[k], y[k], equal_nan=True), k
        else:
            assert np.array_equal(np.asarray(x[k], dtype=object), np.asarray(y[k], dtype=object)), k
    keys = ("num_documents", "num_tokens", "bad_rows", "bad_rows_by_kind")
    assert {k: a.manifest[k] for k in keys} == {k: b.manifest[k] for k in keys}


def small_blocks(monkeypatch) -> None:
    """Many chunks, row groups and compaction blocks: every border is crossed."""
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 700)
    monkeypatch.setattr(store_build, "INDEX_GROUP_ROWS", 7)
    monkeypatch.setattr(store_build, "COMPACT_BLOCK_DOCS", 5)
    monkeypatch.setattr(store_build, "COMPACT_BLOCK_TOKENS", 64)
    monkeypatch.setattr(store_build, "KEY_SPILL_ROWS", 5)  # identity keys spilled to bucket files


def test_chunked_generation_store_equals_one_shot_and_the_reader(tmp_path, tiny_tokenizer_path, monkeypatch):
    src = write_rows(tmp_path / "g.jsonl", messy_generations(300))
    assert src.stat().st_size < store_build.CHUNK_BYTES  # one chunk at the default size
    whole = build_store(src, tiny_tokenizer_path, tmp_path / "whole", kind="generations", skip_bad_rows=True,
                        num_proc=1, progress=False)
    small_blocks(monkeypatch)
    spills = []
    spill = StoreSink.spill_keys
    monkeypatch.setattr(StoreSink, "spill_keys", lambda self, upto: (spills.append(upto), spill(self, upto)))
    chunked = build_store(src, tiny_tokenizer_path, tmp_path / "chunked", kind="generations", skip_bad_rows=True,
                          num_proc=1, progress=False)
    assert len(spills) > 10 and not (tmp_path / "chunked" / "keys").exists()  # the keys went through bucket files
    assert_same_store(chunked, whole)
    procs = build_store(src, tiny_tokenizer_path, tmp_path / "procs", kind="generations", skip_bad_rows=True,
                        num_proc=2, parallel="processes", progress=False)
    assert_same_store(procs, whole)

    counts: dict = {}
    gens = list(iter_generations(src, skip_bad_rows=True, counts=counts))  # the row-by-row oracle
    assert [(g.source_id, g.task, g.gen_index, g.line) for g in gens] == list(zip(
        whole.source_ids.tolist(), whole.tasks.tolist(), whole.gen_indices.tolist(), whole.column("line").tolist()))
    ref = load_tokenizer(tiny_tokenizer_path)
    assert [whole.content_tokens(i).tolist() for i in range(len(whole))] == ref.encode_batch([g.text for g in gens])
    assert [whole.meta(i) for i in range(len(whole))] == [g.fields for g in gens]
    assert whole.manifest["bad_rows_by_kind"] == counts["bad_rows_by_kind"] == {"duplicate_id": 2, "bad_field": 2}
    assert sorted(set(whole.tasks.tolist())) == ["maga", "rationale", "rephrase"]


def test_first_error_in_input_order(tmp_path, tiny_tokenizer_path, monkeypatch):
    """Without skipping, the first bad row in input order is reported, whether it is found while
    reading (a bad field) or when the keys are settled (a duplicate)."""
    small_blocks(monkeypatch)
    rows = messy_generations(300)
    src = write_rows(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError) as e:  # duplicate on line 41 comes before the bad field on line 42
        build_store(src, tiny_tokenizer_path, tmp_path / "a", kind="generations", num_proc=1, progress=False)
    assert str(e.value).startswith(f"{src}:41: duplicate generation (source_id='s2', task='rephrase', gen_index=0) "
                                   f"(first at {src}:9)")
    rows[40] = {"source_id": "s100", "task": "rephrase", "gen_index": 0, "text": "fine"}
    src = write_rows(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{src}:42: gen_index is -2, not an integer >= 0"):
        build_store(src, tiny_tokenizer_path, tmp_path / "b", kind="generations", num_proc=1, progress=False)
    rows[41] = rows[77] = {"source_id": "s101", "task": "rephrase", "gen_index": 0, "text": "fine"}
    src = write_rows(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError) as e:  # found only when the keys are settled at the end
        build_store(src, tiny_tokenizer_path, tmp_path / "c", kind="generations", num_proc=1, progress=False)
    assert str(e.value).startswith(f"{src}:78: duplicate generation (source_id='s101', task='rephrase', gen_index=0) "
                                   f"(first at {src}:42)")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".*"))


def test_magacorpus_documents_fold_repeats_across_chunks(tmp_path, tiny_tokenizer_path, monkeypatch):
    """MAGACorpus rows read as real documents: the repeats of a chunk (one row per reformulation)
    fold into the first; the same chunk id with another text is a duplicate."""
    small_blocks(monkeypatch)
    rows = [maga_row(f"d{i % 6}", "0", i, raw=f"source text of d{i % 6}") for i in range(60)]
    rows[33] = maga_row("d3", "0", 33, raw="a different source text")
    src = write_rows(tmp_path / "m.jsonl", rows)
    st = build_store(src, tiny_tokenizer_path, tmp_path / "s", skip_bad_rows=True, num_proc=1, progress=False)
    counts: dict = {}
    docs = list(iter_documents(src, skip_bad_rows=True, counts=counts))
    assert st.source_ids.tolist() == [d.id for d in docs] == [f"d{i}#0" for i in range(6)]
    assert st.manifest["bad_rows_by_kind"] == counts["bad_rows_by_kind"] == {"duplicate_id": 1}
    assert [st.content_tokens(i).tolist() for i in range(len(st))] == \
        load_tokenizer(tiny_tokenizer_path).encode_batch([d.text for d in docs])


BOUNDED = """
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import build_tiny_tokenizer
from megadoc_pl.data.store_build import build_store
d = Path(tempfile.mkdtemp(dir={tmp!r}))
tok = build_tiny_tokenizer(d / "tok")
def write(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({{"source_id": f"s{{i // 32}}", "task": "rephrase", "gen_index": i % 32, "text": "the mill"}}) + "\\n")
write(d / "warm.jsonl", 20000)
write(d / "g.jsonl", {rows})
build_store(d / "warm.jsonl", tok, d / "warm", kind="generations", progress=False, num_proc=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
st = build_store(d / "g.jsonl", tok, d / "s", kind="generations", progress=False, num_proc=1)
assert len(st) == {rows}
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_tiny_rows_build_with_bounded_memory(tmp_path):
    """Peak RSS grows by under 40 bytes per row from 240k to 1.2M tiny rows: identity keys spill
    to bucket files and the offsets are copied, not held (measured ~20; keys and offsets held in
    memory measured ~55, and the per-row-object builder this replaced ~625)."""
    growth = {}
    for rows in (240_000, 1_200_000):
        code = BOUNDED.format(tests=str(REPO / "tests"), tmp=str(tmp_path), rows=rows)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        growth[rows] = int(out.stdout.split()[-1])
    per_row = (growth[1_200_000] - growth[240_000]) / 960_000
    assert per_row < 40, f"{per_row:.0f} bytes of peak RSS per row"


def test_offsets_past_4g_tokens(tmp_path):
    """A store whose token file is larger than 4G tokens (sparse on disk): 64-bit offsets reach
    its last document."""
    n = (1 << 32) + 10
    store = tmp_path / "big"
    store.mkdir()
    dtype = np.dtype(np.uint16)
    with open(store / "tokens.bin", "wb") as f:
        f.write(token_file_header(dtype, n))
        f.truncate(HEADER_BYTES + n * dtype.itemsize)
        f.seek(HEADER_BYTES + (n - 4) * dtype.itemsize)
        f.write(np.array([0, 7, 8, 1], dtype=dtype).tobytes())
    np.save(store / "offsets.npy", np.array([0, n - 4, n], dtype=np.int64))
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = index_schema("documents")
    cols = {"source_id": ["a", "b"], "task": ["real", "real"], "gen_index": [-1, -1], "file": [0, 0], "line": [1, 2],
            "text_hash": [0, 0], "meta": ["{}", "{}"]}
    pq.write_table(pa.table({f.name: pa.array(cols[f.name], f.type) for f in schema}), store / "index.parquet")
    manifest = {"format_version": FORMAT_VERSION, "kind": "documents", "dtype": "uint16", "num_tokens": n,
                "num_documents": 2, "add_bos": True, "add_eos": True, "bos_id": 0, "eos_id": 1, "inputs": []}
    (store / "manifest.json").write_text(json.dumps(manifest))
    st = TokenStore.open(store)
    assert st.num_tokens > np.iinfo(np.uint32).max
    assert st.lengths.tolist() == [n - 4, 4]
    assert st.content_tokens(1).tolist() == [7, 8]


def test_recorded_text_hashes_equal_the_decoded_ones(tmp_path, tiny_tokenizer_path):
    """A document store records each document's normalised text hash while it is built (held-out
    hygiene reads them instead of decoding every document); they equal the hashes of the texts
    decoded from the stored tokens, which is how stores built before were checked."""
    from megadoc_pl.data.hygiene import normalised_text_hash, text_hashes

    rows = [{"id": f"d{i}", "text": f"  {SAMPLE_TEXTS[i % 5].upper()}\n\n number {i}  "} for i in range(40)]
    st = build_store(write_rows(tmp_path / "d.jsonl", rows), tiny_tokenizer_path, tmp_path / "s", progress=False)
    tok = load_tokenizer(tiny_tokenizer_path).tokenizer
    decoded = [normalised_text_hash(t) for t in tok.decode_batch([st.content_tokens(i).tolist() for i in range(len(st))])]
    assert text_hashes(st, tok.decode_batch).tolist() == decoded == [normalised_text_hash(r["text"]) for r in rows]
    assert len(set(decoded)) == 40


def test_store_pickles_with_lazily_read_columns(tmp_path, tiny_tokenizer_path):
    """DataLoader workers receive stores by pickle: index columns read before and after still work."""
    import pickle

    rows = [{"id": f"d{i}", "text": f"{SAMPLE_TEXTS[i % 5]} {i}"} for i in range(12)]
    st = build_store(write_rows(tmp_path / "d.jsonl", rows), tiny_tokenizer_path, tmp_path / "s", progress=False)
    ids = st.source_ids.tolist()  # one column read before pickling, the others after
    copy = pickle.loads(pickle.dumps(st))
    assert copy.source_ids.tolist() == ids == [r["id"] for r in rows]
    assert copy.column("line").tolist() == list(range(1, 13))
    assert np.array_equal(np.asarray(copy.token_array), np.asarray(st.token_array))


def test_generation_store_reads_ids_and_tasks_dictionary_encoded(tmp_path, tiny_tokenizer_path):
    """A generation store repeats each source id G times: its source_id and task columns are read
    dictionary-encoded (~4 bytes a row), and every accessor still sees plain strings."""
    rows = [{"source_id": f"s{i // 3}", "task": ("rephrase", "rationale")[i % 2], "gen_index": i % 3,
             "text": f"{SAMPLE_TEXTS[i % 5]} {i}"} for i in range(12)]
    st = build_store(write_rows(tmp_path / "g.jsonl", rows), tiny_tokenizer_path, tmp_path / "g", kind="generations",
                     progress=False)
    import pyarrow as pa

    for name in ("source_id", "task"):
        assert pa.types.is_dictionary(st.arrow_column(name).type), name
    assert st.source_ids.tolist() == [r["source_id"] for r in rows]
    assert [st.task(i) for i in range(12)] == [r["task"] for r in rows]
    assert st.indices({"s1"}).tolist() == [3, 4, 5] and st.find("s2") == [6, 7, 8]
    copy = pickle_round_trip(st)
    assert copy.source_ids.tolist() == st.source_ids.tolist()


def pickle_round_trip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


def _fast_and_plain(path, tokenizer, tmp_path, monkeypatch):
    """The generations store of ``path`` built with the builder's fast paths and without them (FAST_PATHS off)."""
    def build(tag):
        return build_store(path, tokenizer, tmp_path / f"{tag}-{path.stem}", kind="generations",
                           skip_bad_rows=True, num_proc=1, progress=False)

    fast = build("fast")
    with monkeypatch.context() as m:
        m.setattr(store_build, "FAST_PATHS", False)
        return fast, build("plain")


def test_inline_generation_rows_equal_the_parser(tmp_path, tiny_tokenizer_path, monkeypatch):
    """Rows taken by the builder's inline check (and its promoted-column and meta shortcuts) give
    the store the full parse gives: ids, tokens, meta, promoted columns, bad rows."""
    rows = messy_generations(130) + [
        {"source_id": 7, "task": "rephrase", "gen_index": 0, "text": "an int source id"},
        {"source_id": "s900", "task": "rephrase", "gen_index": True, "text": "a bool index"},
        {"source_id": "s901", "task": "rephrase", "gen_index": 1, "text": "\x1c\x1d \u2003"},
        {"source_id": "s902", "task": "", "gen_index": 1, "text": "no task"},
        {"source_id": "s903", "task": "rephrase", "gen_index": 2, "text": 5},
        {"source_id": "s904", "task": "rephrase", "gen_index": 3, "text": "mixed promoted types",
         "judge_score": "4", "split_index": 2.0, "style": 3, "genre": None, "chunk_index": True},
        {"source_id": "s905", "task": "rephrase", "gen_index": 0, "text": "nested and unicode: caf\u00e9",
         "sampling": {"temperature": 1.0, "n": 2, "stop": ["\n", "\u00e9"]}, "finish_reason": None, "\u00e9": [1.5, "x"]},
        {"source_id": "s906", "task": "rephrase", "gen_index": 0, "text": "float", "judge_score": 3.5, "x": float("nan")},
    ]
    src = write_rows(tmp_path / "g.jsonl", rows)
    surrogate = tmp_path / "s.jsonl"  # a lone surrogate escape: the whole chunk takes the full parse
    surrogate.write_bytes(src.read_bytes() + b'{"source_id": "s907", "task": "rephrase", "gen_index": 0, "text": "\\ud800"}\n')
    for path in (src, surrogate):
        fast, full = _fast_and_plain(path, tiny_tokenizer_path, tmp_path, monkeypatch)
        assert_same_store(fast, full)
        assert meta_texts(fast) == meta_texts(full)  # the JSON text itself
    assert fast.manifest["bad_rows_by_kind"]["invalid_utf8"] == 1


def test_whole_chunk_path_equals_the_row_loop(tmp_path, tiny_tokenizer_path, monkeypatch):
    """A chunk of plain generation rows is taken column by column (plain_generation_columns); the
    plain path (FAST_PATHS off) gives the same store, and any chunk with one row the column path
    cannot take (a bad row, an int id, a blank line, a MAGACorpus row) falls back to the row loop
    as a whole."""
    plain = [{"source_id": f"s{i // 3}", "task": "rephrase", "gen_index": i % 3, "text": f"{SAMPLE_TEXTS[i % 5]} {i}",
              "style": "qa" if i % 2 else None, "judge_score": i % 4, "\u00e9": {"n": i}} for i in range(60)]
    variants = {"plain": plain, "bad": plain[:30] + [{"source_id": "x", "task": "rephrase", "gen_index": -1, "text": "t"}] + plain[30:],
                "int id": plain + [{"source_id": 5, "task": "rephrase", "gen_index": 0, "text": "t"}],
                "maga": plain + [maga_row("m", "0", 1)], "dup": plain + [plain[4]]}
    for name, rows in variants.items():
        src = write_rows(tmp_path / f"{name}.jsonl", rows)
        if name == "plain":
            blank = tmp_path / "blank.jsonl"
            blank.write_bytes(src.read_bytes().replace(b"\n", b"\n\n", 3))
            assert plain_generation_columns(src.read_bytes(), 1) is not None
            assert plain_generation_columns(blank.read_bytes(), 1) is None
            paths = [src, blank]
        else:
            assert plain_generation_columns(src.read_bytes(), 1) is None or name == "dup"
            paths = [src]
        for path in paths:
            fast, loop = _fast_and_plain(path, tiny_tokenizer_path, tmp_path, monkeypatch)
            assert_same_store(fast, loop)
            assert fast.column("line").tolist() == loop.column("line").tolist()
            assert meta_texts(fast) == meta_texts(loop)


def test_a_duplicate_between_the_column_path_and_the_row_loop_is_found(tmp_path, tiny_tokenizer_path):
    """A chunk taken column by column and one read by the row loop make the same identity keys
    (non-ASCII ids included): a row repeated between them, either way round, is a duplicate."""
    plain = [{"source_id": f"b\u00e9{i}", "task": "rephrase", "gen_index": 12, "text": f"{SAMPLE_TEXTS[i % 5]} {i}"}
             for i in range(8)]
    mixed = [maga_row("m", "0", 1), dict(plain[3], text="again, by the row loop"),
             {"source_id": "c\u00e9", "task": "rephrase", "gen_index": 7, "text": "first, by the row loop"}]
    later = [{"source_id": "c\u00e9", "task": "rephrase", "gen_index": 7, "text": "again, by columns"},
             {"source_id": "d", "task": "rephrase", "gen_index": 0, "text": "new"}]
    files = [write_rows(tmp_path / f"{name}.jsonl", rows) for name, rows in (("a", plain), ("b", mixed), ("c", later))]
    assert [plain_generation_columns(f.read_bytes(), 1) is not None for f in files] == [True, False, True]
    st = build_store(files, tiny_tokenizer_path, tmp_path / "s", kind="generations", skip_bad_rows=True, num_proc=1,
                     progress=False)
    assert st.manifest["bad_rows_by_kind"] == {"duplicate_id": 2}
    assert st.source_ids.tolist() == [r["source_id"] for r in plain] + ["m#0", "c\u00e9", "d"]
    with pytest.raises(ValueError) as e:
        build_store(files, tiny_tokenizer_path, tmp_path / "t", kind="generations", num_proc=1, progress=False)
    assert str(e.value).startswith(f"{files[1]}:2: duplicate generation (source_id='b\u00e93', task='rephrase', "
                                   f"gen_index=12) (first at {files[0]}:4)")


@pytest.mark.parametrize("spill", [False, True])
def test_a_bad_row_before_a_duplicate_in_its_chunk_is_the_error(tmp_path, tiny_tokenizer_path, monkeypatch, spill):
    """Only the rows before the bad one count when the first error is chosen, whether the
    identity keys are still in memory or spilled to bucket files."""
    if spill:
        monkeypatch.setattr(store_build, "KEY_SPILL_ROWS", 2)
    rows = [{"source_id": f"s{i}", "task": "rephrase", "gen_index": 0, "text": f"text {i}"} for i in range(6)]
    rows[3] = {"source_id": "s9", "task": "rephrase", "gen_index": "zero", "text": "bad index"}
    rows.append(dict(rows[1]))  # a duplicate of line 2 on line 8, after the bad line 4, in the same chunk
    src = write_rows(tmp_path / "g.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{src}:4: gen_index is 'zero'"):
        build_store(src, tiny_tokenizer_path, tmp_path / "s", kind="generations", num_proc=1, progress=False)
