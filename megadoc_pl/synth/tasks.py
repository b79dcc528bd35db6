"""Generation tasks: what to ask the backend for each source document, and the rows that result.

A task turns a document into one or more **units** (the document, possibly truncated to the
prompt budget, or its paragraph-aligned chunks), says which ``gen_index`` values each unit must
produce, and for a batch of units with missing indices builds requests, calls the backend through
the runner's context and emits generation rows (docs/data-ingest.md). The runner owns files, sharding, resume and stats;
tasks never touch the file system.

Long sources with ``long_sources="chunk"`` become paragraph-aligned chunks of at most
``max_source_tokens`` and at least ``min_chunk_tokens`` tokens (a short tail is merged with the
chunk before it, never generated for alone). Chunk k asks for the same G generations as a whole
document, with ``gen_index = k * G + g``, and its rows carry ``chunk_index`` and ``num_chunks``;
the corpus views treat every chunk as a pool of its own (data/views.py), so every chunk's
generations reach training.

- ``rephrase``: one request per unit with n = G (WRAP style prompt); gen_index g = 0..G-1.
- ``rationale``: the document is cut at the G points of ``equal_token_split`` over its content
  tokens under the *training* tokenizer (the stretch view cuts at the same offsets); one request
  per split point with the text before and after it; gen_index = split_index.
- ``maga``: stage 1 asks for (genre, audience) pairs (parsed robustly, stored as state so a
  resumed run never redoes it), stage 2 reformulates once per pair, an optional judge scores each
  reformulation 1-5; cleaning strips chat boilerplate and drops outputs with low keyword
  coverage of the source. gen_index = pair index.
- ``self_distill``: a base LM (the real-only teacher) continues the first ``prefix_tokens``
  tokens of the document (at most half of it), raw: BOS + prefix token ids, no chat template,
  n = G samples; the row's text is prefix + continuation (a whole synthetic document that opens
  like the real one), ``prefix_chars`` marks where the continuation starts.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from typing import Any, Protocol, get_args

from megadoc_pl.config import MagaVariant
from megadoc_pl.data.segments import equal_token_split
from megadoc_pl.synth import maga
from megadoc_pl.synth.backends.base import Request, Response
from megadoc_pl.synth.templates import PromptTemplate, load_template
from megadoc_pl.utils import stable_hash

TASKS = ("rephrase", "rationale", "maga", "self_distill")
STYLES = ("wikipedia", "qa", "easy", "hard")
MAGA_VARIANTS = get_args(MagaVariant)
LONG_SOURCES = ("truncate", "chunk")
DEFAULT_MAX_NEW_TOKENS = {"rephrase": 1024, "rationale": 512, "maga": 4096, "self_distill": 1024}
SELF_DISTILL_PROMPT_VERSION = "raw-prefix/v1"  # BOS + the document's first tokens, no template


@dataclass
class TaskConfig:
    """Everything that decides what is generated (recorded in DIR/run.json)."""

    task: str
    generations: int | None = None  # G: rephrases per unit, rationales (split points) per document,
    # or maga (genre, audience) pairs per unit; None: 1 (rephrase, rationale) or 5 (maga)
    style: str = "wikipedia"  # rephrase: wikipedia | qa | easy | hard
    maga_variant: str = "base"  # maga stage 2 prompt: base | strict | relaxed
    judge: bool = False  # maga: score each reformulation 1-5 (Limited Consistency)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # None: task default (1024 / 512 / 4096)
    pairs_max_new_tokens: int = 1024  # maga stage 1
    judge_max_new_tokens: int = 512
    judge_temperature: float = 0.0  # the judge is greedy: a score, not a sample
    max_source_tokens: int = 4096  # prompt budget for the source text (rationale: prefix + suffix)
    long_sources: str = "truncate"  # rephrase/maga: truncate | chunk (paragraph-aligned chunks)
    min_chunk_tokens: int | None = None  # chunk: no chunk shorter (a short tail joins the one before);
    # None: max_source_tokens // 8
    min_keyword_coverage: float = 0.1  # maga: drop outputs covering fewer source keywords (0: off)
    strip_boilerplate: bool | None = None  # remove "Sure, here is ..." openers/closers (None: maga only)
    seed: int = 0
    prompt_dir: str | None = None  # replacement prompt templates (same file names)
    reject_duplicates: bool = False  # rephrase: drop a completion that nearly repeats another
    # sample of the same prompt (counted and warned about either way)
    judge_attempts: int = 3  # maga: judge calls per reformulation in one run before it is kept unjudged
    prefix_tokens: int = 64  # self_distill: the teacher continues this many of the document's first
    # tokens (at most half the document)

    def __post_init__(self) -> None:
        if self.generations is None:
            self.generations = 5 if self.task == "maga" else 1
        checks = [
            (self.task in TASKS, f"unknown task '{self.task}' (choose from {', '.join(TASKS)})"),
            (self.style in STYLES, f"unknown style '{self.style}' (choose from {', '.join(STYLES)})"),
            (self.maga_variant in MAGA_VARIANTS,
             f"unknown MAGA variant '{self.maga_variant}' (choose from {', '.join(MAGA_VARIANTS)})"),
            (self.long_sources in LONG_SOURCES,
             f"unknown --long-sources '{self.long_sources}' (choose from {', '.join(LONG_SOURCES)})"),
            (self.generations >= 1, f"--generations must be >= 1, got {self.generations}"),
            (self.max_source_tokens >= 16, f"--max-source-tokens must be >= 16, got {self.max_source_tokens}"),
            (0.0 <= self.min_keyword_coverage <= 1.0,
             f"--min-keyword-coverage must be in [0, 1], got {self.min_keyword_coverage}"),
            (0 <= self.temperature <= 2, f"--temperature must be in [0, 2] (vLLM and OpenAI-compatible "
             f"servers reject the rest), got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (not (self.task == "rephrase" and self.temperature == 0 and self.generations > 1),
             f"--temperature 0 is greedy: the G={self.generations} samples of one prompt would be identical "
             "(vLLM refuses n > 1 when greedy) (fix: --temperature 0.7 to 1.0, or --generations 1)"),
            (self.judge_attempts >= 1, f"judge_attempts must be >= 1, got {self.judge_attempts}"),
            (self.prefix_tokens >= 1, f"--prefix-tokens must be >= 1, got {self.prefix_tokens}"),
            (not (self.task == "self_distill" and self.long_sources == "chunk"),
             "--long-sources chunk does not apply to self_distill (the teacher continues the document's opening)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.min_chunk_tokens is None:
            self.min_chunk_tokens = max(1, self.max_source_tokens // 8)
        if not 1 <= self.min_chunk_tokens <= self.max_source_tokens // 2:
            raise ValueError(f"--min-chunk-tokens must be in [1, max_source_tokens/2 = {self.max_source_tokens // 2}], "
                             f"got {self.min_chunk_tokens}")
        if self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[self.task]
        if self.strip_boilerplate is None:
            self.strip_boilerplate = self.task == "maga"


# ----------------------------------------------------------------------------- token budget


class TokenCounter:
    """Token spans of a text, for prompt budgets and rationale split points.

    With a tokenizer (``data.tokenizer.TokenizerInfo``) these are real content tokens (no
    BOS/EOS), exactly what the token store counts. Without one, a "token" is 4 characters: a
    rough budget only (rationales always need the real tokenizer).
    """

    APPROX_CHARS = 4

    def __init__(self, tokenizer_info=None) -> None:
        self.info = tokenizer_info
        self.unit = (
            f"tokens:{tokenizer_info.fingerprint[:16]}" if tokenizer_info is not None
            else f"approx:{self.APPROX_CHARS}chars"
        )

    def spans(self, text: str) -> list[tuple[int, int]]:
        if self.info is None:
            step = self.APPROX_CHARS
            return [(i, min(i + step, len(text))) for i in range(0, len(text), step)]
        return list(self.info.tokenizer.encode(text, add_special_tokens=False).offsets)


def truncate_head(text: str, spans: list[tuple[int, int]], budget: int) -> tuple[str, bool]:
    """The first ``budget`` tokens of text (cut on a token boundary)."""
    if len(spans) <= budget:
        return text, False
    return text[: spans[budget - 1][1]], True


def truncate_tail(text: str, spans: list[tuple[int, int]], budget: int) -> tuple[str, bool]:
    """The last ``budget`` tokens of text."""
    if len(spans) <= budget:
        return text, False
    return text[spans[len(spans) - budget][0] :], True


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def chunk_ranges(text: str, spans: list[tuple[int, int]], budget: int, min_tokens: int = 1) -> list[tuple[int, int]]:
    """Character ranges of consecutive chunks of at most ``budget`` tokens, cut at paragraph
    breaks where possible (a paragraph longer than the budget is cut on token boundaries).

    No chunk is shorter than ``min_tokens`` (<= budget // 2): a paragraph break that would leave
    a shorter chunk is not used, and a short tail is merged with the chunk before it, the pair
    re-cut near its middle, so no model is asked to rewrite a few stray tokens.
    """
    n = len(spans)
    if n <= budget:
        return [(0, len(text))]
    assert 1 <= min_tokens <= budget // 2
    starts = [s for s, _ in spans]
    # Candidate cut points: the token index at which each paragraph starts.
    cuts = sorted({bisect.bisect_left(starts, m.end()) for m in _PARAGRAPH_BREAK.finditer(text)})
    cuts = [c for c in cuts if 0 < c < n] + [n]
    bounds = [0]
    while bounds[-1] < n:
        begin = bounds[-1]
        fitting = [c for c in cuts if begin + min_tokens <= c <= begin + budget]
        bounds.append(fitting[-1] if fitting else min(begin + budget, n))
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_tokens:
        # A short tail: re-cut the last two chunks together (more than budget tokens) near the middle.
        lo, hi = bounds[-3], n
        inside = [c for c in cuts if max(lo + min_tokens, hi - budget) <= c <= min(hi - min_tokens, lo + budget)]
        mid = (lo + hi) // 2
        bounds[-2] = min(inside, key=lambda c: abs(c - mid)) if inside else mid
    return [(0 if k == 0 else spans[b][0], len(text) if e == n else spans[e][0])
            for k, (b, e) in enumerate(zip(bounds[:-1], bounds[1:]))]


_NON_WORD = re.compile(r"\W+")


def near_duplicate_key(text: str) -> str:
    """Two completions with the same key differ at most in case, spacing and punctuation."""
    return _NON_WORD.sub(" ", text.lower()).strip()


# ----------------------------------------------------------------------------- units


@dataclass
class Unit:
    """What one prompt is about: a document (or one chunk of it) as given to the model."""

    doc: Any  # data.readers.Document
    key: str  # doc.id, or "doc.id#chunk<k>" when chunked (stage-1 state and seeds use it)
    text: str  # the source text in the prompt (truncated or one chunk)
    truncated: bool
    source_tokens: int  # tokens of ``text`` under the budget counter
    gen_offset: int = 0  # gen_index of this unit's first generation (chunk k: k * per_chunk)
    chunk: tuple[int, int] | None = None  # (chunk_index, num_chunks) when chunked
    extra: dict = field(default_factory=dict)  # task-specific (rationale split points)

    def fields(self) -> dict:
        out: dict[str, Any] = {"truncated": self.truncated, "source_tokens": self.source_tokens}
        if self.chunk is not None:
            out["chunk_index"], out["num_chunks"] = self.chunk
        return out


class Context(Protocol):
    """What the runner gives a task for one batch."""

    model: str  # generator name recorded in rows
    judge_model: str
    state: dict[str, dict]  # maga stage-1 results by unit key
    teacher: dict | None  # self_distill: the teacher's provenance cited by rows (None: template)

    def call(self, requests: list[Request], judge: bool = False) -> list[Response]: ...
    def attempt(self, request_key: str) -> int: ...
    def save_state(self, entries: list[dict]) -> None: ...
    def emit(self, row: dict) -> None: ...
    def drop(self, row: dict, reason: str) -> None: ...
    def fail(self, unit: Unit, stage: str, request_id: str, gen_indices: list[int], error: str,
             raw: str | None = None, seed: int | None = None) -> None: ...
    def count(self, name: str, k: int = 1) -> None: ...
    def judge_pending(self, unit: Unit) -> list[dict]: ...
    def rejudged(self, row: dict, fields: dict) -> None: ...


def request_seed(base: int, key: str, stage: str, indices: list[int], attempt: int) -> int:
    """A per-request seed: a pure function of the run seed, the unit, the stage, the generation
    indices and how many times this request failed before (so a retry samples anew)."""
    tag = f"{base}|{key}|{stage}|{','.join(map(str, indices))}|{attempt}"
    return stable_hash(tag) % (2**31 - 1)


class Task:
    """Shared plumbing: templates, units, request construction and row provenance."""

    name: str = ""
    needs_tokenizer: str = ""  # why the task needs real tokens (not the 4-characters estimate), if it does

    def __init__(self, cfg: TaskConfig, counter: TokenCounter) -> None:
        if self.needs_tokenizer and counter.info is None:
            raise ValueError(f"--task {self.name} needs {self.needs_tokenizer}")
        self.cfg = cfg
        self.counter = counter
        self.templates: dict[str, PromptTemplate] = {}

    def template(self, name: str) -> PromptTemplate:
        if name not in self.templates:
            self.templates[name] = load_template(name, self.cfg.prompt_dir)
        return self.templates[name]

    def template_names(self) -> list[str]:
        """The prompt templates this task renders (what ``prompt_versions`` reports)."""
        return []

    def prompt_versions(self) -> dict[str, str]:
        """Version of every template the task uses, loaded here if needed: under ``--executor ray``
        the requests are rendered in the actors, so the driver has loaded none of them itself."""
        return {name: self.template(name).prompt_version for name in sorted(self.template_names())}

    # -- units

    def units(self, doc) -> list[Unit]:
        cfg = self.cfg
        spans = self.counter.spans(doc.text)
        budget = cfg.max_source_tokens
        if cfg.long_sources == "chunk" and len(spans) > budget:
            ranges = chunk_ranges(doc.text, spans, budget, cfg.min_chunk_tokens)
            starts = [s for s, _ in spans]
            units = []
            for k, (a, b) in enumerate(ranges):
                ntok = bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)
                units.append(Unit(doc, f"{doc.id}#chunk{k}", doc.text[a:b], False, ntok,
                                  k * cfg.generations, (k, len(ranges))))
            return units
        text, truncated = truncate_head(doc.text, spans, budget)
        return [Unit(doc, doc.id, text, truncated, min(len(spans), budget))]

    def expected(self, unit: Unit, state: dict[str, dict]) -> list[int] | None:
        """gen_index values the unit must end up with (None: unknown until stage 1 ran)."""
        return [unit.gen_offset + g for g in range(self.cfg.generations)]

    def run(self, work: list[tuple[Unit, list[int] | None]], ctx: Context) -> None:
        raise NotImplementedError

    # -- helpers

    def request(self, ctx: Context, unit: Unit, stage: str, indices: list[int], messages: list[dict],
                n: int, max_new_tokens: int, temperature: float, payload: dict) -> Request:
        rid = f"{unit.key}|{stage}|{','.join(map(str, indices))}"
        seed = request_seed(self.cfg.seed, unit.key, stage, indices, ctx.attempt(rid))
        return Request(id=rid, messages=messages, n=n, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=self.cfg.top_p, seed=seed, task=stage,
                       payload={"source_id": unit.doc.id, "meta": unit.doc.meta, **payload})

    def row(self, ctx: Context, unit: Unit, gen_index: int, text: str, req: Request, resp: Response,
            k: int, prompt_version: str, **task_fields: Any) -> dict:
        """The generation row of completion k of ``resp``."""
        row = {"source_id": unit.doc.id, "task": self.name, "gen_index": gen_index, "text": text}
        row.update(task_fields)
        row.update(unit.fields())
        row.update(
            model=ctx.model,
            sampling={"temperature": req.temperature, "top_p": req.top_p,
                      "max_new_tokens": req.max_new_tokens, "n": req.n, "seed": req.seed},
            prompt_version=prompt_version,
            completion_tokens=resp.completion_tokens[k],
            finish_reason=resp.finish_reasons[k] if k < len(resp.finish_reasons) else None,
        )
        if resp.tokens_estimated:
            row["completion_tokens_estimated"] = True
        return row

    def clean(self, text: str) -> tuple[str, list[str]]:
        if self.cfg.strip_boilerplate:
            return maga.strip_boilerplate(text)
        return text.strip(), []


# ----------------------------------------------------------------------------- rephrase


class RephraseTask(Task):
    name = "rephrase"

    def template_names(self) -> list[str]:
        return [f"rephrase_{self.cfg.style}"]

    def run(self, work, ctx) -> None:
        tmpl = self.template(f"rephrase_{self.cfg.style}")
        reqs, todo = [], []
        for unit, missing in work:
            req = self.request(ctx, unit, "rephrase", missing, tmpl.render(text=unit.text),
                               len(missing), self.cfg.max_new_tokens, self.cfg.temperature,
                               {"text": unit.text, "style": self.cfg.style})
            reqs.append(req)
            todo.append((unit, missing, req))
        for (unit, missing, req), resp in zip(todo, ctx.call(reqs)):
            if resp.error is not None:
                continue
            seen: dict[str, int] = {}  # near-duplicate key -> first gen_index with it
            for k, (gen_index, text) in enumerate(zip(missing, resp.texts)):
                clean, removed = self.clean(text)
                row = self.row(ctx, unit, gen_index, clean, req, resp, k, tmpl.prompt_version,
                               style=self.cfg.style, boilerplate_removed=len(removed))
                first = seen.setdefault(near_duplicate_key(clean), gen_index)
                if first == gen_index:
                    ctx.emit(row)
                    continue
                ctx.count("near_duplicate_completions")
                row["near_duplicate_of"] = first
                if self.cfg.reject_duplicates:
                    ctx.drop(row, "near_duplicate")
                else:
                    ctx.emit(row)


# ----------------------------------------------------------------------------- rationale


class RationaleTask(Task):
    name = "rationale"

    def template_names(self) -> list[str]:
        return ["rationale"]

    needs_tokenizer = "--tokenizer (the training tokenizer), so that the split points match the ones the stretch view cuts at"

    def units(self, doc) -> list[Unit]:
        spans = self.counter.spans(doc.text)
        splits = equal_token_split(len(spans), self.cfg.generations)
        return [Unit(doc, doc.id, doc.text, False, len(spans), 0, None,
                     {"spans": spans, "splits": splits})]

    def expected(self, unit, state) -> list[int]:
        return list(range(len(unit.extra["splits"])))

    def run(self, work, ctx) -> None:
        tmpl = self.template("rationale")
        half = self.cfg.max_source_tokens // 2
        todo = []
        for unit, missing in work:
            spans, splits = unit.extra["spans"], unit.extra["splits"]
            text = unit.doc.text
            for i in missing:
                offset = splits[i]
                cut = spans[offset][0]
                prefix, cut_p = truncate_tail(text[:cut], spans[:offset], half)
                suffix_spans = [(a - cut, b - cut) for a, b in spans[offset:]]
                suffix, cut_s = truncate_head(text[cut:], suffix_spans, self.cfg.max_source_tokens - half)
                req = self.request(ctx, unit, "rationale", [i], tmpl.render(prefix=prefix, suffix=suffix),
                                   1, self.cfg.max_new_tokens, self.cfg.temperature,
                                   {"prefix": prefix, "suffix": suffix, "split_index": i})
                todo.append((unit, i, offset, cut_p or cut_s, req))
        for (unit, i, offset, truncated, req), resp in zip(todo, ctx.call([t[-1] for t in todo])):
            if resp.error is not None:
                continue
            clean, removed = self.clean(resp.texts[0])
            row = self.row(ctx, unit, i, clean, req, resp, 0, tmpl.prompt_version,
                           split_index=i, split_token_offset=offset,
                           num_splits=len(unit.extra["splits"]), boilerplate_removed=len(removed))
            row["truncated"] = truncated
            row["split_tokenizer"] = self.counter.unit
            ctx.emit(row)


# ----------------------------------------------------------------------------- maga


class MagaTask(Task):
    name = "maga"

    def template_names(self) -> list[str]:
        return ["maga_pairs", f"maga_reformulate_{self.cfg.maga_variant}"] + (["maga_judge"] if self.cfg.judge else [])

    def expected(self, unit, state) -> list[int] | None:
        entry = state.get(unit.key)
        if entry is None:
            return None
        return [unit.gen_offset + i for i in range(len(entry["pairs"]))]

    def run(self, work, ctx) -> None:
        cfg = self.cfg
        # Stage 1: (genre, audience) pairs for units that have none yet.
        pairs_t = self.template("maga_pairs")
        stage1 = [(u, self.request(ctx, u, "maga_pairs", [], pairs_t.render(text=u.text, num_pairs=cfg.generations),
                                   1, cfg.pairs_max_new_tokens, cfg.temperature,
                                   {"text": u.text, "num_pairs": cfg.generations}))
                  for u, missing in work if missing is None]
        saved = []
        for (unit, req), resp in zip(stage1, ctx.call([r for _, r in stage1])):
            if resp.error is not None:
                continue
            try:
                pairs = maga.parse_pairs(resp.texts[0], cfg.generations)
            except maga.ParseError as e:
                ctx.count("maga_pairs_unparseable")
                ctx.fail(unit, "maga_pairs", req.id, [], f"ParseError: {e}", raw=resp.texts[0], seed=req.seed)
                continue
            if len(pairs) < cfg.generations:
                ctx.count("maga_pairs_short")
            saved.append({"key": unit.key, "source_id": unit.doc.id, "pairs": [list(p) for p in pairs],
                          "model": ctx.model, "prompt_version": pairs_t.prompt_version,
                          "seed": req.seed})
        ctx.save_state(saved)

        # Stage 2: one reformulation per pair still missing.
        reform_t = self.template(f"maga_reformulate_{cfg.maga_variant}")
        todo = []
        for unit, missing in work:
            entry = ctx.state.get(unit.key)
            if entry is None:
                continue
            if missing is None:
                missing = self.expected(unit, ctx.state)
            for gen_index in missing:
                genre, audience = entry["pairs"][gen_index - unit.gen_offset]
                req = self.request(ctx, unit, "maga_reformulate", [gen_index],
                                   reform_t.render(text=unit.text, genre=genre, audience=audience),
                                   1, cfg.max_new_tokens, cfg.temperature,
                                   {"text": unit.text, "genre": genre, "audience": audience,
                                    "variant": cfg.maga_variant})
                todo.append((unit, gen_index, genre, audience, req))
        candidates = []
        for (unit, gen_index, genre, audience, req), resp in zip(todo, ctx.call([t[-1] for t in todo])):
            if resp.error is not None:
                continue
            clean, removed = self.clean(resp.texts[0])
            coverage = maga.keyword_coverage(unit.text, clean)
            row = self.row(ctx, unit, gen_index, clean, req, resp, 0,
                           reform_t.prompt_version, genre=genre, audience=audience,
                           pair_index=gen_index - unit.gen_offset, maga_variant=cfg.maga_variant,
                           judge_score=None, keyword_coverage=round(coverage, 4),
                           boilerplate_removed=len(removed),
                           pairs_prompt_version=ctx.state[unit.key]["prompt_version"])
            if not clean.strip() or coverage < cfg.min_keyword_coverage:
                row["min_keyword_coverage"] = cfg.min_keyword_coverage
                ctx.drop(row, "empty" if not clean.strip() else "low_keyword_coverage")
                continue
            candidates.append((unit, row))

        # Optional judge: Limited Consistency score 1-5 for each kept reformulation and for rows
        # an earlier run kept unjudged. A reformulation is never thrown away for its judge: when
        # every judge attempt fails it is kept with judge_score null and judge_pending, and the
        # next run judges it (the runner folds the score into the row).
        if cfg.judge:
            rejudge = [(unit, row) for unit, _ in work for row in ctx.judge_pending(unit)]
            verdicts = self._judge(ctx, candidates + rejudge)
            for (_, row), fields in zip(candidates, verdicts):
                row.update(fields or {"judge_pending": True})
            for (_, row), fields in zip(rejudge, verdicts[len(candidates):]):
                if fields is not None:
                    ctx.rejudged(row, fields)
        for _, row in candidates:
            ctx.emit(row)

    def _judge(self, ctx: Context, items: list[tuple[Unit, dict]]) -> list[dict | None]:
        """Judge fields of each (unit, row), retried up to ``judge_attempts`` times on their own;
        None where every attempt failed."""
        cfg = self.cfg
        judge_t = self.template("maga_judge")
        verdicts: list[dict | None] = [None] * len(items)
        todo = list(range(len(items)))
        for _ in range(cfg.judge_attempts):
            if not todo:
                break
            reqs = [self.request(ctx, items[i][0], "maga_judge", [items[i][1]["gen_index"]],
                                 judge_t.render(text=items[i][0].text, rewritten=items[i][1]["text"]),
                                 1, cfg.judge_max_new_tokens, cfg.judge_temperature,
                                 {"text": items[i][0].text, "rewritten": items[i][1]["text"]})
                    for i in todo]
            failed = []
            for i, resp in zip(todo, ctx.call(reqs, judge=True)):
                if resp.error is not None:
                    failed.append(i)
                    continue
                fields: dict[str, Any] = {"judge_model": ctx.judge_model,
                                          "judge_prompt_version": judge_t.prompt_version}
                try:
                    fields["judge_score"] = maga.parse_judge(resp.texts[0])
                except maga.ParseError as e:
                    ctx.count("judge_unparseable")
                    fields["judge_error"] = str(e)
                verdicts[i] = fields
            todo = failed
        return verdicts


# ----------------------------------------------------------------------------- self_distill


class SelfDistillTask(Task):
    """Raw samples of the teacher (a base LM trained on the real data only) continuing each
    document's opening: the self-distillation baseline of the megadocs paper ("sdn")."""

    name = "self_distill"

    needs_tokenizer = ("the teacher's tokenizer, as the prompt is token ids (fix: pass the teacher's HF export or "
                       "checkpoint as --model, or --tokenizer)")

    def units(self, doc) -> list[Unit]:
        spans = self.counter.spans(doc.text)
        k = max(1, min(self.cfg.prefix_tokens, len(spans) // 2))
        text, cut = truncate_head(doc.text, spans, k)
        return [Unit(doc, doc.id, text, cut, min(k, len(spans)))]

    def run(self, work, ctx) -> None:
        info = self.counter.info
        bos = [] if info.bos_id is None else [info.bos_id]
        todo = []
        for unit, missing in work:
            req = self.request(ctx, unit, "self_distill", missing, [], len(missing), self.cfg.max_new_tokens,
                               self.cfg.temperature, {"prefix": unit.text, "text": unit.doc.text})
            req.prompt_ids = bos + info.encode(unit.text)
            todo.append((unit, missing, req))
        for (unit, missing, req), resp in zip(todo, ctx.call([t[-1] for t in todo])):
            if resp.error is not None:
                continue
            for k, (gen_index, continuation) in enumerate(zip(missing, resp.texts)):
                row = self.row(ctx, unit, gen_index, unit.text + continuation, req, resp, k,
                               SELF_DISTILL_PROMPT_VERSION, prefix_tokens=unit.source_tokens,
                               prefix_chars=len(unit.text), teacher=ctx.teacher)
                ctx.emit(row)


def make_task(cfg: TaskConfig, counter: TokenCounter) -> Task:
    return {"rephrase": RephraseTask, "rationale": RationaleTask, "maga": MagaTask,
            "self_distill": SelfDistillTask}[cfg.task](cfg, counter)
