"""Shared test fixtures (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import SHARED_DATA, build_tiny_tokenizer


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` run the real engine: skipped where vllm is not installed."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="vllm is not installed (make test-vllm runs these in a venv of its own)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> Path:
    """A tokenizer.json of a ~300-token byte-level BPE (BOS '<s>' = 0, EOS '</s>' = 1, pad = 2)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests using it skip cleanly when it is absent."""
    if not (SHARED_DATA / "cc_en_head-0091.jsonl.gz").exists():
        pytest.skip("../shared/data is not present (only in the developers' workplace)")
    return SHARED_DATA


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size, ro) -> a fresh tmpfs (root only; skips where it cannot mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = []

    def mount(name: str, size: str = "2m", ro: bool = False) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if ro else ""), "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
