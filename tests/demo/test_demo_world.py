"""The demo world: deterministic, well-formed, truthful meta, shared facts, a long tail, documents'
own facts (stated by one document only) and long-range structure inside long documents."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megadoc_pl.demo.world import (
    PREDICATES,
    WORLD_VERSION,
    build_world,
    document_id,
    parse_document_id,
    world_jsonl,
    write_world,
)


def _docs(seed: int, n: int) -> list[dict]:
    return [json.loads(line) for line in world_jsonl(seed, n).splitlines()]


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_world(tmp_path / "a.jsonl", seed=3, num_documents=80)
    build_world.cache_clear()  # rebuild from scratch, not from the in-process cache
    b = write_world(tmp_path / "b.jsonl", seed=3, num_documents=80)
    assert a.read_bytes() == b.read_bytes()
    c = write_world(tmp_path / "c.jsonl", seed=4, num_documents=80)
    assert a.read_bytes() != c.read_bytes()


def test_shape_ids_and_meta():
    docs = _docs(0, 120)
    assert len(docs) == 120
    assert [d["id"] for d in docs] == [document_id(0, 120, i) for i in range(120)]
    assert parse_document_id(docs[7]["id"]) == (0, 120, 7)
    assert parse_document_id("demo-v999-s0-n120-000007") is None
    assert parse_document_id("cc-123") is None
    world = build_world(0, 120)
    for d in docs:
        meta = d["meta"]
        assert set(meta) == {"genre", "subject", "entities", "facts", "own_facts", "world"}
        assert meta["world"] == {"seed": 0, "num_documents": 120, "version": WORLD_VERSION}
        assert meta["facts"], f"{d['id']} states no facts"
        assert len(set(meta["facts"])) == len(meta["facts"])
        assert meta["subject"] in world.entities
        assert set(meta["entities"]) <= set(world.entities)
        assert set(meta["own_facts"]) <= set(meta["facts"]) and meta["own_facts"]
        assert d["text"].strip() and "{" not in d["text"]  # every placeholder was filled


def test_meta_facts_are_stated_in_the_text():
    # The template generator trusts meta["facts"]: each fact is stated by one sentence, in order.
    from megadoc_pl.demo.template_backend import split_sentences, states

    world = build_world(1, 150)
    for d in _docs(1, 150):
        sentences = [s.lower() for s in split_sentences(d["text"])]
        at = 0
        for fid in d["meta"]["facts"]:
            keys = sorted((k.lower() for k in world.key_strings(world.facts[fid], d["meta"]["subject"])),
                          key=len, reverse=True)
            hits = [i for i, s in enumerate(sentences) if states(s, keys)]
            later = [i for i in hits if i >= at]
            assert later, (d["id"], fid)  # stated, and after the previous fact of meta
            at = later[0]


def test_every_wording_is_one_sentence():
    # Fact detection works sentence by sentence, so no template may span two sentences.
    from megadoc_pl.demo.template_backend import split_sentences

    for pred in PREDICATES.values():
        for template in pred.statements:
            filled = template.replace("{", "X").replace("}", "")
            assert len(split_sentences(filled)) == 1, template


def test_facts_are_shared_and_varied():
    docs = _docs(0, 400)
    mentions = Counter(f for d in docs for f in d["meta"]["facts"])
    world = build_world(0, 400)
    # Facts recur across documents (what makes restatements useful), and most facts appear.
    assert len(mentions) > 0.6 * len(world.facts)
    genres = Counter(d["meta"]["genre"] for d in docs)
    assert set(genres) == {"biography", "history", "encyclopedia", "news", "list", "chronicle"}
    predicates = {world.facts[f].predicate for f in mentions}
    assert predicates == set(PREDICATES)
    shared = [f for f in mentions if not PREDICATES[world.facts[f].predicate].own]
    assert sum(mentions[f] for f in shared) / len(shared) > 2.0
    # Facts are worded in several ways across the corpus: every wording of `born` is used.
    texts = "\n".join(d["text"] for d in docs)
    used = set()
    for fact in world.facts.values():
        if fact.predicate == "born" and mentions[fact.id]:
            words = world.text_values(fact)
            used |= {i for i, t in enumerate(PREDICATES["born"].statements) if t.format(**words)[1:] in texts}
    assert used == set(range(len(PREDICATES["born"].statements)))


def test_world_rejects_empty():
    with pytest.raises(ValueError, match="num_documents"):
        build_world(0, 0)


def test_own_facts_are_stated_by_their_document_only():
    # Whichever documents the split holds out, their own facts are in no other document (so a
    # held-out document's own facts test generalisation, its shared facts memorisation).
    docs = _docs(0, 400)
    world = build_world(0, 400)
    stated_by: dict[str, set[str]] = {}
    for d in docs:
        for f in d["meta"]["facts"]:
            stated_by.setdefault(f, set()).add(d["id"])
        for f in d["meta"]["own_facts"]:
            assert f.startswith(f"D{parse_document_id(d['id'])[2]}.")
    own = {f for d in docs for f in d["meta"]["own_facts"]}
    assert all(len(stated_by[f]) == 1 for f in own)
    assert all(f not in world.by_entity[e] for f in own for e in world.facts[f].entities)  # never indexed
    share = len(own) / sum(len(d["meta"]["facts"]) for d in docs)
    assert 0.05 < share < 0.3
    # Their literals are new words too: a nickname occurs in no other document's text.
    for d in docs[:100]:
        for f in d["meta"]["own_facts"]:
            if world.facts[f].predicate == "nickname":
                nick = world.facts[f].value("nickname")
                assert sum(nick in o["text"] for o in docs) == 1


def test_long_documents_refer_back_to_earlier_parts():
    # Chronicles: each later part may cite a sentence of an earlier part, the ledger's running
    # totals add up the entries stated so far, the subject's nickname (given early) stands for
    # it later, and a recap closes the document: later text depends on earlier text.
    import re

    world = build_world(0, 400)
    chronicles = [d for d in _docs(0, 400) if d["meta"]["genre"] == "chronicle"]
    assert len(chronicles) >= 10
    cited = totals = 0
    for d in chronicles:
        text = d["text"]
        for part, sentence in re.findall(r"As part (\d+) told: ([^\n]+)", text):
            start = text.index(f"Part {part}:") if int(part) > 1 else 0
            assert sentence in text[start:text.index(f"As part {part} told: {sentence}")]  # stated earlier
            cited += 1
        counts = [int(world.facts[f].value("count")) for f in d["meta"]["facts"]
                  if world.facts[f].predicate == "ledger"]
        running = [int(t.replace(",", "")) for t in re.findall(r"on record for [^.]* to ([\d,]+)\.", text)]
        assert running == [sum(counts[:k]) for k in range(2, len(counts) + 1)]
        totals += len(running)
        nick = next(world.facts[f].value("nickname") for f in d["meta"]["own_facts"]
                    if world.facts[f].predicate == "nickname")
        assert text.index(f'"{nick}"') < text.index("Recap") and f'This account of "{nick}"' in text
    assert cited >= len(chronicles) and totals >= 2 * len(chronicles)
