"""The template generator: each task answered from the source's facts, deterministically,
through the same Request/Response contract as the LLM backends, in its own words (few word
n-grams shared with the source), with partial coverage and a few errors, as LLM rewrites do."""

from __future__ import annotations

import json
import re

import pytest

from megadoc_pl.demo.template_backend import GENRES, STYLES, Source, TemplateBackend, split_sentences
from megadoc_pl.demo.world import build_world, render_document
from megadoc_pl.synth import Request, get_backend
from megadoc_pl.synth.maga import parse_judge, parse_pairs

SEED, N = 0, 200


def _doc(index: int) -> dict:
    return render_document(build_world(SEED, N), index)


def _rich_doc(min_facts: int = 8) -> dict:
    return next(d for d in (_doc(i) for i in range(N)) if len(d["meta"]["facts"]) >= min_facts and d["meta"]["genre"] != "list")


def _req(task: str, payload: dict, n: int = 1, seed: int = 7, rid: str = "r") -> Request:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "do the task now"}]
    return Request(id=rid, messages=messages, n=n, max_new_tokens=64, temperature=1.0, top_p=1.0,
                   seed=seed, task=task, payload=payload)


def _source(doc: dict) -> Source:
    return TemplateBackend()._source({"text": doc["text"], "source_id": doc["id"]})


def _fact_order(src: Source, text: str) -> list[str]:
    """Fact ids in the order the sentences of ``text`` state them."""
    order: list[str] = []
    for sentence in split_sentences(text):
        for fact in src.mentioned(sentence):
            if fact.id not in order:
                order.append(fact.id)
    return order


def test_registered_under_template():
    assert isinstance(get_backend("template"), TemplateBackend)
    assert isinstance(get_backend("template", model="ignored"), TemplateBackend)


def test_source_found_from_meta_or_id_else_sentences():
    doc = _rich_doc()
    backend = TemplateBackend()
    by_meta = backend._source({"text": doc["text"], "meta": doc["meta"]})
    by_id = backend._source({"text": doc["text"], "source_id": doc["id"]})
    assert [f.id for f in by_meta.facts] == [f.id for f in by_id.facts] == doc["meta"]["facts"]
    edited = backend._source({"text": doc["text"] + " Extra.", "source_id": doc["id"]})
    assert not edited.has_facts and edited.sentences[-1] == "Extra."
    plain = backend._source({"text": "Alpha rose. Beta fell.", "source_id": "cc-1"})
    assert plain.sentences == ("Alpha rose.", "Beta fell.")


def _ngrams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("style", STYLES)
def test_rephrase_shares_facts_but_few_word_ngrams(style):
    # An LLM rephrase says much of the same in other words: most facts, a new order, other
    # sentences; the world's documents are written with other templates than the generator's.
    docs = [d for d in (_doc(i) for i in range(60)) if len(d["meta"]["facts"]) >= 6]
    coverage, shared, reordered = [], [], []
    backend = TemplateBackend()
    for doc in docs:
        src = _source(doc)
        resp = backend.generate([_req("rephrase", {"text": doc["text"], "source_id": doc["id"], "style": style}, n=3)])[0]
        assert resp.error is None and len(resp.texts) == 3
        assert len(set(resp.texts)) == 3  # each generation differs
        for text in resp.texts:
            said = [f.id for f in src.mentioned(text)]
            assert said and set(said) <= set(doc["meta"]["facts"])
            coverage.append(len(said) / len(doc["meta"]["facts"]))
            grams = _ngrams(text)
            shared.append(len(grams & _ngrams(doc["text"])) / len(grams))
            assert not set(split_sentences(text)[1:]) & set(split_sentences(doc["text"]))  # no sentence copied
            if len(said) > 2:
                reordered.append(_fact_order(src, text) != [f for f in doc["meta"]["facts"] if f in said])
    mean = sum(coverage) / len(coverage)
    assert 0.6 < mean < 0.95 and min(coverage) < 0.75 and max(coverage) == 1.0  # partial coverage
    assert sum(shared) / len(shared) < 0.1 and max(shared) < 0.3  # own words and structures
    assert sum(reordered) > 0.9 * len(reordered)  # another order (a slip can hide a swap)


def test_generator_lexicon_is_its_own():
    # No generator wording shares a word 4-gram with a world template (placeholders aside).
    from megadoc_pl.demo.lexicon import EASY_SWAPS, LEXICON
    from megadoc_pl.demo.world import PREDICATES

    def grams(template: str) -> set[tuple[str, ...]]:
        return {g for g in _ngrams(template) if not any(w in {r for r, _ in pred.roles} for w in g)}

    assert set(LEXICON) == set(PREDICATES)
    for name, pred in PREDICATES.items():
        world = set().union(*(grams(t) for t in pred.statements))
        lex = LEXICON[name]
        easy = lex.say[0]
        for a, b in EASY_SWAPS:
            easy = easy.replace(a, b)
        for t in (*lex.say, lex.noun, lex.ask, easy):
            assert not grams(t) & world, (name, t)


def test_a_few_facts_come_out_wrong():
    # LLMs slip: about ERROR_RATE of the stated facts carry a wrong year or count, which the
    # fact matcher (and so the MAGA judge) does not count as stated.
    from megadoc_pl.demo.template_backend import ERROR_RATE, _fact_words
    from megadoc_pl.demo.world import rng_for

    world = build_world(SEED, N)
    dated = [f for f in world.facts.values() if f.year][:400]
    wrong = sum(_fact_words(world, f, rng_for("e", f.id), ERROR_RATE) != world.text_values(f) for f in dated)
    assert 0 < wrong < 0.1 * len(dated)
    assert all(_fact_words(world, f, rng_for("e", f.id), 1.0) != world.text_values(f) for f in dated)


def test_deterministic_given_request_seed():
    doc = _rich_doc()
    payload = {"text": doc["text"], "source_id": doc["id"], "style": "wikipedia"}
    backend = TemplateBackend()
    a = backend.generate([_req("rephrase", payload, n=2, seed=1)])[0].texts
    b = get_backend("template").generate([_req("rephrase", payload, n=2, seed=1)])[0].texts
    c = backend.generate([_req("rephrase", payload, n=2, seed=2)])[0].texts
    assert a == b and a != c


def test_rationale_mentions_prefix_and_suffix_facts():
    doc = _rich_doc(10)
    src = _source(doc)
    sentences = split_sentences(doc["text"])
    # Cut after a sentence in the middle (the runner cuts at equal token offsets; any cut works).
    cut = doc["text"].index(sentences[len(sentences) // 2])
    prefix, suffix = doc["text"][:cut], doc["text"][cut:]
    pre = {f.id for f in src.mentioned(prefix)}
    post = {f.id for f in src.mentioned(suffix)} - pre
    assert pre and post
    resp = TemplateBackend().generate([_req("rationale", {"prefix": prefix, "suffix": suffix, "source_id": doc["id"], "split_index": 0}, n=2)])[0]
    assert resp.error is None
    for text in resp.texts:
        said = {f.id for f in src.mentioned(text)}
        assert said & pre and said & post
        assert "prefix" not in text.lower() and "suffix" not in text.lower()
    # Derived statements go beyond restating: an age, an interval, a growth or background facts.
    assert any(len(split_sentences(t)) > len(src.mentioned(t)) for t in resp.texts)


def test_rationale_derives_an_age():
    world = build_world(SEED, N)
    born = next(f for f in world.facts.values() if f.predicate == "born")
    person = born.value("person")
    later = next(world.facts[f] for f in world.by_entity[person]
                 if world.facts[f].predicate != "born" and world.facts[f].year)
    from megadoc_pl.demo.template_backend import _derivations

    name = world.entities[person].name
    assert f"{name} was {later.year - born.year} years old in {later.year}." in _derivations(world, born, later)


def test_maga_pairs_are_valid_json_with_five_distinct_pairs():
    doc = _rich_doc()
    resp = TemplateBackend().generate([_req("maga_pairs", {"text": doc["text"], "source_id": doc["id"], "num_pairs": 5})])[0]
    obj = json.loads(resp.texts[0])
    assert sorted(obj) == sorted([f"genre_{i}" for i in range(1, 6)] + [f"audience_{i}" for i in range(1, 6)])
    pairs = parse_pairs(resp.texts[0])  # the runner's parser reads it
    assert len(pairs) == 5 and len({g for g, _ in pairs}) == 5 and len({a for _, a in pairs}) == 5
    labels = {g.label for g in GENRES}
    assert all(g.split(":")[0] in labels for g, _ in pairs)


def test_maga_reformulate_variants_and_judge():
    doc = _rich_doc()
    src = _source(doc)
    backend = TemplateBackend()
    genre, audience = parse_pairs(backend.generate([_req("maga_pairs", {"text": doc["text"], "source_id": doc["id"]})])[0].texts[0])[0]
    out = {}
    for variant in ("base", "strict", "relaxed"):
        payload = {"text": doc["text"], "source_id": doc["id"], "genre": genre, "audience": audience, "variant": variant}
        out[variant] = backend.generate([_req("maga_reformulate", payload)])[0].texts[0]
    assert {f.id for f in src.mentioned(out["base"])} == set(doc["meta"]["facts"])  # base keeps every fact
    assert out["base"] != doc["text"]
    body = split_sentences(doc["text"])[1:]
    assert all(s in out["strict"] for s in body)  # strict: the source's own sentences, framed
    assert len(src.mentioned(out["relaxed"])) <= len(doc["meta"]["facts"]) // 2  # relaxed drifts
    scores = {}
    for variant, text in out.items():
        verdict = backend.generate([_req("maga_judge", {"text": doc["text"], "source_id": doc["id"], "rewritten": text})])[0].texts[0]
        assert set(json.loads(verdict)) == {"analysis", "score"}
        scores[variant] = parse_judge(verdict)
    assert scores["base"] == scores["strict"] == 5
    assert scores["relaxed"] <= 3


def test_plain_text_fallback_and_errors_per_request():
    text = "Title line\n\nThe mill was built in 1820. Anna Berg founded the mill. It began to grind grain in 1821."
    backend = TemplateBackend()
    reqs = [
        _req("rephrase", {"text": text, "source_id": "x1", "style": "hard"}, rid="a"),
        _req("summarise", {"text": text}, rid="b"),
        _req("maga_judge", {"text": text}, rid="c"),
        _req("maga_judge", {"text": text, "rewritten": text}, rid="d"),
    ]
    a, b, c, d = backend.generate(reqs)
    assert a.error is None and "1820" in a.texts[0] and "Anna Berg" in a.texts[0]
    assert b.error is not None and "unknown task" in b.error and b.texts == []
    assert c.error is not None and "rewritten" in c.error
    assert parse_judge(d.texts[0]) == 5


def test_token_counts_are_whitespace_words():
    doc = _doc(0)
    resp = TemplateBackend().generate([_req("rephrase", {"text": doc["text"], "source_id": doc["id"], "style": "easy"}, n=2)])[0]
    assert resp.prompt_tokens == len("be brief".split()) + len("do the task now".split())
    assert resp.completion_tokens == [len(t.split()) for t in resp.texts]


def test_fact_positions_agree_with_searching_the_pieces():
    # Rationales locate facts by sentence offsets (fast path); the oracle searches each piece.
    from megadoc_pl.demo.template_backend import sentence_spans

    for index in range(0, N, 7):
        doc = _doc(index)
        src = _source(doc)
        spans = sentence_spans(doc["text"])
        assert [doc["text"][a:b] for a, b in spans] == split_sentences(doc["text"]) or doc["meta"]["genre"] == "list"
        # A fact whose key words are among another's ("town lies in region" inside "capital of
        # region is town") is matched by both sentences: the fast path keeps the first in order.
        ambiguous = {f.id for f, k in src._keys for g, k2 in src._keys if g is not f and set(k) <= set(k2)}
        for _, cut in spans[:: max(1, len(spans) // 4)]:
            fast = {f.id for f in src.facts_between(0, cut)} - ambiguous
            # Oracle: the facts some single sentence before the cut states.
            slow = {f.id for a, b in spans if b <= cut for f in src.mentioned(doc["text"][a:b])} - ambiguous
            assert fast == slow, (doc["id"], cut)
            assert fast <= {f.id for f in src.mentioned(doc["text"][:cut])}
