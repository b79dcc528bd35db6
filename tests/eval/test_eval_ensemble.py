"""Ensembles: K copies of one model equal the model; logit/prob averaging equal full-logit oracles."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from megadoc_pl.eval.ensemble import Ensemble
from megadoc_pl.eval.scoring import IGNORE, causal_rows_batch, token_losses
from megadoc_pl.model.llama import Llama, LlamaConfig

from helpers import tiny_llama

V, T = 48, 20


def member(seed: int) -> Llama:
    return tiny_llama(V, seed, init_std=0.2)  # large init: members disagree visibly


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (3, T + 1), generator=g)
    targets = tokens[:, 1:].clone()
    targets[0, :4] = IGNORE
    return causal_rows_batch(tokens[:, :-1], targets)


@pytest.mark.parametrize("mode", ["logit", "prob"])
def test_k_copies_of_one_model_equal_the_model(batch, mode):
    model = member(0)
    with torch.no_grad():
        single = token_losses(model, batch)
        ens = Ensemble([copy.deepcopy(model) for _ in range(3)], mode=mode, chunk_tokens=7)
        got = token_losses(ens, batch)
    torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-5)
    assert (got[0, :4] == 0).all()


@pytest.mark.parametrize("chunk_tokens", [1, 7, 10_000])
def test_logit_and_prob_averaging_equal_full_logit_oracles(batch, chunk_tokens):
    members = [member(s) for s in range(3)]
    with torch.no_grad():
        logits_KBTV = torch.stack([m.logits(m(batch["input_ids"])).double() for m in members])
        tgt = batch["targets"]
        keep = tgt != IGNORE
        safe = tgt.clamp(min=0)
        mean_logits = logits_KBTV.mean(0)
        expect_logit = F.cross_entropy(mean_logits.reshape(-1, V), safe.reshape(-1), reduction="none").view(tgt.shape)
        mean_probs = logits_KBTV.softmax(-1).mean(0)
        expect_prob = -mean_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).log()
        for mode, expect in (("logit", expect_logit), ("prob", expect_prob)):
            got = Ensemble(members, mode=mode, chunk_tokens=chunk_tokens).token_losses(batch)
            torch.testing.assert_close(got.double(), torch.where(keep, expect, 0.0), rtol=1e-5, atol=1e-5)
        # the two rules differ for disagreeing members, and a mixture is never worse than its mean member
        lo = Ensemble(members, mode="logit").token_losses(batch)
        pr = Ensemble(members, mode="prob").token_losses(batch)
        assert not torch.allclose(lo, pr)
        singles = torch.stack([token_losses(m, batch) for m in members]).mean(0)
        assert (pr <= singles + 1e-5).all()  # Jensen: -log mean p <= mean -log p


def test_bad_ensembles_are_refused():
    with pytest.raises(ValueError, match="at least one member"):
        Ensemble([])
    with pytest.raises(ValueError, match="unknown ensemble mode 'median'"):
        Ensemble([member(0)], mode="median")
    other = Llama(LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_mlp=64, vocab_size=V + 1))
    with pytest.raises(ValueError, match="vocabulary"):
        Ensemble([member(0), other])
