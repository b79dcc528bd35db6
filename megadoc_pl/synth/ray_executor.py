"""``--executor ray``: the runner's batches stream through Ray Data to actors that hold a backend.

An ``executors.Executor``. The driver (the runner, one process) stays the only reader of the
inputs and the only writer of the output directory. It works out the pending units exactly as
with the local executor (documents still missing some (source_id, gen_index)) and cuts them into
``worker.Batch``es, each with the slice of resume state it reads; ``RayExecutor.map`` packs each
into one row of a Ray Dataset. The Dataset goes through ``map_batches`` to ``GenerationWorker``, a
callable class: Ray Data starts ``--workers`` actors of it (``--worker-gpus`` GPUs each: vLLM gets
one actor per GPU, or per tensor-parallel group), each loading the backend (and judge) once
(``worker.BatchWorker``), and hands every actor the next row as soon as it has room (two in
flight: one running, one queued), so a slow node takes fewer batches. The driver reads the
results with ``iter_batches`` in completion order and writes them as it writes the local
executor's: the output layout, provenance, stats, resume and the exactly-once guarantee keyed by
(source_id, gen_index) are the same, because rows are written only by the driver and only for a
batch that came back whole.

Failures: an actor whose process dies is restarted by Ray (its backend reloaded) and the batch
it held is run again, up to ``RESTARTS`` times per batch; a batch that kills its actor more often
is one line (exit 1), and a rerun resumes. A backend that cannot load stops the run in one line
before anything is written (the constructor runs before the first result; nothing of a first
start is left behind). Killing the driver is killing a local run.

Why not ``ray.data.llm`` (its vLLM engine processor): see docs/synthesis.md, "Ray executor".
In short, its engine stage keeps only the first completion of a request (we ask vLLM for n = G
samples of one prompt), it has no finish reason, and it makes one LLM call per row, while maga
is three dependent calls per unit (pairs, reformulations, judge) whose intermediate state is
part of resume. The vLLM path is our own backend inside the actor: the same ``vllm.LLM`` engine
per GPU group that Ray Data LLM would start, driven by the same task code as the local runner.

Ray is an optional dependency (``pip install 'megadoc_pl[ray]'``), imported only here.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import socket
import time
import warnings
from typing import Generator, Iterable

from megadoc_pl.synth.backends.base import Backend
from megadoc_pl.synth.run_config import SynthRunConfig
from megadoc_pl.synth.tasks import Task, TaskConfig
from megadoc_pl.synth.worker import Backends, Batch, BatchResult, BatchWorker
from megadoc_pl.utils import require

RESTARTS = 3  # a batch whose actor dies is run again (on the restarted actor) this many times
IN_FLIGHT = 2  # batches per actor at once: one running, one queued so it never waits for the driver


class GenerationWorker:
    """Ray Data's callable class: one instance per actor holds a ``BatchWorker`` (the task, the
    backend and judge); each call runs the batches packed in its rows and returns their results."""

    def __init__(self, task_cfg: TaskConfig, cfg: SynthRunConfig) -> None:
        self.worker = BatchWorker.load(task_cfg, cfg)
        b = self.worker.backends
        self.info = {"model": b.model, "judge_model": b.judge_model, "worker": f"{socket.gethostname()}:{os.getpid()}"}

    def __call__(self, rows: dict) -> dict:
        import numpy as np

        out = []
        for item in rows["batch"]:
            result = self.worker.run(pickle.loads(item))
            if result.error is not None:
                raise result.error
            out.append(pickle.dumps((result, self.info)))
        return {"result": np.array(out, dtype=object)}


class RayExecutor:
    """Feeds the runner's batches through a Ray Data pipeline of ``GenerationWorker`` actors."""

    remote = True

    def __init__(self, task_cfg: TaskConfig, cfg: SynthRunConfig, task: Task | None = None,
                 backend: Backend | None = None, judge_backend: Backend | None = None) -> None:
        # task, backend, judge_backend: objects of this process; each actor builds its own from the configs
        self.ray = require("ray", "ray", "--executor ray")
        if cfg.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
        self.task_cfg, self.cfg = task_cfg, cfg
        self.started_ray = not self.ray.is_initialized()
        if self.started_ray:
            self.ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False,
                          configure_logging=False)
        # The driver's view of the backends: names from the flags until a worker reports its own.
        model = cfg.model or cfg.backend_kwargs.get("model") or cfg.backend
        self.backends = _RemoteBackends(None, None, model, cfg.judge_backend_kwargs.get("model") or model,
                                        cfg.backend, cfg.worker_gpus > 0)
        self.backends.worker_gpus = cfg.workers * cfg.worker_gpus
        self.batches_by_worker: dict[str, int] = {}
        self.first_result_at: float | None = None

    def map(self, batches: Iterable[Batch]) -> Generator[BatchResult, None, None]:
        """A result for every batch, in the order the actors finish them. The batches are packed
        before the pipeline starts (their units are disjoint, so the state a batch reads cannot
        change meanwhile), and the first result is awaited here: the actors have started and
        loaded the backend, or the start fails in one line before the runner writes anything."""
        results = self._results([{"batch": pickle.dumps(batch)} for batch in batches])
        first = next(results, None)
        self.first_result_at = time.perf_counter()

        def all_results():
            try:
                if first is not None:
                    yield first
                    yield from results
            finally:
                results.close()

        return all_results()

    def _results(self, items: list[dict]) -> Generator[BatchResult, None, None]:
        if not items:
            return
        ray, cfg = self.ray, self.cfg
        from ray.data import ActorPoolStrategy, DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False  # the runner has its own
        ctx.execution_options.preserve_order = False  # results in completion order: dynamic balancing
        ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block per batch
        del items
        with warnings.catch_warnings():  # Ray 2.60 deprecates remote args in map_batches, retries have no other knob
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(
                GenerationWorker, fn_constructor_args=(self.task_cfg, cfg), batch_size=1, batch_format="numpy",
                compute=ActorPoolStrategy(size=cfg.workers, max_tasks_in_flight_per_actor=IN_FLIGHT),
                num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus or None, **_retries(ds.map_batches))
        results = ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0)
        first = True
        try:
            for out in results:
                result, info = pickle.loads(out["result"][0])
                if first:  # the model names the backend itself reports
                    self.backends.model, self.backends.judge_model = info["model"], info["judge_model"]
                    first = False
                self.batches_by_worker[info["worker"]] = self.batches_by_worker.get(info["worker"], 0) + 1
                yield result
        except Exception as e:  # noqa: BLE001 - a worker that cannot load or keeps dying: one line
            raise ValueError(_one_line(e, first)) from None
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()

    def stats(self, start: float) -> dict:
        """How the batches spread over the actors (dynamic balancing), and the seconds until the
        first result (actors started, backend loaded, one batch)."""
        first = 0.0 if self.first_result_at is None else self.first_result_at - start
        return {"batches_by_worker": dict(self.batches_by_worker), "first_result_s": round(first, 3)}

    def close(self) -> None:
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()


def _retries(map_batches) -> dict:
    """Actors restart without limit (Ray Data's default) and a batch is retried ``RESTARTS`` times
    (Ray Data's default is forever: a batch that always kills its actor would never end the run),
    where this Ray still takes remote args in ``map_batches``."""
    takes_remote_args = any(p.kind is inspect.Parameter.VAR_KEYWORD
                            for p in inspect.signature(map_batches).parameters.values())
    return {"max_restarts": -1, "max_task_retries": RESTARTS} if takes_remote_args else {}


def _one_line(e: Exception, before_first: bool) -> str:
    """A failed Ray Data run as one line: the last line of what the worker raised (Ray puts the
    worker's traceback in the message of the exception the driver sees)."""
    cause = getattr(e, "cause", None)  # RayTaskError: the worker's own exception
    e = cause if isinstance(cause, BaseException) else e
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if not re.match(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b", last):
        last = f"{type(e).__name__}: {last}".rstrip(": ")
    what = "the Ray workers failed before the first batch came back" if before_first else "a Ray worker failed"
    if "(fix:" in last:
        return f"{what}: {last}"
    fix = ("check that --model, --tokenizer and --prompt-dir exist on every node" if before_first else
           f"a batch whose worker dies is run again {RESTARTS} times; check the worker logs, e.g. out of memory")
    return f"{what}: {last} (fix: {fix}; the logs are under /tmp/ray/session_latest/logs; rerun resumes)"


class _RemoteBackends(Backends):
    """The backends as the driver sees them: names only; GPUs are the actors'."""

    worker_gpus: float = 0.0

    def gpus(self) -> int:
        return int(self.worker_gpus)
