#!/usr/bin/env python
"""Tokenization throughput: end-to-end build_store vs raw `tokenizers` vs `datasets.map` (targets in BENCHMARKS.md).

All three tokenize the same documents with the same tokenizer on the same cores:

- raw:      ``Tokenizer.encode_batch_fast`` over the in-memory texts (one process, the Rust
            thread pool on all cores) -- the peer that bounds what any pipeline can do;
- datasets: ``Dataset.map(batched=True, num_proc=cores)`` over an in-memory Dataset with the
            same tokenizer, writing its Arrow cache (reading the file is not counted for it);
- store:    ``build_store`` from the JSONL file: read + validate + tokenize + write the store,
            with parallel="threads" (one process, the Rust thread pool) and parallel="processes".

Targets: store >= 0.8x raw, store faster than datasets. Best of --repeat runs each.

    python benchmarks/bench_tokenize.py                 # ../shared data if present, else generated
    python benchmarks/bench_tokenize.py --mb 16 --repeat 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def corpus_texts(mb: float, generated: bool) -> tuple[list[str], str]:
    """About ``mb`` MB of text: the shared CC shard repeated, else generated English-like text."""
    src = SHARED / "cc_en_head-0091.jsonl.gz"
    if src.exists() and not generated:
        base = [json.loads(line)["text"] for line in gzip.open(src, "rt", encoding="utf-8")]
        origin = f"{src.name} repeated"
    else:
        rng = random.Random(0)
        words = [w.strip(".,") for w in (REPO / "megadoc_pl" / "data" / "store.py").read_text().split() if w.isalpha()]
        base = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 3000))) + "." for _ in range(50)]
        origin = "generated text"
    texts: list[str] = []
    size = 0
    while size < mb * 1e6:
        for t in base:
            texts.append(t)
            size += len(t.encode("utf-8"))
    return texts, origin


def tokenizer_path(tmp: Path, generated: bool) -> Path:
    tok = SHARED / "llama-test-tokenizer.json"
    if tok.exists() and not generated:
        return tok
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import build_tiny_tokenizer  # a small byte-level BPE, built locally

    return build_tiny_tokenizer(tmp / "tok", vocab_size=2000)


def cpu_seconds() -> float:
    """User + system CPU of this process (all threads) and of its reaped children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, tokens) of one run."""
    w0, c0 = time.perf_counter(), cpu_seconds()
    tokens = fn()
    return time.perf_counter() - w0, cpu_seconds() - c0, tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=8.0, help="MB of text to tokenize")
    ap.add_argument("--repeat", type=int, default=2, help="runs per contender (best is reported)")
    ap.add_argument("--num-proc", type=int, default=None, help="cores to use (default: all available)")
    ap.add_argument("--no-datasets", action="store_true", help="skip the datasets.map peer")
    ap.add_argument("--generated", action="store_true", help="generated text and a locally trained tokenizer even if ../shared exists")
    args = ap.parse_args()

    from tokenizers import Tokenizer

    from megadoc_pl.data.store_build import build_store, default_num_proc
    from megadoc_pl.data.tokenizer import load_tokenizer

    cores = args.num_proc or default_num_proc()
    tmp = Path(tempfile.mkdtemp(prefix="bench_tok_"))
    try:
        texts, origin = corpus_texts(args.mb, args.generated)
        tok_path = tokenizer_path(tmp, args.generated)
        src = tmp / "docs.jsonl"
        with open(src, "w", encoding="utf-8") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"id": f"d{i}", "text": t}) + "\n")
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, using {cores}; python {platform.python_version()}")
        print(f"corpus: {len(texts)} docs, {mb:.1f} MB ({origin}); tokenizer {tok_path.name}")

        tok = Tokenizer.from_file(str(tok_path))

        def raw() -> int:
            return sum(len(e) for e in tok.encode_batch_fast(texts, add_special_tokens=False))

        info = load_tokenizer(tok_path)  # loaded once, as the raw peer's tokenizer is

        def store_run(mode: str):
            def run() -> int:
                out = tmp / f"store-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                st = build_store(src, info, out, num_proc=cores, parallel=mode, progress=False)
                return st.num_tokens - 2 * st.num_documents  # content tokens, as the peers count

            return run

        contenders = {"raw tokenizers encode_batch_fast": raw, "store, threads": store_run("threads")}
        if cores > 1:
            contenders[f"store, {cores} processes"] = store_run("processes")
        if not args.no_datasets:
            contenders[f"datasets.map num_proc={cores}"] = lambda: datasets_map(texts, tok_path, cores, tmp)
        # Rounds interleave the contenders so that a change in machine load hits all of them.
        # Best wall time and best CPU time of each contender over the rounds.
        wall = {k: float("inf") for k in contenders}
        cpu = {k: float("inf") for k in contenders}
        tokens: dict[str, int] = {}
        for _ in range(args.repeat):
            for name, fn in contenders.items():
                w, c, tokens[name] = measure(fn)
                wall[name], cpu[name] = min(w, wall[name]), min(c, cpu[name])
        assert len(set(tokens.values())) == 1, f"contenders counted different token totals: {tokens}"
        ntok = next(iter(tokens.values()))
        raw_key, ds_key = "raw tokenizers encode_batch_fast", f"datasets.map num_proc={cores}"
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; {ntok:,} tokens; best of {args.repeat} rounds")
        print(f"{'contender':36s} {'wall s':>7s} {'tokens/s':>11s} {'x raw':>6s} {'x datasets':>10s} | {'cpu s':>6s} {'tok/cpu-s':>10s} {'x raw':>6s}")
        for name in contenders:
            tps, cps = ntok / wall[name], ntok / cpu[name]
            vs_ds = f"{wall[ds_key] / wall[name]:10.2f}" if ds_key in wall else f"{'-':>10s}"
            print(f"{name:36s} {wall[name]:7.2f} {tps:11,.0f} {wall[raw_key] / wall[name]:6.2f} {vs_ds} | "
                  f"{cpu[name]:6.2f} {cps:10,.0f} {cpu[raw_key] / cpu[name]:6.2f}")
        store_keys = [k for k in contenders if k.startswith("store")]
        best = min(store_keys, key=wall.__getitem__)
        print(f"targets ({best}): wall >= 0.80x raw -> {wall[raw_key] / wall[best]:.2f}x; "
              f"> datasets.map -> " + (f"{wall[ds_key] / wall[best]:.2f}x" if ds_key in wall else "not measured")
              + f"; CPU work vs raw -> {cpu[raw_key] / cpu[best]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def datasets_map(texts: list[str], tok_path: Path, cores: int, tmp: Path) -> int:
    import datasets
    from tokenizers import Tokenizer

    datasets.disable_progress_bars()
    tok = Tokenizer.from_file(str(tok_path))

    def encode(batch):
        return {"input_ids": [e.ids for e in tok.encode_batch_fast(batch["text"], add_special_tokens=False)]}

    ds = datasets.Dataset.from_dict({"text": texts})
    cache = tmp / "ds_cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir()
    out = ds.map(encode, batched=True, batch_size=1000, num_proc=cores if cores > 1 else None,
                 remove_columns=["text"], cache_file_name=str(cache / "map.arrow"))
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py())


if __name__ == "__main__":
    sys.exit(main())
