"""The generation-backend contract: requests in, responses out, backends found by name.

Every backend (vLLM, transformers, OpenAI-compatible HTTP, the demo's template generator) takes a
list of ``Request`` and returns one ``Response`` per request, in order. A backend never raises for
a single bad request: it returns a ``Response`` with ``error`` set, so the runner can record the
failure and retry it on the next run.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable


@dataclass
class Request:
    id: str  # unique per (source, task, stage, index)
    messages: list[dict]  # chat messages [{"role": "user", "content": ...}]
    n: int  # completions wanted for this prompt (G for rephrases)
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    task: str  # rephrase | rationale | maga_pairs | maga_reformulate | maga_judge | self_distill
    # Structured inputs (source text, style, prefix, suffix, genre, audience) so a backend that
    # does not read prompts (the demo's template generator) can still do the task.
    payload: dict = field(default_factory=dict)
    # Raw completion (task self_distill): token ids a base LM continues as they are, no chat
    # template; ``messages`` is then empty. Backends without a raw mode fail such a request.
    prompt_ids: list[int] | None = None


@dataclass
class Response:
    request_id: str
    texts: list[str]  # n completions (empty when error is set)
    prompt_tokens: int  # tokens in the rendered prompt (0 when the backend cannot tell)
    completion_tokens: list[int]  # tokens per completion
    error: str | None = None  # one line; the request is retried on the next run
    finish_reasons: list[str | None] = field(default_factory=list)  # per completion: "stop" (the
    # model ended it), "length" (cut at max_new_tokens), ...; [] when the backend cannot tell
    tokens_estimated: bool = False  # completion_tokens split from a per-request total, not counted


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(self, requests: list[Request]) -> list[Response]: ...


BackendFactory = Callable[..., Backend]

_REGISTRY: dict[str, BackendFactory] = {}

# Backends that live in modules of their own register themselves on import; importing the module
# lazily keeps heavy optional dependencies (vllm, torch for transformers) out of startup.
_LAZY_MODULES: dict[str, str] = {
    "vllm": "megadoc_pl.synth.backends.vllm_backend",
    "transformers": "megadoc_pl.synth.backends.hf",
    "openai": "megadoc_pl.synth.backends.openai_http",
    "template": "megadoc_pl.demo.template_backend",  # the demo's deterministic generator
}


def error_line(e: BaseException) -> str:
    """``Response.error`` for an exception: its type and the first line of its message (<= 500 chars)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def check_model_path(model: str) -> None:
    """A model given as a local path must exist (else hub loaders print a confusing repo-id error)."""
    m = str(model)
    if m.startswith(("/", "./", "../", "~")) and not Path(m).expanduser().exists():
        raise ValueError(f"--model {m}: no such model directory (fix: check the path)")


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``get_backend(name, **kwargs)`` call ``factory(**kwargs)``. Re-registering replaces."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def backend_factory(name: str) -> BackendFactory:
    """The factory registered under ``name`` (importing its module on first use)."""
    if name not in _REGISTRY and name in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown generation backend '{name}' (available: {', '.join(available_backends())})"
        )
    return _REGISTRY[name]


def get_backend(name: str, **kwargs) -> Backend:
    """Build the backend registered under ``name`` (importing its module on first use)."""
    factory = backend_factory(name)
    try:
        return factory(**kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"generation backend '{name}': {e} (fix: drop that --backend-arg/flag)") from None
