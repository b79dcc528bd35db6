"""The circuit breaker: a run stops when many requests in a row fail the same way."""

from __future__ import annotations

import re


class CircuitOpen(ValueError):
    """Too many consecutive requests failed the same way: the run stops instead of walking the shard."""


def failure_kind(error: str) -> str:
    """What the circuit breaker compares: the error with numbers masked, cut short (HTTP 404 and
    HTTP 400 from one server, or 'prompt of 5000 tokens' and 'of 6000 tokens', are one kind)."""
    return re.sub(r"\d+", "#", error)[:60]


class CircuitBreaker:
    """Counts consecutive failed requests of one kind (``failure_kind``); ``check`` raises
    CircuitOpen once there are ``limit`` of them (0: never)."""

    def __init__(self, limit: int) -> None:
        self.limit = int(limit)
        self.kind: str | None = None
        self.count = 0
        self.last = ""

    def record(self, error: str | None) -> None:
        if error is None:
            self.kind, self.count = None, 0
            return
        kind = failure_kind(error)
        self.count = self.count + 1 if kind == self.kind else 1
        self.kind, self.last = kind, error

    def check(self) -> None:
        if self.limit and self.count >= self.limit:
            raise CircuitOpen(
                f"stopped after {self.count} consecutive failed requests: {self.last} (fix: check the "
                "server, --model and --base-url, then rerun: failed requests are retried; "
                "--max-consecutive-failures 0 never stops)"
            )
