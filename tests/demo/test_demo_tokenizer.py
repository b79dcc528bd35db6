"""The demo tokenizer: deterministic training, specials first, transformers-loadable, and the
length distribution the demo's validation sets rely on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megadoc_pl.demo.tokenizer import build_demo_tokenizer
from megadoc_pl.demo.world import write_world


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("w") / "docs.jsonl", seed=0, num_documents=200)


def test_training_is_deterministic(small_world, tmp_path):
    a = build_demo_tokenizer(small_world, tmp_path / "a", vocab_size=512)
    b = build_demo_tokenizer(small_world, tmp_path / "b", vocab_size=512)
    names = sorted(p.name for p in a.iterdir())
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_specials_vocab_and_loaders(small_world, tmp_path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from megadoc_pl.data.tokenizer import load_tokenizer

    out = build_demo_tokenizer(small_world, tmp_path / "tok", vocab_size=512)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    assert [tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>")] == [0, 1, 2]
    text = json.loads(small_world.read_text().splitlines()[0])["text"]
    ids = tok.encode(text).ids
    assert 0 not in ids and 1 not in ids  # no post-processor: the store adds BOS/EOS
    assert tok.decode(ids) == text

    hf = PreTrainedTokenizerFast.from_pretrained(str(out))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    info = load_tokenizer(out)
    assert (info.bos_id, info.eos_id) == (0, 1)
    assert info.encode(text) == ids


def test_vocab_too_small(small_world, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        build_demo_tokenizer(small_world, tmp_path / "t", vocab_size=100)


def test_default_world_lengths_under_the_demo_tokenizer(tmp_path):
    # The default demo (3000 documents, 2048 vocab, seq_len ~256): most documents 100-400
    # tokens, and a tail of 600-2000-token documents for the `long` validation set.
    docs = write_world(tmp_path / "docs.jsonl", seed=0, num_documents=3000)
    out = build_demo_tokenizer(docs, tmp_path / "tok", vocab_size=2048)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    lengths = np.array([len(e.ids) for e in tok.encode_batch(texts)])
    assert len(lengths) == 3000
    assert ((lengths >= 100) & (lengths <= 400)).mean() > 0.7
    long = lengths >= 600
    assert 0.04 < long.mean() < 0.15
    assert lengths.max() <= 2600  # chronicles: parts, back-references, running totals and a recap
    assert (lengths >= 1200).sum() > 30
