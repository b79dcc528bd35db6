"""Offline evaluation over real token stores and windows; hygiene on real units; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.views import documents_units, real_units
from megadoc_pl.data.windows import Windows
from megadoc_pl.eval.ensemble import Ensemble
from megadoc_pl.data.hygiene import HeldoutOverlapError, check_units_disjoint, units_source_ids
from megadoc_pl.eval.position import read_curves_csv
from megadoc_pl.eval.runner import evaluate_validation

from helpers import SAMPLE_TEXTS, tiny_llama

T = 32
TEXTS = SAMPLE_TEXTS


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_tokenizer_path):
    d = tmp_path_factory.mktemp("store")
    rows = [{"id": f"doc{i}", "text": " ".join(TEXTS[(i + k) % 5] for k in range(1 + i % 4))} for i in range(24)]
    (d / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_store(d / "docs.jsonl", tiny_tokenizer_path, d / "store", progress=False, num_proc=1)


@pytest.mark.parametrize("scope", ["window", "document"])
def test_evaluate_validation_equals_cross_entropy_over_the_same_windows(store, tmp_path, scope):
    model = tiny_llama(300, 0)
    sets = {"iid": documents_units(store, np.arange(0, 12), "iid"), "long": documents_units(store, np.arange(12, 24), "long")}
    windows = {k: Windows.sequential(u, T, scope) for k, u in sets.items()}
    out = evaluate_validation(model, windows, seq_len=T, batch_size=3, position_buckets=4, out_dir=tmp_path,
                              progress=False)
    for name, w in windows.items():
        n = len(w)
        assert n >= 2
        with torch.no_grad():
            b = w.batch(list(range(n)))
            hidden = model(b["input_ids"], b["position_ids"], model.segment_mask(b["segment_ids"]))
            ce = F.cross_entropy(model.logits(hidden).reshape(-1, 300), b["targets"].reshape(-1))
        assert out[f"val/{name}/loss"] == pytest.approx(float(ce), rel=1e-5)
        assert out[f"val/{name}/tokens"] == n * T
        rows = read_curves_csv(tmp_path / f"loss_by_position_{name}.csv")
        assert sum(r["count"] for r in rows if r["kind"] == "document") == n * T


def test_ensemble_of_copies_scores_like_the_model(store):
    model = tiny_llama(300, 1)
    windows = {"iid": Windows.sequential(documents_units(store, None, "iid"), T, "window", max_windows=3)}
    single = evaluate_validation(model, windows, seq_len=T, progress=False)
    ens = evaluate_validation(Ensemble([model, model], mode="prob"), windows, seq_len=T, progress=False)
    assert ens["val/iid/loss"] == pytest.approx(single["val/iid/loss"], rel=1e-5)


def test_hygiene_on_real_units(store):
    heldout = {f"doc{i}" for i in range(6)}
    ids = list(store.source_ids)
    held_docs = np.array([i for i, s in enumerate(ids) if s in heldout])
    train = real_units(store, heldout)
    val = {"iid": documents_units(store, held_docs, "iid")}
    assert units_source_ids(val["iid"]) == heldout
    check_units_disjoint([train, None], val)
    leaky = {"iid": val["iid"], "ood": documents_units(store, np.array([7, 8]), "ood")}
    with pytest.raises(HeldoutOverlapError, match=r"'ood' shares 2 of 2 documents \(e.g. 'doc7', 'doc8'\)"):
        check_units_disjoint([train], leaky)
    # only the training ids that a set lists are collected, never the whole stream's
    assert units_source_ids(train, among={"doc7", "doc2", "nowhere"}) == {"doc7"}
    assert units_source_ids(train, among=set()) == set()
    assert units_source_ids(train) == set(ids) - heldout


def test_tasks_only_score_with_the_tokenizer_the_run_kept(tmp_path, tiny_tokenizer_path):
    """A run directory as --checkpoint: its last checkpoint and the tokenizer it kept; scoring tasks
    alone prepares no corpus (the recipe here has none to prepare)."""
    from omegaconf import OmegaConf

    from megadoc_pl.config import RecipeConfig
    from megadoc_pl.eval.runner import EvalSpec, run_evaluation
    from megadoc_pl.train import rundir

    recipe = OmegaConf.structured(RecipeConfig)
    recipe.data.seq_len, recipe.data.cache_dir = T, str(tmp_path / "cache")  # where preparing would write
    recipe.model.size, recipe.model.attention_backend = "nano", "sdpa"
    recipe.model.overrides = {"d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "d_mlp": 64}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in tiny_llama(300, 2).state_dict().items()},
                "hyper_parameters": {"cfg": OmegaConf.to_container(recipe)}}, run / "checkpoints" / "last.ckpt")
    task = tmp_path / "toy.jsonl"
    task.write_text(json.dumps({"question": "Who founded the town?", "choices": ["a fox", "Alice"], "label": 1}) + "\n")
    rundir.save_tokenizer(run, tiny_tokenizer_path)
    result = run_evaluation(EvalSpec(checkpoints=[str(run)], validation=False, tasks={"toy": str(task)}, device="cpu",
                                     progress=False))
    assert result["tasks"]["toy"]["n"] == 1 and result["members"] == 1
    assert not (tmp_path / "cache").exists()
