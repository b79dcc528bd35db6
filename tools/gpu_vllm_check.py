#!/usr/bin/env python
"""Run the vLLM backend for real on a GPU machine and verify what it writes.

    python tools/gpu_vllm_check.py                       # tiny random Llama built here (no download)
    python tools/gpu_vllm_check.py --model /models/Llama-3.1-8B-Instruct --docs 64 --maga-rows

Every task (rephrase, rationale, maga with judge) goes through the real runner with one vLLM
engine; rows are checked (exactly once, provenance, split points, resume asks for nothing) and a
JSON report with per-task tokens/s is printed. Exit code 0 = pass. Needs `pip install vllm`.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from megadoc_pl.synth.backends.vllm_backend import VLLMBackend
from megadoc_pl.synth.selfcheck import CheckFailed, run_selfcheck
from megadoc_pl.synth.tiny import build_tiny_chat_model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="instruct model dir (default: a tiny random Llama)")
    ap.add_argument("--tokenizer", default=None, help="training tokenizer (default: the model's)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--docs", type=int, default=16)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--maga-rows", action="store_true", help="require maga rows (a real model)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vllm_check_"))
    model = args.model or str(build_tiny_chat_model(work / "tiny_model", hidden_size=256, num_heads=4))
    tokenizer = args.tokenizer or str(Path(model) / "tokenizer.json")
    backend = VLLMBackend(model, tensor_parallel_size=args.tensor_parallel_size, seed=0,
                          gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=4096)
    try:
        report = run_selfcheck(backend, work / "runs", tokenizer, model, docs=args.docs,
                               generations=args.generations, max_new_tokens=args.max_new_tokens,
                               expect_maga_rows=args.maga_rows, progress=True)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"model": model, "workdir": str(work), "engine": backend.engine_kwargs,
                      "tasks": report}, indent=2))
    print("PASS", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
