"""The generation runner end to end: every task through the transformers backend with a tiny
local model, MAGA stage 2 / judge through a registered fixed-text backend, sharding, held-out
refusal, failures and retries, torn lines, and a SIGKILL mid-run followed by a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadoc_pl.data.segments import equal_token_split
from megadoc_pl.data.tokenizer import load_tokenizer
from megadoc_pl.synth import Response, register_backend
from megadoc_pl.synth.cli import main as cli_main
from megadoc_pl.synth.outdir import ShardLock
from megadoc_pl.synth.runner import SynthRunConfig, synthesize
from megadoc_pl.synth.sharding import ShardFiles, resolve_shard, shard_of
from megadoc_pl.synth.tasks import TaskConfig
from megadoc_pl.synth.tiny import build_tiny_chat_model

from helpers import one_thread

REPO = Path(__file__).resolve().parents[2]

SENTENCES = [
    "Alice founded the town of Brindle in 1821 and built its first mill near the river.",
    "The mill ground wheat from the valley farms for almost a century.",
    "Brindle later became known for its wool market and its stone bridge.",
    "A flood in 1893 destroyed the bridge, which the town rebuilt in iron.",
]


def make_docs(path: Path, n: int, long_every: int = 0) -> list[dict]:
    docs = []
    for i in range(n):
        k = 1 + i % len(SENTENCES)
        text = " ".join(SENTENCES[:k]) + f" Document number {i}."
        if long_every and i % long_every == 0:
            text = "\n\n".join([text] * 6)
        docs.append({"id": f"doc-{i:03d}", "text": text, "url": f"https://example.org/{i}"})
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


def read_rows(out: Path) -> list[dict]:
    rows = []
    for f in sorted(out.glob("shard-*.jsonl")):
        rows += [json.loads(line) for line in f.read_text().splitlines()]
    return rows


def keys(rows):
    return [(r["source_id"], r["gen_index"]) for r in rows]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with one_thread():
        yield


def run(out, inputs, task_kw, backend="transformers", backend_kwargs=None, **run_kw):
    cfg = SynthRunConfig(inputs=[str(p) for p in inputs], out=str(out), backend=backend,
                    backend_kwargs=backend_kwargs or {}, progress=False, **run_kw)
    return synthesize(TaskConfig(**task_kw), cfg)


# ----------------------------------------------------------------------------- fixed-text backend


class FixedBackend:
    """Answers by request kind with fixed, well-formed text; records every request; can fail
    chosen requests a number of times. Registered by name, like the demo's template backend."""

    name = "fixed"
    instances: list["FixedBackend"] = []

    def __init__(self, fail: dict | None = None, pairs_text: str | None = None, judge_text: str | None = None):
        self.requests = []
        self.fail = dict(fail or {})  # substring of request id -> failures left
        self.pairs_text = pairs_text
        self.judge_text = judge_text
        self.model_name = "fixed-model"
        FixedBackend.instances.append(self)

    def _texts(self, r):
        p = r.payload
        if r.task == "maga_pairs":
            if self.pairs_text is not None:
                return [self.pairs_text]
            body = ",\n".join(f"'genre_{i}': 'Genre {i}', 'audience_{i}': 'Audience {i}'" for i in range(1, 6))
            return ["Sure! Here are the pairs:\n```json\n{" + body + ",}\n```"]
        if r.task == "maga_reformulate":
            if p["genre"] == "Genre 5":  # off-topic: dropped by the keyword-coverage filter
                return ["Completely unrelated words about cooking pasta and tomato sauce."]
            return [f"Sure! Here is the rewritten text:\n\n{p['text']}\n\nI hope this helps!"]
        if r.task == "maga_judge":
            return [self.judge_text or '```json\n{"analysis": "same facts", "score": 4}\n```']
        if r.task == "rationale":
            return [f"thought about {len(p['prefix'])}|{len(p['suffix'])}"]
        return [f"{r.task} {i} of {p['source_id']}" for i in range(r.n)]

    def generate(self, requests):
        out = []
        for r in requests:
            self.requests.append(r)
            hit = next((k for k, left in self.fail.items() if k in r.id and left > 0), None)
            if hit is not None:
                self.fail[hit] -= 1
                out.append(Response(r.id, [], 0, [], "RuntimeError: scripted failure"))
                continue
            texts = self._texts(r)
            out.append(Response(r.id, texts, 10, [3] * len(texts)))
        return out


register_backend("fixed_test", FixedBackend)


# ----------------------------------------------------------------------------- tasks end to end


def test_rephrase_transformers_end_to_end(tmp_path, tiny_model):
    make_docs(tmp_path / "docs.jsonl", 6)
    out = tmp_path / "out"
    stats = run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2, style="qa", max_new_tokens=4),
                backend_kwargs=dict(model=tiny_model, device="cpu"), model=tiny_model, batch_size=4)
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(f"doc-{i:03d}", g) for i in range(6) for g in range(2)]
    r = rows[0]
    assert r["task"] == "rephrase" and r["style"] == "qa" and r["model"] == tiny_model
    assert set(r["sampling"]) == {"temperature", "top_p", "max_new_tokens", "n", "seed"}
    assert r["sampling"]["n"] == 2 and r["sampling"]["max_new_tokens"] == 4 and r["sampling"]["temperature"] == 1.0
    assert r["prompt_version"].startswith("rephrase_qa/v1+") and r["truncated"] is False
    assert 1 <= r["completion_tokens"] <= 4 and isinstance(r["text"], str)
    run_stats = stats["run"]
    assert run_stats["requests"] == 6 and run_stats["completions"] == 12 and run_stats["failures"] == 0
    assert run_stats["remaining_units"] == 0
    total = json.loads((out / "stats.json").read_text())["totals"]
    assert total["rows_written"] == 12 and total["prompt_tokens"] > 0 and total["completion_tokens"] >= 12
    assert total["gpu_hours"] == 0.0 and total["wall_s"] > 0
    # A rerun finds nothing to do.
    again = run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2, style="qa", max_new_tokens=4),
                backend_kwargs=dict(model=tiny_model, device="cpu"), model=tiny_model)
    assert again["run"]["requests"] == 0 and len(read_rows(out)) == 12


def test_rationale_split_points_follow_the_training_tokenizer(tmp_path, tiny_model, tiny_tokenizer_path):
    docs = make_docs(tmp_path / "docs.jsonl", 4)
    docs.append({"id": "tiny", "text": "Al"})  # 1-2 tokens: G is capped at num_tokens - 1
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "out"
    run(out, [tmp_path / "docs.jsonl"], dict(task="rationale", generations=3, max_new_tokens=4),
        backend_kwargs=dict(model=tiny_model, device="cpu"), tokenizer=str(tiny_tokenizer_path))
    tok = load_tokenizer(tiny_tokenizer_path)
    rows = read_rows(out)
    for d in docs:
        n = len(tok.encode(d["text"]))
        splits = equal_token_split(n, 3)
        got = sorted((r for r in rows if r["source_id"] == d["id"]), key=lambda r: r["gen_index"])
        assert [r["split_index"] for r in got] == list(range(len(splits)))
        assert [r["split_token_offset"] for r in got] == splits
        assert all(r["num_splits"] == len(splits) and r["task"] == "rationale" for r in got)
        assert all(r["prompt_version"].startswith("rationale/v1+") for r in got)
        assert all(r["sampling"]["max_new_tokens"] == 4 and r["sampling"]["n"] == 1 for r in got)
    with pytest.raises(ValueError, match="needs --tokenizer"):
        run(tmp_path / "o2", [tmp_path / "docs.jsonl"], dict(task="rationale", generations=2),
            backend_kwargs=dict(model=tiny_model, device="cpu"))


def test_rationale_prompt_gets_prefix_and_suffix_of_the_split(tmp_path, tiny_tokenizer_path):
    docs = make_docs(tmp_path / "docs.jsonl", 3)
    FixedBackend.instances.clear()
    run(tmp_path / "out", [tmp_path / "docs.jsonl"], dict(task="rationale", generations=2),
        backend="fixed_test", tokenizer=str(tiny_tokenizer_path))
    tok = load_tokenizer(tiny_tokenizer_path)
    (backend,) = FixedBackend.instances
    for r in backend.requests:
        doc = next(d for d in docs if d["id"] == r.payload["source_id"])
        assert r.payload["prefix"] + r.payload["suffix"] == doc["text"]  # nothing lost, nothing added
        n_prefix = len(tok.encode(r.payload["prefix"]))
        assert n_prefix == equal_token_split(len(tok.encode(doc["text"])), 2)[r.payload["split_index"]]
        assert r.payload["prefix"] in r.messages[-1]["content"] and r.payload["suffix"] in r.messages[-1]["content"]


def test_maga_random_model_records_stage1_failure_and_retries_with_new_seed(tmp_path, tiny_model):
    make_docs(tmp_path / "docs.jsonl", 3)
    out = tmp_path / "out"
    task = dict(task="maga", max_new_tokens=4, pairs_max_new_tokens=6)
    stats = run(out, [tmp_path / "docs.jsonl"], task, backend_kwargs=dict(model=tiny_model, device="cpu"))
    assert read_rows(out) == []
    errors = [json.loads(x) for x in (out / ".synth/errors/shard-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(errors) == 3 and {e["stage"] for e in errors} == {"maga_pairs"}
    assert all(e["error"].startswith("ParseError:") and "raw" in e and e["attempt"] == 1 for e in errors)
    assert stats["run"]["failures"] == 3 and stats["run"]["counters"]["maga_pairs_unparseable"] == 3
    assert stats["run"]["remaining_units"] == 3 and not stats["complete"]
    run(out, [tmp_path / "docs.jsonl"], task, backend_kwargs=dict(model=tiny_model, device="cpu"))
    errors2 = [json.loads(x) for x in (out / ".synth/errors/shard-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(errors2) == 6 and [e["attempt"] for e in errors2[3:]] == [2, 2, 2]
    first = {e["request_id"]: e["seed"] for e in errors2[:3]}
    assert all(first[e["request_id"]] != e["seed"] for e in errors2[3:])  # a retry samples anew


def test_maga_stage2_judge_and_cleaning_with_fixed_backend(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 4)
    out = tmp_path / "out"
    FixedBackend.instances.clear()
    task = dict(task="maga", judge=True, maga_variant="strict", min_keyword_coverage=0.3)
    stats = run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test")
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(4)]
    for r in rows:
        doc = next(d for d in docs if d["id"] == r["source_id"])
        assert r["text"] == doc["text"]  # "Sure! Here is ..." and "I hope this helps!" removed
        assert r["boilerplate_removed"] == 2
        assert r["genre"] == f"Genre {r['gen_index'] + 1}" and r["audience"] == f"Audience {r['gen_index'] + 1}"
        assert r["judge_score"] == 4 and r["maga_variant"] == "strict" and r["keyword_coverage"] == 1.0
        assert r["prompt_version"].startswith("maga_reformulate_strict/v1+")
        assert r["pairs_prompt_version"].startswith("maga_pairs/v1+") and r["judge_prompt_version"].startswith("maga_judge/v1+")
        assert r["model"] == "fixed-model" and r["sampling"]["n"] == 1
    dropped = [json.loads(x) for x in (out / ".synth/dropped/shard-00000-of-00001.jsonl").read_text().splitlines()]
    assert sorted(keys(dropped)) == [(d["id"], 4) for d in docs]
    assert all(x["drop_reason"] == "low_keyword_coverage" and x["keyword_coverage"] < 0.3
               and x["min_keyword_coverage"] == 0.3 for x in dropped)
    assert stats["run"]["by_stage"] == {"maga_pairs": 4, "maga_reformulate": 20, "maga_judge": 16}
    assert stats["run"]["remaining_units"] == 0
    # Resume: stage-1 pairs are state, dropped outputs count as done: nothing is asked again.
    run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test")
    assert FixedBackend.instances[-1].requests == []


class _InterruptedAtStage2(FixedBackend):
    """Ctrl-C while stage 2 runs: stage 1 of the batch is done, its pairs are in the batch's output."""

    def generate(self, requests):
        if any(r.task == "maga_reformulate" for r in requests):
            raise KeyboardInterrupt
        return super().generate(requests)


def test_a_batch_stopped_midway_keeps_what_it_did(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 3)
    out = tmp_path / "out"
    task = TaskConfig(task="maga", generations=3)
    cfg = SynthRunConfig(inputs=[str(tmp_path / "docs.jsonl")], out=str(out), backend="fixed_test", progress=False)
    with pytest.raises(KeyboardInterrupt):
        synthesize(task, cfg, backend=_InterruptedAtStage2())
    assert len((out / ".synth/state/shard-00000-of-00001.jsonl").read_text().splitlines()) == 3  # stage-1 pairs
    stats = synthesize(task, cfg, backend=FixedBackend())
    assert "maga_pairs" not in stats["run"]["by_stage"]  # the pairs are not asked for again
    assert sorted(keys(read_rows(out))) == [(d["id"], g) for d in docs for g in range(3)]


def test_maga_unparseable_judge_keeps_row_without_score(tmp_path):
    make_docs(tmp_path / "docs.jsonl", 2)
    out = tmp_path / "out"
    run(out, [tmp_path / "docs.jsonl"], dict(task="maga", judge=True, min_keyword_coverage=0.0),
        backend="fixed_test", backend_kwargs=dict(judge_text="I liked it."))
    rows = read_rows(out)
    assert len(rows) == 10 and all(r["judge_score"] is None and "judge_error" in r for r in rows)


def test_maga_long_sources_are_chunked(tmp_path, tiny_tokenizer_path):
    make_docs(tmp_path / "docs.jsonl", 3, long_every=2)  # doc-000 and doc-002 are long
    out = tmp_path / "out"
    run(out, [tmp_path / "docs.jsonl"], dict(task="maga", generations=2, long_sources="chunk",
                                             max_source_tokens=150, min_keyword_coverage=0.0),
        backend="fixed_test", backend_kwargs=dict(
            pairs_text='{"genre_1": "Genre 1", "audience_1": "A", "genre_2": "Genre 2", "audience_2": "B"}'),
        tokenizer=str(tiny_tokenizer_path))
    rows = read_rows(out)
    long_rows = [r for r in rows if r["source_id"] == "doc-000"]
    chunks = {r["chunk_index"] for r in long_rows}
    assert len(chunks) > 1 and all(r["num_chunks"] == len(chunks) for r in long_rows)
    assert sorted(r["gen_index"] for r in long_rows) == list(range(2 * len(chunks)))
    assert all(r["gen_index"] == 2 * r["chunk_index"] + r["pair_index"] for r in long_rows)
    assert all(r["source_tokens"] <= 150 for r in long_rows)
    # the chunks, in order, are the document
    doc0 = json.loads((tmp_path / "docs.jsonl").read_text().splitlines()[0])["text"]
    by_chunk = {r["chunk_index"]: r["text"] for r in long_rows if r["pair_index"] == 0}
    assert "".join(by_chunk[k] for k in sorted(by_chunk)).replace("\n", "") == doc0.replace("\n", "")
    short = [r for r in rows if r["source_id"] == "doc-001"]
    assert len(short) == 2 and all("chunk_index" not in r for r in short)


def test_truncation_is_recorded(tmp_path, tiny_tokenizer_path):
    make_docs(tmp_path / "docs.jsonl", 4, long_every=2)
    out = tmp_path / "out"
    run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", max_source_tokens=40), backend="fixed_test",
        tokenizer=str(tiny_tokenizer_path))
    tok = load_tokenizer(tiny_tokenizer_path)
    docs = {json.loads(x)["id"]: json.loads(x)["text"] for x in (tmp_path / "docs.jsonl").read_text().splitlines()}
    for r in read_rows(out):
        n = len(tok.encode(docs[r["source_id"]]))
        assert r["truncated"] == (n > 40) and r["source_tokens"] == min(n, 40)


# ----------------------------------------------------------------------------- sharding, held-out


def test_shards_are_disjoint_and_complete(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 30)
    out = tmp_path / "out"
    for i in range(3):
        run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2), backend="fixed_test",
            shard=i, num_shards=3)
    per_shard = {}
    for i in range(3):
        f = out / f"shard-{i:05d}-of-00003.jsonl"
        per_shard[i] = {json.loads(x)["source_id"] for x in f.read_text().splitlines()}
        assert all(shard_of(s, 3) == i for s in per_shard[i])
        assert per_shard[i]  # 30 documents over 3 shards: none is empty
    assert sum(len(s) for s in per_shard.values()) == 30
    assert sorted(keys(read_rows(out))) == [(d["id"], g) for d in docs for g in range(2)]
    agg = json.loads((out / "stats.json").read_text())
    assert agg["shards"] == 3 and agg["shards_complete"] == 3 and agg["totals"]["rows_written"] == 60
    # a different shard count in the same directory would duplicate work: refused
    with pytest.raises(ValueError, match=r"split into 3 shards \(.synth/run.json\), this run into 4: .* "
                       r"\(fix: rerun with --num-shards 3"):
        run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2), backend="fixed_test",
            shard=0, num_shards=4)
    assert not (out / ".synth" / "locks" / "shard-00000-of-00004.lock").exists()  # the refused start left nothing


def test_another_shard_count_is_refused_by_its_files_and_locks_without_run_json(tmp_path):
    """A concurrent first start with another count (it holds its lock, run.json not written yet),
    or a directory whose run.json was lost: the shard files and locks name the count."""
    docs = make_docs(tmp_path / "docs.jsonl", 12)
    out = tmp_path / "out"
    other = ShardLock(ShardFiles.of(out, 1, 4).lock, "shard 1 of 4")
    other.acquire()  # a first start of 4 shards, still validating its input
    try:
        with pytest.raises(ValueError, match=r"split into 4 shards \(.synth/locks/shard-00001-of-00004.lock\), "
                           "this run into 2"):
            run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test", shard=0, num_shards=2)
    finally:
        other.discard()
    assert not any((out / ".synth" / "locks").glob("*-of-00002.lock"))
    run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test", shard=0, num_shards=2)
    (out / ".synth" / "run.json").unlink()  # lost: the rows file still names the count
    with pytest.raises(ValueError, match=r"split into 2 shards \(shard-00000-of-00002.jsonl\), this run into 1"):
        run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test")
    run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test", shard=1, num_shards=2)
    assert sorted(keys(read_rows(out))) == [(d["id"], 0) for d in docs]  # nothing twice, nothing lost


def test_the_old_config_name_still_works_and_warns():
    from megadoc_pl.synth import runner

    with pytest.warns(DeprecationWarning, match="use SynthRunConfig"):
        assert runner.RunConfig is SynthRunConfig


def test_shard_resolution_from_flags_and_environment():
    assert resolve_shard(2, 5, env={}) == (2, 5, "flags")
    assert resolve_shard(None, None, env={"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4",
                                          "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4, "slurm")
    assert resolve_shard(None, None, env={"RANK": "1", "WORLD_SIZE": "8"}) == (1, 8, "torchrun")
    assert resolve_shard(None, None, env={}) == (0, 1, "default")
    with pytest.raises(ValueError, match="out of range"):
        resolve_shard(3, 3, env={})
    with pytest.raises(ValueError, match="go together"):
        resolve_shard(1, None, env={})


def _write_split(path: Path, heldout: list[str]) -> None:
    path.write_text(json.dumps({"seed": 0, "heldout": heldout, "sets": {"iid": heldout, "long": [], "short": []}}))


def test_heldout_documents_are_refused(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 10)
    heldout = [d["id"] for d in docs[:3]]
    _write_split(tmp_path / "split.json", heldout)
    out = tmp_path / "out"
    stats = run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test",
                split_file=str(tmp_path / "split.json"))
    seeds = {r["source_id"] for r in read_rows(out)}
    assert seeds == {d["id"] for d in docs[3:]}
    assert stats["run"]["heldout_skipped"] == 3
    # a seed list made only of held-out documents is an error, not an empty run
    only = tmp_path / "only_heldout.jsonl"
    only.write_text("".join(json.dumps(d) + "\n" for d in docs[:3]))
    with pytest.raises(ValueError, match="all 3 input documents are held-out"):
        run(tmp_path / "out2", [only], dict(task="rephrase"), backend="fixed_test",
            split_file=str(tmp_path / "split.json"))


# ----------------------------------------------------------------------------- failures and resume


def test_failed_requests_are_recorded_and_retried_next_run(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 5)
    out = tmp_path / "out"
    task = dict(task="rephrase", generations=3)
    stats = run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test",
                backend_kwargs=dict(fail={"doc-002": 1}), batch_size=2)
    assert stats["run"]["failures"] == 1 and stats["run"]["remaining_units"] == 1
    errors = (out / ".synth/errors/shard-00000-of-00001.jsonl").read_text().splitlines()
    assert len(errors) == 1 and json.loads(errors[0])["source_id"] == "doc-002"
    assert {s for s, _ in keys(read_rows(out))} == {d["id"] for d in docs} - {"doc-002"}
    stats = run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test")
    assert stats["run"]["requests"] == 1 and stats["run"]["remaining_units"] == 0
    assert sorted(keys(read_rows(out))) == [(d["id"], g) for d in docs for g in range(3)]
    totals = json.loads((out / "stats.json").read_text())["totals"]
    assert totals["requests"] == 6 and totals["failures"] == 1 and totals["rows_written"] == 15


def test_torn_last_line_and_lost_rows_are_regenerated_once(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 6)
    out = tmp_path / "out"
    task = dict(task="rephrase", generations=3)
    run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test")
    f = out / "shard-00000-of-00001.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    # simulate a kill in the middle of writing: the last two rows lost, the third torn in half
    f.write_text("".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    FixedBackend.instances.clear()
    run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test")
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(3)]
    (req,) = FixedBackend.instances[-1].requests  # only the missing generations of one document
    assert req.n == 3 and req.id.endswith("|0,1,2")


def test_settings_mismatch_in_the_same_directory_is_refused(tmp_path):
    make_docs(tmp_path / "docs.jsonl", 2)
    out = tmp_path / "out"
    run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2), backend="fixed_test")
    with pytest.raises(ValueError, match=r"generations=2 \(now 3\).*use a new --out"):
        run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=3), backend="fixed_test")


def sigkill_after_rows(cmd: list[str], rows_file: Path, at_least: int) -> int:
    """Run ``cmd``, SIGKILL it once ``rows_file`` has ``at_least`` rows; returns the rows left."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny model: threads only contend
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if rows_file.exists() and rows_file.read_bytes().count(b"\n") >= at_least:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return rows_file.read_bytes().count(b"\n")


def test_sigkill_mid_run_then_resume_gives_every_generation_once(tmp_path, tiny_model):
    docs = make_docs(tmp_path / "docs.jsonl", 24)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "synthesize.py"), "--task", "rephrase", "--generations", "2",
           "--backend", "transformers", "--model", tiny_model, "--device", "cpu", "--max-new-tokens", "6",
           "--input", str(tmp_path / "docs.jsonl"), "--out", str(out), "--batch-size", "1", "--no-progress"]
    partial = sigkill_after_rows(cmd, out / "shard-00000-of-00001.jsonl", 8)
    assert 8 <= partial < 48
    # The same command again (bigger batches are allowed on resume), in-process to save a startup.
    assert cli_main(cmd[2:] + ["--batch-size", "8"]) == 0
    rows = read_rows(out)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(2)]  # each exactly once
    assert len(rows) == len(set(keys(rows)))
    totals = json.loads((out / "stats.json").read_text())["totals"]
    assert totals["rows_written"] == 48 and totals["units_done"] == 24  # recounted from the files


# ----------------------------------------------------------------------------- command line


def test_cli_exit_codes_and_one_line_errors(tmp_path, capsys):
    make_docs(tmp_path / "docs.jsonl", 3)
    out = tmp_path / "out"
    base = ["--task", "rephrase", "--backend", "fixed_test", "--input", str(tmp_path / "docs.jsonl"),
            "--out", str(out), "--no-progress"]
    assert cli_main(base + ["--generations", "2"]) == 0
    assert len(read_rows(out)) == 6
    assert cli_main(base[:-3] + [str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "missing.jsonl" in err
    assert cli_main(["--task", "rephrase", "--backend", "transformers", "--input", str(tmp_path / "docs.jsonl"),
                     "--out", str(tmp_path / "o3")]) == 1
    assert "needs --model" in capsys.readouterr().err
