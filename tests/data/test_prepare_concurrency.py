"""Ranks relaunching on a prepared cache read it side by side (a shared lock); one that finds
something missing builds it alone (the exclusive lock), and nobody builds under the shared one."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from megadoc_pl.data import prepare as prepare_mod
from megadoc_pl.data.prepare import prepare_corpus
from megadoc_pl.recipes import load_recipe
from megadoc_pl.utils import file_lock

from helpers import tiny_overrides, write_corpus


@pytest.fixture
def make(tmp_path, tiny_tokenizer_path):
    """Recipes that use every cached artefact: two stores, the split, a view, a real_fraction
    subset and an extra validation set (extra overrides appended)."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", num_docs=60)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    gens = tmp_path / "gens.jsonl"
    gens.write_text("".join(json.dumps({"source_id": r["id"], "task": "rephrase", "gen_index": 0,
                                        "text": "In other words: " + r["text"]}) + "\n" for r in rows))
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"id": "x-0", "text": "Hana built the tower of Osk in 1850. " * 3}) + "\n")
    over = tiny_overrides(corpus, tiny_tokenizer_path, tmp_path, "c") + [
        f"data.synthetic={gens}", "data.generations=1", "data.mixture.real_epochs=2",
        "data.drop_heldout_generations=true", "data.real_fraction=0.5", f"data.val.extra={{one: {extra}}}"]
    return lambda *extra_over: load_recipe("rephrase", over + list(extra_over))


def _locks(monkeypatch) -> list[bool]:
    """The preparation locks taken (True: shared), in order."""
    taken: list[bool] = []
    real = prepare_mod.preparation_lock

    def spy(cache_dir, shared=False):
        taken.append(shared)
        return real(cache_dir, shared)

    monkeypatch.setattr(prepare_mod, "preparation_lock", spy)
    return taken


def test_a_relaunch_reads_everything_under_the_shared_lock(make, monkeypatch):
    taken = _locks(monkeypatch)
    cfg = make()
    first = prepare_corpus(cfg)
    assert taken == [True, False]  # a cold cache: the shared pass stops at the first missing store
    again = prepare_corpus(cfg)
    assert taken == [True, False, True]  # nothing missing: no exclusive lock
    assert again.fingerprint == first.fingerprint and again.plan == first.plan
    assert again.real_units.num_units == first.real_units.num_units and set(again.val_units) == set(first.val_units)
    assert again.synthetic_units.num_units == first.synthetic_units.num_units
    # each cached artefact gone in turn: the shared pass builds none of them, the exclusive one does
    cache = Path(cfg.data.cache_dir)
    for kind in ("splits", "views", "real_fraction"):
        shutil.rmtree(cache / kind)
        del taken[:]
        assert prepare_corpus(cfg).fingerprint == first.fingerprint
        assert taken == [True, False] and any((cache / kind).iterdir()), kind
    # data.rebuild asks for building: straight to the exclusive lock
    del taken[:]
    prepare_corpus(make("data.rebuild=true"))
    assert taken == [False]


def _in_thread(fn) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def test_readers_run_together_and_a_builder_waits_for_them(make):
    recipe = make()
    lock = Path(recipe.data.cache_dir) / ".prepare.lock"
    # cold cache, another rank reading: building needs the exclusive lock, so it waits
    Path(recipe.data.cache_dir).mkdir(parents=True)
    with file_lock(lock, shared=True):
        t, out = _in_thread(lambda: prepare_corpus(recipe))
        t.join(3)
        assert t.is_alive() and not (Path(recipe.data.cache_dir) / "stores").exists()
    t.join(60)
    assert not t.is_alive() and out
    # warm cache, another rank reading: this one reads alongside it, without waiting
    with file_lock(lock, shared=True):
        t, out = _in_thread(lambda: prepare_corpus(recipe))
        t.join(60)
        assert not t.is_alive() and out
    # warm cache, a rank building: readers wait for it
    with file_lock(lock):
        t, out = _in_thread(lambda: prepare_corpus(recipe))
        t.join(2)
        assert t.is_alive()
    t.join(60)
    assert not t.is_alive() and out


def test_a_cached_relaunch_removes_a_killed_builds_files_but_not_a_pass_writers(make, capsys):
    cfg = make()
    prepare_corpus(cfg)
    cache = Path(cfg.data.cache_dir)
    dead_store = cache / "stores" / ".documents-0123456789abcdef.x1y2.partial"  # a killed build, another config
    dead_store.mkdir()
    (dead_store / "tokens.bin").write_bytes(b"\0" * 64)
    dead_split = cache / "splits" / ".split-0123.json.z9.tmp"
    dead_split.write_text("{")
    (cache / "passes").mkdir()
    pass_tmp = cache / "passes" / ".order-abc-p0-0.npy.w1.tmp"  # a training process's, under its own lock
    pass_tmp.write_bytes(b"half")
    capsys.readouterr()
    with file_lock(cache / ".prepare.lock", shared=True):  # another rank reading: nothing is removed now
        prepare_corpus(cfg)
    assert dead_store.exists() and dead_split.exists()
    prepare_corpus(cfg)  # alone: the relaunch (shared lock only) removes them first
    err = capsys.readouterr().err
    assert not dead_store.exists() and not dead_split.exists() and pass_tmp.exists()
    assert f"removed {dead_store}, left by an interrupted preparation" in err


def test_a_rank_maps_what_the_ranks_of_a_node_share(make):
    """Without loader workers too, a prepared run's streams map their offsets and pass orders
    from data.cache_dir/passes (the first rank of a node computes them), the stores map their
    offsets, and the index columns read for the hygiene checks are released: what a rank holds
    for itself no longer grows by ~50 bytes a document. Another rank reads the same windows."""
    import pickle

    import numpy as np

    from test_shared_passes import _mapped

    cfg = make()
    p = prepare_corpus(cfg)
    for store in (p.real, p.synthetic):
        assert _mapped(store.offsets_full) and not store._index._columns
    w = p.train_windows()
    assert len(w.streams) == 2
    for st in w.streams:
        assert _mapped(st.canon_start) and _mapped(st.piece_key) and _mapped(st.pass_order(0)[0])
    other = prepare_corpus(cfg).train_windows()
    assert np.array_equal(w.tokens(range(8)), other.tokens(range(8)))
    assert sorted({f.name.split("-")[0] for f in (Path(cfg.data.cache_dir) / "passes").glob("*.npy")}) == \
        ["order", "units"]  # rephrase and the real stream: one piece a unit, so no piece offsets
    spawned = pickle.loads(pickle.dumps(w))  # as a spawned loader worker gets them: names made, files mapped
    assert [st.order_name for st in spawned.streams] == [st.order_name for st in w.streams]
    assert np.array_equal(spawned.tokens(range(8, 16)), w.tokens(range(8, 16)))
