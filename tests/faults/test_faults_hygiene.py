"""Held-out hygiene under bad input (issue 15): duplicate texts under new ids, an extra validation set
made of training texts, a split file of another corpus, generations of held-out documents.

Each case goes through ``megadoc-pl fit`` (exit code, the one ``error:`` line, no run directory
left behind) or ``prepare_corpus`` (what training would see).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megadoc_pl.data.hygiene import units_source_ids
from megadoc_pl.data.prepare import prepare_corpus
from megadoc_pl.recipes import load_recipe
from megadoc_pl.train.cli import main

from helpers import tiny_overrides, write_corpus

QUIET_FLAGS = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer_path):
    root = tmp_path_factory.mktemp("hygiene")
    corpus = write_corpus(root / "corpus.jsonl", num_docs=120)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    # every document again under a new id: half verbatim, half re-spaced and upper-cased
    with open(root / "dups.jsonl", "w") as f:
        for k, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
        for k, r in enumerate(rows):
            text = r["text"] if k % 2 else "  " + r["text"].upper().replace(" ", "\n ")
            f.write(json.dumps({"id": f"copy-{r['id']}", "text": text}) + "\n")
    return {"root": root, "tok": tiny_tokenizer_path, "corpus": corpus, "rows": rows, "dups": root / "dups.jsonl"}


def _recipe(world, name: str, extra=(), method: str = "baseline_real", corpus: Path | None = None):
    over = tiny_overrides(corpus or world["corpus"], world["tok"], world["root"], name)
    return load_recipe(method, over + list(extra))


def _cli(world, capsys, name: str, *sets: str, corpus: Path | None = None, method: str = "baseline_real") -> str:
    """Run ``megadoc-pl fit``; asserts exit code 2, one error line and no run directory; returns the line."""
    over = tiny_overrides(corpus or world["corpus"], world["tok"], world["root"], name)
    argv = ["fit", "--recipe", method, *[a for o in [*over, *sets] for a in ("--set", o)], *QUIET_FLAGS]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert not (world["root"] / "runs" / name).exists()  # the claimed directory was given back
    return lines[0]


def test_exact_duplicates_of_heldout_documents_are_excluded_from_training_and_counted(world, capsys):
    capsys.readouterr()
    p = prepare_corpus(_recipe(world, "dups", corpus=world["dups"]))
    err = capsys.readouterr().err
    twin = {r["id"]: f"copy-{r['id']}" for r in world["rows"]}
    twin.update({v: k for k, v in list(twin.items())})
    leaked = {twin[h] for h in p.heldout} - p.heldout  # held-out texts present under another id
    assert leaked  # the split holds out one of each pair, so the fault is there
    trained = units_source_ids(p.real_units)
    assert not trained & leaked and not trained & p.heldout
    assert p.real_units.stats["heldout_duplicates_excluded"] == len(leaked)
    assert p.real_units.stats["heldout_sources_excluded"] == len(p.heldout)
    assert f"held-out hygiene: {len(leaked)} documents repeat the text of a held-out document" in err
    assert len(trained) == 2 * len(world["rows"]) - len(p.heldout) - len(leaked)


def test_an_extra_validation_set_made_of_training_texts_is_refused(world, capsys, tmp_path):
    extra = tmp_path / "extra.jsonl"
    with open(extra, "w") as f:
        for r in world["rows"][:40]:
            f.write(json.dumps({"id": f"new-{r['id']}", "text": r["text"]}) + "\n")
    line = _cli(world, capsys, "extra", f"data.val.extra={{ood: {extra}}}")
    assert line.startswith("error: held-out hygiene: validation set 'ood' shares ")
    assert "documents by text ('new-doc" in line and "= training 'doc" in line and "fix:" in line


def test_a_split_file_matching_none_of_the_corpus_is_refused(world, capsys, tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"heldout": ["other-1", "other-2"], "sets": {"iid": ["other-1"]}}))
    line = _cli(world, capsys, "split", f"data.val.split_file={split}")
    assert line == (f"error: {split}: none of its 2 held-out ids is a document of the real corpus (e.g. 'other-1'; "
                    "the corpus has ids like 'doc0000') (fix: this split belongs to another corpus or data.id_field; "
                    "give the matching data.val.split_file, or remove it to compute a new split)")


def _generations(world, path: Path) -> Path:
    with open(path, "w") as f:
        for r in world["rows"]:
            f.write(json.dumps({"source_id": r["id"], "task": "rephrase", "gen_index": 0,
                                "text": "In other words: " + r["text"]}) + "\n")
    return path


def test_generations_of_heldout_documents_are_an_error_unless_dropping_is_asked_for(world, capsys, tmp_path):
    gens = _generations(world, tmp_path / "gens.jsonl")
    sets = [f"data.synthetic={gens}", "data.generations=1", "data.mixture.real_epochs=2"]
    line = _cli(world, capsys, "gens", *sets, method="rephrase")
    assert line.startswith("error: data.synthetic holds ") and "generations of " in line
    assert "held-out documents (e.g. source 'doc" in line and "data.drop_heldout_generations=true" in line

    capsys.readouterr()
    p = prepare_corpus(_recipe(world, "gens-drop", [*sets, "data.drop_heldout_generations=true"], method="rephrase"))
    err = capsys.readouterr().err
    n = len(p.heldout)
    assert f"dropping {n} generations of held-out documents from data.synthetic" in err
    assert p.synthetic_units.stats["heldout_generations_excluded"] == n
    assert not units_source_ids(p.synthetic_units) & p.heldout


def test_real_fraction_leaves_sources_out_of_both_streams(world, tmp_path, monkeypatch):
    # data.real_fraction's left-out ids (an Arrow IdSet) reach the real stream and the view alike
    import math

    from megadoc_pl.data import view_cache
    from megadoc_pl.data.view_cache import ids_hash

    gens = _generations(world, tmp_path / "gens.jsonl")
    sets = [f"data.synthetic={gens}", "data.generations=1", "data.mixture.real_epochs=2",
            "data.drop_heldout_generations=true"]
    full = prepare_corpus(_recipe(world, "frac-1", sets, method="rephrase"))
    half = prepare_corpus(_recipe(world, "frac-half", [*sets, "data.real_fraction=0.5"], method="rephrase"))
    train = units_source_ids(full.real_units)
    kept = units_source_ids(half.real_units)
    assert len(train) == len(world["rows"]) - len(full.heldout)
    assert kept < train and len(kept) == math.ceil(0.5 * len(train))
    assert half.real_units.stats["real_fraction_sources_excluded"] == len(train) - len(kept)
    assert half.real_units.stats["heldout_sources_excluded"] == len(half.heldout)
    assert units_source_ids(half.synthetic_units) == kept  # generations of left-out sources are dropped
    assert units_source_ids(full.synthetic_units) == train
    assert ids_hash(full.heldout | set()) == ids_hash(sorted(full.heldout))

    # The view's cache key names the left-out sources by what determines them (store, excluded ids,
    # fraction, seed): a relaunch hashes no id set larger than the excluded ids and builds nothing;
    # another seed leaves out other sources and is another view.
    hashed, hash_ids, build = [], view_cache.ids_hash, view_cache.build_view
    monkeypatch.setattr(view_cache, "ids_hash", lambda ids: hashed.append(len(ids)) or hash_ids(ids))
    monkeypatch.setattr(view_cache, "build_view", lambda *a, **k: 1 / 0)
    again = prepare_corpus(_recipe(world, "frac-half-again", [*sets, "data.real_fraction=0.5"], method="rephrase"))
    excluded = len(half.heldout) + half.real_units.stats["heldout_duplicates_excluded"]
    assert hashed and max(hashed) == excluded < excluded + len(train) - len(kept)
    assert units_source_ids(again.synthetic_units) == kept
    monkeypatch.setattr(view_cache, "build_view", build)
    other = prepare_corpus(_recipe(world, "frac-half-seed", [*sets, "data.real_fraction=0.5", "train.data_seed=1"],
                                   method="rephrase"))
    assert units_source_ids(other.synthetic_units) == units_source_ids(other.real_units) != kept
