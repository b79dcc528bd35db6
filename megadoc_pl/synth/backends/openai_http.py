"""OpenAI-compatible HTTP backend (``vllm serve``, TGI, sglang, hosted APIs), standard library only.

Each request is one POST to ``{base_url}/chat/completions`` with ``n`` completions. Requests run
on a bounded thread pool (``concurrency``); a request that times out, cannot connect, or gets 429
or 5xx is retried with exponential backoff and jitter (``Retry-After`` is honoured), up to
``max_retries`` times. Anything else, or running out of retries, gives an error Response: the
runner records it and retries on the next run.

Servers report token usage per request, not per completion; with n > 1 the completion total is
split over the completions in proportion to their text length and flagged as an estimate
(``split_n=True`` asks n times for one completion: exact counts, no shared prompt).
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from megadoc_pl.synth.backends.base import Request, Response, register_backend

_RETRY_STATUS = {408, 409, 425, 429}


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def split_tokens(total: int, texts: list[str]) -> list[int]:
    """Split a completion-token total over completions by text length (sums exactly to total)."""
    if not texts:
        return []
    weights = [max(len(t), 1) for t in texts]
    shares = [total * w // sum(weights) for w in weights]
    for i in range(total - sum(shares)):
        shares[i % len(shares)] += 1
    return shares


class OpenAIBackend:
    name = "openai"

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        split_n: bool = False,
        extra_body: dict | None = None,
    ) -> None:
        if not model:
            raise ValueError("the openai backend needs --model (the model name the server serves)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.split_n = bool(split_n)  # for servers without n > 1: n calls with n=1
        self.extra_body = dict(extra_body or {})

    # ------------------------------------------------------------------ one HTTP call

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
            msg = f"HTTP {e.code} from {self.url}: {detail}"
            if e.code in _RETRY_STATUS or e.code >= 500:
                after = e.headers.get("Retry-After") if e.headers else None
                try:
                    retry_after = float(after) if after else None
                except ValueError:
                    retry_after = None
                raise _Retryable(msg, retry_after) from None
            raise RuntimeError(msg) from None
        except (TimeoutError, socket.timeout) as e:
            raise _Retryable(f"timeout after {self.timeout:g}s from {self.url}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"timeout after {self.timeout:g}s from {self.url}") from None
            raise _Retryable(f"cannot reach {self.url}: {e.reason}") from None
        except (ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"connection to {self.url} failed: {type(e).__name__}") from None

    def _post_with_retries(self, body: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except _Retryable as e:
                if attempt == self.max_retries:
                    raise RuntimeError(f"{e} (gave up after {attempt + 1} attempts)") from None
                delay = min(self.backoff * 2**attempt, self.max_backoff) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, self.max_backoff))
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _body(self, req: Request, n: int, seed: int | None) -> dict:
        body = dict(
            model=self.model_name,
            messages=req.messages,
            n=n,
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=req.max_new_tokens,
        )
        if seed is not None:
            body["seed"] = seed
        body.update(self.extra_body)
        return body

    def _one(self, req: Request) -> Response:
        try:
            if self.split_n:
                calls = [
                    self._body(req, 1, None if req.seed is None else req.seed + i) for i in range(req.n)
                ]
            else:
                calls = [self._body(req, req.n, req.seed)]
            texts: list[str] = []
            counts: list[int] = []
            reasons: list[str | None] = []
            prompt_tokens = 0
            for body in calls:
                reply = self._post_with_retries(body)
                choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
                got = [(c.get("message") or {}).get("content") or "" for c in choices]
                if len(got) != body["n"]:
                    raise RuntimeError(f"server returned {len(got)} choices for n={body['n']}")
                usage = reply.get("usage") or {}
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
                texts += got
                counts += split_tokens(int(usage.get("completion_tokens") or 0), got)
                reasons += [c.get("finish_reason") for c in choices]
            # usage is per call: with n > 1 in one call the per-completion counts are estimates
            return Response(req.id, texts, prompt_tokens, counts, finish_reasons=reasons,
                            tokens_estimated=len(calls) == 1 and req.n > 1)
        except Exception as e:  # noqa: BLE001 - recorded per request, never aborts the run
            return Response(req.id, [], 0, [], f"{type(e).__name__}: {e}"[:500])

    def generate(self, requests: list[Request]) -> list[Response]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))


register_backend("openai", OpenAIBackend)
