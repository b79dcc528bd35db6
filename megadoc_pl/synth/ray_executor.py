"""``--executor ray``: the runner's batches on a pool of Ray actors, each holding one backend.

The driver (the runner, one process) stays the only reader of the inputs and the only writer of
the output directory. It finds the pending units exactly as the local runner does, sends each
batch with the slice of resume state it reads (``Runner.batch_inputs``) to a free actor, and
applies the results as they come back, in any order. So the output layout, provenance, resume
and the exactly-once guarantee keyed by (source_id, gen_index) are the local runner's: rows are
written only when a whole batch has returned.

What Ray adds:

- actors on every node of a cluster (``--ray-address auto``), ``--workers`` of them with
  ``--worker-gpus`` each (vLLM: one actor per GPU, or per tensor-parallel group);
- dynamic load balancing: a batch goes to whichever actor is free, so a slow node takes fewer;
- restarts: an actor whose process dies is restarted (its backend reloaded) and Ray runs the
  batch it held again; only the returned result is written, once.

Killing the driver is killing a local run: rerun the same command and it resumes. Ray Data's
``map_batches`` was not used because its input must be a dataset built up front, while the
runner's work list is computed lazily against the files already written (resume) and each batch
carries resume state; an actor pool fed by ``ray.wait`` streams the same way with bounded memory.

Ray is an optional dependency (``pip install 'megadoc_pl[ray]'``), imported only here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator

from megadoc_pl.synth.runner import Backends, RunConfig, Runner
from megadoc_pl.synth.tasks import TaskConfig, TokenCounter, make_task
from megadoc_pl.utils import require

RESTARTS = 3  # an actor is restarted, and the batch it held is retried, this many times


class GenerationWorker:
    """One Ray actor: a backend (and judge) and the task; runs whole batches."""

    def __init__(self, task_cfg: TaskConfig, cfg: RunConfig) -> None:
        counter = TokenCounter(Runner._load_tokenizer(cfg.tokenizer, cfg, task_cfg.task))
        self.task = make_task(task_cfg, counter)
        self.backends = Backends.load(task_cfg, cfg)

    def describe(self) -> dict:
        b = self.backends
        return {"model": b.model, "judge_model": b.judge_model, "name": b.name, "uses_gpu": b.uses_gpu,
                "pid": os.getpid()}

    def run(self, batch: list, state: dict, attempts: dict, pending: dict) -> dict:
        ctx = self.backends.context(self.task.name, state, attempts, pending)
        self.task.run(batch, ctx)
        return ctx.result()


class RayExecutor:
    """A pool of ``GenerationWorker`` actors and the loop that feeds them."""

    def __init__(self, task_cfg: TaskConfig, cfg: RunConfig) -> None:
        ray = require("ray", "ray", "--executor ray")
        self.ray = ray
        if cfg.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {cfg.workers}")
        if not ray.is_initialized():
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        actor = ray.remote(GenerationWorker).options(
            num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS)
        self.actors = [actor.remote(task_cfg, cfg) for _ in range(cfg.workers)]
        try:
            self.info = ray.get([a.describe.remote() for a in self.actors])
        except Exception as e:  # noqa: BLE001 - a backend that cannot load: one line, not a Ray trace
            self.close()
            cause = getattr(e, "cause", None) or e
            raise ValueError(f"the Ray workers could not load the backend: {type(cause).__name__}: "
                             f"{str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}") from None
        first = self.info[0]
        self.backends = _RemoteBackends(None, None, first["model"], first["judge_model"], first["name"],
                                        first["uses_gpu"])
        self.backends.worker_gpus = cfg.workers * cfg.worker_gpus

    def pids(self) -> list[int]:
        return [i["pid"] for i in self.info]

    def map(self, batches: Iterable[list], inputs: Callable[[list], tuple]) -> Iterator[tuple[list, dict]]:
        """(batch, result) for every batch, as the actors finish them (one batch per actor in
        flight); ``inputs(batch)`` is the resume state sent with it."""
        ray = self.ray
        free = list(self.actors)
        in_flight: dict[Any, tuple[list, Any]] = {}
        todo = iter(batches)
        exhausted = False
        while True:
            while free and not exhausted:
                batch = next(todo, None)
                if batch is None:
                    exhausted = True
                    break
                actor = free.pop()
                in_flight[actor.run.remote(batch, *inputs(batch))] = (batch, actor)
            if not in_flight:
                return
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            batch, actor = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise ValueError(f"a Ray worker died {RESTARTS + 1} times running one batch ({type(e).__name__}) "
                                 "(fix: check the worker logs, e.g. out of memory; rerun resumes)") from None
            free.append(actor)
            yield batch, result

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


class _RemoteBackends(Backends):
    """The backends as the driver sees them: names only; GPUs are the actors'."""

    worker_gpus: float = 0.0

    def gpus(self) -> int:
        return int(self.worker_gpus)
