"""Generation at cluster scale (issue 14): every chunk reaches training, one writer per shard, a
failed start leaves nothing, exact stats after kills, --limit, finish reasons, the circuit
breaker, judge failures that keep their rows, near-duplicate samples, and sampling checked
before any request, and object storage (fsspec memory://, and S3 through s3fs against moto in
server mode). Real parts: the runner, the CLI, the token store and views, a local HTTP server, a
local S3 server, and a second process holding the shard lock."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadoc_pl.data.store_build import build_store
from megadoc_pl.data.views import ViewOptions, build_view
from megadoc_pl.synth import register_backend
from megadoc_pl.synth.cli import main as cli_main
from megadoc_pl.synth.outdir import ShardLock
from megadoc_pl.synth.breaker import CircuitOpen
from megadoc_pl.synth.runner import SynthRunConfig, Runner, synthesize
from megadoc_pl.synth.sharding import ShardFiles
from megadoc_pl.synth.tasks import TaskConfig, TokenCounter, chunk_ranges

from test_synth_backends import _Server
from test_synth_runner import FixedBackend, keys, make_docs, read_rows, run

SHARD = "shard-00000-of-00001"


def _argv(docs, out, *extra) -> list[str]:
    """A tools/synthesize.py command line: rephrase with the fixed-text test backend."""
    return ["--task", "rephrase", "--backend", "fixed_test", "--input", str(docs), "--out", str(out),
            "--no-progress", *extra]


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ----------------------------------------------------------------------------- chunked sources


def test_every_chunk_of_a_long_source_reaches_a_training_unit(tmp_path, tiny_tokenizer_path):
    docs = make_docs(tmp_path / "docs.jsonl", 6, long_every=3)  # doc-000 and doc-003 are long
    out = tmp_path / "gen"
    run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2, long_sources="chunk",
                                             max_source_tokens=150), backend="fixed_test",
        tokenizer=str(tiny_tokenizer_path))
    rows = read_rows(out)
    chunked = {r["source_id"] for r in rows if r.get("num_chunks", 1) > 1}
    assert {"doc-000", "doc-003"} <= chunked and "doc-001" not in chunked
    real = build_store(tmp_path / "docs.jsonl", tiny_tokenizer_path, tmp_path / "real", progress=False)
    synth = build_store(out / f"{SHARD}.jsonl", tiny_tokenizer_path, tmp_path / "synth", kind="generations",
                        progress=False)
    num_chunks = {r["source_id"]: r.get("num_chunks", 1) for r in rows}
    assert synth.num_documents == len(rows) == 2 * sum(num_chunks.values()) and len(num_chunks) == len(docs)
    for name in ("stitch", "rephrase"):
        units = build_view(real, synth, ViewOptions(view=name, generations=2))
        used = {int(units.piece_doc[k]) for k in range(units.num_pieces) if units.piece_src[k] == 1}
        assert used == set(range(synth.num_documents)), name  # every generated row is trained on
    # A stitch megadoc holds its chunks in order, G each, then the original.
    units = build_view(real, synth, ViewOptions(view="stitch", generations=2))
    for u in range(units.num_units):
        gens = [d for s, d, *_ in units.unit(u) if s == 1]
        sid = synth.source_id(gens[0])
        order = [(synth.meta(d).get("chunk_index", 0), synth.gen_index(d)) for d in gens]
        assert order == sorted(order) and len(gens) == 2 * max(1, synth.meta(gens[0]).get("num_chunks", 1))
        assert [p[0] for p in units.unit(u)][-1] == 0 and real.source_id(units.unit(u)[-1][1]) == sid
    # G=1 takes the first generation of every chunk, not the first of the source only.
    one = build_view(real, synth, ViewOptions(view="stitch", generations=1))
    per_source = {}
    for k in range(one.num_pieces):
        if one.piece_src[k] == 1:
            d = int(one.piece_doc[k])
            per_source.setdefault(synth.source_id(d), []).append(synth.meta(d).get("chunk_index", 0))
    assert all(per_source[s] == list(range(len(per_source[s]))) for s in per_source)
    assert len(per_source["doc-000"]) > 1 and len(per_source) == len(docs)


def test_no_chunk_is_shorter_than_the_minimum():
    # Paragraphs of 140 and 148 "tokens" (4 characters each) and a 5-token tail, budget 150: the
    # greedy cut leaves the tail alone; it must be merged and the pair re-cut.
    text = "\n\n".join(["abc " * 139 + "ab", "abc " * 147 + "ab", "abc " * 4 + "ab"])
    spans = TokenCounter().spans(text)
    ranges = chunk_ranges(text, spans, budget=150, min_tokens=18)
    sizes = [len(TokenCounter().spans(text[a:b])) for a, b in ranges]
    assert "".join(text[a:b] for a, b in ranges) == text and len(ranges) == 3
    assert all(18 <= n <= 151 for n in sizes), sizes  # (one token of slack: cuts fall on 4-char spans)
    assert ranges[0] == (0, text.index("\n\nabc") + 2)  # the first paragraph break is kept


def test_chunked_run_never_asks_for_a_tail_chunk(tmp_path):
    text = "\n\n".join(["abc " * 139 + "ab", "abc " * 147 + "ab", "abc " * 4 + "ab"])
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "long", "text": text}) + "\n")
    FixedBackend.instances.clear()
    run(tmp_path / "out", [tmp_path / "docs.jsonl"], dict(task="rephrase", long_sources="chunk", max_source_tokens=150),
        backend="fixed_test")
    requests = FixedBackend.instances[-1].requests
    assert len(requests) == 3 and all(len(r.payload["text"]) >= 18 * 4 for r in requests)
    with pytest.raises(ValueError, match="min-chunk-tokens"):
        TaskConfig(task="rephrase", long_sources="chunk", max_source_tokens=150, min_chunk_tokens=100)


# ----------------------------------------------------------------------------- locks and honest state


_HOLD = """
import sys, time
from pathlib import Path
from megadoc_pl.synth.outdir import ShardLock
lock = ShardLock(Path(sys.argv[1]), "shard")
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_of_the_same_shard_is_refused(tmp_path, capsys):
    make_docs(tmp_path / "docs.jsonl", 4)
    out = tmp_path / "out"
    files = ShardFiles.of(out, 0, 1)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(files.lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = _argv(tmp_path / "docs.jsonl", out)
        FixedBackend.instances.clear()
        assert cli_main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: shard 0 of 1 in") and f"pid {holder.pid}" in err[0]
        assert not files.rows.exists() and FixedBackend.instances == []  # refused before loading a model
    finally:
        holder.kill()
        holder.wait()
    assert cli_main(argv) == 0  # the kernel released the lock with the process
    assert len(read_rows(out)) == 4


def test_lock_is_per_shard(tmp_path):
    make_docs(tmp_path / "docs.jsonl", 8)
    out = tmp_path / "out"
    other = ShardLock(ShardFiles.of(out, 1, 2).lock, "shard 1")
    other.acquire()
    try:
        run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test", shard=0, num_shards=2)
        with pytest.raises(ValueError, match="shard 1 of 2 .* is being written by pid"):
            run(out, [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test", shard=1, num_shards=2)
    finally:
        other.release()
    assert read_rows(out)


def test_a_failed_start_leaves_nothing_behind(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    make_docs(tmp_path / "docs.jsonl", 3)
    out = tmp_path / "out"
    assert cli_main(_argv(tmp_path / "empty.jsonl", out, "-G", "2")) == 1
    assert "hold no documents" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()  # an existing (empty) directory stays, without .synth
    assert cli_main(_argv(tmp_path / "empty.jsonl", out, "-G", "2")) == 1
    assert list(out.iterdir()) == []
    # the corrected command (other settings too) starts afresh
    assert cli_main(_argv(tmp_path / "docs.jsonl", out, "-G", "3")) == 0
    assert len(read_rows(out)) == 9 and json.loads((out / ".synth/run.json").read_text())["generations"] == 3


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs (no handler catches BaseException)."""


def _run_killed_before_third_stats(monkeypatch, *args, **kw) -> None:
    """``run(*args, **kw)`` killed after its third batch wrote its rows, before their stats."""
    calls = {"n": 0}
    original = Runner._write_stats

    def write_stats(self, start, complete):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Killed()
        return original(self, start, complete)

    monkeypatch.setattr(Runner, "_write_stats", write_stats)
    try:
        with pytest.raises(_Killed):
            run(*args, **kw)
    finally:
        monkeypatch.setattr(Runner, "_write_stats", original)


def test_stats_are_exact_after_a_kill_between_rows_and_stats(tmp_path, monkeypatch):
    docs = make_docs(tmp_path / "docs.jsonl", 10)
    out = tmp_path / "out"
    task = dict(task="rephrase", generations=3)
    _run_killed_before_third_stats(monkeypatch, out, [tmp_path / "docs.jsonl"], task, backend="fixed_test",
                                   batch_size=2, backend_kwargs=dict(fail={"doc-001": 1}))
    assert len(read_rows(out)) == 5 * 3  # 3 batches of 2 documents, one request failed
    stats = run(out, [tmp_path / "docs.jsonl"], task, backend="fixed_test", batch_size=2)
    totals = json.loads((out / "stats.json").read_text())["totals"]
    assert len(read_rows(out)) == totals["rows_written"] == 30
    assert totals["failures"] == len(_lines(out / f".synth/errors/{SHARD}.jsonl")) == 1
    assert totals["units_done"] == len(docs) and stats["complete"]


def test_limit_exits_zero_when_the_limited_work_succeeded(tmp_path, capsys):
    make_docs(tmp_path / "docs.jsonl", 5)
    out = tmp_path / "out"
    argv = _argv(tmp_path / "docs.jsonl", out)
    assert cli_main(argv + ["--limit", "3"]) == 0
    assert "2 more units of this shard are not started" in capsys.readouterr().err
    assert len(read_rows(out)) == 3
    assert not json.loads((out / f".synth/stats/{SHARD}.json").read_text())["complete"]
    assert cli_main(argv + ["--limit", "3"]) == 0 and len(read_rows(out)) == 5
    assert json.loads((out / f".synth/stats/{SHARD}.json").read_text())["complete"]
    # a failure inside the limited work is still exit 2
    make_docs(tmp_path / "more.jsonl", 4)
    assert cli_main(_argv(tmp_path / "more.jsonl", tmp_path / "o2", "--limit", "2",
                          "--backend-arg", 'fail={"doc-000": 1}')) == 2


def test_finish_reason_and_token_counts_per_completion(tmp_path):
    from megadoc_pl.synth.tiny import build_tiny_chat_model

    from helpers import one_thread

    model = str(build_tiny_chat_model(tmp_path / "tiny"))
    make_docs(tmp_path / "docs.jsonl", 3)
    with one_thread():
        run(tmp_path / "out", [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=2, max_new_tokens=3),
            backend_kwargs=dict(model=model, device="cpu"), model=model)
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 6 and all(r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["completion_tokens"] == 3 for r in rows if r["finish_reason"] == "length")
    assert all(r["completion_tokens"] <= 3 for r in rows) and "completion_tokens_estimated" not in rows[0]


# ----------------------------------------------------------------------------- fail fast, keep work


def _openai_run(out, docs, base_url, model="tiny", **run_kw):
    cfg = SynthRunConfig(inputs=[str(docs)], out=str(out), backend="openai", progress=False,
                    backend_kwargs=dict(base_url=base_url, model=model, max_retries=1, backoff=0.01,
                                        concurrency=2, timeout=5), **run_kw)
    return synthesize(TaskConfig(task="rephrase"), cfg)


def test_circuit_breaker_stops_on_a_wrong_model_name(tmp_path, capsys):
    pytest.importorskip("httpx")  # the optional extra [openai]
    make_docs(tmp_path / "docs.jsonl", 30)
    server = _Server()
    try:
        server.script = ["404"] * 1000  # every request: unknown model
        with pytest.raises(CircuitOpen, match=r"stopped after 4 consecutive failed requests: .*HTTP 404"):
            _openai_run(tmp_path / "out", tmp_path / "docs.jsonl", server.url, model="nope", batch_size=2,
                        max_consecutive_failures=3)
        assert 2 <= len(server.calls) <= 4  # two batches at most, not the 30 documents of the shard
        assert len(_lines(tmp_path / f"out/.synth/errors/{SHARD}.jsonl")) == 4
        assert json.loads((tmp_path / "out/stats.json").read_text())["totals"]["failures"] == 4
        # the command line says it in one line
        server.script = ["404"] * 1000
        argv = ["--task", "rephrase", "--backend", "openai", "--base-url", server.url, "--model", "nope",
                "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o2"), "--no-progress",
                "--batch-size", "1", "--max-consecutive-failures", "2"]
        assert cli_main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: stopped after 2 consecutive failed requests")
    finally:
        server.close()


def test_circuit_breaker_stops_on_a_dead_server_and_ignores_scattered_failures(tmp_path):
    pytest.importorskip("httpx")  # the optional extra [openai]
    make_docs(tmp_path / "docs.jsonl", 30)
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    with pytest.raises(CircuitOpen, match="cannot reach"):
        _openai_run(tmp_path / "out", tmp_path / "docs.jsonl", f"http://127.0.0.1:{port}/v1", batch_size=4,
                    max_consecutive_failures=4)
    assert len(_lines(tmp_path / f"out/.synth/errors/{SHARD}.jsonl")) == 4
    assert time.perf_counter() - t0 < 30
    # failures between successes never trip it
    fail = {f"doc-{i:03d}": 1 for i in range(0, 30, 2)}
    stats = run(tmp_path / "o2", [tmp_path / "docs.jsonl"], dict(task="rephrase"), backend="fixed_test",
                backend_kwargs=dict(fail=fail), batch_size=1, max_consecutive_failures=2)
    assert stats["run"]["failures"] == 15 and stats["run"]["remaining_units"] == 15


def _maga(out, docs, judge_backend, max_consecutive_failures=8, **task_kw):
    cfg = SynthRunConfig(inputs=[str(docs)], out=str(out), backend="fixed_test", progress=False,
                    max_consecutive_failures=max_consecutive_failures)
    return synthesize(TaskConfig(task="maga", judge=True, min_keyword_coverage=0.0, **task_kw), cfg,
                      judge_backend=judge_backend)


def test_judge_failures_are_retried_on_their_own_and_never_discard_rows(tmp_path):
    make_docs(tmp_path / "docs.jsonl", 2)
    out = tmp_path / "out"
    # every judge request fails twice, then works: judged within the run, nothing regenerated
    flaky = FixedBackend(fail={f"doc-{d:03d}|maga_judge|{g}": 2 for d in range(2) for g in range(5)})
    stats = _maga(out, tmp_path / "docs.jsonl", flaky)
    rows = read_rows(out)
    assert len(rows) == 10 and all(r["judge_score"] == 4 and "judge_pending" not in r for r in rows)
    assert stats["run"]["by_stage"]["maga_reformulate"] == 10 and stats["run"]["by_stage"]["maga_judge"] == 30
    # a judge that is down: the 10 reformulations are kept, unjudged, and the breaker stops the run
    out2 = tmp_path / "out2"
    down = FixedBackend(fail={"maga_judge": 10**6})
    with pytest.raises(CircuitOpen, match="20 consecutive failed requests"):
        _maga(out2, tmp_path / "docs.jsonl", down, judge_attempts=2)
    rows = read_rows(out2)
    assert len(rows) == 10 and all(r["judge_score"] is None and r["judge_pending"] for r in rows)
    stats = _maga(out2, tmp_path / "docs.jsonl", down, max_consecutive_failures=0)
    assert stats["run"]["remaining_units"] == 2 and not stats["complete"]  # not finished until judged
    assert len(read_rows(out2)) == 10
    # the next run judges them (no reformulation asked again) and folds the scores into the rows
    judge = FixedBackend()
    FixedBackend.instances.clear()
    stats = _maga(out2, tmp_path / "docs.jsonl", judge)
    assert {r.task for r in judge.requests} == {"maga_judge"} and len(judge.requests) == 10
    assert all(r.task == "maga_judge" for b in FixedBackend.instances for r in b.requests)
    rows = read_rows(out2)
    assert sorted(keys(rows)) == [(f"doc-{d:03d}", g) for d in range(2) for g in range(5)]
    assert all(r["judge_score"] == 4 and "judge_pending" not in r for r in rows)
    assert stats["run"]["remaining_units"] == 0 and stats["complete"]
    assert _maga(out2, tmp_path / "docs.jsonl", FixedBackend())["run"]["requests"] == 0


class GreedyServer(FixedBackend):
    """A server that ignores temperature and seed: the G samples of a prompt are one text."""

    def _texts(self, r):
        return [f"The same rewrite of {r.payload['source_id']}. "] * r.n if r.task == "rephrase" else super()._texts(r)


register_backend("greedy_test", GreedyServer)


def test_near_identical_samples_are_counted_warned_and_optionally_rejected(tmp_path, capsys):
    make_docs(tmp_path / "docs.jsonl", 3)
    stats = run(tmp_path / "out", [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=3),
                backend="greedy_test")
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 9 and sum("near_duplicate_of" in r for r in rows) == 6
    assert all(r["near_duplicate_of"] == 0 for r in rows if r["gen_index"] > 0)
    assert stats["run"]["counters"]["near_duplicate_completions"] == 6
    assert "warning: 6 of 9 completions nearly repeat another sample" in capsys.readouterr().err
    run(tmp_path / "o2", [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=3, reject_duplicates=True),
        backend="greedy_test")
    assert sorted(keys(read_rows(tmp_path / "o2"))) == [(f"doc-{d:03d}", 0) for d in range(3)]
    dropped = _lines(tmp_path / f"o2/.synth/dropped/{SHARD}.jsonl")
    assert len(dropped) == 6 and {d["drop_reason"] for d in dropped} == {"near_duplicate"}
    assert "6 of 9 completions nearly repeat another sample of the same prompt, dropped" in capsys.readouterr().err
    # distinct samples raise nothing
    run(tmp_path / "o3", [tmp_path / "docs.jsonl"], dict(task="rephrase", generations=3), backend="fixed_test")
    assert "nearly repeat" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- checked up front


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "0", "-G", "3"], "--temperature 0 is greedy: the G=3 samples"),
    (["--temperature", "3"], "--temperature must be in [0, 2]"),
    (["--temperature", "-0.5"], "--temperature must be in [0, 2]"),
])
def test_sampling_is_validated_before_any_request(tmp_path, capsys, flags, message):
    make_docs(tmp_path / "docs.jsonl", 2)
    FixedBackend.instances.clear()
    assert cli_main(_argv(tmp_path / "docs.jsonl", tmp_path / "out", *flags)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert FixedBackend.instances == [] and not (tmp_path / "out").exists()


def test_greedy_is_fine_where_each_prompt_wants_one_sample(tmp_path):
    docs = make_docs(tmp_path / "docs.jsonl", 2)
    FixedBackend.instances.clear()
    assert cli_main(_argv(tmp_path / "docs.jsonl", tmp_path / "rephrase", "--temperature", "0", "-G", "1")) == 0
    maga = run(tmp_path / "maga", [tmp_path / "docs.jsonl"], dict(task="maga", temperature=0, generations=5),
               backend="fixed_test")  # G pairs, one completion per request
    assert sorted(keys(read_rows(tmp_path / "rephrase"))) == [(d["id"], 0) for d in docs]
    assert maga["run"]["remaining_units"] == 0 and maga["run"]["by_stage"] == {"maga_pairs": 2, "maga_reformulate": 10}
    requests = [r for b in FixedBackend.instances for r in b.requests]
    assert {(r.n, r.temperature) for r in requests} == {(1, 0.0)}


def test_object_storage_out_without_its_fsspec_package_is_one_line(tmp_path, capsys, monkeypatch):
    make_docs(tmp_path / "docs.jsonl", 2)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "s3fs", None)  # s3fs missing, installed or not
    assert cli_main(_argv("docs.jsonl", "s3://bucket/gen")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out s3://bucket/gen: cannot open s3:// URLs here" in err[0] and "s3fs" in err[0]
    assert cli_main(_argv("docs.jsonl", "nosuch://bucket/gen")) == 1
    assert "cannot open nosuch:// URLs" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]  # no local 's3:' folder
    assert cli_main(_argv("docs.jsonl", f"file://{tmp_path}/gen")) == 0
    assert len(read_rows(tmp_path / "gen")) == 2


def _memory_rows(url: str) -> list[dict]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return [json.loads(x) for p in sorted(fs.glob(f"{root}/shard-*/part-*.jsonl"))
            for x in fs.cat_file(p).decode().splitlines()]


def test_object_storage_round_trip_with_kills_failures_and_judge(tmp_path, monkeypatch, tiny_tokenizer_path):
    import fsspec

    docs = make_docs(tmp_path / "docs.jsonl", 10)
    url = f"memory://bucket/gen-{tmp_path.name}"
    task = dict(task="rephrase", generations=3)
    _run_killed_before_third_stats(monkeypatch, url, [tmp_path / "docs.jsonl"], task, backend="fixed_test",
                                   batch_size=2, backend_kwargs=dict(fail={"doc-001": 1}))
    assert len(_memory_rows(url)) == 15
    stats = run(url, [tmp_path / "docs.jsonl"], task, backend="fixed_test", batch_size=2)
    rows = _memory_rows(url)
    assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(3)]  # each exactly once
    fs, root = fsspec.core.url_to_fs(url)
    totals = json.loads(fs.cat_file(f"{root}/stats.json"))["totals"]
    assert totals["rows_written"] == 30 and totals["failures"] == 1 and stats["complete"]
    assert fs.exists(f"{root}/.synth/run.json") and len(fs.glob(f"{root}/.synth/errors/{SHARD}/part-*.jsonl")) == 1
    assert not (tmp_path / "memory:").exists()
    # the downloaded folder is a generation input as it is (parts read recursively, .synth hidden)
    fs.get(root, str(tmp_path / "down"), recursive=True)
    synth = build_store(tmp_path / "down", tiny_tokenizer_path, tmp_path / "store", kind="generations",
                        progress=False)
    assert synth.num_documents == 30
    # judge results are folded into the parts that hold the rows
    maga_url = f"memory://bucket/maga-{tmp_path.name}"
    fs.put(str(tmp_path / "docs.jsonl"), f"/bucket/in-{tmp_path.name}/docs/part-0.jsonl")  # inputs too
    cfg = SynthRunConfig(inputs=[f"memory://bucket/in-{tmp_path.name}/docs"], out=maga_url, backend="fixed_test", progress=False,
                    max_consecutive_failures=0)
    maga_task = TaskConfig(task="maga", judge=True, min_keyword_coverage=0.0)
    synthesize(maga_task, cfg, judge_backend=FixedBackend(fail={"maga_judge": 10**6}))
    assert all(r["judge_pending"] for r in _memory_rows(maga_url)) and len(_memory_rows(maga_url)) == 50
    assert synthesize(maga_task, cfg, judge_backend=FixedBackend())["complete"]
    assert all(r["judge_score"] == 4 and "judge_pending" not in r for r in _memory_rows(maga_url))


def test_s3_round_trip_on_a_local_s3_server(tmp_path, monkeypatch):
    """A real S3 API (moto in server mode on 127.0.0.1) through s3fs: rows, resume, stats."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import fsspec

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(k, "test")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}"})
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("gen-bucket")
        docs = make_docs(tmp_path / "docs.jsonl", 6)
        fs.put(str(tmp_path / "docs.jsonl"), "gen-bucket/docs/docs.jsonl")
        argv = _argv("s3://gen-bucket/docs/", "s3://gen-bucket/run1", "-G", "2", "--batch-size", "2")
        assert cli_main(argv + ["--backend-arg", 'fail={"doc-003": 1}']) == 2
        assert cli_main(argv) == 0
        fs.invalidate_cache()
        parts = fs.glob(f"gen-bucket/run1/{SHARD}/part-*.jsonl")
        rows = [json.loads(x) for p in parts for x in fs.cat_file(p).decode().splitlines()]
        assert sorted(keys(rows)) == [(d["id"], g) for d in docs for g in range(2)] and len(parts) == 4
        assert json.loads(fs.cat_file("gen-bucket/run1/stats.json"))["totals"]["rows_written"] == 12
        assert json.loads(fs.cat_file("gen-bucket/run1/.synth/run.json"))["inputs"] == ["s3://gen-bucket/docs/"]
    finally:
        server.stop()


def test_object_storage_shard_lease(tmp_path, monkeypatch, capsys):
    """One writer per shard on object storage: a lease object created exclusively, renewed while
    held, refused to a second writer (one line, exit 1 from the CLI, no model loaded), deleted on
    release, and taken over once a killed run's lease has expired."""
    import fsspec

    from megadoc_pl.synth import outdir

    fs = fsspec.filesystem("memory")
    path = f"/locks-{tmp_path.name}/shard.lock"
    first = outdir.LeaseLock(fs, path, "shard 0 of 1 in memory://x", lease=0.3)
    first.acquire()
    try:
        time.sleep(0.5)  # past the lease: renewals keep it held
        second = outdir.LeaseLock(fs, path, "shard 0 of 1 in memory://x", lease=0.3)
        with pytest.raises(outdir.ShardBusy, match=r"^shard 0 of 1 in memory://x is being written by pid \d+ on .* "
                                                    r"\(lease until .*\) \(fix: wait for that run to end"):
            second.acquire()
    finally:
        first.release()
    assert not fs.exists(path)  # released: the object is gone
    second.acquire()  # and the shard is free
    second._stop.set()  # a killed run: no renewal, no release
    second._thread.join()
    time.sleep(0.35)
    third = outdir.LeaseLock(fs, path, "shard 0 of 1 in memory://x", lease=0.3)
    third.acquire()  # the expired lease is taken over
    assert json.loads(fs.cat_file(path))["token"] == third.token
    third.release()
    second.release()  # a late release of a lease that is no longer its own deletes nothing
    assert not fs.exists(path)

    # through the CLI: a second writer of a shard whose lease is held is refused before any request
    docs = make_docs(tmp_path / "docs.jsonl", 4)
    url = f"memory://bucket/lease-{tmp_path.name}"
    holder = outdir.LeaseLock(fs, f"/bucket/lease-{tmp_path.name}/.synth/locks/{SHARD}.lock", "held by a test")
    holder.acquire()
    try:
        assert cli_main(_argv(tmp_path / "docs.jsonl", url, "-G", "2")) == 1
        assert "is being written by pid" in capsys.readouterr().err
        assert not _memory_rows(url)
    finally:
        holder.release()
    assert cli_main(_argv(tmp_path / "docs.jsonl", url, "-G", "2")) == 0
    assert sorted(keys(_memory_rows(url))) == [(d["id"], g) for d in docs for g in range(2)]
    assert not fs.glob(f"/bucket/lease-{tmp_path.name}/.synth/locks/*")  # released at the end
