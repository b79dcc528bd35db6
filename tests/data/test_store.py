"""Tokenizer loading and the token store: round trip, dtype, reuse/refuse/rebuild, atomicity, CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import megadoc_pl.data.store_build as store_build
from megadoc_pl.data.store import FORMAT_VERSION, TokenStore, token_dtype
from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.tokenizer import fingerprint_json, load_tokenizer

from helpers import SAMPLE_TEXTS

REPO = Path(__file__).resolve().parents[2]
TEXTS = SAMPLE_TEXTS


def write_docs(path: Path, texts=TEXTS, extra_rows=()) -> Path:
    rows = [{"id": f"doc{i}", "text": t, "src": "unit"} for i, t in enumerate(texts)] + list(extra_rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".partial") or p.name.endswith(".old")]


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_load_tokenizer_file_and_directory(tiny_tokenizer_path):
    a = load_tokenizer(tiny_tokenizer_path)
    b = load_tokenizer(tiny_tokenizer_path.parent)
    assert (a.bos_id, a.eos_id, a.vocab_size) == (0, 1, 300) == (b.bos_id, b.eos_id, b.vocab_size)
    assert a.fingerprint == b.fingerprint
    raw = Tokenizer.from_file(str(tiny_tokenizer_path))
    assert a.encode_batch(TEXTS) == [raw.encode(t, add_special_tokens=False).ids for t in TEXTS]
    assert a.decode(a.encode(TEXTS[0])) == TEXTS[0]
    # the fingerprint is of the canonical JSON: reformatting the file does not change it
    pretty = json.dumps(json.loads(tiny_tokenizer_path.read_text()), indent=4)
    assert fingerprint_json(pretty) == a.fingerprint


def _wordlevel(words: list[str], specials: list[str]) -> Tokenizer:
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0] if specials else None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_special_tokens_from_config_and_missing(tmp_path):
    d = tmp_path / "cfgtok"
    d.mkdir()
    _wordlevel(["hello", "world"], ["<unk>", "[START]", "[STOP]"]).save(str(d / "tokenizer.json"))
    info = load_tokenizer(d)
    assert (info.bos_id, info.eos_id) == (None, None)
    with pytest.raises(ValueError) as e:
        info.require_special(add_bos=True, add_eos=False)
    assert str(e.value).startswith(f"{d}: tokenizer has no BOS token") and "--no-bos" in str(e.value)
    info.require_special(add_bos=False, add_eos=False)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[START]", "eos_token": {"content": "[STOP]"}}))
    info = load_tokenizer(d)
    assert (info.bos_id, info.eos_id) == (1, 2)


def test_llama3_style_specials(tmp_path):
    p = tmp_path / "tokenizer.json"
    _wordlevel(["a", "b"], ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]).save(str(p))
    info = load_tokenizer(p)
    assert (info.bos_id, info.eos_id) == (1, 2)
    # an instruct config names the end-of-turn token: documents still end with end-of-text
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    assert (load_tokenizer(tmp_path).bos_id, load_tokenizer(tmp_path).eos_id) == (1, 2)
    only_turn = tmp_path / "chat"
    only_turn.mkdir()
    _wordlevel(["a"], ["<unk>", "<|im_start|>", "<|im_end|>"]).save(str(only_turn / "tokenizer.json"))
    (only_turn / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(only_turn).eos_id == 2


def test_transformers_directory_without_tokenizer_json(tmp_path, tiny_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(tiny_tokenizer_path), bos_token="<s>", eos_token="</s>")
    d = tmp_path / "hf"
    hf.save_pretrained(str(d))
    # keep only what a slow/legacy directory would have: vocab + merges + config
    Tokenizer.from_file(str(tiny_tokenizer_path)).model.save(str(d))
    (d / "tokenizer.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    info = load_tokenizer(d)
    ref = load_tokenizer(tiny_tokenizer_path)
    assert (info.bos_id, info.eos_id) == (0, 1)
    assert info.encode_batch(TEXTS) == ref.encode_batch(TEXTS)


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(ValueError, match="no such tokenizer file or directory"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError) as e:
        load_tokenizer(bad)
    assert str(e.value).startswith(f"{bad}: not a valid tokenizers JSON") and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Round trip and dtype


def test_round_trip_equals_tokenizer_plus_bos_eos(tmp_path, tiny_tokenizer_path):
    src = write_docs(tmp_path / "docs.jsonl")
    st = build_store(src, tiny_tokenizer_path, tmp_path / "store", progress=False)
    ref = Tokenizer.from_file(str(tiny_tokenizer_path))
    enc = [ref.encode(t, add_special_tokens=False).ids for t in TEXTS]
    m = st.manifest
    assert (m["num_documents"], m["num_tokens"]) == (5, sum(len(e) + 2 for e in enc))
    assert type(m["num_documents"]) is int and type(m["num_tokens"]) is int
    assert (m["add_bos"], m["add_eos"], m["bos_id"], m["eos_id"], m["dtype"], m["kind"]) == (True, True, 0, 1, "uint16", "documents")
    assert m["bad_rows"] == 0 and m["format_version"] == FORMAT_VERSION
    for i, e in enumerate(enc):
        assert st.tokens(i).tolist() == [0] + e + [1]
        assert st.content_tokens(i).tolist() == e
        assert (st.source_id(i), st.task(i), st.gen_index(i)) == (f"doc{i}", "real", -1)
        assert st.meta(i) == {"src": "unit"}
        assert st.location(i) == (str(src.resolve()), i + 1)
    assert st.tokens(2).base is not None  # a view, not a copy
    assert st.lengths.tolist() == [len(e) + 2 for e in enc]
    assert st.content_lengths.tolist() == [len(e) for e in enc]
    assert st.offsets.tolist() == np.concatenate([[0], np.cumsum(st.lengths)[:-1]]).tolist()
    assert st.source_ids.tolist() == [f"doc{i}" for i in range(5)]
    assert st.indices(["doc3", "doc1", "nope"]).tolist() == [1, 3]
    assert st.indices(["doc3", "doc1"], exclude=True).tolist() == [0, 2, 4]
    assert st.find("doc4") == [4] and st.find("nope") == []
    # reopened from disk: same thing
    again = TokenStore.open(tmp_path / "store")
    assert np.array_equal(np.asarray(again.token_array), np.asarray(st.token_array))


def test_no_bos_no_eos(tmp_path, tiny_tokenizer_path):
    src = write_docs(tmp_path / "docs.jsonl")
    st = build_store(src, tiny_tokenizer_path, tmp_path / "s", add_bos=False, add_eos=True, progress=False)
    ref = Tokenizer.from_file(str(tiny_tokenizer_path))
    assert st.tokens(0).tolist() == ref.encode(TEXTS[0], add_special_tokens=False).ids + [1]
    assert (st.manifest["add_bos"], st.manifest["bos_id"], st.manifest["eos_id"]) == (False, None, 1)
    st2 = build_store(src, tiny_tokenizer_path, tmp_path / "s2", add_bos=False, add_eos=False, progress=False)
    assert st2.tokens(0).tolist() == ref.encode(TEXTS[0], add_special_tokens=False).ids


def test_dtype_choice_and_large_vocab(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    words = [f"w{i}" for i in range(70_000)]
    p = tmp_path / "big" / "tokenizer.json"
    p.parent.mkdir()
    _wordlevel(words, ["<unk>", "<s>", "</s>"]).save(str(p))
    src = write_docs(tmp_path / "d.jsonl", ["w5 w69999 w65534", "w65535 w0"])
    st = build_store(src, p, tmp_path / "s", progress=False)
    assert st.dtype == np.uint32 and st.manifest["vocab_size"] == 70_003
    assert st.tokens(0).tolist() == [1, 8, 70_002, 65_537, 2]
    assert st.tokens(1).tolist() == [1, 65_538, 3, 2]


def messy_rows(n: int) -> list:
    rows: list = [{"id": f"d{i}", "text": f"{TEXTS[i % 5]} number {i} " * (1 + i % 7), "k": i} for i in range(n)]
    rows[10] = {"id": "d3", "text": "duplicate of an earlier id"}
    rows[50] = {"id": "e", "text": ""}
    rows[90] = {"text": TEXTS[0]}  # content id
    rows[91] = {"text": TEXTS[0]}  # same content: duplicate content id
    rows[150] = {"id": "x", "text": 12}
    return rows


def write_rows(path: Path, rows, raw_lines=()) -> Path:
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"".join(r + b"\n" for r in raw_lines))
    return path


def test_store_index_equals_reader_output(tmp_path, tiny_tokenizer_path, monkeypatch):
    from megadoc_pl.data.readers import iter_documents

    src = write_rows(tmp_path / "d.jsonl", messy_rows(200), [b"{broken", b'{"id": "late", "text": "caf\xe9 ok"}'])
    counts: dict = {}
    docs = list(iter_documents(src, skip_bad_rows=True, counts=counts))
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 3000)  # duplicates found across chunk borders
    st = build_store(src, tiny_tokenizer_path, tmp_path / "s", skip_bad_rows=True, num_proc=1, progress=False)
    ref = load_tokenizer(tiny_tokenizer_path)
    assert st.source_ids.tolist() == [d.id for d in docs]
    assert [st.location(i)[1] for i in range(len(st))] == [d.line for d in docs]
    assert [st.meta(i) for i in range(len(st))] == [d.meta for d in docs]
    assert [st.content_tokens(i).tolist() for i in range(len(st))] == ref.encode_batch([d.text for d in docs])
    assert (st.manifest["bad_rows"], st.manifest["bad_rows_by_kind"]) == (counts["bad_rows"], counts["bad_rows_by_kind"])
    assert counts["bad_rows_by_kind"] == {"duplicate_id": 2, "empty_text": 1, "non_string_text": 1, "invalid_json": 1, "invalid_utf8": 1}


def test_process_pool_matches_in_process(tmp_path, tiny_tokenizer_path, monkeypatch):
    src = write_rows(tmp_path / "d.jsonl", messy_rows(300))
    single = build_store(src, tiny_tokenizer_path, tmp_path / "one", skip_bad_rows=True, num_proc=1, progress=False)
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 2000)  # many chunks, so ordering matters
    multi = build_store(src, tiny_tokenizer_path, tmp_path / "two", skip_bad_rows=True, num_proc=2, parallel="processes", progress=False)
    assert (multi.manifest["parallel"], multi.manifest["num_proc"]) == ("processes", 2)
    assert (single.manifest["parallel"], single.manifest["num_proc"]) == ("threads", 1)
    assert np.array_equal(np.asarray(multi.token_array), np.asarray(single.token_array))
    assert np.array_equal(multi.offsets_full, single.offsets_full)
    assert multi.source_ids.tolist() == single.source_ids.tolist()
    assert multi.manifest["bad_rows_by_kind"] == single.manifest["bad_rows_by_kind"]
    assert [multi.meta(i) for i in range(len(multi))] == [single.meta(i) for i in range(len(single))]
    # without skipping, a worker's bad row is the same one-line error, and nothing is left behind
    with pytest.raises(ValueError) as e:
        build_store(src, tiny_tokenizer_path, tmp_path / "three", num_proc=2, parallel="processes", progress=False)
    assert str(e.value).startswith(f"{src}:11: duplicate id 'd3' (first at {src}:4)")
    assert not (tmp_path / "three").exists() and no_partials(tmp_path)


# --------------------------------------------------------------------------------------------
# Reuse, refuse, rebuild, atomicity


def test_reuse_refuse_rebuild(tmp_path, tiny_tokenizer_path):
    from helpers import build_tiny_tokenizer

    src = write_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "store"
    first = build_store(src, tiny_tokenizer_path, out, progress=False)
    inode = (out / "tokens.bin").stat().st_ino
    # same inputs: reused, not rewritten (also from a copy of the input elsewhere: contents count)
    copy = tmp_path / "elsewhere" / "docs.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(src.read_bytes())
    again = build_store(copy, tiny_tokenizer_path, out, progress=False)
    assert (out / "tokens.bin").stat().st_ino == inode and again.num_tokens == first.num_tokens

    other_tok = build_tiny_tokenizer(tmp_path / "tok2", vocab_size=280)
    with pytest.raises(ValueError) as e:
        build_store(src, other_tok, out, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{out}: token store was built from different settings: tokenizer (fingerprint ")
    assert msg.endswith("(fix: pass --rebuild / data.rebuild=true, or use another output directory)") and "\n" not in msg

    with pytest.raises(ValueError, match=r"add_eos \(True vs False\)"):
        build_store(src, tiny_tokenizer_path, out, add_eos=False, progress=False)

    write_docs(src, TEXTS + ["one more document"])
    with pytest.raises(ValueError) as e:
        build_store(src, tiny_tokenizer_path, out, progress=False)
    assert "input files (1 files vs 1; contents differ)" in str(e.value)
    assert f"new or changed: {src.resolve()}" in str(e.value)
    assert (out / "tokens.bin").stat().st_ino == inode  # refused: untouched

    rebuilt = build_store(src, tiny_tokenizer_path, out, rebuild=True, progress=False)
    assert rebuilt.num_documents == 6 and (out / "tokens.bin").stat().st_ino != inode
    assert no_partials(tmp_path)


def test_interrupted_build_leaves_no_store(tmp_path, tiny_tokenizer_path, monkeypatch):
    texts = [f"document {i} " * 50 for i in range(200)]
    src = write_docs(tmp_path / "d.jsonl", texts, extra_rows=[{"id": "bad", "text": ""}])
    monkeypatch.setattr(store_build, "CHUNK_BYTES", 1000)  # several chunks written before the failure
    with pytest.raises(ValueError, match=r"d.jsonl:201: text field 'text' is empty"):
        build_store(src, tiny_tokenizer_path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)

    class InterruptedTokenizer:  # Ctrl-C while the fourth chunk is tokenized
        def __init__(self, tok):
            self.tok, self.calls = tok, itertools.count(1)

        def encode_batch(self, texts, add_special_tokens):
            if next(self.calls) == 4:
                raise KeyboardInterrupt
            return self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)

    info = load_tokenizer(tiny_tokenizer_path)
    interrupted = dataclasses.replace(info, tokenizer=InterruptedTokenizer(info.tokenizer))
    with pytest.raises(KeyboardInterrupt):
        build_store(src, interrupted, tmp_path / "out", skip_bad_rows=True, parallel="threads", progress=False)
    assert not (tmp_path / "out").exists() and no_partials(tmp_path)


def test_skipped_rows_recorded_and_empty_result(tmp_path, tiny_tokenizer_path):
    src = write_docs(tmp_path / "d.jsonl", extra_rows=[{"id": "doc0", "text": "dup"}, {"id": "e", "text": ""}, {"id": "n", "text": 5}])
    st = build_store(src, tiny_tokenizer_path, tmp_path / "s", skip_bad_rows=True, progress=False)
    assert st.num_documents == 5
    assert (st.manifest["bad_rows"], st.manifest["bad_rows_by_kind"]) == (3, {"duplicate_id": 1, "empty_text": 1, "non_string_text": 1})
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text('{"text": ""}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"no usable rows \(2 bad rows skipped\)"):
        build_store(only_bad, tiny_tokenizer_path, tmp_path / "s2", skip_bad_rows=True, progress=False)
    assert not (tmp_path / "s2").exists()


def test_open_checks_header_and_version(tmp_path, tiny_tokenizer_path):
    out = tmp_path / "s"
    build_store(write_docs(tmp_path / "d.jsonl"), tiny_tokenizer_path, out, progress=False)
    with pytest.raises(ValueError, match="not a token store"):
        TokenStore.open(tmp_path)
    with pytest.raises(ValueError, match="exists but is not a token store"):
        build_store(tmp_path / "d.jsonl", tiny_tokenizer_path, tmp_path, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99, this code reads 1"):
        TokenStore.open(out)
    (out / "manifest.json").write_text(json.dumps(manifest))
    blob = bytearray((out / "tokens.bin").read_bytes())
    blob[:8] = b"XXXXXXXX"
    (out / "tokens.bin").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="bad magic"):
        TokenStore.open(out)


# --------------------------------------------------------------------------------------------
# Generations


def test_generation_store(tmp_path, tiny_tokenizer_path):
    rows = [
        {"source_id": "s1", "task": "rephrase", "gen_index": 1, "text": TEXTS[0], "style": "qa"},
        {"source_id": "s1", "task": "rationale", "gen_index": 0, "text": TEXTS[1], "split_index": 2, "judge_score": 4},
        {"meta": {"docid": "d", "chunk_id": "3", "genre": "poem", "audience": "kids", "raw_text": "r"}, "content_split": TEXTS[2]},
    ]
    src = tmp_path / "g.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    st = build_store(src, tiny_tokenizer_path, tmp_path / "s", kind="generations", progress=False)
    assert st.kind == "generations" and st.manifest["text_field"] is None
    assert st.source_ids.tolist() == ["s1", "s1", "d#3"]
    assert st.tasks.tolist() == ["rephrase", "rationale", "maga"]
    assert st.gen_indices.tolist() == [1, 0, 0]
    assert st.column("split_index").tolist() == [-1, 2, -1]
    assert st.column("judge_score")[1] == 4.0 and np.isnan(st.column("judge_score")[0])
    assert st.column("genre").tolist() == ["", "", "poem"]
    assert st.column("style").tolist() == ["qa", "", ""]
    assert st.meta(2) == {"docid": "d", "chunk_id": "3", "genre": "poem", "audience": "kids"}
    assert st.find("s1") == [0, 1]
    ref = Tokenizer.from_file(str(tiny_tokenizer_path))
    assert st.tokens(2).tolist() == [0] + ref.encode(TEXTS[2], add_special_tokens=False).ids + [1]
    with pytest.raises(KeyError, match="no column 'nope'"):
        st.column("nope")


# --------------------------------------------------------------------------------------------
# tools/prepare.py


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "tools" / "prepare.py"), *args], capture_output=True, text=True, env=env, timeout=120)


def test_prepare_cli(tmp_path, tiny_tokenizer_path):
    src = write_docs(tmp_path / "docs.jsonl", extra_rows=[{"id": "x", "text": ""}])
    out = tmp_path / "store"
    bad = run_prepare("--input", str(src), "--tokenizer", str(tiny_tokenizer_path), "--out", str(out), "--quiet")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"error: {src}:6: text field 'text' is empty (fix: remove the row or pass --skip-bad-rows)\n"
    assert not out.exists() and no_partials(tmp_path)

    ok = run_prepare("--input", str(src), "--tokenizer", str(tiny_tokenizer_path), "--out", str(out), "--skip-bad-rows", "--no-eos", "--quiet", "--num-proc", "1")
    assert ok.returncode == 0, ok.stderr
    st = TokenStore.open(out)
    assert ok.stdout.strip() == f"{out}: 5 documents, {st.num_tokens} tokens (uint16), skipped 1 bad rows {{'empty_text': 1}}"
    assert (st.manifest["add_eos"], st.manifest["bad_rows"]) == (False, 1)

    missing = run_prepare("--input", str(tmp_path / "nope"), "--tokenizer", str(tiny_tokenizer_path), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no such file or directory" in missing.stderr


def test_compressed_and_parquet_inputs_give_the_same_store(tmp_path, tiny_tokenizer_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rows = [{"id": f"d{i}", "text": f"{TEXTS[i % 5]} {i}", "k": i} for i in range(50)]
    plain = write_rows(tmp_path / "d.jsonl", rows)
    zst = tmp_path / "d.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=16)
    monkeypatch.setattr(store_build, "PARQUET_BATCH_ROWS", 7)
    stores = [build_store(p, tiny_tokenizer_path, tmp_path / f"s-{p.name}", progress=False)
              for p in (plain, zst, tmp_path / "d.parquet")]
    for st in stores[1:]:
        assert np.array_equal(np.asarray(st.token_array), np.asarray(stores[0].token_array))
        assert st.source_ids.tolist() == stores[0].source_ids.tolist()
        assert st.column("line").tolist() == list(range(1, 51))
        assert st.meta(49) == {"k": 49}


def test_documents_that_encode_to_nothing(tmp_path):
    from tokenizers import Regex, normalizers

    tok = _wordlevel(["b"], ["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Replace(Regex("a"), "")  # "aaa" normalises to the empty string
    p = tmp_path / "tokenizer.json"
    tok.save(str(p))
    src = write_docs(tmp_path / "d.jsonl", ["aaa", "a a"])
    bare = build_store(src, p, tmp_path / "bare", add_bos=False, add_eos=False, progress=False)
    assert (bare.num_documents, bare.num_tokens, bare.lengths.tolist(), bare.tokens(1).tolist()) == (2, 0, [0, 0], [])
    framed = build_store(src, p, tmp_path / "framed", progress=False)
    assert [framed.tokens(i).tolist() for i in range(2)] == [[1, 2], [1, 2]]


def test_written_files_are_readable_by_others(tmp_path):
    """Atomic writes go through mkstemp (0600); results must follow the umask like ordinary files."""
    import os
    import stat

    from megadoc_pl.utils import atomic_dir, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
