"""train.compile=true: the compiled model trains like the eager one and keeps plain checkpoint keys."""

from __future__ import annotations

import shutil

import pytest
import torch

from megadoc_pl.train.run import train

from helpers import one_thread
from helpers import QUIET, scalars, tiny_recipe, write_corpus


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_compiled_training_matches_eager(tmp_path, tiny_tokenizer_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    with one_thread():
        eager = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "eager", 3), QUIET)
        compiled = train(tiny_recipe(corpus, tiny_tokenizer_path, tmp_path, "compiled", 3, ["train.compile=true"]), QUIET)
    a, b = scalars(eager, "train/loss"), scalars(compiled, "train/loss")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4)
    keys = torch.load(compiled / "checkpoints/last.ckpt", weights_only=False)["state_dict"].keys()
    assert all(k.startswith("model.") and "_orig_mod" not in k for k in keys)
