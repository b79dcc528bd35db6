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

``--from-files`` starts from input files instead, as a user does: dolma-style JSONL shards
(``{"id": "d17", "text": "doc 17 of the bench"}``, unique texts), then

- ``tokenize``: the real-document store built from them by the recipe's own code
  (``prepare._build_store``: the tokenizer, the index, the duplicate checks);
- ``prepare``: ``prepare_corpus`` of ``baseline_real`` on that store (split, hygiene, units,
  validation sets, plan), as a first launch does once the store is built;
- ``first batch``: a relaunch (everything cached) up to the first training micro-batch from the
  datamodule's loader (paper_300m: 8 x 4096 windows a micro-batch);
- ``relaunch``: ``prepare_corpus`` on the prepared cache by ``--ranks`` processes started at once,
  as the ranks of a node do (wall: until the last is done; before the shared lock they took
  turns).

After the last three, ``private_gb`` is the memory the process wrote for itself at the end
(Private_Dirty): the part of its peak RSS that each rank of a node adds, where the memory-mapped
stores and caches are one copy in the page cache for all of them.

Between two sizes it prints the growth exponent of each step's time and memory, and the memory
per document at the larger size. No peer: the point is that nothing holds a Python object per
document (a per-document design needs ~300 bytes a document in the split alone; 30 GB at 100M).

    python benchmarks/bench_many_documents.py --documents 10000000 100000000
    python benchmarks/bench_many_documents.py --from-files --documents 10000000 100000000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("split", "units", "batch")
FILE_STAGES = ("tokenize", "prepare", "first batch", "relaunch")
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "llama-test-tokenizer.json"
BLOCK = 1 << 23  # documents written at a time


def write_store(out: Path, n: int) -> None:
    """A real-document store of ``n`` documents of 3 tokens (BOS, one content token, EOS)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from megadoc_pl.data.store import FORMAT_VERSION, index_schema, token_file_header
    from megadoc_pl.utils import atomic_dir

    if (out / "manifest.json").exists():
        return
    rng = np.random.default_rng(0)
    schema = index_schema("documents")
    with atomic_dir(out) as tmp:
        with open(tmp / "tokens.bin", "wb") as f:
            f.write(token_file_header(np.dtype(np.uint16), 3 * n))
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


def write_inputs(out: Path, n: int) -> None:
    """``n`` documents as dolma-style JSONL shards of ``BLOCK`` lines, written by Arrow (no Python
    string a document): ``{"id": "d<i>", "text": "doc <i> of the bench"}``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from megadoc_pl.utils import atomic_dir

    if (out / "done").exists():
        return
    with atomic_dir(out) as tmp:
        for k, lo in enumerate(range(0, n, BLOCK)):
            num = pc.cast(pa.array(np.arange(lo, min(lo + BLOCK, n))), pa.string())
            lines = pc.binary_join_element_wise('{"id": "d', num, '", "text": "doc ', num, ' of the bench"}\n', "")
            offsets, data = lines.buffers()[1], lines.buffers()[2]
            lo_byte, hi_byte = np.frombuffer(offsets, np.int32)[[lines.offset, lines.offset + len(lines)]].tolist()
            with open(tmp / f"part-{k:04d}.jsonl", "wb") as f:
                f.write(memoryview(data)[lo_byte:hi_byte])
        (tmp / "done").write_text(str(n))


def file_config(inputs: Path, tokenizer: str, cache: Path, real_fraction: float = 1.0):
    from megadoc_pl.recipes import compose_recipe

    return compose_recipe("baseline_real", ["scale=paper_300m", f"data.real={inputs}", f"data.tokenizer={tokenizer}",
                                            f"data.cache_dir={cache}", "data.num_workers=0",
                                            f"data.real_fraction={real_fraction}"])


def run_file_stage(stage: str, inputs: Path, tokenizer: str, real_fraction: float = 1.0) -> dict:
    from megadoc_pl.data import prepare

    cfg = file_config(inputs, tokenizer, inputs.parent / f"{inputs.name}-cache", real_fraction)
    out: dict = {}
    if stage == "tokenize":
        from megadoc_pl.data.tokenizer import load_tokenizer

        store = prepare._build_store(cfg, [str(inputs)], load_tokenizer(cfg.data.tokenizer), "documents", "real documents")
        out.update(documents=store.num_documents, tokens=store.num_tokens)
    else:
        prepared = prepare.prepare_corpus(cfg)
        out.update(units=prepared.real_units.num_units, steps=prepared.plan.steps)
        if stage == "first batch":
            from megadoc_pl.data.batch import packed_fields

            dm = prepared.datamodule()
            dm.setup("fit")
            t = time.perf_counter()
            batch = next(iter(dm.train_dataloader()))
            out["batch_s"] = time.perf_counter() - t
            out["batch"] = "x".join(map(str, packed_fields(batch)["tokens"].shape))
        from bench_views import private_mb

        mb = private_mb()  # what this rank holds for itself; the mapped stores and caches are shared
        if mb is not None:
            out["private_gb"] = round(mb / 1024, 2)
    return out


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
    ap.add_argument("--from-files", action="store_true", help="start from JSONL inputs and tokenize them")
    ap.add_argument("--tokenizer", default=str(SHARED_TOKENIZER) if SHARED_TOKENIZER.exists() else None,
                    help="tokenizer.json for --from-files (default: the shared 32k Llama tokenizer)")
    ap.add_argument("--real-fraction", type=float, default=1.0,
                    help="data.real_fraction of the --from-files prepare and first batch (a D-sweep's subset)")
    ap.add_argument("--ranks", type=int, default=4, help="processes of the relaunch stage, started at once")
    ap.add_argument("--stages", nargs="+", help="only these stages (e.g. prepare: a store built before is reused)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        t0, c0 = time.perf_counter(), time.process_time()
        if args.from_files:
            out = run_file_stage(args.stage, Path(args.store), args.tokenizer, args.real_fraction)
        else:
            out = run_stage(args.stage, Path(args.store))
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        out.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0 + children.ru_utime + children.ru_stime,
                   rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   children_rss_gb=children.ru_maxrss / 2**20)
        print(json.dumps(out))
        return
    if args.from_files and args.tokenizer is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import build_tiny_tokenizer

        args.tokenizer = str(build_tiny_tokenizer(Path(args.root) / "tok"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    stages = [s for s in (FILE_STAGES if args.from_files else STAGES) if not args.stages or s in args.stages]
    results: dict[int, dict] = {}
    print(f"{'step':12} {'documents':>12} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'bytes/doc':>10}  notes")
    for n in args.documents:
        t = time.perf_counter()
        if args.from_files:
            store = Path(args.root) / f"files-{n}"
            write_inputs(store, n)
            if "tokenize" in stages:
                shutil.rmtree(store.parent / f"{store.name}-cache", ignore_errors=True)  # tokenized afresh
            what = f"{sum(f.stat().st_size for f in store.glob('*.jsonl')) / 1e9:.2f} GB of JSONL: {store}"
        else:
            store = Path(args.root) / f"real-{n}"
            write_store(store, n)
            (store.parent / f"{store.name}-split.json").unlink(missing_ok=True)
            what = f"the store: {store}"
        print(f"{'write':12} {n:>12,} {time.perf_counter() - t:8.1f}   ({what})", flush=True)
        for stage in stages:
            if stage == "prepare":  # from the built store: the split, hygiene and views made afresh
                for p in (store.parent / f"{store.name}-cache").glob("*"):
                    if p.name != "stores" and p.is_dir():
                        shutil.rmtree(p)
            cmd = [sys.executable, __file__, "--stage", stage, "--store", str(store)]
            if args.from_files:
                cmd += ["--from-files", "--tokenizer", args.tokenizer, "--real-fraction", str(args.real_fraction)]
            ranks = args.ranks if stage == "relaunch" else 1
            t = time.perf_counter()
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(ranks)]
            outs = [p.communicate() for p in procs]
            wall = time.perf_counter() - t
            failed = [(p.returncode, err) for p, (_, err) in zip(procs, outs) if p.returncode]
            if failed:
                rc, err = failed[0]
                why = f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "") if rc < 0 else \
                    (err.strip().splitlines() or [f"exit status {rc}"])[-1]
                print(f"{stage:12} {n:>12,} {len(failed)} of {ranks} failed: {why}", flush=True)
                continue
            r = json.loads(outs[0][0].strip().splitlines()[-1])
            if ranks > 1:
                each = [json.loads(o.strip().splitlines()[-1])["wall"] for o, _ in outs]
                r.update(ranks=ranks, each_s=f"{min(each):.1f}-{max(each):.1f}", wall=wall)
            r["rss_gb"] = max(r["rss_gb"], r.pop("children_rss_gb"))  # tokenizer worker processes included
            results.setdefault(n, {})[stage] = r
            notes = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                              if k not in ("wall", "cpu", "rss_gb"))
            print(f"{stage:12} {n:>12,} {r['wall']:8.1f} {r['cpu']:8.1f} {r['rss_gb']:12.2f} "
                  f"{r['rss_gb'] * 2**30 / n:10.1f}  {notes}", flush=True)
    sizes = sorted(results)
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        for stage in stages:
            if stage in results[a] and stage in results[b]:
                ra, rb = results[a][stage], results[b][stage]
                k = math.log(b / a)
                print(f"growth {stage}: time exponent {math.log(rb['wall'] / ra['wall']) / k:.2f}, "
                      f"peak RSS exponent {math.log(rb['rss_gb'] / ra['rss_gb']) / k:.2f}")

if __name__ == "__main__":
    main()
