"""Generation backends: registry, transformers (tiny local model), OpenAI HTTP (local server),
and a vLLM contract test against vLLM's documented API."""

from __future__ import annotations

import inspect
import json
import shutil
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from megadoc_pl.errors import BadInput, MissingDependency
from megadoc_pl.synth import Request, Response, get_backend, register_backend
from megadoc_pl.synth.backends import openai_http, vllm_backend
from megadoc_pl.synth.backends.openai_http import OpenAIBackend, split_tokens
from megadoc_pl.synth.cli import main as cli_main
from megadoc_pl.synth.tiny import build_tiny_chat_model

from helpers import one_thread


def req(rid: str, content: str, n: int = 1, max_new: int = 8, temperature: float = 1.0, seed: int | None = 0):
    return Request(rid, [{"role": "user", "content": content}], n, max_new, temperature, 1.0, seed, "rephrase",
                   {"text": content})


# ----------------------------------------------------------------------------- registry


def test_registry_builds_registered_backend_and_rejects_unknown():
    class Echo:
        name = "echo"

        def __init__(self, suffix: str = "!"):
            self.suffix = suffix

        def generate(self, requests):
            return [Response(r.id, [r.payload["text"] + self.suffix] * r.n, 1, [1] * r.n) for r in requests]

    register_backend("echo_test", Echo)
    backend = get_backend("echo_test", suffix="?")
    assert backend.generate([req("a", "hi", n=2)])[0].texts == ["hi?", "hi?"]
    with pytest.raises(ValueError, match="unknown generation backend 'nope'.*echo_test"):
        get_backend("nope")


# ----------------------------------------------------------------------------- transformers


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat")))


@pytest.fixture(scope="module")
def hf_backend(tiny_model):
    return get_backend("transformers", model=tiny_model, device="cpu", batch_size=3)


PROMPTS = ["hi", "Alice founded the town of Brindle in 1821 and built", "x" * 40,
           "The genre is a story; the audience", "mill river town"]


def test_transformers_batched_left_padded_greedy_equals_one_by_one(hf_backend):
    # Oracle: each prompt generated alone (no padding) gives the same greedy tokens.
    reqs = [req(f"r{i}", t, temperature=0.0, max_new=10) for i, t in enumerate(PROMPTS)]
    batched = hf_backend.generate(reqs)
    for r, got in zip(reqs, batched):
        alone = hf_backend.generate([r])[0]
        assert got.request_id == r.id and got.error is None
        assert got.texts == alone.texts
        assert got.completion_tokens == alone.completion_tokens
        assert got.prompt_tokens == alone.prompt_tokens
        # prompt tokens are the chat-template rendering, without padding
        rendered = hf_backend.render(r.messages)
        assert got.prompt_tokens == len(hf_backend.tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_transformers_n_samples_grouping_and_seeds(hf_backend):
    reqs = [req("a", PROMPTS[0], n=3, max_new=6, seed=1), req("b", PROMPTS[1], n=1, max_new=4, seed=2),
            req("c", PROMPTS[2], n=2, max_new=6, seed=3)]
    out = hf_backend.generate(reqs)
    assert [o.request_id for o in out] == ["a", "b", "c"]  # order kept across groups
    assert [len(o.texts) for o in out] == [3, 1, 2]
    assert all(1 <= c <= 6 for c in out[0].completion_tokens)
    assert all(1 <= c <= 4 for c in out[1].completion_tokens)
    again = hf_backend.generate(reqs)
    assert [o.texts for o in again] == [o.texts for o in out]  # seeded sampling is reproducible


def test_transformers_batch_failure_becomes_per_request_error(hf_backend, monkeypatch):
    original = hf_backend._generate_batch

    def flaky(batch, prompts):
        if any(r.id == "bad" for r in batch):
            raise RuntimeError("simulated out of memory\nsecond line")
        return original(batch, prompts)

    monkeypatch.setattr(hf_backend, "_generate_batch", flaky)
    out = hf_backend.generate([req("ok1", "a"), req("bad", "b"), req("ok2", "c")])
    assert [o.error is None for o in out] == [True, False, True]
    assert out[1].error == "RuntimeError: simulated out of memory"


def test_a_tokenizer_without_chat_template_is_one_line(tiny_model, tmp_path, capsys):
    model = tmp_path / "no_template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(BadInput, match=r"has no chat template \(fix: use an instruct model"):
        get_backend("transformers", model=str(model), device="cpu")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "a", "text": "Some text."}) + "\n")
    argv = ["--task", "rephrase", "--backend", "transformers", "--model", str(model), "--device", "cpu",
            "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the tokenizer of {model} has no chat template (fix: ")


# ----------------------------------------------------------------------------- OpenAI HTTP


class _Server:
    """A tiny OpenAI-compatible /v1/chat/completions server with scripted failures."""

    def __init__(self):
        self.calls: list[dict] = []
        self.script: list[str] = []  # per call: "ok" | "500" | "429" | "400" | "404" | "slow"
        self.gets: list[str] = []  # paths of GET requests (the pre-flight's /v1/models)
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                with outer.lock:
                    outer.gets.append(self.path)
                found = self.path == "/v1/models"
                data = json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]} if found
                                  else {"error": "not found"}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.calls.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    action = outer.script.pop(0) if outer.script else "ok"
                try:
                    if action == "slow":
                        time.sleep(1.5)
                    if action in ("500", "429", "400", "404"):
                        self.send_response(int(action))
                        if action == "429":
                            self.send_header("Retry-After", "0")
                        self.end_headers()
                        self.wfile.write(b'{"error": "scripted"}')
                        return
                    n = body.get("n", 1)
                    last = body["messages"][-1]["content"]
                    reply = {
                        "choices": [{"index": i, "message": {"role": "assistant", "content": f"{last}#{i}"},
                                     "finish_reason": "length" if i == 0 else "stop"}
                                    for i in reversed(range(n))],  # out of order on purpose
                        "usage": {"prompt_tokens": 7, "completion_tokens": 5 * n},
                    }
                    data = json.dumps(reply).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    pytest.importorskip("httpx")  # the optional extra [openai]
    s = _Server()
    yield s
    s.close()


def _client(server, **kw):
    defaults = dict(base_url=server.url, model="tiny", api_key="k", concurrency=4, timeout=5.0,
                    max_retries=3, backoff=0.01, max_backoff=0.05)
    return OpenAIBackend(**{**defaults, **kw})


def test_openai_request_shape_and_choices(server):
    backend = _client(server)
    out = backend.generate([req("a", "hello", n=3, max_new=9, seed=11), req("b", "bye", n=1)])
    assert out[0].texts == ["hello#0", "hello#1", "hello#2"]  # sorted by choice index
    assert out[0].prompt_tokens == 7 and sum(out[0].completion_tokens) == 15
    assert out[0].finish_reasons == ["length", "stop", "stop"] and out[0].tokens_estimated  # split of a total
    assert out[1].texts == ["bye#0"] and out[1].error is None and not out[1].tokens_estimated
    bodies = sorted((c["body"] for c in server.calls), key=lambda b: b["n"], reverse=True)
    assert bodies[0] == {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "n": 3,
                         "temperature": 1.0, "top_p": 1.0, "max_tokens": 9, "seed": 11}
    assert all(c["path"] == "/v1/chat/completions" and c["auth"] == "Bearer k" for c in server.calls)


def test_openai_retries_after_500_and_429(server):
    server.script = ["500", "429", "ok"]
    out = _client(server, concurrency=1).generate([req("a", "x")])
    assert out[0].error is None and out[0].texts == ["x#0"]
    assert len(server.calls) == 3


def test_openai_retries_after_timeout(server):
    server.script = ["slow", "ok"]
    out = _client(server, timeout=0.5, concurrency=1).generate([req("a", "x")])
    assert out[0].error is None and out[0].texts == ["x#0"]
    assert len(server.calls) == 2


def test_openai_gives_up_and_does_not_retry_client_errors(server):
    server.script = ["500"] * 10
    out = _client(server, max_retries=2, concurrency=1).generate([req("a", "x")])
    assert out[0].texts == [] and "HTTP 500" in out[0].error and "3 attempts" in out[0].error
    assert len(server.calls) == 3
    server.calls.clear()
    server.script = ["400"]
    out = _client(server, concurrency=1).generate([req("b", "y")])
    assert "HTTP 400" in out[0].error and len(server.calls) == 1


def test_openai_split_n_and_unreachable_server(server):
    out = _client(server, split_n=True).generate([req("a", "x", n=2, seed=5)])
    assert out[0].texts == ["x#0", "x#0"] and not out[0].tokens_estimated  # one usage per completion
    assert sorted(c["body"]["seed"] for c in server.calls) == [5, 6]
    dead = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, backoff=0.01, timeout=1)
    out = dead.generate([req("a", "x")])
    assert out[0].error is not None and "cannot reach" in out[0].error


def test_openai_fails_fast_on_unknown_model_and_dead_server(server, monkeypatch):
    server.script = ["404"] * 10
    backend = _client(server, concurrency=1)
    out = backend.generate([req(f"r{i}", "x") for i in range(5)])
    assert len(server.calls) == 1  # the other four are not sent: they would get the same 404
    assert len({o.error for o in out}) == 1 and "HTTP 404" in out[0].error
    server.script = []
    assert backend.generate([req("again", "x")])[0].error is None  # the next call tries again
    sleeps = []
    monkeypatch.setattr(openai_http.time, "sleep", sleeps.append)
    dead = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m", max_retries=2, backoff=0.01, concurrency=1)
    out = dead.generate([req(f"r{i}", "x") for i in range(3)])
    assert len(sleeps) == 2 and all("cannot reach" in o.error and "3 attempts" in o.error for o in out)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound, then closed: nobody listens there (connection refused)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synth_argv(tmp_path, base_url: str) -> list[str]:
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Alice built mill {i} in Brindle."}) + "\n"
                            for i in range(3)))
    return ["--task", "rephrase", "--backend", "openai", "--base-url", base_url, "--model", "tiny",
            "--input", str(docs), "--out", str(tmp_path / "out"), "--no-progress"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_openai_preflight_refuses_a_closed_port_in_one_line_without_retries(tmp_path, monkeypatch, capsys):
    pytest.importorskip("httpx")  # the optional extra [openai]
    sleeps = []
    monkeypatch.setattr(openai_http.time, "sleep", sleeps.append)  # a retry would back off first
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    capsys.readouterr()
    assert cli_main(_synth_argv(tmp_path, url)) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"error: cannot reach {url}/models: ") and "Connection refused" in line, line
    assert line.endswith("(fix: check --base-url, e.g. http://HOST:8000/v1 for vllm serve, and that the server is up)")
    assert sleeps == [] and not (tmp_path / "out").exists()  # no retry, nothing written


def test_openai_preflight_refuses_a_server_that_is_not_openai_compatible(tmp_path, capsys):
    pytest.importorskip("httpx")  # the optional extra [openai]
    import functools

    (tmp_path / "site").mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(tmp_path / "site")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"  # a web server, and /v1 forgotten
        capsys.readouterr()
        assert cli_main(_synth_argv(tmp_path, url)) == 1
        line = _one_error_line(capsys)
        assert line.startswith(f"error: {url}/models is not an OpenAI-compatible server: HTTP 404, not a model list"), line
        assert "(fix: check --base-url, e.g. http://HOST:8000/v1" in line
        assert not (tmp_path / "out").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_openai_preflight_passes_a_real_server_once_and_the_run_keeps_its_retries(server, tmp_path, capsys):
    server.script = ["500", "ok"]  # a transient error during the run is still retried
    assert cli_main(_synth_argv(tmp_path, server.url) + ["--batch-size", "1", "--max-retries", "2"]) == 0
    assert server.gets == ["/v1/models"]  # one pre-flight, then only generation requests
    assert [c["path"] for c in server.calls] == ["/v1/chat/completions"] * 4  # 3 documents + 1 retry
    rows = [json.loads(x) for x in (tmp_path / "out" / "shard-00000-of-00001.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert _client(server).check_server() == ["tiny"]


def test_retry_after_as_seconds_or_http_date():
    assert openai_http.retry_after_seconds("2.5") == 2.5
    assert openai_http.retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert openai_http.retry_after_seconds("soon") is None and openai_http.retry_after_seconds(None) is None


def test_httpx_missing_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(MissingDependency, match=r"pip install 'megadoc_pl\[openai\]'"):
        OpenAIBackend(model="m")


def test_split_tokens_sums_exactly():
    assert split_tokens(10, ["a", "bbb"]) == [3, 7]  # 2 + 7 by length, remainder to the first
    assert sum(split_tokens(11, ["a", "b", "c"])) == 11
    assert split_tokens(5, []) == []


# ----------------------------------------------------------------------------- vLLM contract

# Parameter names from vLLM's documented API (docs.vllm.ai: "LLM Class", "Sampling Parameters",
# "Engine Arguments"; vllm/entrypoints/llm.py LLM.__init__ / LLM.chat).
DOC_LLM_INIT = {"model", "task", "tokenizer", "tokenizer_mode", "skip_tokenizer_init", "trust_remote_code",
                "tensor_parallel_size", "dtype", "quantization", "revision", "tokenizer_revision", "seed",
                "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager",
                "max_seq_len_to_capture", "disable_custom_all_reduce", "hf_overrides", "compilation_config"}
DOC_ENGINE_ARGS = {"enable_prefix_caching", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
                   "pipeline_parallel_size", "disable_log_stats"}
DOC_SAMPLING = {"n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens",
                "min_tokens", "logprobs", "skip_special_tokens"}
DOC_CHAT = {"messages", "sampling_params", "use_tqdm", "lora_request", "chat_template",
            "chat_template_content_format", "add_generation_prompt", "continue_final_message", "tools",
            "chat_template_kwargs", "mm_processor_kwargs"}


def _fake_vllm(fail_on: str | None = None):
    """A stand-in module whose classes accept exactly the documented keywords."""
    calls = {"init": [], "chat": []}

    class SamplingParams:
        def __init__(self, **kw):
            unknown = set(kw) - DOC_SAMPLING
            assert not unknown, f"undocumented SamplingParams args {unknown}"
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            unknown = set(kw) - DOC_LLM_INIT - DOC_ENGINE_ARGS
            assert not unknown, f"undocumented LLM/engine args {unknown}"
            calls["init"].append(kw)

        def chat(self, messages, **kw):
            unknown = set(kw) - DOC_CHAT
            assert not unknown, f"undocumented chat args {unknown}"
            calls["chat"].append({"messages": messages, **kw})
            params = kw["sampling_params"]
            assert isinstance(messages, list) and all(isinstance(m, list) for m in messages)
            assert isinstance(params, list) and len(params) == len(messages)
            outs = []
            for conv, sp in zip(messages, params):
                content = conv[-1]["content"]
                if fail_on is not None and fail_on in content:
                    raise ValueError("prompt longer than max_model_len")
                completions = [types.SimpleNamespace(text=f"{content}:{i}", token_ids=list(range(i + 1)))
                               for i in range(sp.kw["n"])]
                outs.append(types.SimpleNamespace(prompt_token_ids=[0] * len(content), outputs=completions))
            return outs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams), calls


def test_vllm_backend_calls_match_documented_api(tmp_path):
    fake, calls = _fake_vllm()
    backend = vllm_backend.VLLMBackend(str(tmp_path), tensor_parallel_size=2, dtype="bfloat16", seed=7,
                                       max_model_len=8192, vllm_module=fake)
    assert calls["init"] == [dict(model=str(tmp_path), tensor_parallel_size=2, dtype="bfloat16", seed=7,
                                  enable_prefix_caching=True, gpu_memory_utilization=0.9,
                                  trust_remote_code=False, max_model_len=8192)]
    reqs = [req("a", "hello", n=4, max_new=1024, seed=3), req("b", "bye", n=1, max_new=512, temperature=0.0, seed=None)]
    out = backend.generate(reqs)
    (call,) = calls["chat"]
    assert call["messages"] == [r.messages for r in reqs]  # chat messages, one conversation per request
    assert call["use_tqdm"] is False
    assert [sp.kw for sp in call["sampling_params"]] == [
        dict(n=4, temperature=1.0, top_p=1.0, max_tokens=1024, seed=3),
        dict(n=1, temperature=0.0, top_p=1.0, max_tokens=512),
    ]
    assert out[0].texts == ["hello:0", "hello:1", "hello:2", "hello:3"]
    assert out[0].completion_tokens == [1, 2, 3, 4] and out[0].prompt_tokens == 5
    assert out[1].texts == ["bye:0"]


def test_vllm_one_bad_prompt_fails_only_its_request():
    fake, calls = _fake_vllm(fail_on="TOO_LONG")
    backend = vllm_backend.VLLMBackend("m", vllm_module=fake)
    out = backend.generate([req("a", "fine"), req("b", "TOO_LONG"), req("c", "also fine")])
    assert [o.error is None for o in out] == [True, False, True]
    assert out[1].error == "ValueError: prompt longer than max_model_len"
    assert out[2].texts == ["also fine:0"]


def test_vllm_kwargs_against_installed_vllm_signatures():
    vllm = pytest.importorskip("vllm")
    params = inspect.signature(vllm.LLM.__init__).parameters
    kw = vllm_backend.engine_kwargs("m", max_model_len=4096)
    named = {k for k, p in params.items() if p.kind is not p.VAR_KEYWORD}
    engine_fields = set(inspect.signature(vllm.EngineArgs).parameters)
    assert set(kw) <= named | engine_fields
    vllm.SamplingParams(**vllm_backend.sampling_kwargs(req("a", "x", n=3, seed=1)))
    assert set(DOC_CHAT - {"messages"}) & set(inspect.signature(vllm.LLM.chat).parameters)


def test_vllm_missing_model_dir_is_a_one_line_error(tmp_path):
    fake, _ = _fake_vllm()
    with pytest.raises(ValueError, match="no such model directory"):
        vllm_backend.VLLMBackend(str(tmp_path / "absent"), vllm_module=fake)


def test_vllm_missing_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(MissingDependency, match=r"pip install 'megadoc_pl\[generation\]'"):
        vllm_backend.VLLMBackend("m")


# ----------------------------------------------------------------------------- end-to-end self-check


def test_selfcheck_passes_with_transformers_backend(tmp_path, hf_backend, tiny_model):
    # The check that tools/gpu_vllm_check.py runs with vLLM, here with transformers on CPU.
    from megadoc_pl.synth.selfcheck import run_selfcheck

    report = run_selfcheck(hf_backend, tmp_path, f"{tiny_model}/tokenizer.json", tiny_model,
                           docs=4, generations=2, max_new_tokens=4)
    assert report["rephrase"]["rows"] == 0  # the second rephrase run found everything done
    assert report["rationale"]["rows"] == 8
    assert report["maga"]["stage1_failures"] == 4  # a random model cannot write the JSON


@pytest.mark.gpu
def test_vllm_for_real_on_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "gpu_vllm_check.py"
    proc = subprocess.run([sys.executable, str(tool), "--workdir", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
