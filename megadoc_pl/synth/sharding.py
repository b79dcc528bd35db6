"""Which shard a document belongs to, which shard this process runs, and the files of a shard.

A document's shard is ``stable_hash(source_id) % num_shards``: the same on every node, with no
coordination. Layout of a shard's files: see ``megadoc_pl.synth.runner``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megadoc_pl.synth.outdir import LocalDir, ObjectDir, open_out_dir
from megadoc_pl.utils import stable_hash


def resolve_shard(shard: int | None, num_shards: int | None, env: dict | None = None) -> tuple[int, int, str]:
    """(shard, num_shards, where it came from): flags, else a SLURM job array, else torchrun's
    RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ if env is None else env
    if shard is not None or num_shards is not None:
        if shard is None or num_shards is None:
            raise ValueError("--shard and --num-shards go together (fix: give both)")
        i, n, source = int(shard), int(num_shards), "flags"
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        # Array ids may start anywhere (--array=1-8): count from the first one.
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        i, n, source = int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]), "slurm"
    elif "RANK" in env and "WORLD_SIZE" in env:
        i, n, source = int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun"
    else:
        i, n, source = 0, 1, "default"
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i} of {n} ({source}) is out of range (fix: 0 <= shard < num_shards)")
    return i, n, source


def shard_of(source_id: str, num_shards: int) -> int:
    """The shard a source document belongs to: the same on every node, no coordination."""
    return stable_hash(source_id) % num_shards


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}"


@dataclass
class ShardFiles:
    """A shard's files (Paths in a LocalDir, fsspec paths in an ObjectDir)."""

    rows: Any
    errors: Any
    dropped: Any
    state: Any
    judged: Any
    stats: Any
    lock: Any
    run: Any

    @classmethod
    def of(cls, out: "LocalDir | ObjectDir | str | Path", i: int, n: int) -> "ShardFiles":
        out = open_out_dir(str(out)) if isinstance(out, (str, Path)) else out
        name = shard_name(i, n)
        return cls(out.join(f"{name}.jsonl"), out.join(".synth", "errors", f"{name}.jsonl"),
                   out.join(".synth", "dropped", f"{name}.jsonl"), out.join(".synth", "state", f"{name}.jsonl"),
                   out.join(".synth", "judged", f"{name}.jsonl"), out.join(".synth", "stats", f"{name}.json"),
                   out.join(".synth", "locks", f"{name}.lock"), out.join(".synth", "run.json"))
