"""Every method recipe trains at scale demo: a two-step run on a small demo world.

One session cache holds the world, the tokenizer, the generations and the token stores, so
recipes that need the same pool (rephrase and stitch at G=32, the G=8 ablations) build it once.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest

from megadoc_pl.recipes import list_recipes, load_recipe

from helpers import one_thread

METHODS = list_recipes("methods")
STEPS, BATCH, SEQ_LEN = 2, 4, 64


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


@pytest.mark.parametrize("method", METHODS)
def test_method_recipe_trains_at_demo_scale(method, demo_cache, tmp_path):
    from megadoc_pl.train.run import train

    cfg = load_recipe(method, [
        "scale=demo", "demo.num_documents=200", f"data.seq_len={SEQ_LEN}",
        f"train.max_steps={STEPS}", f"train.global_batch_size={BATCH}", f"train.micro_batch_size={BATCH}",
        "data.val.num_iid=8", "data.val.num_long=4", "data.val.num_short=4", "data.val.max_windows=2",
        "data.val.interval=0", "train.accelerator=cpu", f"data.cache_dir={demo_cache}",
        f"run.root={tmp_path}", f"run.name={method}",
    ])
    with one_thread():
        run_dir = train(cfg, {"enable_progress_bar": False, "enable_model_summary": False})
    assert Path(run_dir) == tmp_path / method
    m = json.loads((run_dir / "metrics.json").read_text())
    assert (m["status"], m["steps"], m["recipe"], m["scale"]) == ("finished", STEPS, method, "demo")
    assert math.isfinite(m["val/iid/loss"]) and math.isfinite(m["train/loss"])
    assert m["tokens_seen"] == STEPS * BATCH * SEQ_LEN
    synthetic = m.get("train/tokens/synthetic", 0)
    assert m["train/tokens/real"] + synthetic == m["tokens_seen"]
    mix = cfg.data.mixture
    if cfg.data.view == "real":
        assert synthetic == 0
    elif mix.mode == "paper":  # window k is synthetic iff floor((k+1)w) > floor(kw)
        assert synthetic == math.floor(STEPS * BATCH * Fraction(str(mix.synthetic_fraction))) * SEQ_LEN > 0
    else:
        assert synthetic > 0
