"""The dry run's memory-per-GPU estimate: its arithmetic, the sharding rule, the one-line refusal."""

from __future__ import annotations

import pytest

from megadoc_pl.model.config import LlamaConfig
from megadoc_pl.model.memory import GIB, check_fits, memory_per_gpu


def test_estimate_is_the_documented_arithmetic():
    cfg = LlamaConfig.from_name("maga_13b")
    n, d, f, kv, L = cfg.num_params(), cfg.d_model, cfg.d_mlp, cfg.n_kv_heads * cfg.head_dim, cfg.n_layers
    T, b = 8192, 1
    full = memory_per_gpu(cfg, T, b, "fsdp2", 8)
    assert full["gib"]["optimizer"] == round(8 * n / 8 / GIB, 3)
    assert full["gib"]["weights"] == full["gib"]["gradients"] == round(4 * n / 8 / GIB, 3)
    assert full["gib"]["activations"] == round(L * T * b * (14 * d + 4 * kv + 8 * f) / GIB, 3)
    ckpt = memory_per_gpu(cfg, T, b, "fsdp2", 8, activation_checkpointing=True)
    assert ckpt["gib"]["activations"] == round((L * 2 * T * b * d + T * b * (14 * d + 4 * kv + 8 * f)) / GIB, 3)
    # sharding divides the states by the world; DDP replicates them
    wide = memory_per_gpu(cfg, T, b, "fsdp2", 64, activation_checkpointing=True)
    assert wide["gib"]["optimizer"] == round(8 * n / 64 / GIB, 3)
    ddp = memory_per_gpu(cfg, T, b, "ddp", 64)
    assert ddp["gib"]["optimizer"] == round(8 * n / GIB, 3) and ddp["gib"]["gathered_block"] == 0
    assert 30 < ckpt["total_gib"] < 32 and 9 < wide["total_gib"] < 10  # 13B at 8192 on 8 / 64 GPUs


def test_a_plan_that_cannot_fit_is_refused_in_one_line():
    est = memory_per_gpu(LlamaConfig.from_name("maga_13b"), 8192, 1, "ddp", 8)
    with pytest.raises(ValueError) as e:
        check_fits(est, 80.0, "NVIDIA H100 80GB HBM3")
    msg = str(e.value)
    assert "\n" not in msg and "more than the 80 GiB of NVIDIA H100" in msg
    assert "train.activation_checkpointing=true" in msg and "train.strategy=fsdp2" in msg
    check_fits(memory_per_gpu(LlamaConfig.from_name("tiny"), 256, 8, "ddp", 1), 80.0, "H100")  # fits: no error


def test_dry_run_reports_memory_for_the_recipe_strategy(capsys):
    from helpers import load_script

    train = load_script("recipes/train.py")
    assert train.main(["--recipe", "megadoc_stitch", "scale=maga_13b", "train.devices=8", "train.num_nodes=8",
                       "--dry-run", "--assume-tokens", "real=20B,synthetic=100B"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    mem = report["memory_per_gpu"]
    assert (mem["strategy"], mem["world_size"], mem["activation_checkpointing"]) == ("fsdp2", 64, True)
    assert "16 B x" in mem["arithmetic"]


def test_assumed_dry_run_trains_on_the_real_fraction(capsys):
    import json

    from helpers import load_script

    train = load_script("recipes/train.py")
    reports = []
    for fraction in ("1.0", "0.25"):
        assert train.main(["--recipe", "baseline_real", "scale=paper_300m", f"data.real_fraction={fraction}",
                           "--dry-run", "--assume-tokens", "real=200M"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    full, quarter = (r["assumed"]["stream_tokens"]["real"] for r in reports)
    assert (full, quarter) == (200_000_000, 50_000_000)
    assert reports[1]["plan"]["steps"] < reports[0]["plan"]["steps"]
