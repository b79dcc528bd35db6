"""OpenAI-compatible HTTP backend (``vllm serve``, TGI, sglang, hosted APIs) on ``httpx``.

Each request is one POST to ``{base_url}/chat/completions`` with ``n`` completions, over one
pooled ``httpx.Client`` (keep-alive connections, separate connect and read timeouts). Requests run
on a bounded thread pool (``concurrency``); a request that times out, cannot connect, or gets 408,
409, 425, 429 or 5xx is retried with exponential backoff and jitter (``Retry-After`` in seconds
or as an HTTP date is honoured), up to ``max_retries`` times. Anything else, or running out of
retries, gives an error Response: the runner records it and retries on the next run.

Pre-flight (``preflight=True``, what ``tools/synthesize.py`` asks for): when the backend starts,
one ``GET {base_url}/models`` with a short timeout and no retries; a refused connection, a timeout,
a rejected key or an answer that is not an OpenAI model list is a one-line ``BadInput`` naming the
URL, at once, instead of every request retrying its way to the circuit breaker.

Fail fast: once a request of a ``generate`` call finds the server unreachable (after its
retries) or gets 401, 403 or 404 (bad key, unknown model or path), the requests of that call not
yet sent fail at once with the same error instead of each waiting out its own backoff; the
runner's circuit breaker then stops the run.

Servers report token usage per request, not per completion; with n > 1 the completion total is
split over the completions in proportion to their text length and flagged as an estimate
(``split_n=True`` asks n times for one completion: exact counts, no shared prompt).
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from megadoc_pl.errors import BadInput
from megadoc_pl.synth.backends.base import Request, Response, register_backend
from megadoc_pl.utils import require

_RETRY_STATUS = {408, 409, 425, 429}
_FATAL_STATUS = {401, 403, 404}  # the same answer for every request of the run
PREFLIGHT_TIMEOUT = 5.0  # seconds for the start's GET {base_url}/models


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(RuntimeError):
    """An error every other request would get too (unreachable server, unknown model, bad key)."""


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds to wait: delta-seconds or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


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
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        split_n: bool = False,
        extra_body: dict | None = None,
        preflight: bool = False,
    ) -> None:
        if not model:
            raise ValueError("the openai backend needs --model (the model name the server serves)")
        httpx = require("httpx", "openai", "the OpenAI-compatible HTTP backend")
        self._httpx = httpx
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model_name = model
        api_key = api_key if api_key is not None else os.environ.get(api_key_env)
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.split_n = bool(split_n)  # for servers without n > 1: n calls with n=1
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout, connect=min(float(connect_timeout), self.timeout)),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._fatal: str | None = None  # set by the first fatal error of a generate() call
        self._fatal_lock = threading.Lock()
        if preflight:
            try:
                self.check_server()
            except BaseException:
                self.client.close()
                raise

    def close(self) -> None:
        self.client.close()

    def check_server(self, timeout: float = PREFLIGHT_TIMEOUT) -> list[str]:
        """One ``GET {base_url}/models``, no retries: the ids of the models the server lists.

        Raises ``BadInput`` naming the URL when the server cannot be reached, does not answer in
        ``timeout`` seconds, rejects the key, or answers something other than an OpenAI model list.
        """
        httpx = self._httpx
        url = self.base_url + "/models"
        fix_url = "fix: check --base-url, e.g. http://HOST:8000/v1 for vllm serve, and that the server is up"
        try:
            resp = self.client.get(url, timeout=timeout)
        except httpx.TimeoutException:
            raise BadInput(f"{url} did not answer within {timeout:g}s ({fix_url})") from None
        except httpx.TransportError as e:
            raise BadInput(f"cannot reach {url}: {str(e) or type(e).__name__} ({fix_url})") from None
        if resp.status_code in (401, 403):
            raise BadInput(f"{url} refused the API key (HTTP {resp.status_code}) (fix: put the key in an "
                           "environment variable and name it with --api-key-env)")
        try:
            listed = resp.json()["data"] if resp.status_code == 200 else None
            models = [str(m["id"]) for m in listed]
        except (ValueError, TypeError, KeyError):
            models = None
        if models is None:
            detail = resp.text[:80].replace("\n", " ")
            raise BadInput(f"{url} is not an OpenAI-compatible server: HTTP {resp.status_code}, not a model list "
                           f"({detail!r}) ({fix_url})")
        return models

    # ------------------------------------------------------------------ one HTTP call

    def _post(self, body: dict) -> dict:
        httpx = self._httpx
        try:
            resp = self.client.post(self.url, json=body)
        except httpx.TimeoutException as e:
            raise _Retryable(f"timeout after {self.timeout:g}s from {self.url} ({type(e).__name__})") from None
        except httpx.ConnectError as e:
            raise _Retryable(f"cannot reach {self.url}: {e}") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection to {self.url} failed: {type(e).__name__}") from None
        if resp.status_code >= 400:
            detail = resp.text[:200].replace("\n", " ")
            msg = f"HTTP {resp.status_code} from {self.url}: {detail}"
            if resp.status_code in _RETRY_STATUS or resp.status_code >= 500:
                raise _Retryable(msg, retry_after_seconds(resp.headers.get("Retry-After")))
            raise (_Fatal if resp.status_code in _FATAL_STATUS else RuntimeError)(msg)
        try:
            return resp.json()
        except ValueError:
            raise RuntimeError(f"{self.url} answered with invalid JSON: {resp.text[:120]!r}") from None

    def _post_with_retries(self, body: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(body)
            except _Retryable as e:
                message = f"{e} (gave up after {attempt + 1} attempts)"
                if attempt == self.max_retries:
                    raise (_Fatal if str(e).startswith("cannot reach") else RuntimeError)(message) from None
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
        if self._fatal is not None:
            return Response(req.id, [], 0, [], self._fatal)  # not sent: it would fail the same way
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
            error = f"RuntimeError: {e}"[:500] if isinstance(e, _Fatal) else f"{type(e).__name__}: {e}"[:500]
            if isinstance(e, _Fatal):
                with self._fatal_lock:
                    self._fatal = self._fatal or error
            return Response(req.id, [], 0, [], error)

    def generate(self, requests: list[Request]) -> list[Response]:
        if not requests:
            return []
        self._fatal = None  # every call tries again (the server may be back)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))


register_backend("openai", OpenAIBackend)
