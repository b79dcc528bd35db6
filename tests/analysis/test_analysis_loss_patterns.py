"""MAGA loss patterns: exact windows and first anomalies, histograms, loss files, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megadoc_pl.analysis import loss_patterns as LP
from helpers import load_script


@pytest.mark.parametrize("length,expected", [(1, 1), (10, 1), (29, 1), (30, 2), (50, 3), (100, 5), (2048, 102)])
def test_window_is_five_percent_rounded_half_up_at_least_one(length, expected):
    assert LP.window_size(length) == expected


def test_windowed_means_match_a_loop():
    rng = np.random.default_rng(0)
    d = rng.normal(size=37)
    for w in (1, 2, 5, 37):
        naive = [d[p : p + w].mean() for p in range(d.size - w + 1)]
        np.testing.assert_allclose(LP.windowed_means(d, w), naive, rtol=1e-12, atol=1e-12)


def bump(length=100, start=60, width=5, height=1.0) -> np.ndarray:
    d = np.zeros(length)
    d[start : start + width] = height
    return d


def test_first_anomaly_positions_exact():
    """100 tokens, +1 on tokens 60..64: mu = 0.05, sigma = sqrt(0.05 * 0.95), window 5.

    Window means rise 0.2, 0.4, 0.6, 0.8, 1.0 at starts 56..60, so the first start above
    |mu| + k sigma is 57 for k = 1 (0.268), 58 for k = 2 (0.486), 59 for k = 3 (0.704),
    60 for k = 4 (0.922) and none for k = 5 (1.140).
    """
    d = bump()
    sigma = np.sqrt(0.05 * 0.95)
    for k, pos in ((1, 57), (2, 58), (3, 59), (4, 60), (5, None)):
        an = LP.first_anomaly(d, k)
        assert an.window == 5 and an.mean == pytest.approx(0.05) and an.std == pytest.approx(sigma)
        assert an.threshold == pytest.approx(0.05 + k * sigma)
        assert an.position == pos
        assert an.relative_position == (-1.0 if pos is None else float(pos))
    # either direction counts: model B better on the bump
    assert LP.first_anomaly(-d, 2).position == 58
    # a constant difference never crosses |mu| + k sigma
    assert LP.first_anomaly(np.full(50, 0.3), 1).position is None
    # a one-token document: window 1, sigma 0, no anomaly
    assert LP.first_anomaly([0.7], 1).position is None


def test_analyze_histograms_and_buckets_exact():
    docs_a = [np.zeros(100), np.zeros(100), np.zeros(40), np.zeros(20)]
    docs_b = [bump(100, 60), bump(100, 5, height=20.0), np.full(40, -0.1), np.full(20, 0.9) + bump(20, 18, 1, 3.0)]
    report = LP.analyze(docs_a, docs_b, ids=["a", "b", "c", "d"], ks=[2], bins=10)
    docs = {d["id"]: d for d in report["documents"]}
    assert docs["a"]["first_anomaly"]["2.0"] == 58 and docs["a"]["relative_position"]["2.0"] == 58.0
    assert docs["b"]["first_anomaly"]["2.0"] == 3  # window 5 over a 5-token bump of 20 starting at 5
    assert docs["c"]["first_anomaly"]["2.0"] is None and docs["c"]["relative_position"]["2.0"] == -1
    assert docs["d"]["window"] == 1 and docs["d"]["first_anomaly"]["2.0"] == 18
    assert [d["bucket"] for d in report["documents"]] == ["0-0.25", ">0.5", "<=0", ">0.5"]
    h = report["histograms"]["2.0"]
    assert h["counts"] == [1, 0, 0, 0, 0, 1, 0, 0, 0, 1] and h["none"] == 1
    assert h["by_mean_diff"][">0.5"]["counts"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert h["by_mean_diff"]["<=0"]["none"] == 1
    with pytest.raises(ValueError, match="document x: the two loss arrays differ in length"):
        LP.analyze([np.zeros(3)], [np.zeros(4)], ids=["x"])


def test_loss_file_formats_and_pairing(tmp_path):
    rng = np.random.default_rng(1)
    la = [rng.random(5), rng.random(3)]
    LP.write_losses_jsonl(tmp_path / "a.jsonl", ["d1", "d2"], la, [list("abcde"), list("xyz")])
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"id": "d2", "losses": [1, 2, 3]}) + "\n" + json.dumps({"id": "d1", "losses": [0] * 5}) + "\n")
    ids, a, b, tokens = LP.pair_losses(LP.read_losses(tmp_path / "a.jsonl"), LP.read_losses(tmp_path / "b.jsonl"))
    assert ids == ["d1", "d2"] and list(b[1]) == [1, 2, 3] and tokens[1] == ["x", "y", "z"]
    np.testing.assert_allclose(a[0], la[0], atol=1e-6)

    padded = np.full((2, 5), np.nan)
    padded[0], padded[1, :3] = [1, 2, 3, 4, 5], [1, 2, 3]
    np.save(tmp_path / "p.npy", padded)
    ids, rows, _ = LP.read_losses(tmp_path / "p.npy")
    assert ids is None and [len(r) for r in rows] == [5, 3]
    np.savez(tmp_path / "z.npz", d1=np.ones(5), d2=np.ones(3))
    ids, rows, _ = LP.read_losses(tmp_path / "z.npz")
    assert ids == ["d1", "d2"] and [len(r) for r in rows] == [5, 3]
    (tmp_path / "bad.jsonl").write_text('{"losses": [1, 2]}\n{"loss": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        LP.read_losses(tmp_path / "bad.jsonl")


def test_cli_on_precomputed_losses(tmp_path, capsys):
    main = load_script("tools/loss_patterns.py").main
    rng = np.random.default_rng(2)
    ids = [f"doc{i}" for i in range(6)]
    la = [rng.normal(3, 0.3, 200) for _ in ids]
    lb = [x + rng.normal(0.0, 0.05, x.size) + bump(x.size, 150, 10, 2.0 * i) for i, x in enumerate(la)]
    toks = [[f"t{j} " for j in range(200)] for _ in ids]
    LP.write_losses_jsonl(tmp_path / "a.jsonl", ids, la, toks)
    LP.write_losses_jsonl(tmp_path / "b.jsonl", ids, lb)
    out = tmp_path / "out"
    main(["--losses-a", str(tmp_path / "a.jsonl"), "--losses-b", str(tmp_path / "b.jsonl"), "--out", str(out),
          "--k", "2", "3", "--label-a", "real", "--label-b", "synt"])
    report = json.loads((out / "report.json").read_text())
    assert report["ks"] == [2.0, 3.0] and report["num_documents"] == 6
    # every document with a bump flags it at the bump (window 10 over the 10-token bump at 150)
    for d in report["documents"][1:]:
        assert 140 < d["first_anomaly"]["2.0"] <= 150
    page = (out / "examples.html").read_text()
    assert "class='anom'" in page and "synt" in page and "t150 " in page and "doc5" in page
    for p in ("histogram_k2.0.png", "histogram_k3.0.png", "example_0.png"):
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "first anomaly in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give both"):
        main(["--losses-a", str(tmp_path / "a.jsonl"), "--out", str(out)])


def test_cli_scores_documents_with_a_checkpoint_and_an_export(tmp_path, tiny_tokenizer_path):
    """End to end: model A from a Lightning-style checkpoint, model B from an HF export.

    Oracle: transformers' LlamaForCausalLM on A's export gives the same mean loss per document.
    """
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from megadoc_pl.checkpoints import export_hf
    from megadoc_pl.model.llama import Llama, LlamaConfig

    vocab = Tokenizer.from_file(str(tiny_tokenizer_path)).get_vocab_size()
    cfg = LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_mlp=64, vocab_size=vocab)
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        models[name] = Llama(cfg)
        export_hf(models[name], tmp_path / name)
    ckpt = tmp_path / "a.ckpt"
    torch.save({"hyper_parameters": {"cfg": {"model": {"size": "tiny", "vocab_size": vocab, "overrides": {
        "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "d_mlp": 64}}}},
                "state_dict": {f"model.{k}": v for k, v in models["a"].state_dict().items()}}, ckpt)
    docs = tmp_path / "docs.jsonl"
    texts = ["The quick brown fox jumps over the lazy dog. " * 3,
             "Alice founded the town of Brindle in 1821 and built its first mill."]
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    load_script("tools/loss_patterns.py").main(["--model-a", str(ckpt), "--model-b", str(tmp_path / "b"),
                                     "--documents", str(docs), "--tokenizer", str(tiny_tokenizer_path),
                                     "--out", str(out), "--max-tokens", "64"])
    ids, losses, tokens = LP.read_losses(out / "losses_a.jsonl")
    assert ids == ["d0", "d1"] and tokens is not None
    tok = Tokenizer.from_file(str(tiny_tokenizer_path))
    oracle = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a")).eval()
    for j, text in enumerate(texts):
        x = torch.tensor([([0] + tok.encode(text).ids)[:64]])
        with torch.no_grad():
            ref = oracle(input_ids=x, labels=x).loss.item()
        assert len(losses[j]) == x.shape[1] - 1
        assert float(np.mean(losses[j])) == pytest.approx(ref, abs=1e-4)
        assert "".join(tokens[j]) == tok.decode(x[0, 1:].tolist())
    report = json.loads((out / "report.json").read_text())
    assert report["num_documents"] == 2
    assert report["documents"][0]["mean_loss_a"] == pytest.approx(float(np.mean(losses[0])), abs=1e-6)
