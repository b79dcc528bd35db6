"""The real shared data: a dolma-format Common Crawl shard and a Llama tokenizer (skips when absent)."""

from __future__ import annotations

import gzip
import json

import pytest
from tokenizers import Tokenizer

from megadoc_pl.data.readers import iter_documents
from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.shared_data


def test_cc_store_matches_the_tokenizers_own_encoding(shared_data, tmp_path):
    src = shared_data / "cc_en_head-0091.jsonl.gz"
    tok_path = shared_data / "llama-test-tokenizer.json"
    rows = [json.loads(line) for line in gzip.open(src, "rt", encoding="utf-8")]
    st = build_store(src, tok_path, tmp_path / "store", progress=False)

    info = load_tokenizer(tok_path)
    assert (info.bos_id, info.eos_id, st.dtype.name) == (1, 2, "uint16")  # <s>, </s>; 32003 ids
    raw = Tokenizer.from_file(str(tok_path))
    assert st.num_documents == len(rows) == 10
    total = 0
    for i, row in enumerate(rows):
        ids = raw.encode(row["text"], add_special_tokens=False).ids
        assert st.tokens(i).tolist() == [st.manifest["bos_id"]] + ids + [st.manifest["eos_id"]]
        # the tokenizer's own template (<s> + text) is our document minus the appended EOS
        assert st.tokens(i)[:-1].tolist() == raw.encode(row["text"]).ids
        assert st.source_id(i) == row["id"]
        # dolma rows: everything but text and id is kept as meta, nested metadata included
        assert st.meta(i) == {k: v for k, v in row.items() if k not in ("text", "id")}
        total += len(ids) + 2
    assert st.num_tokens == total == int(st.lengths.sum())


def test_cc_nested_id_field(shared_data):
    src = shared_data / "cc_en_head-0091.jsonl.gz"
    docs = list(iter_documents(src, text_field="text", id_field="metadata.digest"))
    first = json.loads(gzip.open(src, "rt", encoding="utf-8").readline())
    assert docs[0].id == first["metadata"]["digest"] and docs[0].id.startswith("sha1:")
    assert "digest" not in docs[0].meta["metadata"] and docs[0].meta["id"] == first["id"]
