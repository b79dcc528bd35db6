"""A data.cache_dir that fills up during preparation: one ``error:`` line naming the cache
directory and the fix, exit code 2, no run directory, and nothing half-written in the cache.

Real full filesystems: a small tmpfs (root only; skipped cleanly where it cannot be mounted).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megadoc_pl.data.prepare import prepare_corpus
from megadoc_pl.recipes import load_recipe
from megadoc_pl.train.cli import main

from helpers import fill_filesystem
from helpers import tiny_overrides, write_corpus

QUIET_FLAGS = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, tiny_tokenizer_path):
    """The corpus, tokenizer and a cache prepared where there is room (its token store is copied)."""
    root = tmp_path_factory.mktemp("disk")
    corpus = write_corpus(root / "corpus.jsonl")
    over = tiny_overrides(corpus, tiny_tokenizer_path, root, "roomy")
    store = prepare_corpus(load_recipe("baseline_real", over)).real.path
    return {"root": root, "corpus": corpus, "tok": tiny_tokenizer_path, "store": store}


def _fit(roomy, cache: Path, name: str, capsys) -> tuple[int, str]:
    """(exit code, the one error line) of ``megadoc-pl fit`` on ``cache``."""
    over = tiny_overrides(roomy["corpus"], roomy["tok"], roomy["root"], name) + [f"data.cache_dir={cache}"]
    capsys.readouterr()
    rc = main(["fit", "--recipe", "baseline_real", *[a for o in over for a in ("--set", o)], *QUIET_FLAGS])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return rc, lines[0]


def _files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def test_a_cache_that_fills_up_after_the_token_store_is_one_line(roomy, tmpfs, capsys):
    """The store fits; the split file written next does not (an OSError traceback before)."""
    disk = tmpfs("full-after-store")
    cache = disk / "cache"
    shutil.copytree(roomy["store"], cache / "stores" / roomy["store"].name)
    before = _files(cache)
    fill_filesystem(disk, leave=0)
    rc, line = _fit(roomy, cache, "after-store", capsys)
    assert rc == 2 and line.startswith(f"error: data.cache_dir={cache}: cannot write the split file split-"), line
    assert line.endswith(".json (No space left on device) (fix: free space there, or point data.cache_dir at a "
                         "writable filesystem with room)"), line
    assert not (roomy["root"] / "runs" / "after-store").exists()  # the claimed run directory is given back
    assert _files(cache) == sorted(before + [".prepare.lock"])  # no temporary split file, no half-written file
    (disk / "ballast").unlink()  # the fix it names works
    assert prepare_corpus(load_recipe("baseline_real", tiny_overrides(
        roomy["corpus"], roomy["tok"], roomy["root"], "x") + [f"data.cache_dir={cache}"])).plan.steps > 0


def test_a_cache_that_fills_up_inside_the_token_store_leaves_no_partial_store(roomy, tmpfs, capsys):
    disk = tmpfs("full-in-store")
    cache = disk / "cache"
    fill_filesystem(disk, leave=(roomy["store"] / "tokens.bin").stat().st_size // 2)
    rc, line = _fit(roomy, cache, "in-store", capsys)
    assert rc == 2 and line.startswith(f"error: data.cache_dir={cache}: cannot write the token store documents-"), line
    assert "fix: free space there, or point data.cache_dir at a writable filesystem with room" in line
    assert not (roomy["root"] / "runs" / "in-store").exists()
    assert _files(cache) == [".prepare.lock"]  # the half-built store (.*.partial) is removed
