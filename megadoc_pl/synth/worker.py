"""What runs a batch, in this process or in a Ray actor, built from the run's configs alone: the
task (with its budget tokenizer), the backends (generator and judge), and ``BatchWorker``, which
runs a ``Batch`` and returns its ``BatchResult``.

Both executors build a ``BatchWorker`` here (``executors.LocalExecutor`` in the runner's process,
``ray_executor.GenerationWorker`` once per actor), so a Ray actor needs nothing from the runner
but the pickled ``TaskConfig`` and ``SynthRunConfig``, then one ``Batch`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from megadoc_pl.synth.backends.base import Backend, get_backend
from megadoc_pl.synth.context import BatchContext
from megadoc_pl.synth.run_config import SynthRunConfig
from megadoc_pl.synth.stats import visible_gpus
from megadoc_pl.synth.tasks import Task, TaskConfig, TokenCounter, Unit, make_task


def budget_tokenizer(path: str | None, model: str | None, task: str):
    """The tokenizer prompt budgets are counted in: ``path`` (--tokenizer), else the generator's own
    tokenizer.json when ``model`` is a local directory (budgets only: rationale split points need
    --tokenizer); None: budgets in approximate tokens (``TokenCounter``)."""
    from megadoc_pl.data.tokenizer import load_tokenizer

    if path is not None:
        return load_tokenizer(path)
    if task != "rationale" and model and (Path(model) / "tokenizer.json").is_file():
        return load_tokenizer(Path(model) / "tokenizer.json")
    return None


def load_task(task_cfg: TaskConfig, cfg: SynthRunConfig) -> Task:
    """The task, counting budgets with the run's budget tokenizer (self_distill: the teacher's export)."""
    model = cfg.backend_kwargs.get("model") or cfg.model
    return make_task(task_cfg, TokenCounter(budget_tokenizer(cfg.tokenizer, model, task_cfg.task)))


@dataclass
class Backends:
    """The generator and judge backends of a run and the model names recorded in rows."""

    generator: Any
    judge: Any
    model: str
    judge_model: str
    name: str
    uses_gpu: bool = False
    teacher: dict | None = None  # self_distill: what rows cite (teacher.row_teacher)

    @classmethod
    def load(cls, task_cfg: TaskConfig, cfg: SynthRunConfig, backend: Backend | None = None,
             judge_backend: Backend | None = None) -> "Backends":
        gen = backend if backend is not None else get_backend(cfg.backend, **cfg.backend_kwargs)
        if judge_backend is not None:
            judge = judge_backend
        elif cfg.judge_backend is not None and task_cfg.judge:
            judge = get_backend(cfg.judge_backend, **cfg.judge_backend_kwargs)
        else:
            judge = gen
        if task_cfg.task == "self_distill":
            require_raw(gen, gen.name)
        teacher = None
        if cfg.teacher is not None:
            from megadoc_pl.synth.teacher import row_teacher

            teacher = row_teacher(cfg.teacher)
        # A checkpoint teacher is loaded from its export in a scratch directory: rows name the checkpoint.
        model = (teacher or {}).get("path") or getattr(gen, "model_name", None) or cfg.model or gen.name
        judge_model = getattr(judge, "model_name", None) or cfg.judge_backend_kwargs.get("model") or model
        return cls(gen, judge, model, judge_model, gen.name, bool(getattr(gen, "uses_gpu", False)), teacher)

    def context(self, task_name: str, state: dict, attempts: dict, pending: dict) -> "BatchContext":
        return BatchContext(self.generator, self.judge, self.model, self.judge_model, task_name,
                            state, attempts, pending, self.teacher)

    def gpus(self) -> int:
        """GPUs billed when --gpus is not given: the visible ones if the backend uses them."""
        return visible_gpus() if self.uses_gpu else 0


def require_raw(backend: Any, name: str) -> None:
    """self_distill sends token ids to continue (Request.prompt_ids): the backend must take them."""
    if not getattr(backend, "raw_completion", False):
        raise ValueError(f"--task self_distill needs a backend that continues raw token ids (transformers, vllm or "
                         f"template), not '{name}'")


class Batch(NamedTuple):
    """Units that run together and the slices of resume state they read (what a Ray actor is sent)."""

    units: list[tuple[Unit, list[int] | None]]  # each with the gen indices it misses (None: stage 1 first)
    state: dict[str, dict]  # stage-1 state of these units, by unit key
    attempts: dict[str, int]  # failed attempts of their requests, by request id
    judge_pending: dict[str, list[dict]]  # rows kept earlier with judge_pending, by unit key


class BatchResult(NamedTuple):
    """What a batch produced (``BatchContext.result``), with its units: executors may return batches
    in any order."""

    units: list[tuple[Unit, list[int] | None]]
    output: dict
    error: BaseException | None = None  # what stopped the batch midway; its output is still written


class BatchWorker:
    """Runs batches with one task and one pair of backends (in the runner's process, or in a Ray actor)."""

    def __init__(self, task: Task, backends: Backends) -> None:
        self.task, self.backends = task, backends

    @classmethod
    def load(cls, task_cfg: TaskConfig, cfg: SynthRunConfig, task: Task | None = None,
             backend: Backend | None = None, judge_backend: Backend | None = None) -> "BatchWorker":
        """The task (unless given) and the backends (those given, else loaded) of a run."""
        return cls(task if task is not None else load_task(task_cfg, cfg),
                   Backends.load(task_cfg, cfg, backend, judge_backend))

    def run(self, batch: Batch) -> BatchResult:
        ctx = self.backends.context(self.task.name, batch.state, batch.attempts, batch.judge_pending)
        try:
            self.task.run(batch.units, ctx)
        except BaseException as e:  # noqa: BLE001 - a kill of the task still records what the batch did
            return BatchResult(batch.units, ctx.result(), e)
        return BatchResult(batch.units, ctx.result())
