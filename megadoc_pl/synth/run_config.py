"""How a generation run is set up: inputs, output, backend, sharding and executor (not what is asked:
that is ``tasks.TaskConfig``). Named apart from the training run's ``megadoc_pl.config.RunConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SynthRunConfig:
    """Where documents come from, where rows go, and how the work is split (not what is asked)."""

    inputs: list[str]
    out: str
    backend: str = "transformers"
    backend_kwargs: dict = field(default_factory=dict)
    judge_backend: str | None = None  # None: the generator also judges
    judge_backend_kwargs: dict = field(default_factory=dict)
    model: str | None = None  # recorded in rows when the backend does not name its model
    split_file: str | None = None  # split.json: its held-out documents are never used as seeds
    shard: int | None = None  # None: from SLURM / torchrun environment, else 0
    num_shards: int | None = None
    batch_size: int = 64  # units (documents or chunks) per backend round
    text_field: str = "text"
    id_field: str = "id"
    skip_bad_rows: bool = False
    tokenizer: str | None = None  # training tokenizer: budgets and rationale split points
    gpus: int | None = None  # GPUs billed for GPU-hours (None: visible GPUs if the backend uses them)
    limit: int | None = None  # at most this many pending units in this run (smoke tests)
    max_consecutive_failures: int = 8  # stop after this many failed requests in a row with the
    # same error (0: never stop; failures are still recorded and retried by the next run)
    executor: str = "local"  # local: batches run in this process | ray: on Ray actors (ray_executor)
    ray_address: str | None = None  # ray: cluster to join ("auto", "ray://host:10001"); None: start one here
    workers: int = 1  # ray: actors, each holding one backend (one per GPU or tensor-parallel group)
    worker_gpus: float = 0.0  # ray: GPUs per actor (vLLM: its tensor_parallel_size)
    worker_cpus: float = 1.0  # ray: CPUs per actor
    progress: bool = True
    teacher: dict | None = None  # self_distill: the teacher's provenance, filled by the runner from
    # --model (synth/teacher.py); cited by every row, kept whole in run.json
