#!/usr/bin/env python
"""Views, plans and the train loader at the megadocs paper's scale (issue 12), vs a bare memmap slicer.

Writes token stores directly in the store format (random tokens, no tokenizer; cached under
``--root``): S real documents and, per task, S x G generations (rephrase; rationale with the
split offsets stretch checks; maga with judge scores; rephrase + rationale for the hybrid).
Every stage runs in a fresh process (its wall, CPU and peak RSS are its own):

- ``build <view>``: :func:`megadoc_pl.data.view_cache.cached_view` from an empty cache
  (open the stores, build the view, save it);
- ``relaunch <view>``: the same call on the saved cache (open the stores, load the view);
- ``loader <order> w<workers>``: stitch batches (B x T, scope document) through the datamodule's
  DataLoader: packed batches (tokens plus per-segment/per-clip offsets), which the datamodule
  unpacks into the whole contract on the training device (the unpack's CPU time is printed
  too), early (step 1) and late (the plan's last steps) window indices, against the peer;
- ``peer``: nanoGPT's ``get_batch`` as train.py writes it (memmap re-opened per batch,
  ``torch.randint`` offsets, ``torch.stack`` of int64 slices; inputs and targets only), one
  process; and a tighter slicer (one array, ``np.stack``), printed alongside.

    python benchmarks/bench_views.py --sources 16400            # 1/10 of the paper
    python benchmarks/bench_views.py --sources 164000           # the paper: 5.2M generations per task
    python benchmarks/bench_views.py --sources 16400 --lengths paper --views stitch,rephrase \
        --loader-view rephrase --workers 0,1,2,4,8               # the papers' document lengths, many cores

Documents are short by default (real ~180 tokens, generations ~30-60) so that paper-size stores
fit in ~1 GB each; ``--lengths paper`` draws the papers' means (~1.24k and ~700). The loader
stages read the stitch view's synthetic stream, or ``--loader-view``'s; with workers, pass orders
and window tables are shared through files as in training (``--no-shared-passes``: each worker
computes its own), and each worker's private memory is printed.

Targets (BENCHMARKS.md): every view builds in <= 30 s, relaunches in <= 5 s, peak RSS <= 1.5 GB;
the loader >= 0.8x the peer from one process. The last line starts with ``SUMMARY:`` and a JSON
list of the loader stages (parsed by benchmarks/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VIEWS = ("real", "rephrase", "stitch", "stretch", "stitch_stretch", "maga", "maga_stitch")
STORE_OF = {"real": "rephrase", "rephrase": "rephrase", "stitch": "rephrase", "stretch": "rationale",
            "stitch_stretch": "hybrid", "maga": "maga", "maga_stitch": "maga"}
HELDOUT = 1000  # held-out sources (excluded from every view)


# ---------------------------------------------------------------------------------------------
# Stores written directly (random tokens): the format of megadoc_pl.data.store


def write_store(out: Path, kind: str, lengths: np.ndarray, source_ids, tasks=None, gen_index=None,
                fields: dict | None = None, meta=None, seed: int = 0, vocab: int = 32000):
    """A token store of random tokens with BOS=0 / EOS=1 around every document; returns it opened."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megadoc_pl.data.store import FORMAT_VERSION, HEADER_BYTES, MAGIC, PROMOTED_FIELDS, TokenStore
    from megadoc_pl.utils import atomic_dir

    if (out / "manifest.json").exists():
        return TokenStore.open(out)
    D = len(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as tmp:
        with open(tmp / "tokens.bin", "wb") as f:
            f.write((MAGIC + np.array([FORMAT_VERSION, 2, n], "<i8").tobytes()).ljust(HEADER_BYTES, b"\0"))
            for a in range(0, n, 1 << 24):
                rng.integers(3, vocab, min(1 << 24, n - a), dtype=np.uint16).tofile(f)
        tok = np.memmap(tmp / "tokens.bin", np.uint16, "r+", offset=HEADER_BYTES, shape=(n,))
        tok[offsets[:-1]], tok[offsets[1:] - 1] = 0, 1
        tok.flush()
        del tok
        np.save(tmp / "offsets.npy", offsets)
        cols = {"source_id": source_ids, "task": tasks if tasks is not None else pa.array(["real"] * D),
                "gen_index": pa.array(gen_index if gen_index is not None else np.full(D, -1, np.int64)),
                "file": pa.array(np.zeros(D, np.int32)), "line": pa.array(np.arange(1, D + 1))}
        if kind == "generations":
            for name, (typ, default) in PROMOTED_FIELDS.items():
                value = (fields or {}).get(name)
                cols[name] = value if value is not None else pa.array(np.full(D, default, object if typ == "string" else typ))
        cols["meta"] = meta if meta is not None else pa.array(["{}"] * D)
        pq.write_table(pa.table(cols), tmp / "index.parquet", compression="zstd")
        manifest = {"format_version": FORMAT_VERSION, "kind": kind, "tokenizer_fingerprint": "bench" * 8,
                    "vocab_size": vocab, "dtype": "uint16", "add_bos": True, "add_eos": True, "bos_id": 0,
                    "eos_id": 1, "num_documents": D, "num_tokens": n,
                    "inputs": [{"path": str(out), "sha256": f"{kind}-{seed}-{D}-{n}", "size": n}]}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
    return TokenStore.open(out)


# Token lengths drawn uniformly per document: real documents, rephrases, rationales, MAGA
# reformulations. "short" keeps full-size stores small (11.3M generations in ~1 GB each);
# "paper" has the papers' means (164k documents of ~1.24k tokens, 5.2M generations of ~700).
LENGTHS = {"short": {"real": (60, 300), "rephrase": (20, 100), "rationale": (20, 40), "maga": (20, 40)},
           "paper": {"real": (200, 2290), "rephrase": (300, 1100), "rationale": (100, 300), "maga": (300, 1100)}}


def build_stores(root: Path, sources: int, generations: int, lengths: str = "short") -> dict:
    """The real store and one generation store per task family (cached under ``root``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from megadoc_pl.data.views import stretch_cuts

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    S, G = sources, generations
    ids = pa.array(np.char.add("doc", np.arange(S).astype(str)).astype(object))
    span = LENGTHS[lengths]
    real = write_store(root / "real", "documents", rng.integers(*span["real"], S), ids, seed=1)
    sid = pc.take(ids, pa.array(np.repeat(np.arange(S), G)))
    gi = np.tile(np.arange(G, dtype=np.int64), S)

    def gens(task: str, lo: int, hi: int, seed: int, **extra):
        lengths = np.random.default_rng(seed).integers(lo, hi, S * G)
        return lengths, sid, pa.array([task] * (S * G)), gi, extra

    _, _, cut = stretch_cuts(real.content_lengths, G)
    unit = pa.scalar(f"tokens:{real.manifest['tokenizer_fingerprint'][:16]}")
    rat_meta = pc.binary_join_element_wise(
        '{"split_index": ', pa.array(gi).cast(pa.string()), ', "split_token_offset": ', pa.array(cut).cast(pa.string()),
        ', "split_tokenizer": "', unit, '"}', "")
    parts = {"rephrase": gens("rephrase", *span["rephrase"], 2),
             "rationale": gens("rationale", *span["rationale"], 3, split_index=pa.array(gi), meta=rat_meta),
             "maga": gens("maga", *span["maga"], 4,
                          judge_score=pa.array(np.random.default_rng(5).integers(1, 6, S * G) * 1.0))}
    stores = {"real": real}
    for name, (lengths, s, t, g, extra) in parts.items():
        meta = extra.pop("meta", None)
        stores[name] = write_store(root / name, "generations", lengths, s, t, g, extra, meta, seed=len(name))
    a, b = parts["rephrase"], parts["rationale"]
    stores["hybrid"] = write_store(
        root / "hybrid", "generations", np.concatenate([a[0], b[0]]), pa.concat_arrays([sid, sid]),
        pa.concat_arrays([a[2], b[2]]), np.concatenate([gi, gi]),
        {"split_index": pa.array(np.concatenate([np.full(S * G, -1), gi]))},
        pa.concat_arrays([pa.array(["{}"] * (S * G)), rat_meta]), seed=9)
    return stores


def open_stores(root: Path, view: str):
    from megadoc_pl.data.store import TokenStore

    return TokenStore.open(root / "real"), TokenStore.open(root / STORE_OF[view])


# ---------------------------------------------------------------------------------------------
# Timed stages (importable; each returns seconds or a rate)


def heldout_ids(real, n: int = HELDOUT) -> set[str]:
    return set(real.source_ids[:: max(1, real.num_documents // n)][:n].tolist())


def view_options(view: str, generations: int):
    from megadoc_pl.data.views import ViewOptions

    return ViewOptions(view=view, generations=generations, short_pool="drop")


def time_view(root: Path, cache: Path, view: str, generations: int) -> float:
    """Seconds to open the stores and get ``view`` through the cache (a build when it is empty)."""
    from megadoc_pl.data.view_cache import cached_view
    from megadoc_pl.data.views import real_units

    t = time.perf_counter()
    real, synth = open_stores(root, view)
    held = heldout_ids(real)
    if view == "real":
        units = real_units(real, held)
    else:
        units = cached_view(cache, real, synth, view_options(view, generations), held, encode=_encode)
    assert units.num_units > 0
    return time.perf_counter() - t


def _encode(text: str) -> list[int]:
    return [5, 6, 7][: len(text) % 4]  # the delimiters' token ids (any fixed short ids)


def train_windows(root: Path, cache: Path, generations: int, seq_len: int, batch: int, order: str,
                  shared: bool = False, view: str = "stitch"):
    """A recipe's training windows (E=32, w=0.9, scope document; the view's synthetic stream) on
    the bench stores; ``shared``: pass orders and window tables shared through files, as with
    loader workers."""
    from megadoc_pl.data.mixture import paper_plan
    from megadoc_pl.data.view_cache import cached_view
    from megadoc_pl.data.views import real_units
    from megadoc_pl.data.windows import SharedPasses, StreamWindows, Windows

    real, synth = open_stores(root, view)
    held = heldout_ids(real)
    ru = real_units(real, held)
    su = cached_view(cache, real, synth, view_options(view, generations), held)
    plan = paper_plan(ru.num_tokens, 32, 0.9, batch, seq_len, su.num_tokens)
    passes = SharedPasses(cache / "passes") if shared else None
    streams = {n: StreamWindows(u, seq_len, 42, n, window_order=order, shared=passes)
               for n, u in (("real", ru), ("synthetic", su))}
    return Windows.from_plan(streams, plan, "document"), plan, synth


def loader_rate(windows, first_step: int, batches: int, batch: int, workers: int) -> dict:
    """The datamodule's DataLoader over ``windows``: ``rate`` (batches/s after one warm batch),
    the CPU it cost per batch in the main process (``main_ms``: receiving a worker's batch, or
    making it with no workers) and in the workers (``worker_ms``, their whole life included:
    fork, first batches, exit), and ``unpack_ms``, the CPU time to unpack one batch into the
    whole contract, which a GPU run does on the GPU."""
    import gc

    from megadoc_pl.data.datamodule import PackedWindows, SlotLoader, loader_kwargs, release_slot
    from megadoc_pl.data.batch import unpack

    def cpu(who: int) -> float:
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime

    steps = [list(range(s * batch, (s + 1) * batch)) for s in range(first_step, first_step + batches + 1)]
    kids0 = cpu(resource.RUSAGE_CHILDREN)
    loader = SlotLoader(PackedWindows(windows), batch_size=None, sampler=steps, **loader_kwargs(workers))
    it = iter(loader)
    packed = next(it)
    t, c = time.perf_counter(), cpu(resource.RUSAGE_SELF)
    for _ in range(batches):
        release_slot(next(it))  # done with it, as the datamodule is once it has unpacked a batch
    out = {"rate": batches / (time.perf_counter() - t), "main_ms": (cpu(resource.RUSAGE_SELF) - c) / batches * 1e3}
    out["worker_private_mb"] = worker_private_mb(loader._iterator)
    del it, loader
    gc.collect()  # shuts the persistent workers down, so that their CPU time is counted
    out["worker_ms"] = (cpu(resource.RUSAGE_CHILDREN) - kids0) / (batches + 1) * 1e3 if workers else None
    t = time.perf_counter()
    for _ in range(5):
        full = unpack(packed)
    assert full["input_ids"].shape == (batch, windows.seq_len)
    out["unpack_ms"] = (time.perf_counter() - t) / 5 * 1e3
    return out


def private_mb(pid: int | str = "self") -> Optional[float]:
    """MB a process wrote for itself (Private_Dirty of /proc/PID/smaps_rollup, Linux: its own
    arrays, not the files it maps, whose pages the processes of a node share), or None."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Private_Dirty")) / 1024


def worker_private_mb(it) -> Optional[float]:
    """Mean :func:`private_mb` of a DataLoader iterator's workers, or None."""
    sizes = [private_mb(w.pid) for w in getattr(it, "_workers", [])]
    return sum(sizes) / len(sizes) if sizes and None not in sizes else None


def gpu_unpack_ms(windows, batch: int) -> Optional[float]:
    """ms to move one packed batch to the GPU and unpack it there (what training does), or None."""
    import torch

    from megadoc_pl.data.batch import unpack

    if not torch.cuda.is_available():
        return None
    packed = windows.packed(list(range(batch)))
    pinned = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in packed.items()}
    for i in range(25):  # 5 warm-up rounds, then 20 timed
        if i == 5:
            torch.cuda.synchronize()
            t = time.perf_counter()
        unpack({k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in pinned.items()})
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 20 * 1e3


def peer_rate(path: Path, batches: int, batch: int, seq_len: int) -> float:
    """nanoGPT's ``get_batch`` (train.py, CPU branch) on the same token file, as written there: the
    memmap re-opened per batch, ``torch.randint`` offsets, ``torch.stack`` of int64 slices."""
    import torch

    from megadoc_pl.data.store import HEADER_BYTES

    torch.manual_seed(0)
    t = time.perf_counter()
    for _ in range(batches):
        data = np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES)
        ix = torch.randint(len(data) - seq_len, (batch,))
        x = torch.stack([torch.from_numpy((data[i:i + seq_len]).astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + seq_len]).astype(np.int64)) for i in ix])
        assert x.shape == y.shape
    return batches / (time.perf_counter() - t)


def slicer_rate(tokens: np.ndarray, batches: int, batch: int, seq_len: int, seed: int = 0) -> float:
    """A tighter bare slicer than nanoGPT's: one plain array, integer offsets, ``np.stack``."""
    import torch

    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    for _ in range(batches):
        ix = rng.integers(0, len(tokens) - seq_len - 1, batch)
        x = torch.from_numpy(np.stack([tokens[i:i + seq_len].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + seq_len].astype(np.int64) for i in ix]))
        assert x.shape == y.shape
    return batches / (time.perf_counter() - t)


# ---------------------------------------------------------------------------------------------
# Driver: one process per stage


def run_stage(args: argparse.Namespace) -> dict:
    root, cache = Path(args.root), Path(args.root) / "cache"
    kind, what = args.stage.split(":", 1)
    c0 = time.process_time()
    t0 = time.perf_counter()
    out: dict = {}
    if kind in ("build", "relaunch"):
        time_view(root, cache, what, args.generations)
    elif kind == "loader":
        order, workers, where = what.split(":")
        shutil.rmtree(cache / "passes", ignore_errors=True)  # every stage computes its passes afresh
        windows, plan, synth = train_windows(root, cache, args.generations, args.seq_len, args.batch, order,
                                             shared=int(workers) > 0 and not args.no_shared_passes,
                                             view=args.loader_view)
        first = 1 if where == "early" else plan.steps - args.batches - 2
        out.update(loader_rate(windows, first, args.batches, args.batch, int(workers)))
        out["peer"] = peer_rate(synth.path / "tokens.bin", args.batches, args.batch, args.seq_len)
        out["slicer"] = slicer_rate(np.asarray(synth.token_array), args.batches, args.batch, args.seq_len)
        out["gpu_unpack_ms"] = gpu_unpack_ms(windows, args.batch)
    out.update(wall=time.perf_counter() - t0, cpu=time.process_time() - c0, rss_gb=peak_rss_gb())
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu"] += children.ru_utime + children.ru_stime
    return out


def peak_rss_gb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not inherit the parent's across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=16400)
    ap.add_argument("--generations", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--views", default=",".join(VIEWS))
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to measure (many cores: 0,1,2,4,8)")
    ap.add_argument("--loader-view", default="stitch", choices=("stitch", "rephrase", "maga"),
                    help="the synthetic stream of the loader stages (rephrase: one unit per generation, 5.2M a pass)")
    ap.add_argument("--lengths", default="short", choices=tuple(LENGTHS),
                    help="document lengths: short (small stores) or paper (the papers' mean lengths)")
    ap.add_argument("--positions", default="early,late",
                    help="loader stages' window indices: early (step 1), late (the plan's last steps) or both")
    ap.add_argument("--no-shared-passes", action="store_true",
                    help="workers compute pass orders and window tables each (as before they were shared)")
    ap.add_argument("--root", default=None, help="store and cache directory (default .cache/bench_views/s<S>-g<G>)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.root = args.root or str(ROOT / ".cache" / "bench_views" / (f"s{args.sources}-g{args.generations}"
                                                                    + ("" if args.lengths == "short" else "-paper")))
    if args.stage:
        print(json.dumps(run_stage(args)))
        return

    t = time.perf_counter()
    build_stores(Path(args.root), args.sources, args.generations, args.lengths)
    print(f"stores: {args.sources:,} sources x G={args.generations} under {args.root} "
          f"({time.perf_counter() - t:.1f}s)", flush=True)
    shutil.rmtree(Path(args.root) / "cache", ignore_errors=True)
    size = f"{args.sources // 1000}k x {args.generations}"
    views = [v for v in args.views.split(",") if v]
    stages = [f"build:{v}" for v in views] + [f"relaunch:{v}" for v in views]
    positions = [p for p in args.positions.split(",") if p]
    stages += [f"loader:shuffled:{w}:{where}" for w in map(int, args.workers.split(",")) for where in positions]
    print(f"{'stage':34} {'size':>10} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'ratio vs peer':>14}")
    # the checkout first, then whatever the caller's path holds (wheels installed with --target)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    loaders = []
    for stage in stages:
        proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--root", args.root,
                               "--generations", str(args.generations), "--seq-len", str(args.seq_len),
                               "--batch", str(args.batch), "--batches", str(args.batches),
                               "--loader-view", args.loader_view]
                              + (["--no-shared-passes"] if args.no_shared_passes else []),
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"{stage:34} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if "rate" in r:
            _, _, workers, where = stage.split(":")
            loaders.append({"stage": stage, "workers": int(workers), "where": where, **r})
        ratio = f"{r['rate'] / r['peer']:.2f}x" if "rate" in r else ""
        extra = (f"  ({r['rate']:.0f} vs {r['peer']:.0f} batches/s; {r['rate'] / r['slicer']:.2f}x the tight slicer "
                 f"at {r['slicer']:.0f}/s; CPU per batch: main {r['main_ms']:.2f} ms"
                 + (f", workers {r['worker_ms']:.2f} ms" if r.get("worker_ms") else "")
                 + (f"; {r['worker_private_mb']:.0f} MB written per worker" if r.get("worker_private_mb") else "")
                 + f"; unpack on CPU {r['unpack_ms']:.1f} ms"
                 + (f", to GPU and unpack there {r['gpu_unpack_ms']:.2f} ms" if r.get("gpu_unpack_ms") else "")
                 + ")") if "rate" in r else ""
        print(f"{stage:34} {size:>10} {r['wall']:8.1f} {r['cpu']:8.1f} {r['rss_gb']:12.2f} {ratio:>14}{extra}",
              flush=True)
    print("SUMMARY: " + json.dumps(loaders))


if __name__ == "__main__":
    main()
