"""MAGA text handling: stage-1 pair parsing, judge parsing, and cleaning of generations.

LLM output is only nearly structured: JSON inside code fences, single quotes, trailing commas,
a missing closing brace when generation stopped early, or a numbered list instead of JSON. The
parsers below accept all of those and raise ``ParseError`` (one line, with the reason) when
nothing usable is present, so the runner can record the failure and retry later.
"""

from __future__ import annotations

import json
import re
from collections import Counter

# ----------------------------------------------------------------------------- near-JSON


class ParseError(ValueError):
    """Model output that cannot be read as what was asked for."""


_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_SMART_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


def strip_code_fences(text: str) -> str:
    """The inside of the first ``` fence (closed or not), else the text unchanged."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def _repair_json(text: str) -> tuple[str, bool]:
    """Rewrite near-JSON into JSON: quote keys, convert single-quoted strings, drop trailing
    commas, close an unterminated string and any brackets left open. Also returns whether a
    string had to be closed (its value is cut short).

    A small scanner instead of regexes, so that apostrophes and commas *inside* strings are left
    alone.
    """
    out: list[str] = []
    stack: list[str] = []
    unterminated = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"' or (c == "'" and _starts_value_or_key(out)):
            s, i, closed = _read_string(text, i, c)
            unterminated |= not closed
            out.append(json.dumps(s, ensure_ascii=False))
            continue
        if c in "{[":
            stack.append("}" if c == "{" else "]")
            out.append(c)
        elif c in "}]":
            _drop_trailing_comma(out)
            if stack:
                stack.pop()
            out.append(c)
        elif c.isalpha() or c == "_":
            # A bare word: a key (quote it) or a literal (keep / translate Python spellings).
            j = i
            while j < n and (text[j].isalnum() or text[j] in "_-"):
                j += 1
            word = text[i:j]
            rest = text[j:].lstrip(" \t")
            if rest.startswith(":"):
                out.append(json.dumps(word))
            else:
                out.append({"True": "true", "False": "false", "None": "null"}.get(word, word))
            i = j
            continue
        else:
            out.append(c)
        i += 1
    _drop_trailing_comma(out)
    out.extend(reversed(stack))
    return "".join(out), unterminated


def _starts_value_or_key(out: list[str]) -> bool:
    """True if a single quote here opens a string (after { [ : , or at the start)."""
    prev = "".join(out).rstrip()
    return not prev or prev[-1] in "{[:,"


def _read_string(text: str, i: int, quote: str) -> tuple[str, int, bool]:
    """Read a quoted string starting at text[i]; returns (value, index after it, closed). An
    unterminated string runs to the end of the text (generation stopped mid-value)."""
    buf: list[str] = []
    j = i + 1
    n = len(text)
    while j < n:
        c = text[j]
        if c == "\\" and j + 1 < n:
            nxt = text[j + 1]
            buf.append({"n": "\n", "t": "\t", '"': '"', "'": "'", "\\": "\\"}.get(nxt, "\\" + nxt))
            j += 2
            continue
        if c == quote:
            # A single quote closes the string only before a delimiter; otherwise it is an
            # apostrophe inside the value ('the reader's view').
            if quote == '"' or text[j + 1 :].lstrip()[:1] in ("", ",", ":", "}", "]"):
                return "".join(buf), j + 1, True
        buf.append(c)
        j += 1
    return "".join(buf), n, False


def _drop_trailing_comma(out: list[str]) -> None:
    k = len(out) - 1
    while k >= 0 and out[k].isspace():
        k -= 1
    if k >= 0 and out[k] == ",":
        del out[k]


def loads_lenient(text: str):
    """Parse the first JSON object or array in ``text``, repairing near-JSON on the way."""
    return _loads_lenient(text)[0]


def _loads_lenient(text: str):
    """(object, cut_short): cut_short is True when a string value ran off the end."""
    body = strip_code_fences(text.translate(_SMART_QUOTES))
    starts = [p for p in (body.find("{"), body.find("[")) if p >= 0]
    if not starts:
        raise ParseError("no JSON object or array in the output")
    body = body[min(starts) :]
    try:
        return json.JSONDecoder().raw_decode(body)[0], False
    except json.JSONDecodeError:
        pass
    # Cut after the last closing bracket (drops chatter after the JSON) when there is one.
    last = max(body.rfind("}"), body.rfind("]"))
    for candidate in ([body[: last + 1]] if last >= 0 else []) + [body]:
        repaired, cut_short = _repair_json(candidate)
        try:
            return json.JSONDecoder().raw_decode(repaired)[0], cut_short
        except json.JSONDecodeError:
            continue
    raise ParseError("output looks like JSON but could not be repaired")


# ----------------------------------------------------------------------------- stage 1

_INDEXED_KEY = re.compile(r"^\s*(genre|audience)\s*[_\- ]?\s*(\d+)\s*$", re.I)
_LIST_LINE = re.compile(
    r"^[\s>*#\-]*(?:\(?\d+[.)]\s*)?[*_]*\s*(genre|audience)\s*(?:[_\- ]?\d+)?\s*[*_]*\s*[:\-\u2013]\s*(.+)$",
    re.I,
)


def _as_text(value) -> str:
    """A pair value as one string: nested dicts/lists (label + description) are joined."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return " ".join(_as_text(v) for v in value.values() if _as_text(v))
    if isinstance(value, list):
        return " ".join(_as_text(v) for v in value if _as_text(v))
    if value is None:
        return ""
    return str(value).strip()


def _pairs_from_obj(obj) -> list[tuple[str, str]]:
    if isinstance(obj, list):
        pairs = []
        for item in obj:
            if isinstance(item, dict):
                low = {str(k).lower().strip(): v for k, v in item.items()}
                if "genre" in low and "audience" in low:
                    pairs.append((_as_text(low["genre"]), _as_text(low["audience"])))
                else:
                    pairs.extend(_pairs_from_obj(item))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append((_as_text(item[0]), _as_text(item[1])))
        return pairs
    if not isinstance(obj, dict):
        return []
    indexed: dict[int, dict[str, str]] = {}
    for key, value in obj.items():
        m = _INDEXED_KEY.match(str(key))
        if m:
            indexed.setdefault(int(m.group(2)), {})[m.group(1).lower()] = _as_text(value)
    if indexed:
        return [
            (d.get("genre", ""), d.get("audience", "")) for _, d in sorted(indexed.items())
        ]
    low = {str(k).lower().strip(): v for k, v in obj.items()}
    if "genre" in low and "audience" in low:
        return [(_as_text(low["genre"]), _as_text(low["audience"]))]
    # A wrapper ({"pairs": [...]}, {"1": {...}, "2": {...}}): collect from the values.
    pairs = []
    for value in obj.values():
        if isinstance(value, (dict, list)):
            pairs.extend(_pairs_from_obj(value))
    return pairs


def _pairs_from_lines(text: str) -> list[tuple[str, str]]:
    """Numbered-list fallback: 'Genre: ...' / 'Audience: ...' lines, paired in order."""
    genres, audiences = [], []
    for line in text.splitlines():
        m = _LIST_LINE.match(line)
        if m:
            value = m.group(2).strip().strip("*_").strip().strip('",').strip()
            (genres if m.group(1).lower() == "genre" else audiences).append(value)
    if genres and len(genres) == len(audiences):
        return list(zip(genres, audiences))
    return []


def parse_pairs(text: str, max_pairs: int = 5) -> list[tuple[str, str]]:
    """(genre, audience) pairs from a stage-1 output: at most ``max_pairs``, at least one.

    Raises ParseError when no complete pair can be found.
    """
    pairs: list[tuple[str, str]] = []
    try:
        obj, cut_short = _loads_lenient(text)
        pairs = _pairs_from_obj(obj)
        if cut_short and pairs:
            pairs = pairs[:-1]  # the value generation stopped in is incomplete
    except ParseError:
        pass
    if not any(g and a for g, a in pairs):
        pairs = _pairs_from_lines(strip_code_fences(text))
    pairs = [(g, a) for g, a in pairs if g and a]
    if not pairs:
        raise ParseError("no complete (genre, audience) pair in the output")
    return pairs[:max_pairs]


# ----------------------------------------------------------------------------- judge

_SCORE_TEXT = re.compile(r"score\"?\s*[:=]\s*\"?\s*([1-5])(?:\s*/\s*5)?\b", re.I)


def _find_score(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if str(k).lower() == "score":
                return v
        for v in obj.values():
            found = _find_score(v)
            if found is not None:
                return found
    if isinstance(obj, list):
        for v in obj:
            found = _find_score(v)
            if found is not None:
                return found
    return None


def parse_judge(text: str) -> int:
    """The 1-5 Limited Consistency score from a judge output ({"score": n} at any depth, or
    'score: n' in prose). Raises ParseError otherwise."""
    score = None
    try:
        score = _find_score(loads_lenient(text))
    except ParseError:
        pass
    if isinstance(score, str):
        m = re.match(r"\s*([1-5])(?:\s*/\s*5)?\s*$", score)
        score = int(m.group(1)) if m else None
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if not (isinstance(score, int) and not isinstance(score, bool) and 1 <= score <= 5):
        m = _SCORE_TEXT.search(text)
        if not m:
            raise ParseError("no score between 1 and 5 in the judge output")
        score = int(m.group(1))
    return score


# ----------------------------------------------------------------------------- cleaning

# Lead-in lines a chat model puts before the text it was asked for, and sign-offs after it.
_OPENER = re.compile(  # removed when short (a whole line of chatter)
    r"^\s*(?:[*_#]+\s*)?(?:sure|certainly|of course|absolutely|okay|ok|great|here(?:'s| is| are))\b",
    re.I,
)
_LEAD_IN = re.compile(  # removed only when the line ends with a colon ("The following is ...:")
    r"^\s*(?:[*_#]+\s*)?(?:below (?:is|are)|the following|this is|"
    r"(?:the )?(?:rewritten|reformulated|rephrased|revised|adapted|new)\s+(?:text|version|document|article))\b",
    re.I,
)
_CLOSER = re.compile(
    r"^\s*(?:[*_]+\s*)?(?:"
    r"i hope (?:this|that|you)|hope (?:this|that) helps|let me know|feel free to|"
    r"notes?\s*:|please note|note that|the above (?:text|is|version|article|rewrite)|"
    r"this (?:rewrite|rewritten|reformulated|revised|adapted) (?:text|version)|"
    r"word count\s*:|i have (?:rewritten|reformulated|adapted)|in this (?:rewrite|version)"
    r")",
    re.I,
)


def strip_boilerplate(text: str) -> tuple[str, list[str]]:
    """Remove chat lead-ins ("Sure, here is ...:") and sign-offs ("I hope this helps ...").

    Only whole first/last lines or paragraphs are removed, and never the last remaining one.
    Returns (clean text, removed pieces).
    """
    removed: list[str] = []
    lines = text.strip().split("\n")
    for _ in range(3):
        first = lines[0].rstrip()
        colon = first.endswith(":") or first.endswith(":**")
        if len(lines) > 1 and (
            (_OPENER.match(first) and (colon or len(first) < 100)) or (_LEAD_IN.match(first) and colon)
        ):
            removed.append(lines.pop(0).strip())
            while lines and not lines[0].strip():
                lines.pop(0)
        else:
            break
    paragraphs = "\n".join(lines).split("\n\n")
    for _ in range(3):
        if len(paragraphs) > 1 and _CLOSER.match(paragraphs[-1]):
            removed.append(paragraphs.pop().strip())
        else:
            break
    clean = "\n\n".join(paragraphs).strip()
    # A closing sentence glued to the last paragraph ("... end of text. I hope this helps!").
    m = re.search(r"(?<=[.!?])\s+((?:I hope (?:this|that)|Hope this helps|Let me know if|Feel free to)[^\n]*)$", clean)
    if m and m.start() > 0:
        removed.append(m.group(1).strip())
        clean = clean[: m.start()].rstrip()
    return clean, removed


_WORD = re.compile(r"[^\W\d_][\w'-]*", re.U)
_STOPWORDS = frozenset(
    """about above after again against also among another because been before being below
    between both could does doing down during each even every from further have having here
    into itself just more most much must only other over same should since some such than
    that their them then there these they this those through under until upon very were what
    when where which while will with within without would your yours also many make made like
    well used uses using said says will shall cannot""".split()
)


def _stem(word: str) -> str:
    # Crude but language-agnostic: "teaching"/"teacher"/"teaches" share their first 6 letters.
    return word[:6]


def keywords(text: str, k: int = 20) -> list[str]:
    """The k most frequent content-word stems of a text (ties: first occurrence)."""
    words = [w.lower() for w in _WORD.findall(text)]
    stems = [_stem(w) for w in words if len(w) >= 4 and w not in _STOPWORDS]
    counts = Counter(stems)
    first = {}
    for i, s in enumerate(stems):
        first.setdefault(s, i)
    return sorted(counts, key=lambda s: (-counts[s], first[s]))[:k]


def keyword_coverage(source: str, output: str, k: int = 20) -> float:
    """Fraction of the source's top-k keyword stems that occur in the output (1.0 if the
    source has no keywords). MAGA drops outputs whose coverage is very low (topic drift)."""
    keys = keywords(source, k)
    if not keys:
        return 1.0
    present = {_stem(w.lower()) for w in _WORD.findall(output)}
    return sum(1 for s in keys if s in present) / len(keys)
