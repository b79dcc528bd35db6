"""The template generator's own words: how its "LLM" states a demo-world fact.

The world's documents use the sentence templates of ``world.PREDICATES``. A real LLM asked to
rephrase them writes other words and other sentence structures, so the generator has a lexicon
of its own, written apart from the world's: per predicate two declarative wordings (``say``), a
nominalisation (``noun``, for the formal register: "the founding of X by Y (1821)") and a
question (``ask``, for the qa style). No template here shares a word 4-gram with a world
template (``tests/demo/test_demo_template_backend.py`` checks it). Registers (easy, formal, casual)
are built from these by frames and word swaps; see ``template_backend``.

Placeholders are the predicate's role names, as in the world's templates.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wording:
    """The generator's wordings of one predicate."""

    say: tuple[str, str]  # declarative sentences (the first one leads with the fact's first role)
    noun: str  # a noun phrase naming the fact, for formal frames
    ask: str  # a question the fact answers


def _w(say1: str, say2: str, noun: str, ask: str) -> Wording:
    return Wording((say1, say2), noun, ask)


LEXICON: dict[str, Wording] = {
    "born": _w("{person} came into the world at {town} during {year}.",
               "Born during {year}, {person} was a native of {town}.",
               "the birth of {person} at {town} ({year})", "What were the place and year of {person}'s birth?"),
    "died": _w("{person} passed away at {town} during {year}.", "Death came to {person} during {year}, at {town}.",
               "the death of {person} at {town} ({year})", "Where did the life of {person} end?"),
    "profession": _w("{person} practised as {profession}.", "Throughout a working life, {person} served as {profession}.",
                     "the career of {person} as {profession}", "What was the occupation of {person}?"),
    "parent": _w("{child} descended from {parent}.", "Among the children of {parent} was {child}.",
                 "the descent of {child} from {parent}", "From whom did {child} descend?"),
    "married": _w("{person} wed {spouse} during {year}.", "The wedding of {person} and {spouse} took place during {year}.",
                  "the marriage between {person} and {spouse} ({year})", "Who was the spouse of {person}?"),
    "mentor": _w("{student} was a pupil of {teacher}.", "Lessons from {teacher} shaped the young {student}.",
                 "the apprenticeship of {student} with {teacher}", "Who instructed {student}?"),
    "moved": _w("{person} relocated to {town} during {year}.", "During {year}, {town} became the new home of {person}.",
                "the relocation of {person} to {town} ({year})", "Which town became home to {person}?"),
    "award": _w("{person} was honoured with the {award} during {year}.",
                "During {year}, the {award} was conferred on {person}.",
                "the conferral of the {award} on {person} ({year})", "Which distinction did {person} earn?"),
    "wrote": _w("{person} is the author of \"{book}\" ({year}).",
                "During {year}, \"{book}\" came out under the name of {person}.",
                "the authorship of \"{book}\" by {person} ({year})", "What did {person} write?"),
    "mayor": _w("{person} took charge of {town} as its mayor during {year}.",
                "During {year}, {town} was led by a new mayor, {person}.",
                "the term of {person} as mayor at {town}, from {year}", "Which town did {person} lead as mayor?"),
    "founded_company": _w("{person} set up {company} during {year}.", "{company} owes its start to {person}, during {year}.",
                          "the founding of {company} by {person} ({year})", "Who set up {company}?"),
    "invented": _w("{person} devised {invention} during {year}.",
                   "Credit for {invention} goes to {person}, who devised it during {year}.",
                   "the invention of {invention} by {person} ({year})", "Who devised {invention}?"),
    "town_region": _w("{town} belongs to {region}.", "Within {region} one finds {town}.",
                      "the place of {town} within {region}", "To which region does {town} belong?"),
    "town_river": _w("{town} sits beside {river}.", "The waters of {river} pass through {town}.",
                     "the position of {town} beside {river}", "Which river passes {town}?"),
    "town_founded": _w("{town} has existed since {year}.", "The origins of {town} go back to {year}.",
                       "the settlement of {town} ({year})", "How old is {town}?"),
    "population": _w("{town} was home to {count} people during {year}.",
                     "A head count during {year} found {count} souls at {town}.",
                     "a population of {count} at {town} ({year})", "What was the size of {town} during {year}?"),
    "industry": _w("{town} lives chiefly from {industry}.", "Most work at {town} revolves around {industry}.",
                   "the reliance of {town} on {industry}", "What trade sustains {town}?"),
    "landmark": _w("{town} raised {landmark} during {year}.", "Construction of {landmark} at {town} ended during {year}.",
                   "the construction of {landmark} at {town} ({year})", "When did {landmark} of {town} go up?"),
    "twin": _w("{town} and {partner} formed a twinning during {year}.",
               "During {year}, {partner} was paired with {town} as a twin.",
               "the twinning of {town} with {partner} ({year})", "With which town is {town} paired?"),
    "river_length": _w("{river} stretches {km} km from end to end.", "Measured end to end, {river} spans {km} km.",
                       "the {km} km course of {river}", "What is the length of {river}?"),
    "river_source": _w("{river} springs from {mountain}.", "The headwaters of {river} are on {mountain}.",
                       "the headwaters of {river} on {mountain}", "Where are the headwaters of {river}?"),
    "river_mouth": _w("{river} reaches {sea} at its end.", "At its end, {river} meets {sea}.",
                      "the outflow of {river} into {sea}", "Where does {river} reach the sea?"),
    "tributary": _w("{river} feeds {main}.", "Among the streams that swell {main} is {river}.",
                    "the confluence of {river} with {main}", "Into which river does {river} feed?"),
    "hq": _w("{company} has its seat at {town}.", "Out of {town} operates {company}.",
             "the seat of {company} at {town}", "Where does {company} have its seat?"),
    "product": _w("{company} specialises in {product}.", "The trade of {company} is {product}.",
                  "the output of {product} by {company}", "What does {company} specialise in?"),
    "employees": _w("{company} had a workforce of {count} during {year}.",
                    "During {year}, the payroll of {company} listed {count} names.",
                    "a workforce of {count} at {company} ({year})", "How large was the workforce of {company}?"),
    "acquired": _w("{buyer} took over {company} during {year}.", "During {year}, {company} passed into the hands of {buyer}.",
                   "the takeover of {company} by {buyer} ({year})", "Which firm took over {company}?"),
    "manufactures": _w("{company} turned out {invention} in quantity.",
                       "Copies of {invention} came from the works of {company}.",
                       "the making of {invention} at {company}", "Which firm turned out {invention}?"),
    "purpose": _w("{invention} serves to {purpose}.", "With {invention}, one can {purpose}.",
                  "the role of {invention}, made to {purpose}", "What does {invention} serve to do?"),
    "demonstrated": _w("{invention} made its debut at {town} during {year}.",
                       "The public at {town} first watched {invention} at work during {year}.",
                       "the debut of {invention} at {town} ({year})", "Where did {invention} make its debut?"),
    "capital": _w("{region} has its seat of government at {town}.", "Chief among the towns of {region} is {town}.",
                  "the status of {town} as chief town of {region}", "Which is the chief town of {region}?"),
    "climate": _w("{region} enjoys weather that is {climate}.", "Weather across {region} tends to be {climate}.",
                  "the {climate} weather of {region}", "What weather does {region} have?"),
    "area": _w("{region} spans some {km2} square km.", "The land of {region} measures {km2} square km overall.",
               "the {km2} square km of {region}", "What is the size of {region}?"),
    "ledger": _w("{who} noted {count} {item} during {year}.", "During {year}, the books of {who} show {count} {item}.",
                 "a tally of {count} {item} for {who} ({year})", "How many {item} did {who} note during {year}?"),
    "visit": _w("{guest} travelled to {who} during {year}, aiming to {errand}.",
                "During {year}, {who} hosted {guest}, whose errand was to {errand}.",
                "the journey of {guest} to {who} ({year}) to {errand}", "Who travelled to {who} during {year}?"),
    "incident": _w("{who} was hit by {incident} during {year}.", "During {year}, {who} endured {incident}.",
                   "{incident} at {who} ({year})", "What befell {who} during {year}?"),
    "nickname": _w("{who} went by the nickname \"{nickname}\".", "People nearby spoke of {who} as \"{nickname}\".",
                   "the nickname \"{nickname}\" for {who}", "What did locals call {who}?"),
}

# Registers: frames around a fact's sentence or noun phrase, and word swaps for plain words.
FORMAL_FRAMES = ("Records attest {noun}.", "Of note is {noun}.", "The sources document {noun}.",
                 "Scholars point to {noun}.", "One must consider {noun}.", "The archive preserves {noun}.")
CASUAL_FRAMES = ("Fun fact: {say}", "Here's one: {say}", "{say} Pretty neat.", "Get this: {say}", "{say}",
                 "Oh, and {say_lc}", "{say} Not bad, right?")
EASY_SWAPS = (("came into the world", "was born"), ("passed away", "died"), ("relocated", "moved"),
              ("devised", "made"), ("was honoured with", "got"), ("conferred on", "given to"),
              ("specialises in", "sells"), ("descended from", "came from"), ("practised as", "was"),
              ("a workforce of", "a team of"), ("took charge of", "ran"), ("springs from", "starts at"))
