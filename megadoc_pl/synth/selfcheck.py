"""End-to-end check of a generation backend: every task through the real runner, rows verified.

Used by ``tools/gpu_vllm_check.py`` to run the vLLM backend for real on a GPU machine (with a
tiny random model built on the spot, or a real instruct model), and by the tests with the
transformers backend on CPU, so the check itself is tested. One backend instance (one vLLM
engine) serves all tasks.

Checks: rephrase gives exactly G rows per document with provenance and a rerun asks for nothing;
rationale rows sit at the equal-token split points of the training tokenizer; maga either
produces rows (a real model) or records its stage-1 failures (a random model cannot write JSON).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from megadoc_pl.data.segments import equal_token_split
from megadoc_pl.data.tokenizer import load_tokenizer
from megadoc_pl.synth.backends.base import Backend
from megadoc_pl.synth.runner import SynthRunConfig, synthesize
from megadoc_pl.synth.tasks import TaskConfig

_SENTENCES = [
    "Alice founded the town of Brindle in 1821 and built its first mill near the river.",
    "The mill ground wheat from the valley farms for almost a century.",
    "Brindle later became known for its wool market and its stone bridge.",
    "A flood in 1893 destroyed the bridge, which the town rebuilt in iron.",
    "Today the old mill houses a small museum about the valley's farming history.",
]


class CheckFailed(AssertionError):
    pass


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("shard-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def write_docs(path: Path, n: int) -> list[dict]:
    docs = [{"id": f"check-{i:04d}", "text": " ".join(_SENTENCES[: 2 + i % 4]) + f" (record {i})"}
            for i in range(n)]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def run_selfcheck(backend: Backend, workdir: str | Path, tokenizer: str | Path, model_name: str,
                  docs: int = 16, generations: int = 4, max_new_tokens: int = 16,
                  expect_maga_rows: bool = False, progress: bool = False) -> dict:
    """Run rephrase, rationale and maga through ``backend``; raise CheckFailed on any problem."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = write_docs(work / "docs.jsonl", docs)
    ids = [d["id"] for d in src]
    report: dict = {}

    def go(name: str, **task_kw) -> dict:
        t = time.perf_counter()
        stats = synthesize(
            TaskConfig(**task_kw),
            SynthRunConfig(inputs=[str(work / "docs.jsonl")], out=str(work / name), model=model_name,
                      tokenizer=str(tokenizer), batch_size=8, progress=progress),
            backend=backend,
        )
        run = stats["run"]
        report[name] = {"seconds": round(time.perf_counter() - t, 3), "requests": run["requests"],
                        "failures": run["failures"], "rows": run["rows_written"],
                        "completion_tokens": run["completion_tokens"],
                        "tokens_per_s": round(run["completion_tokens"] / max(run["wall_s"], 1e-9), 1)}
        return stats

    # rephrase: G rows per document, full provenance, resumable
    stats = go("rephrase", task="rephrase", generations=generations, max_new_tokens=max_new_tokens)
    rows = _rows(work / "rephrase")
    got = sorted((r["source_id"], r["gen_index"]) for r in rows)
    _expect(got == [(i, g) for i in ids for g in range(generations)],
            f"rephrase: expected {docs} x {generations} rows exactly once, got {len(rows)} "
            f"({stats['run']['failures']} failures; see {work / 'rephrase' / '.synth' / 'errors'})")
    for key in ("model", "sampling", "prompt_version", "style", "truncated", "completion_tokens"):
        _expect(all(key in r for r in rows), f"rephrase: rows lack '{key}'")
    _expect(all(r["sampling"]["n"] == generations for r in rows), "rephrase: n != G in the sampling record")
    _expect(all(1 <= r["completion_tokens"] <= max_new_tokens for r in rows),
            "rephrase: completion_tokens outside [1, max_new_tokens]")
    again = go("rephrase", task="rephrase", generations=generations, max_new_tokens=max_new_tokens)
    _expect(again["run"]["requests"] == 0, "rephrase: a rerun sent requests although everything was done")

    # rationale: rows at the equal-token split points of the training tokenizer
    go("rationale", task="rationale", generations=generations, max_new_tokens=max_new_tokens)
    tok = load_tokenizer(tokenizer)
    rows = _rows(work / "rationale")
    for d in src:
        splits = equal_token_split(len(tok.encode(d["text"])), generations)
        mine = sorted((r for r in rows if r["source_id"] == d["id"]), key=lambda r: r["gen_index"])
        _expect([r["split_token_offset"] for r in mine] == splits,
                f"rationale: {d['id']} split offsets {[r['split_token_offset'] for r in mine]} != {splits}")

    # maga: rows from a real model, recorded stage-1 failures from a random one
    stats = go("maga", task="maga", judge=True, max_new_tokens=max_new_tokens * 4,
               pairs_max_new_tokens=max(256, max_new_tokens))
    rows = _rows(work / "maga")
    errors = work / "maga" / ".synth" / "errors" / "shard-00000-of-00001.jsonl"
    n_err = len(errors.read_text().splitlines()) if errors.exists() else 0
    if expect_maga_rows:
        _expect(len(rows) > 0, f"maga: no rows ({n_err} errors in {errors})")
        _expect(all(r.get("genre") and r.get("audience") for r in rows), "maga: rows without genre/audience")
    else:
        _expect(len(rows) > 0 or n_err >= docs,
                f"maga: neither rows nor recorded stage-1 failures ({n_err} errors)")
    report["maga"]["stage1_failures"] = stats["run"]["counters"].get("maga_pairs_unparseable", 0)
    report["maga"]["judged"] = sum(1 for r in rows if r.get("judge_score") is not None)
    return report
