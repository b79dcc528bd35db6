"""Embedding t-SNE map (MAGA Fig. 5): the shift number on hand-made points, and the tool end to end
on the demo world (real vs template rephrases vs MAGA reformulations) with a tiny random Llama."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers import load_script, one_thread, tiny_llama
from megadoc_pl.errors import MissingDependency
from megadoc_pl.analysis import embed_map as em

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="t-SNE needs the 'analysis' extra (scikit-learn)")

N_DOCS = 50
SAMPLE = 40


# --------------------------------------------------------------------------- the shift number


def test_shift_on_hand_made_points():
    real = np.array([[0.0], [1.0], [3.0]])  # nearest real neighbours: 1, 1, 2 -> mean 4/3
    synth = np.array([[0.5], [5.0]])  # nearest real: 0.5, 2 -> mean 1.25; real -> synth: 0.5, 0.5, 2
    s = em.shift_stats(real, synth)
    assert s["real_nn_distance"] == pytest.approx(4 / 3)
    assert s["shift"] == pytest.approx(1.25 / (4 / 3))
    assert s["reverse"] == pytest.approx(1.0 / (4 / 3))
    assert em.shift_stats(real, real)["shift"] == pytest.approx(0.0, abs=1e-7)  # copies


def test_same_distribution_scores_about_one():
    rng = np.random.default_rng(0)
    real, synth, far = rng.normal(size=(1500, 3)), rng.normal(size=(1500, 3)), rng.normal(size=(1500, 3)) + 2.0
    assert em.shift_stats(real, synth)["shift"] == pytest.approx(1.0, abs=0.08)
    assert em.shift_stats(real, far)["shift"] > 3


def test_nearest_distances_match_brute_force():
    rng = np.random.default_rng(1)
    q, r = rng.normal(size=(7, 5)), rng.normal(size=(9, 5))
    brute = np.linalg.norm(q[:, None] - r[None], axis=2).min(1)
    assert np.allclose(em.nearest_distances(q, r, chunk=3), brute)
    self_brute = np.linalg.norm(r[:, None] - r[None], axis=2) + np.diag(np.full(9, np.inf))
    assert np.allclose(em.nearest_distances(r, r, exclude_self=True, chunk=4), self_brute.min(1))


def test_sampling_is_a_function_of_seed_and_id():
    items = [(f"d{i}", i) for i in range(100)]
    a = em.sample_smallest(items, 10, seed=3)
    assert a == em.sample_smallest(list(reversed(items)), 10, seed=3)  # file order does not matter
    assert len(a) == 10 and a != em.sample_smallest(items, 10, seed=4)
    assert em.sample_smallest(items, None, seed=3)[:10] == a  # a larger sample contains the smaller


@needs_sklearn
def test_tsne_reduces_with_pca_first_and_is_deterministic():
    x = np.random.default_rng(2).normal(size=(30, 64))
    xy, info = em.tsne_2d(x, seed=1, perplexity=50)
    assert xy.shape == (30, 2) and info["pca_dims"] == 30 and info["perplexity"] == pytest.approx(29 / 3)
    assert np.array_equal(xy, em.tsne_2d(x, seed=1, perplexity=50)[0])


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.decomposition", None)  # import fails as if not installed
    with pytest.raises(MissingDependency, match=r"pip install 'megadoc_pl\[analysis\]'"):
        em.tsne_2d(np.zeros((10, 3)))


@pytest.mark.parametrize("spec, problem", [("maga", "expected NAME=PATH"), ("real=x.jsonl", "bad label"),
                                           ("a b=x.jsonl", "bad label"), ("maga=", "expected NAME=PATH")])
def test_bad_labels(spec, problem):
    with pytest.raises(ValueError, match=problem):
        em.parse_set_spec(spec)


# --------------------------------------------------------------------------- the tool on the demo world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo documents, tokenizer, rephrase and MAGA generations, and a tiny random checkpoint."""
    from megadoc_pl.config import RecipeConfig
    from megadoc_pl.demo import ensure_generations, ensure_world

    root = tmp_path_factory.mktemp("embed")

    def cfg(view: str):
        c = OmegaConf.structured(RecipeConfig)
        c.data.cache_dir, c.data.view, c.data.generations = str(root / "cache"), view, 1
        c.demo.num_documents, c.demo.vocab_size = N_DOCS, 512
        return c

    real, tok = ensure_world(cfg("real"))
    gens = {view: ensure_generations(cfg(view)) for view in ("rephrase", "maga")}
    model = tiny_llama(512)
    ckpt = root / "tiny.ckpt"
    recipe = {"model": {"size": "nano", "vocab_size": None, "attention_backend": "sdpa",
                        "loss_chunk_size": 64, "overrides": {"d_model": 32, "n_layers": 1, "n_heads": 2,
                                                             "n_kv_heads": 2, "d_mlp": 64}},
              "data": {"tokenizer": str(tok)}}
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"cfg": recipe}}, ckpt)
    return {"root": root, "real": real, "tokenizer": tok, "ckpt": ckpt, **gens}


@needs_sklearn
def test_tool_on_demo_world_is_deterministic(world, capsys):
    tool = load_script("tools/embed_map.py")
    args = ["--model", str(world["ckpt"]), "--real", str(world["real"]),
            "--synthetic", f"rephrase={world['rephrase']}", "--synthetic", f"maga={world['maga'].parent}",
            "--sample", str(SAMPLE), "--max-tokens", "128", "--seed", "7", "--no-progress"]
    with one_thread():
        assert tool.main(args + ["--out", str(world["root"] / "a")]) == 0
        table = capsys.readouterr().out
        assert tool.main(args + ["--out", str(world["root"] / "b")]) == 0
    a, b = world["root"] / "a", world["root"] / "b"
    assert (a / "embed_map.csv").read_bytes() == (b / "embed_map.csv").read_bytes()
    assert (a / "embed_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (a / "embed_map.csv").read_text().splitlines()
    assert rows[0] == "set,id,x,y" and len(rows) == 1 + 3 * SAMPLE
    sets = [r.split(",")[0] for r in rows[1:]]
    assert sets == ["real"] * SAMPLE + ["rephrase"] * SAMPLE + ["maga"] * SAMPLE
    real_ids = {json.loads(line)["id"] for line in world["real"].read_text().splitlines()}
    assert {r.split(",")[1] for r in rows[1: 1 + SAMPLE]} <= real_ids
    assert all("#" in r.split(",")[1] for r in rows[1 + SAMPLE:])  # source_id#gen_index
    report = json.loads((a / "shift.json").read_text())
    assert set(report["sets"]) == {"rephrase", "maga"}
    for s in report["sets"].values():
        assert s["documents"] == SAMPLE and np.isfinite(s["shift"]) and s["shift"] > 0 and np.isfinite(s["reverse"])
    assert "rephrase" in table and "maga" in table and "shift" in table
    # a different seed draws another sample
    with one_thread():
        assert tool.main(args[:-3] + ["--seed", "8", "--no-progress", "--out", str(world["root"] / "c")]) == 0
    assert (world["root"] / "c" / "embed_map.csv").read_bytes() != (a / "embed_map.csv").read_bytes()


def test_real_set_against_itself_has_zero_shift(world):
    with one_thread():
        embedder = em.load_embedder(str(world["ckpt"]))
        docs = em.read_set("real", [str(world["real"])], False, 20, 0)
        emb = em.embed_set(embedder, docs, max_tokens=64, progress=False)
    assert emb.shape == (20, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1.0)
    assert em.shift_stats(emb, emb)["shift"] == pytest.approx(0.0, abs=1e-6)


def test_one_line_errors(world, tmp_path):
    tool = load_script("tools/embed_map.py")
    base = ["--model", str(world["ckpt"]), "--real", str(world["real"]), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        tool.main(base + ["--synthetic", f"x={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(SystemExit, match="bad label"):
        tool.main(base + ["--synthetic", f"real={world['rephrase']}"])
    with pytest.raises(SystemExit, match="no such model"):
        tool.main(["--model", str(tmp_path / "none.ckpt"), "--real", str(world["real"]), "--out", str(tmp_path),
                   "--synthetic", f"x={world['rephrase']}"])


def test_hf_export_embeds_like_its_checkpoint(world, tmp_path):
    """The AutoModel path (a tools/export_hf.py directory) gives the checkpoint path's embeddings."""
    from megadoc_pl.checkpoints import export_checkpoint

    hf_dir = export_checkpoint(world["ckpt"], tmp_path / "hf")
    with one_thread():
        docs = em.read_set("rephrase", [str(world["rephrase"])], True, 12, 0)
        ours = em.embed_set(em.load_embedder(str(world["ckpt"])), docs, max_tokens=64, batch_size=5, progress=False)
        theirs = em.embed_set(em.load_embedder(str(hf_dir)), docs, max_tokens=64, batch_size=5, progress=False)
    assert np.allclose(ours, theirs, atol=1e-4)


def test_token_store_set_embeds_like_its_files(world, tmp_path):
    """A token store is read as tokenised: same ids and embeddings as its source files; a store of
    another tokenizer is refused."""
    from helpers import build_tiny_tokenizer
    from megadoc_pl.data.store_build import build_store

    store = build_store(world["maga"], world["tokenizer"], tmp_path / "store", kind="generations",
                        num_proc=1, parallel="threads", progress=False)
    embedder = em.load_embedder(str(world["ckpt"]))
    with one_thread():
        from_files = em.read_set("maga", [str(world["maga"])], True, 10, 0)
        from_store = em.read_set("maga", [str(store.path)], True, 10, 0)
        assert from_store.ids == from_files.ids
        a = em.embed_set(embedder, from_files, max_tokens=64, progress=False)
        b = em.embed_set(embedder, from_store, max_tokens=64, progress=False)
    assert np.allclose(a, b, atol=1e-6)
    other = build_store(world["maga"], build_tiny_tokenizer(tmp_path / "tok"), tmp_path / "other",
                        kind="generations", num_proc=1, parallel="threads", progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        em.embed_set(embedder, em.read_set("maga", [str(other.path)], True, 5, 0), progress=False)
