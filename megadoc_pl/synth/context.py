"""What a task sees for one batch: backend calls with bookkeeping, and the batch's output."""

from __future__ import annotations

import time

from megadoc_pl.synth.backends.base import Backend, Request, Response, error_line
from megadoc_pl.synth.tasks import Unit

CALL_COUNTERS = ("requests", "completions", "failures", "prompt_tokens", "completion_tokens")


class BatchContext:
    """What a task sees for one batch (tasks.Context): backend calls with bookkeeping.

    Self-contained: it reads the slices of resume state the batch needs (stage-1 state, failed
    attempts, rows waiting for their judge) and collects everything the batch produced in plain
    lists, which the runner applies after the batch (``Runner._apply``) whether the batch ran in
    this process or on a Ray actor (``result`` is what travels back).
    """

    def __init__(self, backend: Backend, judge_backend: Backend, model: str, judge_model: str, task_name: str,
                 state: dict[str, dict], attempts: dict[str, int], judge_pending: dict[str, list[dict]],
                 teacher: dict | None = None) -> None:
        self.backend, self.judge_backend = backend, judge_backend
        self.model, self.judge_model, self.task_name = model, judge_model, task_name
        self.teacher = teacher
        self._state, self._attempts, self._pending = state, attempts, judge_pending
        self.new_state: dict[str, dict] = {}
        self.new_attempts: dict[str, int] = {}
        self.rows: list[dict] = []
        self.dropped: list[dict] = []
        self.errors: list[dict] = []
        self.judged: list[dict] = []  # judge results of rows kept earlier with judge_pending
        self.stats: dict[str, int] = {k: 0 for k in CALL_COUNTERS}
        self.by_stage: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.outcomes: list[str | None] = []  # per request, in order: its error or None (circuit breaker)

    @property
    def state(self) -> dict[str, dict]:
        return {**self._state, **self.new_state} if self.new_state else self._state

    def result(self) -> dict:
        return {k: getattr(self, k) for k in ("new_state", "new_attempts", "rows", "dropped", "errors", "judged",
                                              "stats", "by_stage", "counters", "outcomes")}

    def call(self, requests: list[Request], judge: bool = False) -> list[Response]:
        if not requests:
            return []
        backend = self.judge_backend if judge else self.backend
        try:
            responses = backend.generate(requests)
        except Exception as e:  # noqa: BLE001 - a broken backend call fails its requests, not the run
            responses = [Response(r.id, [], 0, [], error_line(e)) for r in requests]
        if len(responses) != len(requests):
            responses = [Response(r.id, [], 0, [], f"backend returned {len(responses)} responses for "
                                  f"{len(requests)} requests") for r in requests]
        stats = self.stats
        for req, resp in zip(requests, responses):
            stats["requests"] += 1
            self.by_stage[req.task] = self.by_stage.get(req.task, 0) + 1
            ok = resp.error is None and resp.request_id == req.id and len(resp.texts) == req.n
            if resp.error is None and not ok:
                resp.error = (f"backend answered request {resp.request_id!r} with {len(resp.texts)} "
                              f"texts for {req.id!r} with n={req.n}")
            stats["prompt_tokens"] += resp.prompt_tokens
            stats["completion_tokens"] += sum(resp.completion_tokens)
            if resp.error is not None:
                stats["failures"] += 1
                self.errors.append(self._error(req.id, req.payload.get("source_id"), req.task, resp.error,
                                               seed=req.seed))
            else:
                stats["completions"] += req.n
            self.outcomes.append(resp.error)
        return responses

    def _error(self, request_id: str, source_id: str | None, stage: str, error: str,
               raw: str | None = None, seed: int | None = None) -> dict:
        self.new_attempts[request_id] = self.new_attempts.get(request_id, 0) + 1
        e = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "request_id": request_id,
             "source_id": source_id, "task": self.task_name, "stage": stage, "error": error,
             "attempt": self.attempt(request_id), "seed": seed}
        if raw is not None:
            e["raw"] = raw[:2000]
        return e

    def attempt(self, request_id: str) -> int:
        return self._attempts.get(request_id, 0) + self.new_attempts.get(request_id, 0)

    def save_state(self, entries: list[dict]) -> None:
        for e in entries:
            self.new_state[e["key"]] = e

    def emit(self, row: dict) -> None:
        self.rows.append(row)

    def drop(self, row: dict, reason: str) -> None:
        self.dropped.append({**row, "drop_reason": reason})

    def fail(self, unit: Unit, stage: str, request_id: str, gen_indices: list[int], error: str,
             raw: str | None = None, seed: int | None = None) -> None:
        self.stats["failures"] += 1
        self.errors.append(self._error(request_id, unit.doc.id, stage, error, raw, seed))

    def count(self, name: str, k: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + k

    def judge_pending(self, unit: Unit) -> list[dict]:
        """Rows of this unit written earlier with ``judge_pending`` (their judge call failed)."""
        return self._pending.get(unit.key, [])

    def rejudged(self, row: dict, fields: dict) -> None:
        self.judged.append({"source_id": row["source_id"], "gen_index": row["gen_index"], **fields})
