"""Where the runner's batches run: the ``Executor`` interface, the local executor, and the factory.

The runner has one loop: it asks ``make_executor`` once for the executor that ``--executor`` names,
hands it every pending ``worker.Batch`` through ``map``, and writes each ``worker.BatchResult`` that
comes back; it stays the only writer of the output directory, so resume and exactly-once keyed by
(source_id, gen_index) do not depend on where a batch ran. Executors:

- ``local`` (``LocalExecutor``): each batch runs in this process when the runner asks for it.
- ``ray`` (``ray_executor.RayExecutor``): batches stream through Ray Data to actors holding a backend.

Both run a batch with a ``worker.BatchWorker``.
"""

from __future__ import annotations

from typing import ClassVar, Generator, Iterable, Protocol

from megadoc_pl.synth.backends.base import Backend
from megadoc_pl.synth.ray_executor import RayExecutor
from megadoc_pl.synth.run_config import SynthRunConfig
from megadoc_pl.synth.tasks import Task, TaskConfig
from megadoc_pl.synth.worker import Backends, Batch, BatchResult, BatchWorker


class Executor(Protocol):
    """Runs batches somewhere; built as ``cls(task_cfg, cfg, task=, backend=, judge_backend=)``
    (the objects are for executors that run batches in this process)."""

    remote: ClassVar[bool]  # batches run on other nodes: paths in the configs must exist there
    backends: Backends  # the model names rows record and the GPUs billed, as this process sees them

    def map(self, batches: Iterable[Batch]) -> Generator[BatchResult, None, None]:
        """One result per batch, in any order. May start work before it returns, so that a backend
        that cannot load fails the start before anything is written. A result with an ``error``
        is the last: the runner writes its output, then raises the error. Closing the generator
        stops the work still in flight."""
        ...

    def stats(self, start: float) -> dict:
        """What this executor adds to the run's stats (``start``: the run's perf_counter start)."""
        ...

    def close(self) -> None:
        """Release what the executor started (a Ray cluster it started itself)."""
        ...


class LocalExecutor:
    """Runs each batch in this process, one after another, as the runner's loop asks for it."""

    remote = False

    def __init__(self, task_cfg: TaskConfig, cfg: SynthRunConfig, task: Task | None = None,
                 backend: Backend | None = None, judge_backend: Backend | None = None) -> None:
        self.worker = BatchWorker.load(task_cfg, cfg, task, backend, judge_backend)
        self.backends = self.worker.backends

    def map(self, batches: Iterable[Batch]) -> Generator[BatchResult, None, None]:
        for batch in batches:
            result = self.worker.run(batch)
            yield result
            if result.error is not None:
                return

    def stats(self, start: float) -> dict:
        return {}

    def close(self) -> None:
        pass


EXECUTOR_CLASSES: dict[str, type[Executor]] = {"local": LocalExecutor, "ray": RayExecutor}
EXECUTORS = tuple(EXECUTOR_CLASSES)


def executor_class(name: str) -> type[Executor]:
    if name not in EXECUTOR_CLASSES:
        raise ValueError(f"unknown executor '{name}' (choose from {', '.join(EXECUTORS)})")
    return EXECUTOR_CLASSES[name]


def make_executor(name: str, task_cfg: TaskConfig, cfg: SynthRunConfig, task: Task | None = None,
                  backend: Backend | None = None, judge_backend: Backend | None = None) -> Executor:
    """The executor ``name``, ready: local loads the backends here, ray joins or starts its cluster."""
    return executor_class(name)(task_cfg, cfg, task=task, backend=backend, judge_backend=judge_backend)
