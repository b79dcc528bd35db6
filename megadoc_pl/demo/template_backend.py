"""The demo's template generator: a generation backend that restates demo-world facts.

It answers the same ``Request`` objects as the LLM backends (``megadoc_pl.synth``), reading the
structured ``payload`` instead of the prompt, so the runner, files and provenance are exactly
those of a real generation run. It is a stand-in for an LLM, designed from what LLM rewrites do
(not tuned against any loss): it writes in its own words (``lexicon``: other words and sentence
structures than the world's templates, a register per style or audience), keeps only part of
the facts (``KEEP``) in a new order, gets a few wrong (``ERROR_RATE``), and its rationales derive
new statements and add background facts (shared world facts only, never a document's own).

How it finds the facts of a source document, in order of preference:

1. ``payload["meta"]`` (or ``payload["source_meta"]``) carries the demo world's meta
   (``world`` = seed/num_documents/version, ``facts`` = fact ids, ``subject``);
2. ``payload["source_id"]`` is a demo document id (``demo-v2-s0-n3000-000123`` names its
   world), and the payload's text is part of that document: the document is re-rendered;
3. otherwise the text's own sentences are used as the statements (any text works, the output
   is simply less varied).

Payload keys read: ``text`` (source), ``style`` (rephrase), ``prefix``/``suffix`` (rationale),
``num_pairs`` (maga_pairs, default 5), ``genre``/``audience``/``variant`` (maga_reformulate),
``rewritten`` (maga_judge; ``reformulation`` accepted too), ``prefix`` (self_distill: the
continuation restates the facts the prefix has not stated yet, in a new order). Token counts in the responses are
whitespace-separated words, an approximation of real tokenizer counts.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from typing import Callable

from megadoc_pl.demo.lexicon import CASUAL_FRAMES, EASY_SWAPS, FORMAL_FRAMES, LEXICON
from megadoc_pl.demo.world import (
    PREDICATES,
    Fact,
    World,
    build_world,
    capitalize_first,
    leads_with,
    parse_document_id,
    render_document,
    render_template,
    rng_for,
    world_for_meta,
)
from megadoc_pl.synth import Request, Response, register_backend
from megadoc_pl.synth.tasks import MAGA_VARIANTS

# Bump when the generated text changes: it is part of the demo's generation cache key and of the
# model name recorded in every row.
TEMPLATE_VERSION = 2
STYLES = ("wikipedia", "qa", "easy", "hard")
# What LLM rewrites do that a re-rendering does not: drop some facts (a rephrase keeps each fact
# with a probability drawn per generation from KEEP) and get a few wrong (a year or a count).
KEEP = (0.6, 1.0)
ERROR_RATE = 0.03  # MAGA's base reformulations are asked to keep every fact and do (judge score 5)
TASKS = ("rephrase", "rationale", "maga_pairs", "maga_reformulate", "maga_judge", "self_distill")

# --------------------------------------------------------------------------------------------
# Source statements: world facts when known, else the text's sentences
# --------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``, as ``split_sentences`` cuts them."""
    spans = []
    for line in re.finditer(r"[^\n]+", text):
        start = line.start()
        for m in _SENTENCE_END.finditer(line.group()):
            spans.append((start, line.start() + m.start()))
            start = line.start() + m.end()
        spans.append((start, line.end()))
    return spans


def split_sentences(text: str) -> list[str]:
    """Sentences of a text; title lines and list items count as sentences."""
    out = []
    for block in re.split(r"\n+", text):
        block = block.strip().lstrip("-*").strip()
        out += [s.strip() for s in _SENTENCE_END.split(block) if s.strip()]
    return out


def states(sentence: str, keys: list[str]) -> bool:
    """Whether ``sentence`` holds every key word, each at its own place: a key found inside a
    longer one does not count ("Garford" inside "Garford Glass Company"). Keys longest first."""
    for key in keys:
        i = sentence.find(key)
        if i < 0:
            return False
        sentence = sentence[:i] + "\0" + sentence[i + len(key):]
    return True


@dataclass
class Source:
    """What a source says: world facts (``world`` set) or plain sentences."""

    text: str
    world: World | None = None
    subject: str | None = None
    facts: tuple[Fact, ...] = ()
    sentences: tuple[str, ...] = ()

    @property
    def has_facts(self) -> bool:
        return self.world is not None and bool(self.facts)

    @property
    def name(self) -> str:
        if self.world is not None and self.subject in self.world.entities:
            return capitalize_first(self.world.entities[self.subject].name)
        first = self.sentences[0] if self.sentences else self.text.strip()[:60]
        return first.rstrip(".")[:60]

    @functools.cached_property
    def rendered(self) -> dict:
        """Sentences rendered for this source (a cache for ``say``)."""
        return {}

    @functools.cached_property
    def _keys(self) -> list[tuple[Fact, list[str]]]:
        """Each fact with its key words, lower-cased, longest first (see ``states``)."""
        assert self.world is not None
        return [(f, sorted((k.lower() for k in self.world.key_strings(f, skip_entity=self.subject)),
                           key=len, reverse=True)) for f in self.facts]

    def mentioned(self, text: str) -> list[Fact]:
        """The source facts that ``text`` states: all key words of the fact in one sentence."""
        low = text.lower()
        sentences = [s.lower() for s in split_sentences(text)]
        return [f for f, keys in self._keys
                if all(k in low for k in keys) and any(states(s, keys) for s in sentences)]

    @functools.cached_property
    def _fact_spans(self) -> list[tuple[int, int, Fact]]:
        """(start, end, fact): the sentence of the source that states each fact.

        World documents state their facts in meta order, so the search for the next fact starts
        at the sentence of the previous one (and wraps around for other texts).
        """
        low = self.text.lower()
        spans = sentence_spans(self.text)
        out, j = [], 0
        for fact, keys in self._keys:
            for k in list(range(j, len(spans))) + list(range(j)):
                a, b = spans[k]
                if states(low[a:b], keys):
                    out.append((a, b, fact))
                    j = k
                    break
        return out

    def facts_between(self, lo: int, hi: int) -> list[Fact]:
        """Facts stated by whole sentences inside ``text[lo:hi]`` (what ``mentioned`` would find
        for that piece, in the usual case, without searching it)."""
        return [f for a, b, f in self._fact_spans if lo <= a and b <= hi]


def _source_from_meta(text: str, meta: dict | None) -> Source | None:
    world = world_for_meta(meta)
    if world is None or not isinstance(meta, dict):
        return None
    facts = [world.fact(f) for f in meta.get("facts", [])]
    if not any(facts):
        return None
    return Source(text, world, meta.get("subject"), tuple(f for f in facts if f is not None))


@functools.lru_cache(maxsize=4096)
def _demo_source(seed: int, num_documents: int, index: int) -> Source | None:
    doc = render_document(build_world(seed, num_documents), index)
    return _source_from_meta(doc["text"], doc["meta"])


def _source_from_id(source_id: str, payload: dict) -> Source | None:
    """Re-render a demo document from its id; used only if the payload's text comes from it."""
    parsed = parse_document_id(source_id)
    if parsed is None:
        return None
    src = _demo_source(*parsed)
    pieces = [payload[k] for k in ("text", "prefix", "suffix") if isinstance(payload.get(k), str)]
    if src is None or not all(piece in src.text for piece in pieces):
        return None  # the text was edited: fall back to its sentences
    return src


# --------------------------------------------------------------------------------------------
# Rendering helpers
# --------------------------------------------------------------------------------------------

_FUNCTION_WORDS = {"In", "The", "By", "Since", "As", "People", "Many", "It", "He", "She", "Its", "His", "Her",
                   "During", "Records", "Of", "Scholars", "One", "Among", "Within", "Out", "At", "With", "Born",
                   "Measured", "Chief", "Weather", "Most", "Lessons", "Credit", "Copies", "Construction",
                   "Throughout", "Death", "A", "Locals", "People"}


def decapitalize(sentence: str) -> str:
    """Lower-case the first word only if it is a function word or pronoun (names stay)."""
    first = sentence.split(" ", 1)[0].rstrip(",")
    return sentence[:1].lower() + sentence[1:] if first in _FUNCTION_WORDS else sentence


def _fact_words(world: World, fact: Fact, rng: random.Random, error_rate: float) -> dict[str, str]:
    """The fact's words; with probability ``error_rate`` one year or count is wrong (LLMs slip)."""
    words = world.text_values(fact)
    if error_rate and rng.random() < error_rate:
        kinds = dict(PREDICATES[fact.predicate].roles)
        numeric = [r for r, k in kinds.items() if k in ("year", "count")]
        if numeric:
            role = rng.choice(numeric)
            true = int(fact.value(role))  # type: ignore[arg-type]
            if kinds[role] == "year":
                wrong = f"{true + rng.choice((-1, 1)) * rng.randint(1, 9)}"
            else:
                wrong = f"{max(1, round(true * rng.uniform(0.6, 1.4))) + (true == 1):,}"
            words = {**words, role: wrong if wrong != words[role] else f"{true + 1:,}"}
    return words


def _pick(fact: Fact, register: str, rng: random.Random) -> str:
    """A declarative wording; the easy register keeps to the simpler first one."""
    wordings = LEXICON[fact.predicate].say
    return wordings[0] if register == "easy" else wordings[rng.random() < 0.5]


def say(world: World, fact: Fact, rng: random.Random, template: str | None = None,
        pronoun_for: str | None = None, register: str = "plain", error_rate: float = 0.0,
        cache: dict | None = None) -> str:
    """One sentence stating ``fact`` in the generator's own words (``lexicon``), in a register:
    ``plain``, ``easy`` (simpler verbs), ``formal`` (a nominalisation in a scholarly frame) or
    ``casual`` (chatty frames). ``cache`` keeps rendered sentences of one source (G generations
    reuse them; the random draws are the same with or without it)."""
    lex = LEXICON[fact.predicate]
    words = _fact_words(world, fact, rng, error_rate)
    if register == "formal":
        return capitalize_first(rng.choice(FORMAL_FRAMES).format(noun=lex.noun.format(**words)))
    template = template or _pick(fact, register, rng)
    key = (fact.id, template, pronoun_for, register)
    sentence = cache.get(key) if cache is not None and words is world.text_values(fact) else None
    if sentence is None:
        if register == "easy":
            for a, b in EASY_SWAPS:
                template = template.replace(a, b)
        sentence = render_template(world, fact, template, pronoun_for, words)
        if cache is not None and words is world.text_values(fact):
            cache[key] = sentence
    if register == "casual":
        sentence = rng.choice(CASUAL_FRAMES).format(say=sentence, say_lc=decapitalize(sentence))
    return sentence


def _statements(src: Source, facts: list[Fact], rng: random.Random, register: str = "plain",
                error_rate: float = ERROR_RATE) -> list[str]:
    """One sentence per fact, pronouns for the subject when it leads twice in a row."""
    assert src.world is not None
    out, last = [], None
    for fact in facts:
        template = _pick(fact, register, rng)
        lead = src.subject if src.subject and leads_with(fact, template, src.subject) else None
        pronoun = src.subject if lead and last == lead and rng.random() < 0.5 and register != "formal" else None
        out.append(say(src.world, fact, rng, template, pronoun, register, error_rate, src.rendered))
        last = lead
    return out


def _covered(facts: list[Fact], rng: random.Random, keep: float) -> list[Fact]:
    """The facts a rewrite keeps, each with probability ``keep`` (at least one)."""
    kept = [f for f in facts if rng.random() < keep]
    return kept or [facts[rng.randrange(len(facts))]]


def _reordered(items: list, rng: random.Random) -> list:
    """A shuffled copy that differs from ``items`` whenever it can (two or more distinct items)."""
    out = list(items)
    rng.shuffle(out)
    if len(out) > 1 and out == list(items):
        out = out[1:] + out[:1]
    return out


def _paragraphs(sentences: list[str], rng: random.Random, lo: int = 3, hi: int = 5) -> list[str]:
    paras, i = [], 0
    while i < len(sentences):
        k = rng.randint(lo, hi)
        paras.append(" ".join(sentences[i:i + k]))
        i += k
    return paras


_CONNECTORS = ("; moreover, {b}", ", whereas {b}", "; furthermore, {b}", ". It is also recorded that {b}",
               ", and, notably, {b}", "; in addition, {b}")
_SYNONYMS = (("was born", "came into the world"), ("built", "constructed"), ("founded", "established"),
             ("moved to", "relocated to"), ("known for", "noted for"), ("makes", "produces"),
             ("died", "passed away"), ("bought", "acquired"), ("began", "commenced"))


def _reword(sentence: str, rng: random.Random) -> str:
    """Fallback wording change for plain sentences: a few deterministic synonym swaps."""
    for a, b in _SYNONYMS:
        if a in sentence and rng.random() < 0.7:
            sentence = sentence.replace(a, b, 1)
    return sentence


def _fuse(sentences: list[str], rng: random.Random, p: float) -> list[str]:
    """Each sentence joined to the next with a semicolon with probability ``p``."""
    out: list[str] = []
    for s in sentences:
        if out and out[-1].endswith(".") and rng.random() < p:
            out[-1] = out[-1][:-1] + "; " + decapitalize(s)
        else:
            out.append(s)
    return out


def _join_hard(sentences: list[str], rng: random.Random) -> list[str]:
    """Pairs of sentences fused with scholarly connectors."""
    out = []
    for i in range(0, len(sentences), 2):
        a = sentences[i]
        if i + 1 < len(sentences):
            b = decapitalize(sentences[i + 1])
            a = a.rstrip(".") + rng.choice(_CONNECTORS).format(b=b)
        out.append(a)
    return out


# --------------------------------------------------------------------------------------------
# rephrase
# --------------------------------------------------------------------------------------------


def rephrase(src: Source, style: str, rng: random.Random) -> str:
    """The source's statements in ``style``, in a new order and (for facts) new wording."""
    if style not in STYLES:
        raise ValueError(f"unknown rephrase style '{style}' (known: {', '.join(STYLES)})")
    name = src.name
    if src.has_facts:
        facts = _reordered(_covered(list(src.facts), rng, rng.uniform(*KEEP)), rng)
        if style == "qa":
            assert src.world is not None
            lines = [f"Questions and answers about {name}"]
            for fact in facts:
                q = LEXICON[fact.predicate].ask.format(**src.world.text_values(fact))
                a = say(src.world, fact, rng, error_rate=ERROR_RATE)
                lines.append(f"Q: {capitalize_first(q)}\nA: {a}")
            return "\n\n".join(lines)
        sentences = _statements(src, facts, rng, {"wikipedia": "plain", "easy": "easy", "hard": "formal"}[style])
        if style == "wikipedia":  # some pairs fused into one sentence: another sentence structure
            sentences = _fuse(sentences, rng, 0.3)
    else:
        sentences = [_reword(s, rng) for s in _reordered(list(src.sentences[1:] or src.sentences), rng)]
        if style == "qa":
            lines = [f"Questions and answers about {name}"]
            for i, s in enumerate(sentences, 1):
                lines.append(f"Q: What is point {i} about {name}?\nA: {s}")
            return "\n\n".join(lines)
    if style == "wikipedia":
        title = rng.choice((name, f"{name} (article)", f"{name}: overview"))
        return "\n\n".join([title] + _paragraphs(sentences, rng, 3, 6))
    if style == "easy":
        title = rng.choice((f"{name} in simple words", f"Learning about {name}", f"{name}: the easy version"))
        return "\n\n".join([title] + _paragraphs(sentences, rng, 2, 3))
    title = rng.choice((f"{name}: an analytical account", f"On {name}: a considered survey",
                        f"{name}, examined"))
    return "\n\n".join([title] + _paragraphs(_join_hard(sentences, rng), rng, 2, 4))


# --------------------------------------------------------------------------------------------
# rationale
# --------------------------------------------------------------------------------------------


def _derivations(world: World, a: Fact, b: Fact) -> list[str]:
    """Statements that follow from two facts: ages, intervals, growth, places in regions."""
    out: list[str] = []
    ents_a, ents_b = set(a.entities), set(b.entities)
    shared = sorted(ents_a & ents_b)
    for ent_id in shared:
        ent = world.entities[ent_id]
        name = capitalize_first(ent.name)
        if a.year is not None and b.year is not None and a.year != b.year:
            lo, hi = sorted((a.year, b.year))
            if ent.kind == "person" and "born" in (a.predicate, b.predicate):
                born = a if a.predicate == "born" else b
                other = b if born is a else a
                if other.year is not None and other.year > born.year:  # type: ignore[operator]
                    out.append(f"{name} was {other.year - born.year} years old in {other.year}.")  # type: ignore[operator]
            elif a.predicate == b.predicate == "population":
                pa, pb = (a, b) if a.year < b.year else (b, a)  # type: ignore[operator]
                diff = int(pb.value("count")) - int(pa.value("count"))  # type: ignore[arg-type]
                verb = "grew" if diff >= 0 else "shrank"
                out.append(f"Between {pa.year} and {pb.year}, the population of {name} {verb} by {abs(diff):,}.")
            else:
                out.append(f"For {name}, {hi - lo} years passed between {lo} and {hi}.")
    return out


def _background(world: World, ent_id: str, known: set[str], rng: random.Random) -> str | None:
    """A world fact about ``ent_id`` that the source does not state (knowledge from elsewhere)."""
    extra = [f for f in world.by_entity.get(ent_id, []) if f not in known]
    if not extra:
        return None
    return say(world, world.facts[rng.choice(extra)], rng)


def rationale(src: Source, prefix: str, suffix: str, rng: random.Random) -> str:
    """Thinking that leads from what ``prefix`` states to what ``suffix`` states."""
    if not src.has_facts:
        before = split_sentences(prefix)[-2:]
        after = split_sentences(suffix)[:3]
        parts = [f"Recall: {_reword(s, rng)}" for s in before]
        parts += [f"It follows naturally that {decapitalize(s)}" for s in after]
        return " ".join(parts) or "Nothing needs to be added here."
    world = src.world
    assert world is not None
    if src.text.startswith(prefix + suffix):  # the usual cut (no truncation): use sentence offsets
        cut = len(prefix)
        pre, post = src.facts_between(0, cut), src.facts_between(cut, len(prefix) + len(suffix))
    else:
        pre, post = src.mentioned(prefix), src.mentioned(suffix)
    pre_ids = {f.id for f in pre}
    post_new = [f for f in post if f.id not in pre_ids] or post
    known = {f.id for f in src.facts}
    lines: list[str] = []
    for fact in pre[-1:]:  # one premise from before the split; the thinking is about what follows
        lines.append(say(world, fact, rng))
    for fact in post_new[:4]:
        lines.append(say(world, fact, rng))
        ents = set(fact.entities)
        related = [o for o in pre + post if o is not fact and not ents.isdisjoint(o.entities)]
        rng.shuffle(related)
        for other in related:  # the first pair that yields a derived statement
            derived = _derivations(world, other, fact)
            if derived:
                lines.append(rng.choice(derived))
                break
        ents = [e for e in fact.entities if e != src.subject]
        if ents:
            bg = _background(world, rng.choice(ents), known, rng)
            if bg:
                lines.append(bg)
    if not lines:
        lines.append(f"The account of {src.name} continues with further details.")
    return " ".join(dict.fromkeys(lines))  # drop repeated derivations, keep order


# --------------------------------------------------------------------------------------------
# MAGA: pairs, reformulation, judge
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Genre:
    label: str
    description: str
    form: str  # how reformulate lays the text out


GENRES = (
    Genre("Children's story", "A gentle bedtime story that turns the facts into a simple tale. Short sentences, "
          "a warm tone and a clear beginning and end.", "story"),
    Genre("Lecture notes", "Compact notes a lecturer hands out before class. Bullet points, one fact per "
          "line, no ornament.", "bullets"),
    Genre("Radio interview", "A conversation between a host and a local historian. Questions lead the "
          "listener through the facts one at a time.", "dialogue"),
    Genre("Textbook section", "A section of a school textbook with a heading, learning goals and a closing "
          "summary. Clear and methodical.", "textbook"),
    Genre("Newspaper feature", "A feature article for a regional newspaper. It opens with a dateline and "
          "keeps a lively, factual tone.", "news"),
    Genre("Personal letter", "A letter to a friend who asked about the subject. Informal, warm and chatty, "
          "but accurate.", "letter"),
    Genre("Quiz sheet", "A pub-quiz style sheet of questions followed by the answers. Playful and brisk.", "quiz"),
    Genre("Museum placard", "The text of a placard beside an exhibit. Dense, precise and brief.", "placard"),
    Genre("Debate brief", "Evidence prepared for a debate team. Claims first, then the supporting facts as "
          "numbered evidence.", "brief"),
    Genre("Diary entry", "A first-person diary entry written after reading about the subject. Reflective "
          "and personal.", "diary"),
)
AUDIENCES = (
    ("Curious children aged eight to ten", "They read slowly and like simple words. They want to be surprised.", "easy"),
    ("Retired engineers", "They are precise and impatient with vagueness. They enjoy numbers and dates.", "hard"),
    ("Office workers who find history boring", "They skim and want the point quickly. They are not "
     "interested in the subject and need a reason to care.", "plain"),
    ("Sceptical university students", "They question every claim and look for evidence. They have time "
     "to read carefully.", "hard"),
    ("Tourists planning a short visit", "They want practical, memorable facts. They read on their phones "
     "between sights.", "plain"),
    ("Learners of English as a second language", "They know basic grammar and a limited vocabulary. They "
     "prefer short, regular sentences.", "easy"),
    ("Local historians", "They already know the region well. They look for exact dates and names.", "hard"),
    ("Teenagers who dislike school", "They are bored by lessons and distrust textbooks. They respond to "
     "a direct, informal tone.", "plain"),
)


def maga_pairs(src: Source, num_pairs: int, rng: random.Random) -> str:
    """``num_pairs`` distinct (genre, audience) pairs as the flat JSON the MAGA stage-1 prompt asks for."""
    genres = rng.sample(GENRES, min(num_pairs, len(GENRES)))
    audiences = rng.sample(AUDIENCES, min(num_pairs, len(AUDIENCES)))
    obj: dict[str, str] = {}
    for i, (g, a) in enumerate(zip(genres, audiences), 1):
        obj[f"genre_{i}"] = f"{g.label}: {g.description}"
        obj[f"audience_{i}"] = f"{a[0]}: {a[1]}"
    return json.dumps(obj, ensure_ascii=False, indent=1)


def _genre_form(genre: str) -> str:
    low = genre.lower()
    for g in GENRES:
        if low.startswith(g.label.lower()):
            return g.form
    return "article"


def _audience_level(audience: str) -> str:
    low = audience.lower()
    for label, _, level in AUDIENCES:
        if low.startswith(label.lower()):
            return level
    return "plain"


def maga_reformulate(src: Source, genre: str, audience: str, variant: str, rng: random.Random) -> str:
    """The source's statements laid out as ``genre`` for ``audience`` (Base / Strict / Relaxed)."""
    if variant not in MAGA_VARIANTS:
        raise ValueError(f"unknown maga variant '{variant}' (known: {', '.join(MAGA_VARIANTS)})")
    name = src.name
    level = _audience_level(audience)
    if variant == "strict":
        sentences = split_sentences(src.text)  # the source's own sentences, lightly framed
        body = sentences[1:] or sentences
    elif src.has_facts:
        facts = _reordered(list(src.facts), rng)
        if variant == "relaxed":  # keeps a few themes and drifts away from the rest
            facts = facts[: max(1, len(src.facts) // 4)]
        # The audience sets the register: simple verbs, scholarly nominalisations, or chat.
        body = _statements(src, facts, rng, {"easy": "easy", "hard": "formal"}.get(level, "casual"), error_rate=0.0)
        if level == "hard":
            body = _join_hard(body, rng)
    else:
        body = [_reword(s, rng) for s in _reordered(list(src.sentences[1:] or src.sentences), rng)]
        if variant == "relaxed":
            body = body[: max(1, len(body) // 4)]
    if variant == "relaxed":
        body.append(f"Stories like that of {name} remind us how places and people shape one another.")
    who = audience.split(":", 1)[0].strip().lower() or "readers"
    form = _genre_form(genre)
    layouts: dict[str, Callable[[], list[str]]] = {
        "story": lambda: [f"Once upon a time, there was {name}."] + _paragraphs(body, rng, 2, 3)
        + [f"And that is how people still remember {name}."],
        "bullets": lambda: [f"Lecture notes: {name}", "Key points:"] + ["\n".join("- " + s for s in body)],
        "dialogue": lambda: [f"HOST: Today we talk about {name}."]
        + [f"{'HISTORIAN' if i % 2 == 0 else 'HOST'}: {s}" for i, s in enumerate(body)]
        + ["HOST: Thank you for joining us."],
        "textbook": lambda: [f"Section: {name}", f"Learning goal: know the main facts about {name}."]
        + _paragraphs(body, rng, 3, 4) + [f"Summary: {body[0] if body else name}"],
        "news": lambda: [f"{name.upper()}. {body[0] if body else ''}".strip()] + _paragraphs(body[1:], rng, 2, 4),
        "letter": lambda: ["Dear friend,", f"You asked me about {name}, so here is what I know."]
        + _paragraphs(body, rng, 2, 4) + ["With warm wishes,", "Your friend"],
        "quiz": lambda: [f"Quiz: {name}"] + [f"{i}. True or false? {s}" for i, s in enumerate(body, 1)]
        + ["Answers: all of the statements are true."],
        "placard": lambda: [name.upper()] + [" ".join(body)],
        "brief": lambda: [f"Claim: {name} deserves attention."]
        + [f"Evidence {i}: {s}" for i, s in enumerate(body, 1)],
        "diary": lambda: ["Dear diary,", f"Today I read about {name}."] + _paragraphs(body, rng, 2, 4)
        + ["I will think about it tomorrow."],
        "article": lambda: [name] + _paragraphs(body, rng, 3, 5),
    }
    blocks = layouts[form]()
    if form not in ("letter", "diary", "placard"):
        blocks.insert(1, f"(Written for {who}.)")
    return "\n\n".join(b for b in blocks if b)


def continuation(src: Source, prefix: str, rng: random.Random) -> str:
    """What a "teacher" writes after the opening ``prefix``: the statements the prefix has not made
    yet, in a new order (the demo's stand-in for sampling a base LM)."""
    if src.has_facts:
        stated = set(src.mentioned(prefix))
        sentences = _statements(src, _reordered([f for f in src.facts if f not in stated], rng), rng, "plain")
    else:
        sentences = [_reword(s, rng) for s in _reordered([s for s in src.sentences if s not in prefix], rng)]
    return " " + " ".join(sentences) if sentences else ""


def coverage(src: Source, text: str) -> float:
    """Fraction of the source's statements restated in ``text`` (facts, or sentences' key words)."""
    if src.has_facts:
        return len(src.mentioned(text)) / len(src.facts)
    low = text.lower()
    hits = total = 0
    for s in src.sentences:
        keys = [w for w in re.findall(r"\b(?:[A-Z][a-z]+|\d[\d,]*)\b", s)]
        if keys:
            total += 1
            hits += sum(k.lower() in low for k in keys) >= (len(keys) + 1) // 2
    return hits / total if total else 1.0


def maga_judge(src: Source, rewritten: str) -> str:
    """A Limited-Consistency style JSON verdict whose score (1-5) follows fact coverage."""
    cov = coverage(src, rewritten)
    score = 1 + int(cov * 4 + 0.5)
    n = len(src.facts) if src.has_facts else len(src.sentences)
    analysis = (f"The rewrite restates about {round(cov * n)} of the {n} pieces of information in the "
                f"original ({cov:.0%}); differences of style and order are not penalised.")
    return json.dumps({"analysis": analysis, "score": score})


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def _words(text: str) -> int:
    return len(text.split())


class TemplateBackend:
    """Deterministic template generation for the demo (``get_backend("template")``)."""

    name = "template"
    model_name = f"template-v{TEMPLATE_VERSION}"
    raw_completion = True  # self_distill: reads the payload's prefix, not the token ids

    def __init__(self, **_: object):
        # Constructor arguments (model, sampling defaults) are accepted and ignored: the runner
        # builds every backend the same way.
        pass

    def _source(self, payload: dict) -> Source:
        text = payload.get("text")
        if not isinstance(text, str):
            text = str(payload.get("prefix", "")) + str(payload.get("suffix", ""))
        meta = payload.get("meta") or payload.get("source_meta")
        src = _source_from_meta(text, meta) if meta else None
        if src is None and isinstance(payload.get("source_id"), str):
            src = _source_from_id(payload["source_id"], payload)
        return src or Source(text, sentences=tuple(split_sentences(text)))

    def _answer(self, req: Request) -> list[str]:
        p = req.payload or {}
        src = self._source(p)

        def rng(k: int) -> random.Random:
            return rng_for("template", req.task, req.id, req.seed, k)

        n = max(1, int(req.n))
        if req.task == "rephrase":
            return [rephrase(src, str(p.get("style", "wikipedia")), rng(k)) for k in range(n)]
        if req.task == "rationale":
            return [rationale(src, str(p.get("prefix", "")), str(p.get("suffix", "")), rng(k)) for k in range(n)]
        if req.task == "maga_pairs":
            return [maga_pairs(src, int(p.get("num_pairs", 5)), rng(k)) for k in range(n)]
        if req.task == "maga_reformulate":
            return [maga_reformulate(src, str(p.get("genre", "")), str(p.get("audience", "")),
                                     str(p.get("variant", "base")), rng(k)) for k in range(n)]
        if req.task == "maga_judge":
            rewritten = p.get("rewritten", p.get("reformulation"))
            if not isinstance(rewritten, str):
                raise ValueError("maga_judge payload needs 'rewritten' (the reformulated text)")
            return [maga_judge(src, rewritten) for _ in range(n)]
        if req.task == "self_distill":
            return [continuation(src, str(p.get("prefix", "")), rng(k)) for k in range(n)]
        raise ValueError(f"unknown task '{req.task}' (the template backend knows: {', '.join(TASKS)})")

    def generate(self, requests: list[Request]) -> list[Response]:
        out = []
        for req in requests:
            prompt_words = sum(_words(str(m.get("content", ""))) for m in req.messages) + len(req.prompt_ids or [])
            try:
                texts = self._answer(req)
            except (ValueError, KeyError, TypeError) as e:  # one bad request never stops the batch
                out.append(Response(req.id, [], prompt_words, [], error=f"{type(e).__name__}: {e}"))
                continue
            out.append(Response(req.id, texts, prompt_words, [_words(t) for t in texts],
                                finish_reasons=["stop"] * len(texts)))
        return out


register_backend("template", TemplateBackend)

__all__ = ["TemplateBackend", "TEMPLATE_VERSION", "STYLES", "GENRES", "AUDIENCES", "rephrase", "rationale", "maga_pairs",
           "maga_reformulate", "maga_judge", "coverage", "split_sentences", "Source"]
