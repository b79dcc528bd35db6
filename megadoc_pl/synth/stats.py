"""Run counters: which are counted, GPUs billed, and DIR/stats.json summed over the shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megadoc_pl.synth.outdir import LocalDir, ObjectDir, open_out_dir


def visible_gpus() -> int:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPUs
        return 0


COUNTERS = ("requests", "completions", "failures", "prompt_tokens", "completion_tokens",
            "rows_written", "rows_dropped", "units_done", "heldout_skipped", "wall_s", "gpu_hours")
# Totals recounted from the shard's files on every start (exact after kills); the other
# counters are summed over runs.
FILE_COUNTERS = ("rows_written", "rows_dropped", "failures")


def aggregate_stats(out: "LocalDir | ObjectDir | str | Path") -> dict:
    """Sum the per-shard stats files into DIR/stats.json (each shard does this when it ends or
    checkpoints; the last writer sees every shard that wrote before it)."""
    out = open_out_dir(str(out)) if isinstance(out, (str, Path)) else out
    shards = {}
    for p in out.glob(out.join(".synth", "stats"), "shard-*.json"):
        try:
            shards[str(p).rsplit("/", 1)[-1][: -len(".json")]] = out.read_json(p)
        except (OSError, json.JSONDecodeError):
            continue  # a shard writing right now; its next checkpoint is counted
    totals: dict[str, float] = {}
    for s in shards.values():
        for k, v in s.get("totals", {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
    summary = {
        "shards": len(shards),
        "shards_complete": sum(1 for s in shards.values() if s.get("complete")),
        "totals": totals,
        "per_shard": {k: s.get("totals", {}) for k, s in shards.items()},
    }
    out.write_json(out.join("stats.json"), summary)
    return summary
