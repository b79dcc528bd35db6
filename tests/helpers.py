"""What the tests share: the repository's paths, tiny tokenizers and models, a CPU-sized
training recipe and corpus, TensorBoard readers, filesystem helpers. Tests import it as
``helpers`` (``pythonpath = tests`` in pyproject.toml); fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
from pathlib import Path
from types import ModuleType
from typing import Iterator, Sequence

from omegaconf import DictConfig

from megadoc_pl.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]  # tests/ is one level down
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



def fill_filesystem(directory: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of a filesystem."""
    st = os.statvfs(directory)
    (directory / "ballast").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


_NAMES = ["Alice", "Bob", "Carol", "Dmitri", "Erin", "Farid", "Grace", "Hana"]
_PLACES = ["Brindle", "Osk", "Tarrow", "Velm", "Quill", "Marsh"]
_THINGS = ["mill", "bridge", "school", "tower", "market", "harbor"]


def write_corpus(path: Path, num_docs: int = 240, seed: int = 0) -> Path:
    """A JSONL corpus of templated facts: varied enough to need learning, regular enough to learn fast."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(num_docs):
            sents = []
            for _ in range(rng.randint(2, 9)):
                who, where, what = rng.choice(_NAMES), rng.choice(_PLACES), rng.choice(_THINGS)
                year = 1800 + rng.randint(0, 99)
                sents.append(f"{who} built the {what} of {where} in {year}.")
            f.write(json.dumps({"id": f"doc{i:04d}", "text": " ".join(sents)}) + "\n")
    return path


def tiny_overrides(corpus: Path, tokenizer: Path, root: Path, name: str, steps: int = 6) -> list[str]:
    """Recipe overrides for a CPU run of a couple of seconds per step or less."""
    return [
        f"data.real={corpus}",
        f"data.tokenizer={tokenizer}",
        f"data.cache_dir={root / 'cache'}",
        "data.seq_len=32",
        "data.val.num_iid=8", "data.val.num_long=4", "data.val.num_short=4",
        "data.val.long_threshold=180", "data.val.short_threshold=90",
        "data.val.max_windows=4", "data.val.interval=0",
        "data.mixture.real_epochs=4",
        "model.size=nano", "model.vocab_size=null",
        "model.overrides={d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 2, d_mlp: 64}",
        "train.global_batch_size=4", "train.micro_batch_size=2",
        f"train.max_steps={steps}", "train.lr=3e-3", "train.warmup_fraction=0.0",
        "train.accelerator=cpu", "train.devices=1", "train.log_every=1",
        f"run.root={root / 'runs'}", f"run.name={name}",
    ]


def tiny_recipe(corpus: Path, tokenizer: Path, root: Path, name: str, steps: int = 6,
                extra: Sequence[str] = ()) -> DictConfig:
    return load_recipe("baseline_real", tiny_overrides(corpus, tokenizer, root, name, steps) + list(extra))


QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def scalars_per_file(run_dir: Path, tag: str) -> list[dict[int, float]]:
    """step -> value of one TensorBoard scalar, per event file (one file per process segment)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for f in sorted(glob.glob(str(Path(run_dir) / "events.out.tfevents.*")), key=lambda p: Path(p).stat().st_mtime):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            out.append({e.step: e.value for e in acc.Scalars(tag)})
    return out


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one TensorBoard scalar over all event files of a run directory."""
    merged: dict[int, float] = {}
    for part in scalars_per_file(run_dir, tag):
        merged.update(part)
    return merged
