#!/usr/bin/env python
"""A real-document store of 10M-100M documents through the steps training takes (issue 12).

Writes token stores directly in the store format (one random content token per document between
BOS and EOS, ids ``d0``, ``d1``, ...; cached under ``--root``), then runs each step in a fresh
process, printing its wall, CPU and peak RSS:

- ``split``: the validation split of the whole corpus (``split.split_from_store``, written as
  ``split.json``): a seeded hash of every id, the order, the sets;
- ``units``: what ``prepare_corpus`` does next with a real store: the held-out ids read back and
  matched against the corpus (``missing_heldout_ids``), training documents repeating a held-out
  text (``heldout_duplicates``), ``data.real_fraction`` (at 1), the real stream's units
  (``views.real_units``) and the validation sets' units;
- ``batch``: the stream's windows (``StreamWindows``, shuffled) and a batch of 64 x 4096
  windows at the end of the first pass (``Windows.batch``).

Between two sizes it prints the growth exponent of each step's time and memory, and the memory
per document at the larger size. No peer: the point is that nothing holds a Python object per
document (a per-document design needs ~300 bytes a document in the split alone; 30 GB at 100M).

    python benchmarks/bench_many_documents.py --documents 10000000 100000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("split", "units", "batch")
BLOCK = 1 << 23  # documents written at a time


def write_store(out: Path, n: int) -> None:
    """A real-document store of ``n`` documents of 3 tokens (BOS, one content token, EOS)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from megadoc_pl.data.store import FORMAT_VERSION, _header, _index_schema
    from megadoc_pl.utils import atomic_dir

    if (out / "manifest.json").exists():
        return
    rng = np.random.default_rng(0)
    schema = _index_schema("documents")
    with atomic_dir(out) as tmp:
        with open(tmp / "tokens.bin", "wb") as f:
            f.write(_header(np.dtype(np.uint16), 3 * n))
            for lo in range(0, n, BLOCK):
                k = min(BLOCK, n - lo)
                doc = np.empty((k, 3), np.uint16)
                doc[:, 0], doc[:, 2] = 0, 1
                doc[:, 1] = rng.integers(3, 32000, k)
                doc.tofile(f)
        np.save(tmp / "offsets.npy", np.arange(0, 3 * n + 1, 3, dtype=np.int64))
        with pq.ParquetWriter(tmp / "index.parquet", schema, compression="zstd") as w:
            for lo in range(0, n, BLOCK):
                k = min(BLOCK, n - lo)
                num = pa.array(np.arange(lo, lo + k))
                cols = {"source_id": pc.binary_join_element_wise("d", pc.cast(num, pa.string()), ""),
                        "task": pa.array(["real"] * k, pa.string()), "gen_index": pa.array(np.full(k, -1, np.int64)),
                        "file": pa.array(np.zeros(k, np.int32)), "line": pa.array(np.arange(lo + 1, lo + k + 1)),
                        "text_hash": pa.array(rng.integers(0, 2**63, k, dtype=np.uint64)),
                        "meta": pa.array(["{}"] * k, pa.string())}
                w.write_table(pa.table([cols[f.name] for f in schema], schema=schema))
        manifest = {"format_version": FORMAT_VERSION, "kind": "documents", "dtype": "uint16", "num_tokens": 3 * n,
                    "num_documents": n, "add_bos": True, "add_eos": True, "bos_id": 0, "eos_id": 1, "inputs": [],
                    "text_field": "text", "id_field": "id", "tokenizer_fingerprint": "bench"}
        (tmp / "manifest.json").write_text(json.dumps(manifest))


def run_stage(stage: str, store: Path) -> dict:
    from megadoc_pl.config import ValConfig
    from megadoc_pl.data import split as split_mod
    from megadoc_pl.data.store import TokenStore

    real = TokenStore.open(store)
    path = store.parent / f"{store.name}-split.json"
    out: dict = {}
    if stage == "split":
        split = split_mod.split_from_store(real, ValConfig())
        split_mod.write_split(path, split)
        out["heldout"] = len(split["heldout"])
    elif stage in ("units", "batch"):
        from omegaconf import OmegaConf

        from megadoc_pl.data.hygiene import heldout_duplicates, text_hashes
        from megadoc_pl.data.prepare import _val_units
        from megadoc_pl.data.views import real_fraction_excluded, real_units

        # What prepare_corpus does with a real store once it is built, in its order.
        split = split_mod.load_split(path)
        heldout = set(split["heldout"])
        out["missing"] = split_mod.missing_heldout_ids(path, heldout, real.arrow_column("source_id"))
        duplicates = heldout_duplicates(real.arrow_column("source_id"), text_hashes(real, None), heldout)
        excluded = heldout | duplicates | real_fraction_excluded(real, heldout | duplicates, 1.0, 0)
        units = real_units(real, excluded)
        val = _val_units(OmegaConf.create({"data": {"val": {"extra": None}}}), real, split["sets"], None)
        out["units"] = units.num_units
        out["val_windows"] = sum(u.num_units for u in val.values())
        if stage == "batch":
            from fractions import Fraction

            from megadoc_pl.data.mixture import StreamDrawer
            from megadoc_pl.data.windows import StreamWindows, Windows

            st = StreamWindows(units, 4096, 42, "real")
            w = Windows([st], StreamDrawer(["real"], [Fraction(1)]), 4096, "document")
            last = st.num_windows - 64
            t = time.perf_counter()
            b = w.batch(list(range(last, last + 64)))
            out["batch_s"] = time.perf_counter() - t
            assert b["input_ids"].shape == (64, 4096)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--documents", type=int, nargs="+", default=[10_000_000, 100_000_000])
    ap.add_argument("--root", default=str(ROOT / ".cache" / "bench_many_documents"))
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        t0, c0 = time.perf_counter(), time.process_time()
        out = run_stage(args.stage, Path(args.store))
        out.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0,
                   rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
        print(json.dumps(out))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    results: dict[int, dict] = {}
    print(f"{'step':8} {'documents':>12} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'bytes/doc':>10}  notes")
    for n in args.documents:
        store = Path(args.root) / f"real-{n}"
        t = time.perf_counter()
        write_store(store, n)
        print(f"{'write':8} {n:>12,} {time.perf_counter() - t:8.1f}   (the store: {store})", flush=True)
        (store.parent / f"{store.name}-split.json").unlink(missing_ok=True)
        for stage in STAGES:
            proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--store", str(store)],
                                  capture_output=True, text=True, env=env)
            if proc.returncode:
                print(f"{stage:8} {n:>12,} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.setdefault(n, {})[stage] = r
            notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                              if k not in ("wall", "cpu", "rss_gb"))
            print(f"{stage:8} {n:>12,} {r['wall']:8.1f} {r['cpu']:8.1f} {r['rss_gb']:12.2f} "
                  f"{r['rss_gb'] * 2**30 / n:10.1f}  {notes}", flush=True)
    sizes = sorted(results)
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        for stage in STAGES:
            if stage in results[a] and stage in results[b]:
                ra, rb = results[a][stage], results[b][stage]
                k = math.log(b / a)
                print(f"growth {stage}: time exponent {math.log(rb['wall'] / ra['wall']) / k:.2f}, "
                      f"peak RSS exponent {math.log(rb['rss_gb'] / ra['rss_gb']) / k:.2f}")


if __name__ == "__main__":
    main()
