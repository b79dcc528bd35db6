"""Plans of every method recipe at every scale, through ``recipes/train.py --dry-run``.

Stream sizes are assumed (``--assume-tokens``: nothing is prepared), so the paper's own numbers
can be checked exactly: parameter counts (docs/papers.md, megadocs 1.3), steps, tokens and passes per
stream (the megadocs paper's table; docs/data-corpus.md) and MAGA's budget mode (docs/papers.md, MAGA 12.2). One real dry run on a
small demo world checks that the real stream's size is what the store holds for training.
"""

from __future__ import annotations

import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from megadoc_pl.dryrun import parse_stream_sizes
from megadoc_pl.model.llama import LlamaConfig
from megadoc_pl.recipes import list_recipes, load_recipe


REPO = Path(__file__).resolve().parents[1]
METHODS = list_recipes("methods")
SCALES = list_recipes("scales")

# docs/papers.md, megadocs 1.5: T_real of the 200M-token DCLM subset and the s32 / b32 synthetic stream.
T_REAL, T_SYN = 203_867_748, 3_713_048_352
# docs/papers.md, MAGA 12.2: EntireSet MGA-Expansion: 50B unique real tokens, 200B of MGA reformulations.
MAGA_REAL, MAGA_SYN = 50 * 10**9, 200 * 10**9
# docs/papers.md, megadocs 1.3 (vocabulary 128,256, untied embeddings).
PAPER_PARAMS = {"150m": 154_147_328, "300m": 299_649_792, "600m": 602_457_088, "1_5b": 1_540_732_416}


def _train_module():
    spec = importlib.util.spec_from_file_location("recipes_train", REPO / "recipes" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TRAIN = _train_module()


def dry_run(argv: list[str], capsys) -> dict:
    """recipes/train.py main() in this process; the printed JSON report."""
    capsys.readouterr()
    rc = TRAIN.main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def assumed_sizes(method: str) -> dict[str, int]:
    cfg = load_recipe(method)
    if cfg.data.mixture.mode == "budget":
        return {"real": MAGA_REAL, "synthetic": MAGA_SYN}
    return {"real": T_REAL} if cfg.data.view == "real" else {"real": T_REAL, "synthetic": T_SYN}


def sizes_arg(sizes: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sizes.items())


def paper_oracle(t_real: int, E, w, B: int, T: int) -> tuple[int, int, int, int]:
    """The paper's rule written out: (steps_per_epoch, steps, synthetic windows, real windows)."""
    E, w = Fraction(str(E)), Fraction(str(w))
    spe = t_real // (B * T)
    steps = math.floor(spe * E / (1 - w))
    syn = math.floor(steps * B * w)
    return spe, steps, syn, steps * B - syn


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("method", METHODS)
def test_plan_of_every_recipe_at_every_scale(method, scale, tmp_path, capsys):
    sizes = assumed_sizes(method)
    cache = tmp_path / "cache"
    r = dry_run(["--recipe", method, f"scale={scale}", f"data.cache_dir={cache}", "--dry-run",
                 "--assume-tokens", sizes_arg(sizes)], capsys)
    assert not cache.exists()  # nothing was prepared
    cfg = load_recipe(method, [f"scale={scale}"])
    B, T = int(cfg.train.global_batch_size), int(cfg.data.seq_len)
    mix = cfg.data.mixture
    plan, streams = r["plan"], r["plan"]["streams"]
    assert (r["recipe"], r["scale"], plan["mode"], plan["seq_len"], plan["global_batch_size"]) == (
        method, scale, mix.mode, T, B)
    assert r["assumed"]["stream_tokens"] == sizes
    assert {n: s["unique_tokens_per_pass"] for n, s in streams.items()} == sizes

    # model: the size's own vocabulary, exact parameter counts
    size = str(cfg.model.size)
    mcfg = LlamaConfig.from_name(size)
    assert r["vocab_size"] == mcfg.vocab_size
    assert r["parameters"] == mcfg.num_params()
    assert r["parameters_non_embedding"] == mcfg.num_params(embeddings=False)
    if scale.startswith("paper_"):
        assert mcfg.vocab_size == 128_256 and r["parameters"] == PAPER_PARAMS[size]

    # token accounting
    if mix.mode == "paper":
        spe, steps, syn_windows, real_windows = paper_oracle(T_REAL, mix.real_epochs, mix.synthetic_fraction, B, T)
        assert (plan["steps_per_epoch"], plan["steps"]) == (spe, steps)
        # the real stream gets exactly E epochs of steps_per_epoch batches
        assert streams["real"]["tokens"] == real_windows * T == int(mix.real_epochs) * spe * B * T
        if "synthetic" in sizes:
            assert streams["synthetic"]["windows"] == syn_windows
            assert streams["synthetic"]["passes"] == round(syn_windows * T / T_SYN, 6)
        else:
            assert set(streams) == {"real"} and syn_windows == 0
    else:  # budget mode: epochs x unique tokens per stream, docs/papers.md, MAGA 12.2
        budget = sum(int(cfg.data.mixture.stream_epochs[n]) * t for n, t in sizes.items())
        steps = budget // (B * T)
        assert plan["steps"] == steps and plan["steps_per_epoch"] is None
        real_share = Fraction(int(mix.stream_epochs.real) * MAGA_REAL, budget)
        assert streams["real"]["windows"] == math.floor(steps * B * real_share)
        assert streams["real"]["windows"] + streams["synthetic"]["windows"] == steps * B
    assert plan["windows"] == plan["steps"] * B and plan["tokens"] == plan["windows"] * T
    assert sum(s["tokens"] for s in streams.values()) == plan["tokens"]

    # the run: the demo scale trains a 300-step prefix of the plan
    run = 300 if scale == "demo" else plan["steps"]
    assert r["max_steps"] == run and r["trained_tokens"] == run * B * T

    # FLOPs: 6 per weight of a matmul per token + attention over whole windows, (T + 1) / 2 keys
    matmul = (mcfg.n_layers * (mcfg.d_model * (mcfg.n_heads + 2 * mcfg.n_kv_heads) * mcfg.head_dim
                               + mcfg.n_heads * mcfg.head_dim * mcfg.d_model + 3 * mcfg.d_model * mcfg.d_mlp)
              + mcfg.vocab_size * mcfg.d_model)
    per_token = 6 * matmul + 12 * mcfg.n_layers * mcfg.n_heads * mcfg.head_dim * (T + 1) / 2
    assert r["flops"]["per_token"] == pytest.approx(per_token, rel=1e-12)
    assert r["flops"]["total"] == pytest.approx(per_token * r["trained_tokens"], rel=1e-12)
    assert r["flops"]["six_N_D"] == 6 * r["parameters"] * r["trained_tokens"]
    assert ("upper bound" in r["flops"]["mean_attended_keys_from"]) == (cfg.model.attention_scope != "window")
    assert "device" in r["hardware"]


def test_the_papers_runs(capsys):
    """The megadocs 1.5 table (docs/papers.md) at 300M: steps, total tokens and synthetic passes."""
    def plan(method: str) -> dict:
        return dry_run(["--recipe", method, "scale=paper_300m", "--dry-run", "--assume-tokens",
                        sizes_arg(assumed_sizes(method))], capsys)

    stitch = plan("megadoc_stitch")
    assert (stitch["plan"]["steps"], stitch["max_steps"]) == (248_640, 248_640)
    assert stitch["plan"]["steps_per_epoch"] == 777
    assert stitch["trained_tokens"] == 248_640 * 64 * 4096  # 65.2B
    assert stitch["plan"]["streams"]["real"]["tokens"] == 32 * 777 * 64 * 4096
    assert round(stitch["plan"]["streams"]["synthetic"]["passes"], 1) == 15.8
    assert stitch["flops"]["six_N_D"] == pytest.approx(1.2e20, rel=0.03)  # "roughly 1.2e20 FLOPs"

    base = plan("baseline_real")
    assert base["plan"]["steps"] == 12_432 and set(base["plan"]["streams"]) == {"real"}
    assert base["plan"]["streams"]["real"]["tokens"] == 16 * 777 * 64 * 4096  # 3.26B
    assert base["plan"]["streams"]["real"]["passes"] == pytest.approx(16, abs=0.05)

    reph = plan("rephrase")
    assert reph["plan"]["steps"] == 49_728 and reph["trained_tokens"] == 49_728 * 64 * 4096  # 13.0B
    assert round(reph["plan"]["streams"]["synthetic"]["passes"], 1) == 2.6


def test_maga_entire_set_budget(capsys):
    """EntireSet MGA-Expansion: 50B real x 2 + 200B MGA x 2 = 500B tokens at 377M (batch 320 x 8192)."""
    r = dry_run(["--recipe", "maga_mix", "scale=maga_377m", "--dry-run", "--assume-tokens",
                 "real=50B,synthetic=200B"], capsys)
    assert r["assumed"]["stream_tokens"] == {"real": MAGA_REAL, "synthetic": MAGA_SYN}
    assert r["plan"]["steps"] == 500 * 10**9 // (320 * 8192) == 190_734
    s = r["plan"]["streams"]
    assert s["real"]["fraction_of_tokens"] == pytest.approx(0.2, abs=1e-6)
    for name, unique in (("real", MAGA_REAL), ("synthetic", MAGA_SYN)):
        # two epochs each, short by less than one global batch
        assert 0 <= 2 * unique - s[name]["tokens"] < 320 * 8192
    assert r["vocab_size"] == 49_152 and r["parameters"] == LlamaConfig.from_name("maga_377m").num_params()


def test_vocab_override_and_document_scope(capsys):
    r = dry_run(["--recipe", "stitch_scope_document", "scale=paper_150m", "model.vocab_size=32000", "--dry-run",
                 "--assume-tokens", "real=200M,synthetic=1.5B"], capsys)
    assert r["vocab_size"] == 32_000 and r["assumed"]["vocab_size"] == "model.vocab_size"
    assert r["parameters"] == LlamaConfig.from_name("150m", vocab_size=32_000).num_params()
    assert r["parameters"] == PAPER_PARAMS["150m"] - 2 * 512 * (128_256 - 32_000)
    assert r["flops"]["mean_attended_keys"] == 2048.5 and "upper bound" in r["flops"]["mean_attended_keys_from"]


def test_parse_stream_sizes():
    assert parse_stream_sizes("real=203_867_748,synthetic=3.713048352B") == {"real": T_REAL, "synthetic": T_SYN}
    assert parse_stream_sizes("real=200M, synthetic=1e9") == {"real": 200 * 10**6, "synthetic": 10**9}
    assert parse_stream_sizes("real=1.5k") == {"real": 1500}
    for bad, msg in (("real", "not NAME=TOKENS"), ("real=abc", "not a token count"), ("real=1.5", "whole number"),
                     ("real=-3", "whole number"), ("real=1,real=2", "given twice"), ("real=inf", "whole number")):
        with pytest.raises(ValueError, match=msg):
            parse_stream_sizes(bad)


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "megadoc_stitch", "--dry-run", "--assume-tokens", "real=200M"],
     "error: recipe megadoc_stitch (data.view=stitch) has a synthetic stream: give its size too"),
    (["--recipe", "maga_mix", "--dry-run", "--assume-tokens", "real=50B"],
     "error: recipe maga_mix (data.view=maga) has a synthetic stream: give its size too"),
    (["--recipe", "baseline_real", "--dry-run", "--assume-tokens", "real=200M,synthetic=1B"],
     "error: recipe baseline_real (data.view=real) has no synthetic stream"),
    (["--recipe", "rephrase", "--dry-run", "--assume-tokens", "real=200M,synthetc=1B"],
     "error: assumed sizes name unknown stream(s) ['synthetc']"),
    (["--recipe", "rephrase", "--dry-run", "--assume-tokens", "synthetic=1B"],
     "error: recipe rephrase needs the real stream's size"),
    (["--recipe", "baseline_real", "scale=paper_300m", "--dry-run", "--assume-tokens", "real=100k"],
     "error: the real stream has 100000 tokens, less than one global batch"),
])
def test_assumed_size_errors_are_one_line(argv, message, capsys):
    capsys.readouterr()
    assert TRAIN.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_assume_tokens_needs_dry_run_and_valid_sizes(capsys):
    for argv, message in ((["--recipe", "rephrase", "--assume-tokens", "real=1M,synthetic=1M"], "add --dry-run"),
                          (["--recipe", "rephrase", "--dry-run", "--assume-tokens", "real=lots"], "not a token count")):
        with pytest.raises(SystemExit) as e:
            TRAIN.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_real_dry_run_counts_the_stores_training_tokens(tmp_path, capsys):
    """A real dry run on a small demo world: the real stream is the store's non-held-out documents,
    and the assumed-size dry run of the same sizes gives the same plan, model and FLOPs."""
    from megadoc_pl.data.split import load_heldout_ids
    from megadoc_pl.data.store import TokenStore

    args = ["--recipe", "megadoc_stitch", "demo.num_documents=200", "data.generations=4",
            f"data.cache_dir={tmp_path / 'cache'}", "--dry-run"]
    r = dry_run(args, capsys)
    store = TokenStore.open(r["paths"]["real_store"])
    heldout = load_heldout_ids(r["paths"]["split"])
    train = np.array([s not in heldout for s in store.source_ids])
    assert 0 < len(heldout) and train.sum() == store.num_documents - len(heldout) == r["real"]["sources"]
    real = r["plan"]["streams"]["real"]
    assert real["unique_tokens_per_pass"] == int(store.lengths[train].sum())
    assert real["units_per_pass"] == int(train.sum())
    assert r["flops"]["mean_attended_keys"] == (256 + 1) / 2  # scope window: whole windows, measured

    sizes = {n: s["unique_tokens_per_pass"] for n, s in r["plan"]["streams"].items()}
    a = dry_run(args[:-1] + [f"model.vocab_size={r['vocab_size']}", "--dry-run", "--assume-tokens",
                             sizes_arg(sizes)], capsys)
    for s in r["plan"]["streams"].values():
        s["units_per_pass"] = None
    assert a["plan"] == r["plan"]
    for key in ("max_steps", "trained_tokens", "vocab_size", "parameters", "parameters_non_embedding"):
        assert a[key] == r[key], key
    for key in ("per_token", "total", "mean_attended_keys", "six_N_D"):
        assert a["flops"][key] == r["flops"][key], key
