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
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from megadoc_pl.synth.backends.base import Request, Response, check_model_path, error_line, register_backend
from megadoc_pl.utils import require


def engine_kwargs(
    model: str,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    seed: int = 0,
    enable_prefix_caching: bool = True,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    trust_remote_code: bool = False,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Arguments of ``vllm.LLM(...)`` (``enable_prefix_caching`` and ``max_model_len`` are
    engine arguments that ``LLM`` forwards to ``EngineArgs``)."""
    kw: dict[str, Any] = dict(
        model=str(model),
        tensor_parallel_size=int(tensor_parallel_size),
        dtype=dtype,
        seed=int(seed),
        enable_prefix_caching=bool(enable_prefix_caching),
        gpu_memory_utilization=float(gpu_memory_utilization),
        trust_remote_code=bool(trust_remote_code),
    )
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


class VLLMBackend:
    name = "vllm"
    uses_gpu = True
    raw_completion = True  # continues Request.prompt_ids through LLM.generate

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        enable_prefix_caching: bool = True,
        gpu_memory_utilization: float = 0.9,
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
        self.engine_kwargs = engine_kwargs(
            model, tensor_parallel_size, dtype, seed, enable_prefix_caching,
            gpu_memory_utilization, max_model_len, trust_remote_code, engine_extra,
        )
        self.llm = vllm.LLM(**self.engine_kwargs)
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


register_backend("vllm", VLLMBackend)
