#!/usr/bin/env bash
# The GPU checks of megadoc_pl in one go, sized for one H200 in under 8 minutes:
#   1. the GPU test marker (flash_attn / torch_varlen / flex against fp32 sdpa in bf16, forward and backward)
#   2. 300m at 4096 context, document scope: tokens/s and MFU, eager and torch.compile
#   3. FSDP2 (train.strategy=fsdp2, meta-device init) training the demo recipe on one GPU
#   4. the loader at 1/10 paper scale (the papers' document lengths) with 0-8 DataLoader workers: packed batches vs nanoGPT's get_batch, and the cost of moving a
#      packed 64 x 4096 batch to the GPU and unpacking it there
# then one summary table. Needs the package importable (pip install -e . --no-deps on a machine that has
# torch, lightning, transformers, torchmetrics, tensorboard and the other core dependencies).
#   bash scripts/gpu_check.sh [OUT_DIR]        # logs and summary.md in OUT_DIR (default /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"

step() {  # step NAME LIMIT_S CMD...: run with a time limit, keep the log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  printf '%s\t%s\t%s\n' "$name" "$?" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  tail -n 3 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
step gpu_tests 150 python -m pytest -q -m gpu tests
step bench_eager 100 python benchmarks/bench_train_step.py --gpu --steps 10
step bench_compiled 200 python benchmarks/bench_train_step.py --gpu --compile --steps 10
step fsdp2_one_gpu 120 python -m megadoc_pl.train.cli fit --recipe megadoc_stitch \
  --set train.strategy=fsdp2 --set train.accelerator=gpu --set train.devices=1 --set train.max_steps=50 \
  --set run.root="$OUT/runs" --set run.name=fsdp2 --set data.cache_dir="$OUT/cache" \
  --trainer.enable_progress_bar false
step loader 240 python benchmarks/bench_views.py --sources 16400 --lengths paper --views stitch --workers 0,1,2,4,8 --root "$OUT/bench_views"

python - "$OUT" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
def grab(name, pattern):
    text = (out / f"{name}.log").read_text(errors="replace") if (out / f"{name}.log").exists() else ""
    m = re.findall(pattern, text)
    return m[-1] if m else ""
notes = {
    "gpu_tests": grab("gpu_tests", r"(\d+ passed[^\n]*)"),
    "bench_eager": " ".join(filter(None, [grab("bench_eager", r"([\d,]+ tokens/s)"), grab("bench_eager", r"(MFU [\d.]+%)")])),
    "bench_compiled": " ".join(filter(None, [grab("bench_compiled", r"([\d,]+ tokens/s)"), grab("bench_compiled", r"(MFU [\d.]+%)")])),
    "loader": grab("loader", r"loader:shuffled:0:late.*?(\d+\.\d+x .*)"),
}
metrics = out / "runs" / "fsdp2" / "metrics.json"
if metrics.exists():
    m = json.loads(metrics.read_text())
    notes["fsdp2_one_gpu"] = f"steps {m.get('steps')} train/loss {m.get('train/loss', float('nan')):.3f} " \
                             f"val/iid/loss {m.get('val/iid/loss', float('nan')):.3f} {m.get('train/tokens_per_s', 0):,.0f} tokens/s"
lines = [f"GPU: {(out / 'gpu.txt').read_text().strip()}", "", "| check | rc | seconds | result |", "|---|---|---|---|"]
lines += [f"| {n} | {rc} | {s} | {notes.get(n, '')} |" for n, rc, s in rows]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
