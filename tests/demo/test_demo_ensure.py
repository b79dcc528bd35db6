"""The demo's corpus inputs end to end on a small world: cached world and tokenizer, generations
through the synth runner with full provenance, held-out documents never used as seeds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megadoc_pl.config import RecipeConfig
from megadoc_pl.data.segments import equal_token_split
from megadoc_pl.data.views import VIEW_TASKS
from megadoc_pl.demo import corpus_inputs, ensure_generations, ensure_world, generation_plan
from megadoc_pl.demo.template_backend import TEMPLATE_VERSION
from megadoc_pl.errors import BadInput

N_DOCS = 60


def _cfg(cache: Path, view: str = "stitch", generations: int = 2, **synth):
    cfg = OmegaConf.structured(RecipeConfig)
    cfg.data.cache_dir = str(cache)
    cfg.data.view = view
    cfg.data.generations = generations
    cfg.demo.num_documents = N_DOCS
    cfg.demo.vocab_size = 512
    for k, v in synth.items():
        cfg.synth[k] = v
    return cfg


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _demo_inputs(cfg, split_file=None) -> dict:
    """What preparation gets for a demo recipe: the world, its tokenizer and, asked from the
    provider as preparation asks, the generations of the view's one task (None for ``real``)."""
    inputs = corpus_inputs(cfg)
    (real,) = inputs.real
    files = [inputs.generate(task, split_file) for task in VIEW_TASKS[str(cfg.data.view)]]
    assert len(files) <= 1 and not inputs.synthetic
    return {"real": Path(real), "tokenizer": Path(inputs.tokenizer), "synthetic": files[0] if files else None}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_stitch_g2_generations_with_provenance(cache):
    out = _demo_inputs(_cfg(cache))
    real = _rows(out["real"])
    assert len(real) == N_DOCS
    assert (out["tokenizer"] / "tokenizer.json").exists()
    rows = _rows(out["synthetic"])
    # Every (source, generation) exactly once, for every real document.
    pairs = Counter((r["source_id"], r["gen_index"]) for r in rows)
    assert set(pairs.values()) == {1}
    assert set(pairs) == {(d["id"], g) for d in real for g in (0, 1)}
    for r in rows:
        assert r["task"] == "rephrase" and r["style"] == "wikipedia"
        assert r["model"] == f"template-v{TEMPLATE_VERSION}"
        assert r["prompt_version"].startswith("rephrase_wikipedia/v")
        assert set(r["sampling"]) >= {"temperature", "top_p", "max_new_tokens", "n", "seed"}
        assert r["completion_tokens"] == len(r["text"].split())
    stats = json.loads((out["synthetic"].parent / "stats.json").read_text())
    assert stats["totals"]["rows_written"] == 2 * N_DOCS and stats["totals"]["failures"] == 0


def test_cached_and_keyed_by_settings(cache):
    first = _demo_inputs(_cfg(cache))
    mtime = first["synthetic"].stat().st_mtime_ns
    again = _demo_inputs(_cfg(cache))
    assert again == first and again["synthetic"].stat().st_mtime_ns == mtime  # reused, not regenerated
    other = ensure_generations(_cfg(cache, generations=3))
    assert other != first["synthetic"]
    assert Counter(r["gen_index"] for r in _rows(other)) == {0: N_DOCS, 1: N_DOCS, 2: N_DOCS}
    qa = ensure_generations(_cfg(cache, style="qa"))
    assert qa not in (first["synthetic"], other) and _rows(qa)[0]["style"] == "qa"


def test_heldout_documents_are_never_seeds(cache, tmp_path):
    from megadoc_pl.data.split import make_split, write_split
    from megadoc_pl.data.tokenizer import load_tokenizer

    cfg = _cfg(cache)
    real, tok_dir = ensure_world(cfg)
    docs = _rows(real)
    tok = load_tokenizer(tok_dir)
    val = {"num_iid": 6, "num_long": 0, "num_short": 0, "long_threshold": 10**6, "short_threshold": 1,
           "split_seed": 1, "heldout_fraction": 0.0}
    split = make_split([d["id"] for d in docs], [len(tok.encode(d["text"])) for d in docs], val)
    split_file = write_split(tmp_path / "split.json", split)
    heldout = set(split["heldout"])
    assert len(heldout) == 6
    rows = _rows(_demo_inputs(cfg, split_file=split_file)["synthetic"])
    sources = {r["source_id"] for r in rows}
    assert not sources & heldout
    assert sources == {d["id"] for d in docs} - heldout
    # The held-out documents' own facts are stated by no training document and no generation
    # (rephrases here, rationales with their background facts below): only generalisation helps there.
    from megadoc_pl.demo.template_backend import Source
    from megadoc_pl.demo.world import build_world

    world = build_world(0, N_DOCS)
    held_docs = [d for d in docs if d["id"] in heldout]
    own = {f for d in held_docs for f in d["meta"]["own_facts"]}
    assert own and not own & {f for d in docs if d["id"] not in heldout for f in d["meta"]["facts"]}
    rationales = _rows(_demo_inputs(_cfg(cache, view="stretch", generations=2), split_file=split_file)["synthetic"])
    for d in held_docs:
        probe = Source(d["text"], world, None, tuple(world.facts[f] for f in d["meta"]["own_facts"]))
        for r in rows + rationales:
            assert not probe.mentioned(r["text"]), (d["id"], r["source_id"])


def test_stretch_rationales_at_the_equal_token_split(cache):
    from megadoc_pl.data.tokenizer import load_tokenizer

    cfg = _cfg(cache, view="stretch", generations=3)
    out = _demo_inputs(cfg)
    tok = load_tokenizer(out["tokenizer"])
    texts = {d["id"]: d["text"] for d in _rows(out["real"])}
    rows = _rows(out["synthetic"])
    assert len(rows) == 3 * N_DOCS
    for r in rows:
        assert r["task"] == "rationale" and r["split_index"] == r["gen_index"]
        splits = equal_token_split(len(tok.encode(texts[r["source_id"]])), 3)
        assert r["split_token_offset"] == splits[r["split_index"]]


def test_maga_with_judge(cache):
    out = _demo_inputs(_cfg(cache, view="maga_stitch", generations=5, judge=True))
    rows = _rows(out["synthetic"])
    assert Counter(r["gen_index"] for r in rows) == {g: N_DOCS for g in range(5)}
    for r in rows:
        assert r["task"] == "maga" and r["genre"] and r["audience"]
        assert r["judge_score"] == 5  # base variant keeps every fact


def test_real_view_needs_no_generations_and_bad_settings_are_one_line_errors(cache):
    assert _demo_inputs(_cfg(cache, view="real", generations=0))["synthetic"] is None
    with pytest.raises(ValueError, match="data.generations"):
        generation_plan(_cfg(cache, view="stitch", generations=0))
    with pytest.raises(ValueError, match="data.view"):
        generation_plan(_cfg(cache, view="mystery"))


def test_stitch_stretch_gets_the_rephrases_of_stitch_and_the_rationales_of_stretch(cache):
    inputs = corpus_inputs(_cfg(cache, view="stitch_stretch", generations=2))
    files = [inputs.generate(task, None) for task in VIEW_TASKS["stitch_stretch"]]
    assert files == [_demo_inputs(_cfg(cache, view=v, generations=2))["synthetic"] for v in ("stitch", "stretch")]
    assert [_rows(f)[0]["task"] for f in files] == ["rephrase", "rationale"]
    with pytest.raises(ValueError, match="name one"):
        ensure_generations(_cfg(cache, view="stitch_stretch", generations=2))


def test_preparation_reads_the_demo_only_when_given_it(cache, tmp_path):
    from megadoc_pl.data.prepare import CorpusInputs, prepare_corpus

    cfg = _cfg(cache, view="real", generations=0)
    with pytest.raises(BadInput, match=r"^data.real is not set .*\(fix: .*corpus_inputs\(cfg\)"):
        prepare_corpus(cfg)  # data/ knows nothing of the demo: the entry points hand it over
    cfg.data.synthetic = str(tmp_path / "gens.jsonl")
    with pytest.raises(BadInput, match="data.synthetic is set but data.real is not"):
        corpus_inputs(cfg)
    cfg.data.real, cfg.data.tokenizer = "docs.jsonl", "tok.json"
    assert corpus_inputs(cfg) == CorpusInputs(("docs.jsonl",), "tok.json", (str(tmp_path / "gens.jsonl"),))
