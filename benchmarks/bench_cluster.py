#!/usr/bin/env python
"""Cluster start-up costs (issue 11): relaunching on a prepared corpus, and memory per GPU of the big presets.

1. Preparation: a synthetic JSONL corpus of ``--gb`` GB (default 2) is prepared once (tokenized
   into a store, split, views, plan) and then again, as a relaunch does. The relaunch reads no
   input file: the store's stat cache ((path, size, mtime_ns) -> sha256) answers for them. Printed:
   both wall times and their ratio, next to sha256 over the same files (what a relaunch cost
   before the stat cache).
2. Memory: the dry run's per-GPU estimate for maga_13b at 8192 context on 8 and 64 GPUs
   (FSDP2, with and without activation checkpointing), with the arithmetic it comes from.

    python benchmarks/bench_cluster.py [--gb 2] [--workdir /tmp/bench_cluster]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def write_corpus(path: Path, gb: float, seed: int = 0) -> int:
    words = [f"w{i}" for i in range(5000)]
    rng = random.Random(seed)
    target, n = int(gb * 1e9), 0
    with open(path, "w", encoding="utf-8") as f:
        size = 0
        while size < target:
            text = " ".join(rng.choices(words, k=rng.randint(200, 2000)))
            line = json.dumps({"id": f"d{n}", "text": text}) + "\n"
            f.write(line)
            size += len(line)
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the input corpus in GB")
    ap.add_argument("--workdir", default="/tmp/bench_cluster")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from helpers import build_tiny_tokenizer
    from megadoc_pl.data.prepare import prepare_corpus
    from megadoc_pl.model.config import LlamaConfig
    from megadoc_pl.model.memory import memory_per_gpu
    from megadoc_pl.recipes import load_recipe
    from megadoc_pl.utils import sha256_file

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    corpus = work / "corpus.jsonl"
    docs = write_corpus(corpus, args.gb)
    tok = build_tiny_tokenizer(work / "tok", vocab_size=2048)
    cfg = load_recipe("baseline_real", [f"data.real={corpus}", f"data.tokenizer={tok}", f"data.cache_dir={work}/cache",
                                        "data.seq_len=1024", "model.size=tiny", "data.val.num_iid=100",
                                        "data.val.num_long=50", "data.val.num_short=50",
                                        "data.val.long_threshold=1500", "data.val.short_threshold=400"])
    t0 = time.perf_counter()
    first = prepare_corpus(cfg)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = prepare_corpus(cfg)
    t_again = time.perf_counter() - t0
    assert again.fingerprint == first.fingerprint
    t0 = time.perf_counter()
    sha256_file(corpus)
    t_hash = time.perf_counter() - t0
    size = corpus.stat().st_size / 1e9
    print(f"corpus: {size:.2f} GB, {docs:,} documents, {first.real_units.num_tokens:,} training tokens")
    print(f"first preparation   {t_first:8.2f} s")
    print(f"relaunch            {t_again:8.2f} s   ({t_first / t_again:,.0f}x faster than the first)")
    print(f"sha256 of the input {t_hash:8.2f} s   (what every relaunch paid per rank before the stat cache: "
          f"{t_hash / t_again:,.1f}x the relaunch now)")

    cfg13 = LlamaConfig.from_name("maga_13b")
    print("\nmaga_13b, T=8192, micro batch 1, bf16, FSDP2:")
    for world in (8, 64):
        for ckpt in (False, True):
            est = memory_per_gpu(cfg13, 8192, 1, "fsdp2", world, activation_checkpointing=ckpt)
            print(f"  {world:3d} GPUs, activation checkpointing {str(ckpt):5s}: {est['total_gib']:7.2f} GiB/GPU  "
                  f"{json.dumps(est['gib'])}")
            print(f"      {est['arithmetic']}")


if __name__ == "__main__":
    main()
