"""Readers: formats, nested fields, content ids, bad rows (exact messages), MAGACorpus generations."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from megadoc_pl.data.readers import (
    BadRowError,
    Document,
    expand_inputs,
    iter_documents,
    iter_generations,
)
from megadoc_pl.utils import content_id

ROWS = [
    {"id": "a", "text": "first document", "meta": {"lang": "en", "raw_text": "RAW A"}, "score": 1.5},
    {"id": "b", "text": "second document", "meta": {"lang": "fr", "raw_text": "RAW B"}, "score": 2.5},
    {"id": "c", "text": "third document", "meta": {"lang": "de", "raw_text": "RAW C"}, "score": 3.5},
]


def write_jsonl(path: Path, rows, raw_lines: list[bytes] | None = None) -> Path:
    blob = b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"".join(line + b"\n" for line in raw_lines or [])
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(blob))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(blob))
    else:
        path.write_bytes(blob)
    return path


def write_parquet(path: Path, rows) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def as_tuples(docs: list[Document]):
    return [(d.id, d.text, d.meta, d.line) for d in docs]


# --------------------------------------------------------------------------------------------
# Formats and fields


def test_all_formats_read_identically(tmp_path):
    plain = list(iter_documents(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    assert as_tuples(plain) == [
        ("a", "first document", {"meta": {"lang": "en", "raw_text": "RAW A"}, "score": 1.5}, 1),
        ("b", "second document", {"meta": {"lang": "fr", "raw_text": "RAW B"}, "score": 2.5}, 2),
        ("c", "third document", {"meta": {"lang": "de", "raw_text": "RAW C"}, "score": 3.5}, 3),
    ]
    for name in ("d.jsonl.gz", "d.jsonl.zst", "d.json.gz"):
        assert as_tuples(list(iter_documents(write_jsonl(tmp_path / name, ROWS)))) == as_tuples(plain), name
    assert as_tuples(list(iter_documents(write_parquet(tmp_path / "d.parquet", ROWS)))) == as_tuples(plain)


def test_multi_frame_zstd(tmp_path):
    path = tmp_path / "two.jsonl.zst"
    cctx = zstandard.ZstdCompressor()
    path.write_bytes(cctx.compress(json.dumps(ROWS[0]).encode() + b"\n") + cctx.compress(json.dumps(ROWS[1]).encode() + b"\n"))
    assert [d.id for d in iter_documents(path)] == ["a", "b"]


def test_nested_text_and_id_fields(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", ROWS)
    docs = list(iter_documents(path, text_field="meta.raw_text", id_field="meta.lang"))
    assert [(d.id, d.text) for d in docs] == [("en", "RAW A"), ("fr", "RAW B"), ("de", "RAW C")]
    # the rest of the row is kept, minus the two nested fields used
    assert docs[0].meta == {"id": "a", "text": "first document", "meta": {}, "score": 1.5}


def test_content_ids_when_rows_have_none(tmp_path):
    rows = [{"text": "alpha beta"}, {"text": "gamma"}, {"id": None, "text": "delta"}, {"id": 7, "text": "eps"}]
    docs = list(iter_documents(write_jsonl(tmp_path / "x.jsonl", rows)))
    assert [d.id for d in docs] == [content_id("alpha beta"), content_id("gamma"), content_id("delta"), "7"]
    assert docs[0].id == "sha1:" + __import__("hashlib").sha1(b"alpha beta").hexdigest()[:20]
    # stable: reading again (another process would do the same) gives the same ids
    assert [d.id for d in iter_documents(tmp_path / "x.jsonl")] == [d.id for d in docs]


def test_directories_expand_sorted_and_skip_hidden(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "b.jsonl", [ROWS[1]])
    write_jsonl(d / "a.jsonl.gz", [ROWS[0]])
    write_jsonl(d / "sub" / "c.jsonl.zst", [ROWS[2]])
    write_jsonl(d / ".partial.jsonl", [{"id": "hidden", "text": "x"}])
    (d / "notes.txt").write_text("ignored")
    # bookkeeping beside the data (the synthesis runner's stats.json) is not read as rows
    (d / "stats.json").write_text('{"requests": 3}')
    assert [p.name for p in expand_inputs(d)] == ["a.jsonl.gz", "b.jsonl", "c.jsonl.zst"]
    assert [doc.id for doc in iter_documents(d)] == ["a", "b", "c"]


def test_input_path_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.csv").write_text("a,b\n")
    cases = {
        tmp_path / "missing.jsonl": f"{tmp_path / 'missing.jsonl'}: no such file or directory (fix: check the input path)",
        tmp_path / "empty": f"{tmp_path / 'empty'}: directory has no input files",
        tmp_path / "x.csv": f"{tmp_path / 'x.csv'}: unsupported file type",
    }
    write_jsonl(tmp_path / "x.jsonl", ROWS)
    cases[tmp_path / "x.jsonl"] = f"{tmp_path / 'x.jsonl'}: input file given more than once"
    for path, start in cases.items():
        if path.name == "x.jsonl":
            path = [tmp_path, path]  # type: ignore[assignment]  # the directory already holds it
        with pytest.raises(ValueError) as e:
            expand_inputs(path)
        assert str(e.value).startswith(start) and "\n" not in str(e.value)


def test_truncated_gzip_is_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl.gz", [{"id": str(i), "text": f"document {i}"} for i in range(500)])
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError) as e:
        list(iter_documents(path))
    assert str(e.value).startswith(f"{path}: cannot read the file") and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Bad rows

BAD_LINES = {
    # kind: (raw line, expected message after "FILE:2: ")
    "invalid_json": (b'{"id": "x", "text": "unterminated', "invalid JSON at column 21 (Unterminated string starting at) (fix: write one JSON object per line or pass --skip-bad-rows)"),
    "invalid_utf8": (b'{"id": "x", "text": "caf\xe9"}', "invalid UTF-8 at byte 24 of the line (fix: re-encode the file as UTF-8 or pass --skip-bad-rows)"),
    "lone_surrogate": (b'{"id": "x", "text": "bad \\ud800 escape"}', "text field 'text' is not valid Unicode (lone surrogate escape) (fix: fix the text encoding or pass --skip-bad-rows)"),
    "missing_text": (b'{"id": "x", "body": "no text"}', "no text field 'text' (fix: set the text field (--text-field / data.text_field) or pass --skip-bad-rows)"),
    "empty_text": (b'{"id": "x", "text": "  \\n "}', "text field 'text' is empty (fix: remove the row or pass --skip-bad-rows)"),
    "non_string_text": (b'{"id": "x", "text": ["a", "b"]}', "text field 'text' is a list, not a string (fix: store the text as a string or pass --skip-bad-rows)"),
    "not_an_object": (b'["id", "text"]', "row is a JSON list, not an object (fix: write one JSON object per line or pass --skip-bad-rows)"),
    "bad_id": (b'{"id": {"k": 1}, "text": "t"}', "id field 'id' is a dict, not a string or integer (fix: give the row a string id, drop the field to derive one from the text, or pass --skip-bad-rows)"),
    "duplicate_id": (b'{"id": "a", "text": "again"}', "duplicate id 'a' (first at FILE:1) (fix: remove the duplicate row, make ids unique, or pass --skip-bad-rows)"),
}
KIND_OF = {"lone_surrogate": "invalid_utf8"}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_each_bad_row_kind_names_file_and_line(tmp_path, case):
    raw, expected = BAD_LINES[case]
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0]], [raw])
    with pytest.raises(BadRowError) as e:
        list(iter_documents(path))
    assert str(e.value) == f"{path}:2: " + expected.replace("FILE", str(path))
    assert e.value.kind == KIND_OF.get(case, case) and e.value.line == 2


def test_skip_bad_rows_counts_by_kind(tmp_path):
    raws = [BAD_LINES[k][0] for k in sorted(BAD_LINES)] + [b"", b'{"id": "z", "text": "last good"}']
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [ROWS[0]], raws)
    counts: dict = {}
    docs = list(iter_documents(path, skip_bad_rows=True, counts=counts))
    assert [d.id for d in docs] == ["a", "z"]
    assert docs[1].line == 12  # 1 good + 9 bad + 1 blank line before it: lines keep counting
    assert counts == {
        "rows": 2,
        "bad_rows": 9,
        "bad_rows_by_kind": {
            "bad_id": 1, "duplicate_id": 1, "empty_text": 1, "invalid_json": 1, "invalid_utf8": 2,
            "missing_text": 1, "non_string_text": 1, "not_an_object": 1,
        },
    }


def test_duplicate_ids_across_files_and_from_content(tmp_path):
    write_jsonl(tmp_path / "1.jsonl", [{"text": "same text"}])
    write_jsonl(tmp_path / "2.jsonl", [{"text": "same text"}])
    with pytest.raises(BadRowError) as e:
        list(iter_documents(tmp_path))
    cid = content_id("same text")
    assert str(e.value) == (
        f"{tmp_path / '2.jsonl'}:1: duplicate id '{cid}' (first at {tmp_path / '1.jsonl'}:1) "
        "(fix: remove the duplicate row, make ids unique, or pass --skip-bad-rows)"
    )


def test_parquet_bad_rows_use_row_numbers(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [{"id": "a", "text": "ok"}, {"id": "b", "text": ""}])
    with pytest.raises(BadRowError) as e:
        list(iter_documents(path))
    assert str(e.value) == f"{path}:2: text field 'text' is empty (fix: remove the row or pass --skip-bad-rows)"


# --------------------------------------------------------------------------------------------
# Generations


def maga_row(docid: str, chunk: str, k: int) -> dict:
    return {
        "meta": {
            "chunk_id": chunk, "docid": docid, "meta_extra": "{}", "source": "fineweb-edu-dedup", "split": "train",
            "genre": f"genre {k}", "audience": f"audience {k}", "raw_text": f"source text of {docid}/{chunk}",
        },
        "content_split": f"reformulation {k} of {docid}/{chunk}",
    }


def test_maga_rows_read_as_generations(tmp_path):
    rows = [maga_row("d1", "0", k) for k in range(3)] + [maga_row("d1", "1", 0), maga_row("d2", "0", 0), maga_row("d1", "0", 3)]
    for path in (write_jsonl(tmp_path / "maga.jsonl.zst", rows), write_parquet(tmp_path / "maga.parquet", rows)):
        gens = list(iter_generations(path))
        assert [(g.source_id, g.task, g.gen_index, g.text) for g in gens] == [
            ("d1#0", "maga", 0, "reformulation 0 of d1/0"),
            ("d1#0", "maga", 1, "reformulation 1 of d1/0"),
            ("d1#0", "maga", 2, "reformulation 2 of d1/0"),
            ("d1#1", "maga", 0, "reformulation 0 of d1/1"),
            ("d2#0", "maga", 0, "reformulation 0 of d2/0"),
            ("d1#0", "maga", 3, "reformulation 3 of d1/0"),
        ]
        assert gens[1].fields == {
            "chunk_id": "0", "docid": "d1", "meta_extra": "{}", "source": "fineweb-edu-dedup", "split": "train",
            "genre": "genre 1", "audience": "audience 1",
        }


def test_spec_generation_rows(tmp_path):
    rows = [
        {"source_id": "s1", "task": "rephrase", "gen_index": 0, "text": "r0", "style": "wikipedia", "model": "m"},
        {"source_id": "s1", "task": "rationale", "gen_index": 0, "text": "t0", "split_index": 0, "split_token_offset": 12},
    ]
    gens = list(iter_generations(write_jsonl(tmp_path / "g.jsonl", rows)))
    assert [(g.source_id, g.task, g.gen_index, g.text, g.fields) for g in gens] == [
        ("s1", "rephrase", 0, "r0", {"style": "wikipedia", "model": "m"}),
        ("s1", "rationale", 0, "t0", {"split_index": 0, "split_token_offset": 12}),
    ]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"source_id": "s", "task": "rephrase", "gen_index": -1, "text": "t"},
         "gen_index is -1, not an integer >= 0 (fix: write generation rows (source_id, task, gen_index, text) or pass --skip-bad-rows)"),
        ({"source_id": "", "task": "rephrase", "gen_index": 0, "text": "t"},
         "source_id is '', not a non-empty string (fix: write generation rows (source_id, task, gen_index, text) or pass --skip-bad-rows)"),
        ({"source_id": "s", "task": "rephrase", "gen_index": 0, "text": 3},
         "text field 'text' is a int, not a string (fix: store the text as a string or pass --skip-bad-rows)"),
        ({"source_id": "s1", "task": "rephrase", "gen_index": 0, "text": "again"},
         "duplicate generation (source_id='s1', task='rephrase', gen_index=0) (first at FILE:1) (fix: remove the duplicate row or pass --skip-bad-rows)"),
        ({"foo": 1},
         "row is neither a generation (source_id, task, gen_index, text) nor a MAGACorpus row (meta.docid, content_split) (fix: write generation rows (docs/data-ingest.md) or pass --skip-bad-rows)"),
    ],
)
def test_bad_generation_rows(tmp_path, row, expected):
    good = {"source_id": "s1", "task": "rephrase", "gen_index": 0, "text": "r0"}
    path = write_jsonl(tmp_path / "g.jsonl", [good, row])
    with pytest.raises(BadRowError) as e:
        list(iter_generations(path))
    assert str(e.value) == f"{path}:2: " + expected.replace("FILE", str(path))
    counts: dict = {}
    assert len(list(iter_generations(path, skip_bad_rows=True, counts=counts))) == 1
    assert counts["bad_rows"] == 1


# Lines where a fast JSON path could differ from json.loads: whitespace, BOM, NaN and out-of-range
# numbers, integers past 64 bits, lone surrogates, duplicate keys, non-objects, invalid UTF-8.
TRICKY_LINES = [
    b'{"a": 1, "text": "plain"}', b"", b"   ", b'  {"a": 2}  ', b'{"a": 3}\r', b"\xef\xbb\xbf{\"a\": 4}",
    b'{"a": NaN}', b'{"a": Infinity, "b": -Infinity}', b'{"a": 1E400}', b'{"a": 1e-400}', b'{"a": -0, "b": -0.0}',
    b'{"a": 18446744073709551616}', b'{"a": -9223372036854775809}', b'{"a": 9223372036854775807}',
    b'{"a": "\\ud800"}', b'{"a": "\\ud83d\\ude00 ok"}', b'{"a": 1, "b": 2, "a": 3}', b"[1, 2]", b'"text"', b"17",
    b'{"a": 1} {"b": 2}', b'{"a": 1},{"b": 2}', b'{"a": [1', b'2]}', b'{"a": "caf\xc3\xa9", "b": "\\u00e9"}',
    b'{"a": "\xff"}', b'{"a": "\x01"}', b'{"a": 0.1, "b": 1.5e3, "c": 12345678.9}', b"{bad json",
]


@pytest.mark.parametrize("orjson_path", [True, False], ids=["orjson", "stdlib-scanner"])
def test_block_rows_equal_decode_line_per_line(monkeypatch, orjson_path):
    """The fast block parser answers exactly as json.loads line by line (decode_line over
    block_lines), on every path: orjson, the stdlib scanner on a decoded block, and (invalid UTF-8
    anywhere) the slow path, including blocks that the long-digits guard keeps from orjson."""
    import megadoc_pl.data.readers as readers

    if not orjson_path:
        monkeypatch.setattr(readers, "orjson_loads", lambda block: None)
    elif readers.orjson_loads(b"{}") is None:
        pytest.skip("orjson is not installed")

    def answers(rows):
        return [(line, r if isinstance(r, dict) else (r.kind, str(r))) for line, r in rows]

    def same(a, b):  # NaN != NaN: compare the JSON text of the answers
        return json.dumps(a, default=str) == json.dumps(b, default=str)

    safe = [ln for ln in TRICKY_LINES if b"\xff" not in ln]
    no_long = [ln for ln in safe if not any(d in ln for d in (b"18446744073709551616", b"9223372036854775809",
                                                              b"9223372036854775807"))]
    for lines in (TRICKY_LINES, safe, no_long, [b'{"x": %d}' % i for i in range(5)]):
        block = b"\n".join(lines) + b"\n"
        oracle = [(line, readers.decode_line(raw, "f.jsonl", line)) for line, raw in readers.block_lines(7, block)]
        got = list(readers.block_rows(7, block, "f.jsonl"))
        assert same(answers(got), answers(oracle))
        for (_, g), (_, o) in zip(got, oracle):  # key order too (it is the order of meta's JSON)
            if isinstance(o, dict):
                assert list(g) == list(o)
    if orjson_path:
        assert readers.orjson_loads(b"\n".join(no_long)) is not None  # the orjson path really ran
        assert readers.orjson_loads(b"\n".join(safe)) is None
