#!/usr/bin/env python
"""Paper-scale data: tokenizing, views, plans and relaunches at a chosen corpus size (issue 12).

Writes a synthetic corpus in the project's formats (no LLM needed): S real documents (dolma
rows) and, per source, G rephrases, G rationales (split_index 0..G-1) and 5 MAGA
reformulations (generation rows). Then each stage runs in a process of its own, so its
wall time, CPU time and peak RSS are its own (os.wait4):

- tokenize real / tokenize generations: the stores a recipe prepares (data.cache_dir), built
  with every core (``auto``) and, for generations, also on 1 core and on 2 processes;
- peer: raw ``tokenizers`` batch encoding of the same generation texts (already in memory) into
  id lists, on 1 and on all cores (RAYON_NUM_THREADS) — the work no store builder can skip;
- dry run of each view's recipe at paper_300m (stores cached): the view, the split, the mixture
  plan; first build, then a relaunch (view cache);

and prints one table, the ratios to the peer, and with two sizes (``--sources A B``) the growth
exponent of each stage (log time ratio / log size ratio; 1 = linear).

    python benchmarks/bench_scale.py --sources 16400                 # 1/10 paper scale
    python benchmarks/bench_scale.py --sources 16400 164000          # and full scale, exponents
    python benchmarks/bench_scale.py --sources 2000 --views stitch   # a quick look

Rows are short by default (``--gen-words 15``, ~30 tokens): the row count, not the token count,
is what paper scale stresses, and disk stays small (full scale: ~2.5 GB of JSONL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "llama-test-tokenizer.json"
VIEW_RECIPES = {"stitch": "megadoc_stitch", "stretch": "megadoc_stretch", "rephrase": "rephrase", "maga": "maga",
                "maga_stitch": "maga_stitch", "hybrid": "megadoc_hybrid"}
VIEW_OVERRIDES = {"hybrid": ["data.generations=32"]}  # rationales are tied to the G they were written for
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "je", "pa", "qu", "ze",
             "mon", "tar", "len", "dis", "cor", "ver", "ast", "ing", "tion", "al", "er", "ed", "ly"]


# --------------------------------------------------------------------------------------------
# The corpus


def vocabulary(rng: np.random.Generator, n: int = 6000) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), int(rng.integers(1, 4)))))
    return sorted(words)


def write_corpus(root: Path, sources: int, generations: int, real_words: int, gen_words: int) -> dict:
    """real/docs.jsonl and gen/{rephrase,rationale,maga}.jsonl (skipped when already written)."""
    done = root / "corpus.json"
    if done.exists():
        return json.loads(done.read_text())
    rng = np.random.default_rng(0)
    vocab = np.array(vocabulary(rng))
    (root / "real").mkdir(parents=True, exist_ok=True)
    (root / "gen").mkdir(parents=True, exist_ok=True)

    def texts(count: int, words: int) -> list[str]:
        lengths = rng.integers(words // 2, words * 3 // 2 + 1, count)
        flat = vocab[rng.integers(0, len(vocab), int(lengths.sum()))]
        cuts = np.cumsum(lengths)[:-1]
        return [" ".join(w) + "." for w in np.split(flat, cuts)]

    t0 = time.perf_counter()
    block = 2000  # sources per write
    with open(root / "real" / "docs.jsonl", "w") as freal, open(root / "gen" / "rephrase.jsonl", "w") as freph, \
            open(root / "gen" / "rationale.jsonl", "w") as frat, open(root / "gen" / "maga.jsonl", "w") as fmaga:
        for lo in range(0, sources, block):
            ids = range(lo, min(sources, lo + block))
            for s, t in zip(ids, texts(len(ids), real_words)):
                freal.write(json.dumps({"id": f"doc{s}", "text": t, "source": "bench"}) + "\n")
            reph, rat = texts(len(ids) * generations, gen_words), texts(len(ids) * generations, gen_words)
            mag = texts(len(ids) * 5, gen_words)
            for k, s in enumerate(ids):
                for g in range(generations):
                    t = k * generations + g
                    freph.write(json.dumps({"source_id": f"doc{s}", "task": "rephrase", "gen_index": g, "text": reph[t],
                                            "style": "wikipedia", "model": "bench", "prompt_version": "v1"}) + "\n")
                    frat.write(json.dumps({"source_id": f"doc{s}", "task": "rationale", "gen_index": g, "split_index": g,
                                           "text": rat[t], "model": "bench"}) + "\n")
                for g in range(5):
                    fmaga.write(json.dumps({"source_id": f"doc{s}", "task": "maga", "gen_index": g, "text": mag[k * 5 + g],
                                            "genre": f"genre{g}", "audience": f"audience{g}", "judge_score": 3 + g % 3,
                                            "model": "bench"}) + "\n")
    info = {"sources": sources, "generations": generations, "rows": sources * (2 * generations + 5),
            "bytes": sum(f.stat().st_size for f in root.rglob("*.jsonl")), "write_seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------
# Measuring a stage in a process of its own


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall and CPU seconds, peak RSS (os.wait4: this child only) and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"stage failed ({' '.join(cmd[:6])} ...):\n{stderr[-3000:]}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


def overrides(root: Path, tokenizer: Path) -> list[str]:
    return ["scale=paper_300m", f"data.real={root / 'real'}", f"data.synthetic={root / 'gen'}",
            f"data.tokenizer={tokenizer}", f"data.cache_dir={root / 'cache'}",
            "data.drop_heldout_generations=true"]  # the corpus is written before the split


STAGE_CODE = {
    # the stores a recipe prepares, through the same code and cache as a run
    "prepare_store": """
import sys
from megadoc_pl.recipes import compose_recipe
from megadoc_pl.data import prepare
from megadoc_pl.data.tokenizer import load_tokenizer
cfg = compose_recipe("megadoc_stitch", {overrides!r})
tok = load_tokenizer(cfg.data.tokenizer)
st = prepare._build_store(cfg, [{inputs!r}], tok, {kind!r}, "bench")
print(len(st), st.num_tokens)
""",
    # our builder on a given number of cores / mode, into a scratch directory
    "build": """
import sys, shutil, time
from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.tokenizer import load_tokenizer
shutil.rmtree({out!r}, ignore_errors=True)
tok = load_tokenizer({tokenizer!r})
t0 = time.perf_counter()
st = build_store({inputs!r}, tok, {out!r}, kind="generations", num_proc={num_proc}, parallel={parallel!r}, progress=False)
print(len(st), st.num_tokens, time.perf_counter() - t0)
shutil.rmtree({out!r})
""",
    # the peer: texts in memory, encode_batch_fast, ids as lists (timed from here)
    "peer": """
import json, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tokenizer!r})
texts = [json.loads(line)["text"] for line in open({inputs!r}, "rb")]
t0 = time.perf_counter()
n = 0
for lo in range(0, len(texts), 8192):
    encs = tok.encode_batch_fast(texts[lo:lo + 8192], add_special_tokens=False)
    n += sum(len(e.ids) for e in encs)
print(len(texts), n, time.perf_counter() - t0)
""",
}


def stage(name: str, env: dict | None = None, one_core: bool = False, **kw) -> dict:
    """A stage's code in a fresh interpreter; ``one_core``: pinned to one CPU (taskset)."""
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if one_core else []
    return measured([*pin, sys.executable, "-c", STAGE_CODE[name].format(**kw)], env=env)


def dry_run(recipe: str, root: Path, tokenizer: Path, extra: list[str]) -> dict:
    r = measured([sys.executable, str(ROOT / "recipes" / "train.py"), "--recipe", recipe, "--dry-run",
                  *overrides(root, tokenizer), *extra])
    report = json.loads(r["stdout"])
    r["stdout"] = ""
    r["units"] = sum(s.get("units", 0) for s in report.get("streams", {}).values()) if isinstance(report.get("streams"), dict) else None
    return r


# --------------------------------------------------------------------------------------------
# One size


def run_size(work: Path, sources: int, args, tokenizer: Path) -> dict:
    root = work / f"s{sources}_g{args.generations}_w{args.gen_words}"
    root.mkdir(parents=True, exist_ok=True)
    corpus = write_corpus(root, sources, args.generations, args.real_words, args.gen_words)
    print(f"# {sources} sources: {corpus['rows']:,} generation rows, {corpus['bytes'] / 1e9:.2f} GB of JSONL "
          f"(written in {corpus['write_seconds']} s)", flush=True)
    res: dict = {"corpus": corpus}
    shutil.rmtree(root / "cache", ignore_errors=True)  # every stage measured from nothing cached
    ov = overrides(root, tokenizer)
    single = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "true"}

    res["tokenize real"] = stage("prepare_store", overrides=ov, inputs=str(root / "real"), kind="documents")
    res["tokenize generations"] = stage("prepare_store", overrides=ov, inputs=str(root / "gen"), kind="generations")
    rows, tokens = map(int, res["tokenize generations"]["stdout"].split())
    res["tokenize generations"]["rows"], res["tokenize generations"]["tokens"] = rows, tokens
    print(f"  tokenized: real {res['tokenize real']['wall']:.1f} s, generations {res['tokenize generations']['wall']:.1f} s",
          flush=True)
    if args.builders:
        sample = root / "gen" / "rephrase.jsonl"
        scratch = str(root / "scratch_store")
        res["build rephrase, 1 core"] = stage("build", env=single, one_core=True, inputs=str(sample), tokenizer=str(tokenizer),
                                              out=scratch, num_proc=1, parallel="threads")
        res["build rephrase, all cores (threads)"] = stage("build", inputs=str(sample), tokenizer=str(tokenizer), out=scratch,
                                                           num_proc=os.cpu_count(), parallel="threads")
        res["build rephrase, all cores (processes)"] = stage("build", inputs=str(sample), tokenizer=str(tokenizer),
                                                             out=scratch, num_proc=os.cpu_count(), parallel="processes")
        for label, env in (("peer encode rephrase, 1 core", single), ("peer encode rephrase, all cores", None)):
            res[label] = stage("peer", env=env, one_core=env is not None, inputs=str(sample), tokenizer=str(tokenizer))
        for r in res.values():
            if "stdout" in r and len(r["stdout"].split()) == 3:
                r["seconds"] = float(r["stdout"].split()[-1])  # the call itself, without start-up
    for view in args.views:
        recipe = VIEW_RECIPES[view]
        extra = VIEW_OVERRIDES.get(view, [])
        res[f"dry run {view} (first)"] = dry_run(recipe, root, tokenizer, extra)
        res[f"dry run {view} (relaunch)"] = dry_run(recipe, root, tokenizer, extra)
        print(f"  {view}: first {res[f'dry run {view} (first)']['wall']:.1f} s, relaunch "
              f"{res[f'dry run {view} (relaunch)']['wall']:.1f} s", flush=True)
    return res


def print_table(sources: int, res: dict) -> None:
    print(f"\n## {sources} sources x G={res['corpus']['generations']} "
          f"({res['corpus']['rows']:,} generation rows)\n")
    print("| stage | wall s | CPU s | peak RSS MB | note |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        if name == "corpus":
            continue
        note = ""
        if name == "tokenize generations":
            note = f"{r['rows']:,} rows, {r['tokens'] / 1e6:.0f}M tokens, {r['rows'] / r['wall']:,.0f} rows/s"
        if "seconds" in r:
            note = f"{r['seconds']:.1f} s in the call itself"
        print(f"| {name} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_mb']:.0f} | {note} |")
    if "peer encode rephrase, all cores" in res:
        peer1, peerall = res["peer encode rephrase, 1 core"]["seconds"], res["peer encode rephrase, all cores"]["seconds"]
        print()
        for label, peer in (("build rephrase, 1 core", peer1), ("build rephrase, all cores (threads)", peerall),
                            ("build rephrase, all cores (processes)", peerall)):
            ours = res[label]["seconds"]
            print(f"- {label}: {peer / ours:.2f}x the peer's throughput (peer: encode to id lists {peer:.1f} s; "
                  f"ours: read, parse, check, encode, write the store {ours:.1f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", type=int, nargs="+", default=[16_400], help="real sources (paper: 164k); two sizes give exponents")
    ap.add_argument("--generations", type=int, default=32, help="G rephrases and rationales per source (paper: 32)")
    ap.add_argument("--real-words", type=int, default=300, help="mean words per real document")
    ap.add_argument("--gen-words", type=int, default=15, help="mean words per generation")
    ap.add_argument("--views", nargs="*", default=list(VIEW_RECIPES), choices=list(VIEW_RECIPES))
    ap.add_argument("--no-builders", dest="builders", action="store_false", help="skip the 1-core / processes / peer runs")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_scale")
    ap.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER if SHARED_TOKENIZER.exists() else None)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.tokenizer is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import build_tiny_tokenizer

        args.tokenizer = build_tiny_tokenizer(args.work / "tok")
    print(f"# tokenizer {args.tokenizer}; {os.cpu_count()} cores", flush=True)
    results = {}
    for s in args.sources:
        results[s] = run_size(args.work, s, args, args.tokenizer)
        print_table(s, results[s])
    if len(args.sources) == 2:
        a, b = args.sources
        print(f"\n## growth exponents {a} -> {b} sources (1 = linear in the corpus)\n")
        for name in results[a]:
            if name != "corpus" and name in results[b]:
                ta, tb = results[a][name]["wall"], results[b][name]["wall"]
                ra, rb = results[a][name]["rss_mb"], results[b][name]["rss_mb"]
                print(f"- {name}: time {math.log(tb / ta) / math.log(b / a):.2f}, peak RSS {math.log(rb / ra) / math.log(b / a):.2f}")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
