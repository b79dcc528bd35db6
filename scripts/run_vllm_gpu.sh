#!/usr/bin/env bash
# Generate all three synthetic corpora with vLLM on one GPU node (or one shard of many).
#
#   scripts/run_vllm_gpu.sh MODEL INPUT OUT [G]
#     MODEL  instruct model directory (e.g. /models/Llama-3.1-8B-Instruct)
#     INPUT  real documents (JSONL/.gz/.zst/Parquet files or a directory)
#     OUT    output root: OUT/rephrase, OUT/rationale, OUT/maga
#     G      generations per document (default 32; maga always uses 5 pairs)
#
# Environment: TOKENIZER (training tokenizer, default MODEL), SPLIT (split.json with held-out
# documents), TP (tensor parallel size, default: all visible GPUs), SHARD/NUM_SHARDS (else taken
# from SLURM_ARRAY_TASK_ID/COUNT or RANK/WORLD_SIZE). Rerunning the same command resumes.
# First run `python tools/gpu_vllm_check.py` once to check the installation with a tiny model.
set -euo pipefail
MODEL=${1:?model dir}; INPUT=${2:?input}; OUT=${3:?output root}; G=${4:-32}
TOKENIZER=${TOKENIZER:-$MODEL}
TP=${TP:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
common=(--backend vllm --model "$MODEL" --tensor-parallel-size "$TP" --tokenizer "$TOKENIZER"
        --input "$INPUT" --batch-size "${BATCH:-512}")
[[ -n "${SPLIT:-}" ]] && common+=(--split-file "$SPLIT")
[[ -n "${SHARD:-}" ]] && common+=(--shard "$SHARD" --num-shards "${NUM_SHARDS:?NUM_SHARDS}")
cd "$(dirname "$0")/.."
status=0
python tools/synthesize.py --task rephrase --style wikipedia --generations "$G" "${common[@]}" --out "$OUT/rephrase" || status=$?
python tools/synthesize.py --task rationale --generations "$G" "${common[@]}" --out "$OUT/rationale" || status=$?
python tools/synthesize.py --task maga --judge "${common[@]}" --out "$OUT/maga" || status=$?
exit $status
