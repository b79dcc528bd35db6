"""The built-in demo world: seeded entities and facts, rendered into varied documents.

A world is a pure function of ``(seed, num_documents)``. It holds entities (people, towns,
rivers, companies, inventions, regions) and facts (a predicate over named roles, each role an
entity or a literal). Documents (biographies, town histories, encyclopedic entries, news
reports, lists, long chronicles) restate facts with varied templates, sentence orders and
pronouns, and many documents share facts, so that a synthetic restatement of one document
teaches something about others. Each document also states a few facts of its own (stated by
no other document: held-out documents' own facts test generalisation, not memorisation), and
long chronicles tie later parts to earlier ones (back-references, running totals, a nickname
used in place of the name, a recap). Each document's ``meta`` carries the ids of the facts it
states (in order) and of its own facts, so the template generator can restate them without
parsing prose.

Randomness comes only from ``random.Random`` seeded with ``stable_hash`` of a name, so every
entity, fact and document is the same in every process and Python version.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from megadoc_pl.utils import atomic_write_text, stable_hash

# Bump when entities, facts, templates or document rendering change: it is part of every cache key.
WORLD_VERSION = 2

ENTITY_KINDS = ("region", "river", "town", "person", "company", "invention")
ENTITY_ROLE_KINDS = ENTITY_KINDS + ("entity",)  # "entity": a role that takes an entity of any kind


def rng_for(*parts: object) -> random.Random:
    """An independent, reproducible random stream named by ``parts``."""
    return random.Random(stable_hash(":".join(str(p) for p in parts)))


# --------------------------------------------------------------------------------------------
# Predicates: roles and sentence templates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Predicate:
    """A kind of fact: its roles (name -> entity kind or literal type) and its wordings."""

    name: str
    roles: tuple[tuple[str, str], ...]  # (role, kind): kind in ENTITY_ROLE_KINDS, or year | count | text
    statements: tuple[str, ...]  # declarative templates, placeholders are role names
    own: bool = False  # a document's own fact: stated by that one document only (see OWN_PREDICATES)

    @functools.cached_property
    def entity_roles(self) -> tuple[str, ...]:
        return tuple(r for r, k in self.roles if k in ENTITY_ROLE_KINDS)


def _p(name: str, roles: str, statements: list[str], own: bool = False) -> Predicate:
    pairs = tuple(tuple(x.split("=")) for x in roles.split())
    return Predicate(name, pairs, tuple(statements), own)  # type: ignore[arg-type]


PREDICATES: dict[str, Predicate] = {
    p.name: p
    for p in [
        _p("born", "person=person town=town year=year",
           ["{person} was born in {town} in {year}.", "{person} was born in {year} in {town}.",
            "In {year}, {person} was born in {town}.",
            "{town} was the birthplace of {person}, who was born there in {year}."]),
        _p("died", "person=person year=year town=town",
           ["{person} died in {town} in {year}.", "{person} died in {year} at {town}.",
            "In {year}, {person} died in {town}.", "{person}'s life ended in {town} in {year}."]),
        _p("profession", "person=person profession=text",
           ["{person} worked as {profession}.", "By trade, {person} was {profession}.",
            "{person} made a living as {profession}."]),
        _p("parent", "child=person parent=person",
           ["{child} was a child of {parent}.", "{parent} was the parent of {child}.",
            "{child} grew up as the child of {parent}."]),
        _p("married", "person=person spouse=person year=year",
           ["{person} married {spouse} in {year}.", "In {year}, {person} and {spouse} were married.",
            "{person} and {spouse} married in {year}."]),
        _p("mentor", "student=person teacher=person",
           ["{student} studied under {teacher}.", "{teacher} was the teacher of {student}.",
            "{student} learned the trade from {teacher}."]),
        _p("moved", "person=person town=town year=year",
           ["In {year}, {person} moved to {town}.", "{person} settled in {town} in {year}.",
            "{person} moved to {town} in {year}."]),
        _p("award", "person=person award=text year=year",
           ["{person} received the {award} in {year}.", "In {year}, {person} was awarded the {award}.",
            "The {award} went to {person} in {year}."]),
        _p("wrote", "person=person book=text year=year",
           ["{person} wrote \"{book}\", published in {year}.",
            "In {year}, {person} published a book called \"{book}\".",
            "\"{book}\", a book by {person}, appeared in {year}."]),
        _p("mayor", "person=person town=town year=year",
           ["{person} became mayor of {town} in {year}.", "In {year}, {person} was elected mayor of {town}.",
            "{town} chose {person} as its mayor in {year}."]),
        _p("founded_company", "person=person company=company year=year",
           ["{person} founded {company} in {year}.", "{company} was founded by {person} in {year}.",
            "In {year}, {person} established {company}."]),
        _p("invented", "person=person invention=invention year=year",
           ["{person} invented {invention} in {year}.", "{invention} was invented by {person} in {year}.",
            "{invention} was the work of {person}, who completed it in {year}."]),
        _p("town_region", "town=town region=region",
           ["{town} lies in {region}.", "{town} is a town in {region}.",
            "{region} is the region where {town} is found."]),
        _p("town_river", "town=town river=river",
           ["{town} stands on {river}.", "{river} flows through {town}.",
            "{town} was built on the banks of {river}."]),
        _p("town_founded", "town=town year=year",
           ["{town} was founded in {year}.", "The town of {town} dates from {year}.",
            "{town} was first settled in {year}."]),
        _p("population", "town=town count=count year=year",
           ["In {year}, {town} had {count} inhabitants.", "{town} counted {count} residents in {year}.",
            "The census of {year} recorded {count} people living in {town}."]),
        _p("industry", "town=town industry=text",
           ["The economy of {town} rests on {industry}.", "{town} is known for {industry}.",
            "{industry} has long been the main trade of {town}."]),
        _p("landmark", "town=town landmark=text year=year",
           ["{landmark} in {town} was built in {year}.", "In {year}, the people of {town} built {landmark}.",
            "{town} is home to {landmark}, built in {year}."]),
        _p("twin", "town=town partner=town year=year",
           ["{town} has been twinned with {partner} since {year}.",
            "Since {year}, {town} and {partner} have been twin towns.",
            "{partner} became the twin town of {town} in {year}."]),
        _p("river_length", "river=river km=count",
           ["{river} is {km} kilometres long.", "{river} runs for {km} kilometres.",
            "The length of {river} is {km} kilometres."]),
        _p("river_source", "river=river mountain=text",
           ["{river} rises on {mountain}.", "The source of {river} lies on {mountain}.",
            "{river} begins on the slopes of {mountain}."]),
        _p("river_mouth", "river=river sea=text",
           ["{river} flows into {sea}.", "{river} empties into {sea}.",
            "The mouth of {river} opens onto {sea}."]),
        _p("tributary", "river=river main=river",
           ["{river} is a tributary of {main}.", "{river} joins {main}.", "{main} is fed by {river}."]),
        _p("hq", "company=company town=town",
           ["{company} is based in {town}.", "The headquarters of {company} are in {town}.",
            "{town} is home to {company}."]),
        _p("product", "company=company product=text",
           ["{company} makes {product}.", "The main products of {company} are {product}.",
            "{product} are the main business of {company}."]),
        _p("employees", "company=company count=count year=year",
           ["By {year}, {company} employed {count} people.", "In {year}, {company} had {count} workers.",
            "{company} counted {count} employees in {year}."]),
        _p("acquired", "buyer=company company=company year=year",
           ["{buyer} bought {company} in {year}.", "In {year}, {company} was taken over by {buyer}.",
            "{company} became part of {buyer} in {year}."]),
        _p("manufactures", "company=company invention=invention",
           ["{company} manufactured {invention}.", "{invention} was produced by {company}.",
            "{company} built {invention} for sale."]),
        _p("purpose", "invention=invention purpose=text",
           ["{invention} is used to {purpose}.", "{invention} was designed to {purpose}.",
            "People use {invention} to {purpose}."]),
        _p("demonstrated", "invention=invention town=town year=year",
           ["{invention} was first shown in {town} in {year}.",
            "In {year}, {invention} was demonstrated in {town}.",
            "{town} saw the first demonstration of {invention} in {year}."]),
        _p("capital", "region=region town=town",
           ["The capital of {region} is {town}.", "{town} is the capital of {region}.",
            "{region} is governed from {town}."]),
        _p("climate", "region=region climate=text",
           ["{region} has a {climate} climate.", "The climate of {region} is {climate}.",
            "{region} is known for its {climate} climate."]),
        _p("area", "region=region km2=count",
           ["{region} covers {km2} square kilometres.", "The area of {region} is {km2} square kilometres.",
            "{region} extends over {km2} square kilometres."]),
        # A document's own facts: made for one document (its subject, literals drawn for it) and
        # stated nowhere else, so a held-out document's own facts are in no training text.
        _p("ledger", "who=entity count=count item=text year=year",
           ["In {year}, {who} recorded {count} {item}.", "{who} recorded {count} {item} in {year}.",
            "The ledger of {year} lists {count} {item} for {who}."], own=True),
        _p("visit", "who=entity guest=person year=year errand=text",
           ["In {year}, {guest} came to {who} to {errand}.", "{guest} visited {who} in {year} to {errand}.",
            "{who} received {guest} in {year}, who came to {errand}."], own=True),
        _p("incident", "who=entity incident=text year=year",
           ["In {year}, {who} suffered {incident}.", "{who} went through {incident} in {year}.",
            "{incident} struck {who} in {year}."], own=True),
        _p("nickname", "who=entity nickname=text",
           ["{who} was known locally as \"{nickname}\".", "Locals called {who} \"{nickname}\".",
            "\"{nickname}\" was the local name for {who}."], own=True),
    ]
}

# --------------------------------------------------------------------------------------------
# Entities and facts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    id: str  # "<kind>:<index>", e.g. "person:17"
    kind: str  # one of ENTITY_KINDS
    name: str  # as written mid-sentence (articles included, e.g. "the River Aven")
    gender: str = ""  # people: "f" or "m" (pronouns)


@dataclass(frozen=True, eq=False)  # one object per fact: identity is equality (and fast)
class Fact:
    id: str  # "F<index>"
    predicate: str  # a key of PREDICATES
    values: tuple[tuple[str, object], ...]  # (role, entity id | int | str), in the predicate's role order

    def value(self, role: str) -> object:
        return dict(self.values)[role]

    @functools.cached_property
    def entities(self) -> tuple[str, ...]:
        """Entity ids of the fact's entity roles, in role order."""
        pred = PREDICATES[self.predicate]
        return tuple(str(v) for r, v in self.values if r in pred.entity_roles)

    @functools.cached_property
    def year(self) -> int | None:
        for role, v in self.values:
            if role == "year":
                return int(v)  # type: ignore[arg-type]
        return None


@dataclass
class World:
    """Entities and facts of one seed; documents are rendered from it by ``render_documents``."""

    seed: int
    num_documents: int
    entities: dict[str, Entity] = field(default_factory=dict)
    facts: dict[str, Fact] = field(default_factory=dict)
    by_entity: dict[str, list[str]] = field(default_factory=dict)  # entity id -> fact ids (creation order)
    _words: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)  # text_values cache
    _own: dict[int, list[str]] = field(default_factory=dict, repr=False)  # document index -> own fact ids
    num_shared_facts: int = 0  # facts made by build_world (documents' own facts come later, on demand)

    def own_facts(self, index: int) -> list[str]:
        """Ids of document ``index``'s own facts (stated by that document only); made on first use."""
        ids = self._own.get(index)
        if ids is None:
            ids = self._own[index] = _make_own_facts(self, index)
        return ids

    def fact(self, fid: str) -> Fact | None:
        """A fact by id; a document's own fact (``D<index>.<k>``) is made on demand."""
        if fid not in self.facts and fid.startswith("D") and "." in fid:
            index = fid[1:].split(".", 1)[0]
            if index.isdigit() and int(index) < self.num_documents:
                self.own_facts(int(index))
        return self.facts.get(fid)

    def entities_of(self, kind: str) -> list[Entity]:
        return [e for e in self.entities.values() if e.kind == kind]

    def text_values(self, fact: Fact) -> dict[str, str]:
        """Every role of a fact as the words that stand for it in a sentence."""
        cached = self._words.get(fact.id)
        if cached is not None:
            return cached
        out = {}
        kinds = dict(PREDICATES[fact.predicate].roles)
        for role, v in fact.values:
            kind = kinds[role]
            if kind in ENTITY_ROLE_KINDS:
                out[role] = self.entities[str(v)].name
            elif kind == "count":
                out[role] = f"{int(v):,}"  # type: ignore[arg-type]
            else:
                out[role] = str(v)
        self._words[fact.id] = out
        return out

    def key_strings(self, fact: Fact, skip_entity: str | None = None) -> list[str]:
        """Words a text must contain to state ``fact`` (the focus entity may be a pronoun)."""
        kinds = dict(PREDICATES[fact.predicate].roles)
        words = self.text_values(fact)
        return [
            words[role]
            for role, v in fact.values
            if not (kinds[role] in ENTITY_ROLE_KINDS and v == skip_entity)
        ]

    def _add_entity(self, kind: str, name: str, gender: str = "") -> Entity:
        ent = Entity(f"{kind}:{sum(e.kind == kind for e in self.entities.values())}", kind, name, gender)
        self.entities[ent.id] = ent
        self.by_entity[ent.id] = []
        return ent

    def _add_fact(self, predicate: str, fid: str | None = None, **values: object) -> Fact:
        """A shared fact (indexed by entity: any document about its entities may state it), or,
        with ``fid``, a document's own fact (not indexed: only its document states it)."""
        pred = PREDICATES[predicate]
        assert set(values) == {r for r, _ in pred.roles}, (predicate, values)
        assert pred.own == (fid is not None), predicate
        fact = Fact(fid or f"F{len(self.facts)}", predicate, tuple((r, values[r]) for r, _ in pred.roles))
        self.facts[fact.id] = fact
        if fid is None:
            for ent_id in dict.fromkeys(fact.entities):
                self.by_entity[ent_id].append(fact.id)
        return fact


# Vocabulary the generator draws names and literals from.
_FEMALE = ("Ada Alma Bea Cora Della Edith Elsa Flora Greta Hanna Ida Iris Jana Kira Lena Lotte Mara "
           "Mina Nora Olga Petra Rosa Ruth Selma Tilda Una Vera Wanda Yara Zelda").split()
_MALE = ("Abel Bruno Carl Dorian Emil Felix Gustav Hugo Ivo Jonas Karl Leon Magnus Nils Oskar Paul "
         "Quentin Rafe Simon Tobias Ulrich Viktor Walter Xaver Yusuf Zeno Anton Bernd Cyril Falk").split()
_SUR_A = ("Ash Bram Brin Cald Dorn Elm Fen Gar Hal Kest Lind Marl Nor Orm Pell Quar Rook Sel Tarr "
          "Vell Wick Yarn Thorn Hollin Bex Corr").split()
_SUR_B = "worth ley ford man wick ton by mere dale croft well ham stead more field gate".split()
_TOWN_B = "ford wick ton bury mouth by stead field haven bridge moor dale holm port minster".split()
_SYL = "al ar bel cor dan el fen gal hen il kar lor mar nel or pel ren sal tor ul ven wyn".split()
_REGION_B = "shire mark land vale march reach".split()
_PROFESSIONS = ("an engineer|a cartographer|a clockmaker|a weaver|a printer|a physician|a teacher|"
                "a merchant|a botanist|a brewer|a shipwright|an architect|a chemist|a surveyor|"
                "a blacksmith|a glassblower|a banker|a journalist|a miller|an astronomer").split("|")
_INDUSTRIES = ("wool weaving|glassmaking|shipbuilding|salt mining|brewing|paper making|"
               "clock making|fishing|copper smelting|pottery|rope making|timber milling").split("|")
_PRODUCTS = ("copper pipes|pocket watches|printing presses|glass lenses|river barges|steam pumps|"
             "wool blankets|paper goods|bricks|oil lamps|rail carriages|telegraph cables|bicycles").split("|")
_DEVICES = ("loom|press|pump|lamp|gauge|lens|engine|compass|telegraph|kiln|lathe|barometer|"
            "sextant|crane|bellows").split("|")
_DEVICE_ADJ = "rotary|double|folding|portable|steam|tidal|spring|twin|lever|signal".split("|")
_PURPOSES = ("measure rainfall|lift water from mines|weave cloth faster|print newspapers|"
             "keep accurate time|signal ships at night|cut timber|grind grain|survey land|"
             "light streets|forge iron|send messages over wires|fire bricks|cool cellars").split("|")
_CLIMATES = "mild and wet|cold and dry|warm and windy|foggy|harsh|gentle|snowy|sunny and dry".split("|")
_SEAS = "the Northern Sea|the Grey Sea|the Bay of Tallis|the Amber Gulf|the Western Ocean".split("|")
_LANDMARK = ("Old Bridge|Clock Tower|Town Hall|Corn Exchange|Great Library|Market Cross|"
             "Lighthouse|Stone Mill|Guild House|Harbour Wall|Observatory|Cathedral").split("|")
_AWARD = "Medal|Prize|Award|Cross|Ribbon".split("|")
_AWARD_FIELD = "Engineering|Science|Letters|Civic Service|Invention|Industry|Navigation".split("|")
_BOOK = ("A Treatise on {x}|Notes on {x}|The Art of {x}|On {x}|A History of {x}|"
         "Letters from {town}|Travels along {river}|The {adj} Workshop").split("|")
_BOOK_X = "Clocks|Bridges|Rivers|Weaving|Glass|Maps|Trade|Medicine|the Stars|Salt|Engines".split("|")
_BOOK_ADJ = "Quiet|Busy|Northern|Last|Golden|Small".split("|")
_COMPANY = ("{sur} & Sons|{sur} Works|{town} {ind} Company|{sur} and {sur2}|the {town} Guild|"
            "{sur} Brothers|{adj} {ind} Works").split("|")
_COMPANY_IND = "Iron|Glass|Paper|Rope|Salt|Brewing|Printing|Pump|Lamp|Clock|Textile".split("|")
_COMPANY_ADJ = "Northern|United|Royal|Standard|Union|Crown|Eastern".split("|")
# Documents' own facts.
_LEDGER_ITEM = {"town": "new houses", "region": "new roads", "river": "ferry crossings", "person": "letters",
                "company": "orders", "invention": "repairs"}
_ERRANDS = ("sign a trade agreement|give a lecture|buy land|study the old records|open a school|"
            "settle a dispute|paint the harbour|survey the roads|collect old songs|plan a new bridge").split("|")
_INCIDENTS = ("a great flood|a fire|a long strike|a hard winter|an outbreak of fever|a bank failure|"
              "a bitter lawsuit|a storm|a failed harvest|a theft").split("|")
_NICK_ADJ = "Old|Little|Grey|Red|Quiet|Iron|Silver|Lucky".split("|")


def _unique(rng: random.Random, used: set[str], make) -> str:  # type: ignore[no-untyped-def]
    for _ in range(1000):
        name = make(rng)
        if name not in used:
            used.add(name)
            return name
    # A small name space ran out: disambiguate deterministically.
    base = make(rng)
    i = 2
    while f"{base} {i}" in used:
        i += 1
    used.add(f"{base} {i}")
    return f"{base} {i}"


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


@functools.lru_cache(maxsize=4)
def build_world(seed: int, num_documents: int) -> World:
    """All entities and facts of the world of ``(seed, num_documents)`` (pure; cached)."""
    if num_documents < 1:
        raise ValueError(f"demo.num_documents must be >= 1, got {num_documents}")
    w = World(seed, num_documents)
    rng = rng_for("world", WORLD_VERSION, seed)
    used: set[str] = set()
    n = num_documents
    counts = {
        "region": max(2, n // 150), "river": max(2, n // 80), "town": max(4, n // 25),
        "person": max(10, n // 6), "company": max(3, n // 25), "invention": max(3, n // 25),
    }

    regions = [w._add_entity("region", _unique(rng, used, lambda r: _word(r, 2) + r.choice(_REGION_B)))
               for _ in range(counts["region"])]
    rivers = [w._add_entity("river", _unique(rng, used, lambda r: "the River " + _word(r, 2)))
              for _ in range(counts["river"])]
    towns = [w._add_entity("town", _unique(rng, used, lambda r: r.choice(_SUR_A) + r.choice(_TOWN_B)))
             for _ in range(counts["town"])]
    people = []
    for _ in range(counts["person"]):
        gender = rng.choice("fm")
        given = _FEMALE if gender == "f" else _MALE
        people.append(w._add_entity(
            "person", _unique(rng, used, lambda r: f"{r.choice(given)} {r.choice(_SUR_A)}{r.choice(_SUR_B)}"),
            gender))

    # Geography first: it does not depend on people.
    for i, reg in enumerate(regions):
        w._add_fact("climate", region=reg.id, climate=rng.choice(_CLIMATES))
        w._add_fact("area", region=reg.id, km2=rng.randrange(800, 20000, 10))
    for i, riv in enumerate(rivers):
        w._add_fact("river_length", river=riv.id, km=rng.randrange(20, 900))
        mountain = f"Mount {_word(rng, 2)}" if rng.random() < 0.5 else f"the {_word(rng, 2)} Fells"
        w._add_fact("river_source", river=riv.id, mountain=mountain)
        if i > 0 and rng.random() < 0.4:
            w._add_fact("tributary", river=riv.id, main=rivers[rng.randrange(i)].id)
        else:
            w._add_fact("river_mouth", river=riv.id, sea=rng.choice(_SEAS))
    town_region: dict[str, Entity] = {}
    founded_year: dict[str, int] = {}
    for i, town in enumerate(towns):
        region = regions[i % len(regions)] if i < len(regions) else rng.choice(regions)
        town_region[town.id] = region
        w._add_fact("town_region", town=town.id, region=region.id)
        if i < len(regions):
            w._add_fact("capital", region=region.id, town=town.id)
        if rng.random() < 0.75:
            w._add_fact("town_river", town=town.id, river=rng.choice(rivers).id)
        founded_year[town.id] = rng.randrange(850, 1650)
        w._add_fact("town_founded", town=town.id, year=founded_year[town.id])
        w._add_fact("industry", town=town.id, industry=rng.choice(_INDUSTRIES))
        census = sorted(rng.sample(range(1850, 2001, 10), rng.choice((1, 2, 2, 3))))
        pop = rng.randrange(800, 60000)
        for year in census:
            w._add_fact("population", town=town.id, count=pop, year=year)
            pop = int(pop * rng.uniform(0.9, 1.8))
        for lm in rng.sample(_LANDMARK, rng.choice((0, 1, 1, 2))):
            w._add_fact("landmark", town=town.id, landmark=f"the {lm}",
                        year=rng.randrange(founded_year[town.id] + 10, 1950))
    for i, town in enumerate(towns):
        if i > 0 and rng.random() < 0.3:
            partner = towns[rng.randrange(i)]
            w._add_fact("twin", town=town.id, partner=partner.id, year=rng.randrange(1950, 2011))

    # People: lives placed in time, family and teaching ties to earlier-born people.
    born: dict[str, int] = {}
    died: dict[str, int] = {}
    for p in people:
        born[p.id] = rng.randrange(1700, 1900)
        died[p.id] = born[p.id] + rng.randrange(45, 92)
    by_birth = sorted(people, key=lambda p: (born[p.id], p.id))
    for p in people:
        b, d = born[p.id], died[p.id]
        w._add_fact("born", person=p.id, town=rng.choice(towns).id, year=b)
        w._add_fact("profession", person=p.id, profession=rng.choice(_PROFESSIONS))
        elders = [q for q in by_birth if b - 45 <= born[q.id] <= b - 18]
        if elders and rng.random() < 0.4:
            w._add_fact("parent", child=p.id, parent=rng.choice(elders).id)
        teachers = [q for q in by_birth if b - 50 <= born[q.id] <= b - 12]
        if teachers and rng.random() < 0.35:
            w._add_fact("mentor", student=p.id, teacher=rng.choice(teachers).id)
        peers = [q for q in by_birth if abs(born[q.id] - b) <= 8 and q.id != p.id and q.gender != p.gender]
        if peers and rng.random() < 0.35:
            w._add_fact("married", person=p.id, spouse=rng.choice(peers).id, year=b + rng.randrange(19, 40))
        if rng.random() < 0.45:
            w._add_fact("moved", person=p.id, town=rng.choice(towns).id, year=b + rng.randrange(16, 45))
        if rng.random() < 0.3:
            w._add_fact("award", person=p.id,
                        award=f"{rng.choice(towns).name} {rng.choice(_AWARD)} for {rng.choice(_AWARD_FIELD)}",
                        year=b + rng.randrange(30, max(31, d - b)))
        if rng.random() < 0.25:
            title = rng.choice(_BOOK).format(x=rng.choice(_BOOK_X), town=rng.choice(towns).name,
                                             river=rng.choice(rivers).name.replace("the ", ""),
                                             adj=rng.choice(_BOOK_ADJ))
            w._add_fact("wrote", person=p.id, book=title, year=b + rng.randrange(25, max(26, d - b)))
        if rng.random() < 0.1:
            w._add_fact("mayor", person=p.id, town=rng.choice(towns).id, year=b + rng.randrange(30, 60))
        if rng.random() < 0.7 and d < 2010:
            w._add_fact("died", person=p.id, year=d, town=rng.choice(towns).id)

    # Companies and inventions hang on people (founder, inventor) and towns.
    company_year: dict[str, int] = {}
    companies = []
    for _ in range(counts["company"]):
        founder = rng.choice(people)
        surname = founder.name.split()[-1]

        def make(r: random.Random, surname: str = surname) -> str:
            return r.choice(_COMPANY).format(
                sur=surname, sur2=r.choice(_SUR_A) + r.choice(_SUR_B), town=r.choice(towns).name,
                ind=r.choice(_COMPANY_IND), adj=r.choice(_COMPANY_ADJ))

        comp = w._add_entity("company", _unique(rng, used, make))
        companies.append(comp)
        year = born[founder.id] + rng.randrange(22, 55)
        company_year[comp.id] = year
        w._add_fact("founded_company", person=founder.id, company=comp.id, year=year)
        w._add_fact("hq", company=comp.id, town=rng.choice(towns).id)
        w._add_fact("product", company=comp.id, product=rng.choice(_PRODUCTS))
        if rng.random() < 0.7:
            w._add_fact("employees", company=comp.id, count=rng.randrange(12, 9000),
                        year=year + rng.randrange(5, 60))
    for i, comp in enumerate(companies):
        if i > 0 and rng.random() < 0.2:
            buyer = companies[rng.randrange(i)]
            year = max(company_year[comp.id], company_year[buyer.id]) + rng.randrange(5, 50)
            w._add_fact("acquired", buyer=buyer.id, company=comp.id, year=year)
    for _ in range(counts["invention"]):
        inventor = rng.choice(people)
        surname = inventor.name.split()[-1]
        inv = w._add_entity("invention", _unique(
            rng, used,
            lambda r, s=surname: f"the {r.choice((s, r.choice(_DEVICE_ADJ)))} {r.choice(_DEVICES)}"))
        year = born[inventor.id] + rng.randrange(20, 60)
        w._add_fact("invented", person=inventor.id, invention=inv.id, year=year)
        w._add_fact("purpose", invention=inv.id, purpose=rng.choice(_PURPOSES))
        if rng.random() < 0.6:
            w._add_fact("demonstrated", invention=inv.id, town=rng.choice(towns).id, year=year + rng.randrange(0, 4))
        if rng.random() < 0.5:
            w._add_fact("manufactures", company=rng.choice(companies).id, invention=inv.id)
    w.num_shared_facts = len(w.facts)
    return w


# --------------------------------------------------------------------------------------------
# Rendering facts as sentences
# --------------------------------------------------------------------------------------------

_PRONOUN = {"f": ("She", "Her"), "m": ("He", "His")}


def capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def render_template(world: World, fact: Fact, template: str, pronoun_for: str | None = None,
                    words: dict[str, str] | None = None) -> str:
    """Fill ``template`` with the fact's words (or ``words``); a leading role that is
    ``pronoun_for`` becomes a pronoun."""
    words = world.text_values(fact) if words is None else words
    if pronoun_for is not None and template.startswith("{"):
        role = template[1:template.index("}")]
        if dict(fact.values).get(role) == pronoun_for:
            ent = world.entities[pronoun_for]
            subj, poss = _PRONOUN.get(ent.gender, ("It", "Its"))
            rest = template[len(role) + 2:]
            if rest.startswith("'s "):
                return capitalize_first((poss + rest[2:]).format(**words))
            return capitalize_first((subj + rest).format(**words))
    return capitalize_first(template.format(**words))


def render_fact(world: World, fact: Fact, rng: random.Random, pronoun_for: str | None = None) -> str:
    """One declarative sentence stating ``fact`` with a randomly chosen wording."""
    return render_template(world, fact, rng.choice(PREDICATES[fact.predicate].statements), pronoun_for)


def leads_with(fact: Fact, template: str, entity: str) -> bool:
    """Whether the sentence from ``template`` starts with ``entity`` (so a pronoun could stand for it)."""
    if not template.startswith("{"):
        return False
    return dict(fact.values).get(template[1:template.index("}")]) == entity


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

_TITLES = {
    "biography": ["{name}", "The life of {name}", "{name}: a biography", "A short life of {name}"],
    "history": ["A history of {name}", "{name} through the years", "{name}: a short history", "{name}"],
    "encyclopedia": ["{name}", "{name} ({kind})", "Entry: {name}"],
    "news": ["News: {name}", "Report on {name}", "From our correspondent: {name}", "Latest on {name}"],
    "list": ["{name} at a glance", "Facts about {name}", "Notes on {name}", "{name}: key facts"],
    "chronicle": ["The chronicle of {name}", "{name}: a long history", "A complete account of {name}",
                  "{name} and its people"],
}
_FILLERS = {
    "biography": ["Records of these years are incomplete.", "Much of this comes from family letters.",
                  "Contemporaries remembered a patient and careful worker."],
    "history": ["The history of the place is long and varied.", "Old maps show the area much as it is today.",
                "Local archives preserve many of these records."],
    "encyclopedia": ["This entry summarises the main facts.", "Further details are given below."],
    "news": ["Our correspondent reports the following.", "Officials confirmed the details this week.",
             "Residents followed the news closely."],
    "list": [],
    "chronicle": ["What follows draws on many sources.", "The story continues with related places and people.",
                  "Each part of this account stands on the records of its time."],
}


@dataclass(frozen=True)
class DocPlan:
    """What one document will say: genre, subject, and fact sections (heading entity, fact ids)."""

    genre: str
    subject: str
    sections: tuple[tuple[str, tuple[str, ...]], ...]


def _neighbours(world: World, fact_ids: Iterable[str], seen: set[str]) -> list[str]:
    out: list[str] = []
    for fid in fact_ids:
        for ent in world.facts[fid].entities:
            if ent not in seen and ent not in out:
                out.append(ent)
    return out


def _doc_head(world: World, index: int) -> tuple[random.Random, str, str]:
    """(rng, genre, subject) of document ``index``; the rng goes on to draw the rest of its plan."""
    rng = rng_for("doc", WORLD_VERSION, world.seed, index)
    if rng.random() < 0.08:
        genre = "chronicle"
        kind = rng.choice(("region", "region", "town", "person", "river"))
    else:
        genre = rng.choices(["biography", "history", "encyclopedia", "news", "list"], [30, 15, 25, 15, 15])[0]
        kind = {"biography": "person", "history": "town"}.get(
            genre, rng.choice(("person", "person", "town", "company", "invention", "river", "region")))
    candidates = world.entities_of(kind)
    return rng, genre, candidates[rng.randrange(len(candidates))].id


def _make_own_facts(world: World, index: int) -> list[str]:
    """Document ``index``'s own facts: a ledger (a series of yearly counts for running totals in
    chronicles and histories), a local nickname (used later in the document in place of the name),
    a visit, an incident. Made for this document only, never indexed by entity."""
    _, genre, subject = _doc_head(world, index)
    rng = rng_for("own", WORLD_VERSION, world.seed, index)
    ent = world.entities[subject]
    years = [world.facts[f].year for f in world.by_entity[subject] if world.facts[f].year]
    lo = min(years) if years else 1800
    hi = max(lo + 20, min(2010, (max(years) if years else lo) + 30))
    ids: list[str] = []

    def add(predicate: str, **values: object) -> None:
        world._add_fact(predicate, fid=f"D{index}.{len(ids)}", **values)
        ids.append(f"D{index}.{len(ids)}")

    entries = {"chronicle": rng.randint(4, 6), "history": rng.choice((0, 3, 3, 4))}.get(genre, rng.choice((0, 0, 1)))
    year = rng.randrange(lo, max(lo + 1, hi - 6 * entries))
    for _ in range(entries):
        add("ledger", who=subject, count=rng.randrange(5, 400), item=_LEDGER_ITEM[ent.kind], year=year)
        year += rng.randrange(2, 7)
    if genre == "chronicle" or rng.random() < 0.4:
        add("nickname", who=subject, nickname=f"{rng.choice(_NICK_ADJ)} {_word(rng, 2)}")
    if rng.random() < 0.5:
        guest = rng.choice(world.entities_of("person"))
        if guest.id != subject:
            add("visit", who=subject, guest=guest.id, year=rng.randrange(lo, hi), errand=rng.choice(_ERRANDS))
    if not ids or rng.random() < 0.4:
        add("incident", who=subject, incident=rng.choice(_INCIDENTS), year=rng.randrange(lo, hi))
    return ids


def plan_document(world: World, index: int) -> DocPlan:
    """Choose genre, subject and the facts of document ``index`` (pure function of the world)."""
    rng, genre, subject = _doc_head(world, index)
    long = genre == "chronicle"
    if long:
        # At most an eighth of the world's facts: in a tiny (test) world a chronicle stays a
        # document about its subject instead of restating the whole world.
        budget = min(int(rng.uniform(35, 130)), world.num_shared_facts // 8)
        per_neighbour, depth = 8, 3
    else:
        budget = int(round(2 ** rng.uniform(3.1, 5.1)))  # ~9..34 facts: ~100..400 demo tokens
        per_neighbour, depth = rng.choice((1, 2, 2, 3)), 1

    # Breadth-first around the subject: its own facts, then a few facts of each neighbour.
    sections: list[tuple[str, tuple[str, ...]]] = []
    used: set[str] = set()
    seen = {subject}
    frontier = [subject]
    total = 0
    for level in range(depth + 1):
        nxt: list[str] = []
        for ent in frontier:
            fids = [f for f in world.by_entity[ent] if f not in used]
            if level > 0:
                fids = fids[:per_neighbour] if long else rng.sample(fids, min(per_neighbour, len(fids)))
            fids = fids[: max(0, budget - total)]
            if fids:
                sections.append((ent, tuple(fids)))
                used.update(fids)
                total += len(fids)
                nxt += [e for e in _neighbours(world, fids, seen) if e not in nxt]
                seen.update(nxt)
        if total >= budget:
            break
        rng.shuffle(nxt)
        frontier = nxt
    # The document's own facts: ledger entries one per part (the rest in the last part), the
    # others with the subject's own facts.
    own = world.own_facts(index)
    ledger = [f for f in own if world.facts[f].predicate == "ledger"]
    other = [f for f in own if f not in ledger]
    parts = [list(fids) for _, fids in sections]
    parts[0] += other
    for i, fid in enumerate(ledger):
        parts[min(i, len(parts) - 1)].append(fid)
    return DocPlan(genre, subject, tuple((ent, tuple(fids)) for (ent, _), fids in zip(sections, parts)))


def _order_facts(world: World, fids: tuple[str, ...], rng: random.Random) -> list[str]:
    """Chronological (undated facts first) half of the time, otherwise shuffled."""
    out = list(fids)
    if rng.random() < 0.5:
        out.sort(key=lambda f: (world.facts[f].year or 0))
    else:
        rng.shuffle(out)
    return out


class _Narrator:
    """Renders a document's facts as paragraphs and adds what depends on earlier parts of the
    document: running totals of its ledger, its subject's local nickname once introduced (a
    coreference only the earlier text resolves), back-references to earlier parts and recaps."""

    def __init__(self, world: World, subject: str, rng: random.Random, fillers: list[str]):
        self.world, self.subject, self.rng, self.fillers = world, subject, rng, fillers
        self.said: dict[str, tuple[int, str]] = {}  # fact id -> (part, sentence) where first stated
        self.ledger: list[int] = []
        self.item = ""
        self.nickname: str | None = None
        self.part = 0

    def ref(self) -> str:
        """How a derived sentence names the subject: its nickname once the text has given it."""
        return f'"{self.nickname}"' if self.nickname else capitalize_first(self.world.entities[self.subject].name)

    def prose(self, items: list[tuple[str, str]]) -> list[str]:
        """Paragraphs from (focus entity, fact id) items; a sentence leading with the document's
        subject, like the previous one, may use a pronoun (only the subject: a reader of the text
        can then still tell which entity every other fact is about)."""
        world, rng = self.world, self.rng
        paragraphs, para = [], []
        last_lead: str | None = None
        size = rng.randint(3, 6)
        for focus, fid in items:
            fact = world.facts[fid]
            template = rng.choice(PREDICATES[fact.predicate].statements)
            lead = focus if leads_with(fact, template, focus) else None
            pronoun = focus if (lead == self.subject and last_lead == self.subject and rng.random() < 0.6) else None
            sentence = render_template(world, fact, template, pronoun)
            para.append(sentence)
            self.said.setdefault(fid, (self.part, sentence))
            last_lead = lead
            if fact.predicate == "nickname":
                self.nickname = str(fact.value("nickname"))
            elif fact.predicate == "ledger":
                self.ledger.append(int(fact.value("count")))  # type: ignore[arg-type]
                self.item = str(fact.value("item"))
                if len(self.ledger) > 1:
                    para.append(f"That brings the {self.item} on record for {self.ref()} to {sum(self.ledger):,}.")
            if len(para) >= size:
                if self.fillers and rng.random() < 0.15:
                    para.append(rng.choice(self.fillers))
                paragraphs.append(" ".join(para))
                para, size, last_lead = [], rng.randint(3, 6), None
        if para:
            paragraphs.append(" ".join(para))
        return paragraphs

    def back_reference(self, ent: str) -> str | None:
        """A sentence of an earlier part that stated a fact about ``ent``, cited by its part."""
        for fid, (part, sentence) in self.said.items():
            if part < self.part and ent in self.world.facts[fid].entities and not sentence.startswith(_PRONOUNS):
                return f"As part {part + 1} told: {sentence}"
        return None

    def recap(self, names: list[str]) -> str:
        text = f"This account of {self.ref()} ran to {len(names)} parts: {', '.join(names)}."
        if self.ledger:
            text += f" The {self.item} on record came to {sum(self.ledger):,} in all."
        return text

    def years_recap(self) -> str | None:
        years = sorted({self.world.facts[f].year for f in self.said if self.world.facts[f].year})
        return f"Years mentioned above: {', '.join(map(str, years[:6]))}." if len(years) >= 2 else None


_PRONOUNS = tuple(p + " " for pair in _PRONOUN.values() for p in pair) + ("It ", "Its ")


def render_document(world: World, index: int) -> dict:
    """Document ``index`` as a JSONL row: ``id``, ``text``, ``meta`` (genre, subject, entities,
    facts, own_facts)."""
    plan = plan_document(world, index)
    rng = rng_for("render", WORLD_VERSION, world.seed, index)
    subject = world.entities[plan.subject]
    title = rng.choice(_TITLES[plan.genre]).format(name=capitalize_first(subject.name), kind=subject.kind)
    narrator = _Narrator(world, plan.subject, rng, _FILLERS[plan.genre])
    sections = [(ent, _order_facts(world, fids, rng)) for ent, fids in plan.sections]
    order = [f for _, fids in sections for f in fids]
    blocks = [title]
    if plan.genre == "list":
        blocks.append("\n".join("- " + render_fact(world, world.facts[f], rng) for f in order))
    elif plan.genre == "chronicle":
        # Long documents: one numbered part per entity, each later part tied to an earlier one.
        names = []
        for si, (ent, fids) in enumerate(sections):
            narrator.part = si
            names.append(capitalize_first(world.entities[ent].name))
            if si > 0:
                blocks.append(f"Part {si + 1}: {names[-1]}")
                back = narrator.back_reference(ent)
                if back:
                    blocks.append(back)
            blocks += narrator.prose([(ent, f) for f in fids])
        blocks += ["Recap", narrator.recap(names)]
    else:
        paragraphs = narrator.prose([(ent, f) for ent, fids in sections for f in fids])
        if plan.genre == "news":
            year = next((world.facts[f].year for f in order if world.facts[f].year), None)
            if year is not None:
                paragraphs[0] = f"{subject.name.upper()}, {year}. {paragraphs[0]}"
        blocks += paragraphs
        recap = narrator.years_recap() if rng.random() < 0.3 else None
        if recap:
            blocks.append(recap)
    entities = list(dict.fromkeys(e for f in order for e in world.facts[f].entities))
    meta = {
        "genre": plan.genre,
        "subject": plan.subject,
        "entities": entities,
        "facts": order,
        "own_facts": [f for f in order if PREDICATES[world.facts[f].predicate].own],
        "world": {"seed": world.seed, "num_documents": world.num_documents, "version": WORLD_VERSION},
    }
    return {"id": document_id(world.seed, world.num_documents, index), "text": "\n\n".join(blocks), "meta": meta}


def document_id(seed: int, num_documents: int, index: int) -> str:
    """Ids name their world, so a generator can find a document's facts from the id alone."""
    return f"demo-v{WORLD_VERSION}-s{seed}-n{num_documents}-{index:06d}"


_ID = re.compile(r"^demo-v(\d+)-s(-?\d+)-n(\d+)-(\d+)$")


def parse_document_id(doc_id: str) -> tuple[int, int, int] | None:
    """(seed, num_documents, index) of a demo document id of this world version, else None."""
    m = _ID.match(doc_id)
    if m is None or int(m.group(1)) != WORLD_VERSION:
        return None
    seed, n, index = int(m.group(2)), int(m.group(3)), int(m.group(4))
    return (seed, n, index) if index < n else None


def iter_documents(world: World) -> Iterator[dict]:
    for i in range(world.num_documents):
        yield render_document(world, i)


def world_jsonl(seed: int, num_documents: int) -> str:
    """The whole world as JSONL text (one document per line)."""
    world = build_world(seed, num_documents)
    return "".join(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n" for doc in iter_documents(world))


def write_world(path: str | Path, seed: int, num_documents: int) -> Path:
    """Write the world's documents as JSONL atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, world_jsonl(seed, num_documents))
    return path


def world_for_meta(meta: dict | None) -> World | None:
    """The world a document came from, from its ``meta["world"]`` (None if absent or another version)."""
    if not isinstance(meta, dict):
        return None
    info = meta.get("world")
    if not isinstance(info, dict) or info.get("version") != WORLD_VERSION:
        return None
    try:
        return build_world(int(info["seed"]), int(info["num_documents"]))
    except (KeyError, TypeError, ValueError):
        return None
