"""MAGA text handling (pair parsing, judge parsing, cleaning) and prompt templates."""

from __future__ import annotations

import pytest

from megadoc_pl.synth import maga
from megadoc_pl.synth.templates import PACKAGE_PROMPTS, load_template, parse_template

TWO = [("Story", "Kids"), ("Essay", "Adults")]

# (name, model output, expected pairs)
PAIR_CASES = [
    ("valid flat JSON",
     '{"genre_1": "Story", "audience_1": "Kids", "genre_2": "Essay", "audience_2": "Adults"}', TWO),
    ("code fence with chatter",
     'Here you go:\n```json\n{"genre_1": "Story", "audience_1": "Kids",\n "genre_2": "Essay", '
     '"audience_2": "Adults"}\n```\nEnjoy!', TWO),
    ("unclosed code fence", '```json\n{"genre_1": "Story", "audience_1": "Kids"}', [("Story", "Kids")]),
    ("single quotes with apostrophes",
     "{'genre_1': 'A reader\\'s story', 'audience_1': 'Kids who don't care'}",
     [("A reader's story", "Kids who don't care")]),
    ("trailing commas", '{"genre_1": "Story", "audience_1": "Kids", "genre_2": "Essay", "audience_2": "Adults",}', TWO),
    ("missing closing brace",
     '{"genre_1": "Story", "audience_1": "Kids", "genre_2": "Essay", "audience_2": "Adults"', TWO),
    ("cut inside the last value (dropped)",
     '{"genre_1": "Story", "audience_1": "Kids", "genre_2": "Essay", "audience_2": "Adu', [("Story", "Kids")]),
    ("unquoted keys", '{genre_1: "Story", audience_1: "Kids"}', [("Story", "Kids")]),
    ("smart quotes", "{\u201cgenre_1\u201d: \u201cStory\u201d, \u201caudience_1\u201d: \u201cKids\u201d}",
     [("Story", "Kids")]),
    ("list of objects, mixed case keys",
     '[{"genre": "Story", "audience": "Kids"}, {"Genre": "Essay", "Audience": "Adults"}]', TWO),
    ("wrapped list", '{"pairs": [{"genre": "Story", "audience": "Kids"}, {"genre": "Essay", "audience": "Adults"}]}', TWO),
    ("numbered dict of objects", '{"1": {"genre": "Story", "audience": "Kids"}, "2": {"genre": "Essay", "audience": "Adults"}}', TWO),
    ("keys with spaces and case", '{"Genre 1": "Story", "Audience 1": "Kids"}', [("Story", "Kids")]),
    ("nested label + description",
     '{"genre_1": {"label": "Story", "description": "A tale."}, "audience_1": "Kids"}',
     [("Story A tale.", "Kids")]),
    ("numbered markdown list",
     "1. **Genre:** Story\n   **Audience:** Kids\n2. Genre: Essay\n   Audience: Adults", TWO),
    ("indexed lines", "Genre 1: Story\nAudience 1: Kids\nGenre 2: Essay\nAudience 2: Adults", TWO),
    ("keys out of order", '{"audience_2": "Adults", "genre_1": "Story", "genre_2": "Essay", "audience_1": "Kids"}', TWO),
]

INVALID_PAIR_CASES = [
    ("empty", ""),
    ("prose", "I cannot help with that request."),
    ("genre without audience", '{"genre_1": "Story"}'),
    ("empty values", '{"genre_1": "", "audience_1": ""}'),
    ("random bytes", "\x00\x01\ufffd{[ \ufffd garbage"),
    ("unbalanced list lines", "Genre: Story\nGenre: Essay\nAudience: Kids"),
]


@pytest.mark.parametrize("name,text,expected", PAIR_CASES, ids=[c[0] for c in PAIR_CASES])
def test_parse_pairs_valid_and_near_valid(name, text, expected):
    assert maga.parse_pairs(text) == expected


@pytest.mark.parametrize("name,text", INVALID_PAIR_CASES, ids=[c[0] for c in INVALID_PAIR_CASES])
def test_parse_pairs_invalid_raises(name, text):
    with pytest.raises(maga.ParseError):
        maga.parse_pairs(text)


def test_parse_pairs_keeps_at_most_max_pairs():
    obj = ", ".join(f'"genre_{i}": "G{i}", "audience_{i}": "A{i}"' for i in range(1, 8))
    pairs = maga.parse_pairs("{" + obj + "}", max_pairs=5)
    assert pairs == [(f"G{i}", f"A{i}") for i in range(1, 6)]


@pytest.mark.parametrize(
    "text,score",
    [
        ('{"analysis": "close", "score": 4}', 4),
        ('{"A": {"analysis": "x", "score": "3"}}', 3),
        ("```json\n{'analysis': 'ok', 'score': 5,}\n```", 5),
        ('{"analysis": "cut short", "score": 2', 2),
        ("After comparing, the score: 1/5.", 1),
        ('{"score": 4.0}', 4),
    ],
)
def test_parse_judge(text, score):
    assert maga.parse_judge(text) == score


@pytest.mark.parametrize("text", ['{"score": 9}', '{"score": 0}', "no verdict", '{"score": true}', ""])
def test_parse_judge_rejects(text):
    with pytest.raises(maga.ParseError):
        maga.parse_judge(text)


@pytest.mark.parametrize(
    "raw,clean,removed",
    [
        ("Sure! Here is the rewritten text:\n\nThe mill was built.\n\nIt ran for years. I hope this helps!",
         "The mill was built.\n\nIt ran for years.", 2),
        ("Certainly.\nHere's the article:\nThe mill was built.", "The mill was built.", 2),
        ("**Rewritten text:**\nThe mill was built.\n\nLet me know if you want changes.", "The mill was built.", 2),
        ("The mill was built.\n\nNote: I kept all facts.", "The mill was built.", 1),
        # Content that merely looks similar is kept.
        ("This is a story about a mill.\nIt was built in 1821.", "This is a story about a mill.\nIt was built in 1821.", 0),
        ("Here is the mill.", "Here is the mill.", 0),  # the only line is never removed
    ],
)
def test_strip_boilerplate(raw, clean, removed):
    out, gone = maga.strip_boilerplate(raw)
    assert out == clean
    assert len(gone) == removed


def test_keyword_coverage():
    src = "Alice founded the town of Brindle and built its first mill near the river Brindle."
    assert maga.keyword_coverage(src, src) == 1.0
    assert maga.keyword_coverage(src, "Completely unrelated words about cooking pasta.") == 0.0
    # stems: "founding" matches "founded", "mills" matches "mill"
    partial = maga.keyword_coverage(src, "Brindle founding story and its mills")
    assert 0.0 < partial < 1.0
    assert maga.keyword_coverage("a an the of", "anything") == 1.0  # no keywords: nothing to cover


# ----------------------------------------------------------------------------- templates


def test_shipped_templates_parse_and_render():
    names = sorted(p.stem for p in PACKAGE_PROMPTS.glob("*.txt"))
    assert {"rephrase_wikipedia", "rephrase_qa", "rephrase_easy", "rephrase_hard", "rationale",
            "maga_pairs", "maga_reformulate_base", "maga_reformulate_strict",
            "maga_reformulate_relaxed", "maga_judge"} <= set(names)
    values = {"text": "SRC {{genre}} {x}", "prefix": "P", "suffix": "S", "genre": "G", "audience": "A",
              "num_pairs": 5, "rewritten": "R"}
    for name in names:
        t = load_template(name)
        msgs = t.render(**{k: values[k] for k in t.placeholders})
        assert msgs[-1]["role"] == "user"
        assert "{{" not in msgs[-1]["content"].replace("{{genre}}", "")  # values are not re-expanded
        assert t.prompt_version.startswith(f"{name}/v1+")


def test_template_values_are_not_reexpanded():
    t = load_template("maga_reformulate_base")
    msgs = t.render(text="doc mentions {{genre}}", genre="Story", audience="Kids")
    assert "doc mentions {{genre}}" in msgs[-1]["content"]
    assert "<<<Story>>>" in msgs[-1]["content"]


def test_prompt_dir_overrides_and_changes_version(tmp_path):
    (tmp_path / "rephrase_wikipedia.txt").write_text("# version: 7\n[user]\nSay it again: {{text}}\n")
    t = load_template("rephrase_wikipedia", tmp_path)
    assert t.render(text="hi") == [{"role": "user", "content": "Say it again: hi"}]
    assert t.prompt_version.startswith("rephrase_wikipedia/v7+")
    # files the directory lacks come from the package
    assert load_template("rationale", tmp_path).path.startswith(str(PACKAGE_PROMPTS))


def test_template_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError, match="missing '# version"):
        parse_template("x", "[user]\nhi\n", "x.txt")
    with pytest.raises(ValueError, match="no value for placeholder"):
        parse_template("x", "# version: 1\n[user]\n{{text}}\n", "x.txt").render()
    with pytest.raises(ValueError, match="shipped templates"):
        load_template("no_such_template")
