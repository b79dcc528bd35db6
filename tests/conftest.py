"""Shared test fixtures: locally built tokenizers and the optional ../shared data."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Alice founded the town of Brindle in 1821 and built its first mill.",
    "Megadocs stitch many rephrases of one document into a long context.",
    "Rationales are inserted between equal token segments of the original.",
    "A mixture draws windows from the real and the synthetic stream.",
]
_CORPUS = SAMPLE_TEXTS * 20  # the tiny tokenizer's training text


def build_tiny_tokenizer(out_dir: Path, vocab_size: int = 300) -> Path:
    """Train a small byte-level BPE with <s>/</s>/<pad> specials; returns the tokenizer.json path."""
    from megadoc_pl.data.tokenizer import train_byte_level_bpe

    tok = train_byte_level_bpe(_CORPUS, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    return path


def load_script(relpath: str) -> ModuleType:
    """Import a script of the repository (``tools/<name>.py``, ``recipes/train.py``) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(relpath.replace("/", "_")[:-3], REPO / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A seeded one-layer Llama (d_model 32, sdpa attention) in eval mode; ``overrides`` are LlamaConfig fields."""
    import torch

    from megadoc_pl.model.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    fields = dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_mlp=64, attention_backend="sdpa")
    return Llama(LlamaConfig(**{**fields, "vocab_size": vocab_size, **overrides})).eval()


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


def fill_filesystem(directory: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of a filesystem."""
    st = os.statvfs(directory)
    (directory / "ballast").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
