#!/usr/bin/env bash
# The GPU check of megadoc_pl in one shot on a lent GPU machine: one H100 (usually) or one H200,
# 16 CPU cores, offline, python3 3.12 with torch, lightning and transformers but not the package's
# other dependencies: their wheels come in .whl/ (`make gpu-bundle` here, then the tree is copied
# there with .whl). The package runs from the checkout (PYTHONPATH), nothing is built there.
#
#   bash scripts/gpu_check.sh OUT                        # on the GPU machine, from any directory
#   GPU_CHECK_SMOKE=1 bash scripts/gpu_check.sh /tmp/x   # every step at toy sizes on the CPU
#
# Time: the steps' limits add up to 540 s on one H100; the script ends within GPU_CHECK_DEADLINE_S
# (570 s: install and summary included). The steps run cheap and decisive first; when time runs
# short (an H200 handed out after a failed H100 start, a slow start, a shorter lease: lower
# GPU_CHECK_DEADLINE_S) a step gets only what is left and the last ones drop first: loader, fsdp2,
# demo_fits, loss. The demo data is prepared in the background meanwhile (CPU only).
#
# OUT receives three files and nothing else: summary.md (one table: step, budget, rc, seconds,
# result), steps.tsv and logs.txt (every step's log). Runs, caches and benchmark data go under
# GPU_CHECK_WORK (default /tmp/gpu_check_work, emptied first). Steps and numbers: docs/gpu-check.md.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${1:?usage: bash scripts/gpu_check.sh OUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
case $WORK in /tmp/?*) ;; *) echo "error: GPU_CHECK_WORK must be a directory under /tmp, got $WORK" >&2; exit 2 ;; esac
DEADLINE=$((SECONDS + ${GPU_CHECK_DEADLINE_S:-570}))
SMOKE=${GPU_CHECK_SMOKE:-0}
rm -rf "$WORK" && mkdir -p "$WORK/logs"
rm -f "$OUT/summary.md" "$OUT/steps.tsv" "$OUT/logs.txt"
: > "$OUT/steps.tsv"
export GPU_CHECK_WORK=$WORK GPU_CHECK_SMOKE=$SMOKE PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
  TRITON_CACHE_DIR=$WORK/triton TORCHINDUCTOR_CACHE_DIR=$WORK/inductor MPLCONFIGDIR=$WORK/matplotlib \
  HF_HOME=$WORK/hf XDG_CACHE_HOME=$WORK/cache-home
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=1
  DEVICE=cpu
else
  DEVICE=cuda
fi

# The wheels the machine lacks, into /tmp/site. Without .whl, and in the smoke run (the wheels are
# for python3 3.12), the packages installed where it runs serve.
if [ "$SMOKE" != 1 ] && compgen -G ".whl/*.whl" > /dev/null; then
  t0=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl > "$WORK/logs/install.log" 2>&1
  echo "rc $? in $((SECONDS - t0)) s: $(ls .whl | wc -l) wheels from .whl into /tmp/site" >> "$WORK/logs/install.log"
  export PYTHONPATH=/tmp/site:$REPO
else
  echo "nothing installed (no .whl, or the smoke run): the installed packages serve" > "$WORK/logs/install.log"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

# The demo fits' data (world, generations, token stores) is prepared on the CPU while the first steps run.
(
  CUDA_VISIBLE_DEVICES= RAYON_NUM_THREADS=4 timeout -k 5 300 python3 benchmarks/gpu_check.py prep \
    > "$WORK/logs/prep.log" 2>&1 &
  echo $! > "$WORK/prep.pid"
  wait $!
  echo $? > "$WORK/prep.rc"
) &

step() {  # step NAME BUDGET_S CMD...: run CMD within its budget, or what is left before the deadline
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 15))  # 15 s kept for the summary
  local limit=$((budget < left ? budget : left))
  if ((limit < 10)); then
    printf '%s\t%s\tskipped\t0\n' "$name" "$budget" >> "$OUT/steps.tsv"
    echo "$name: skipped (deadline)"
    return
  fi
  local t0=$SECONDS
  GPU_CHECK_STEP_END=$(($(date +%s) + limit)) timeout -k 5 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  echo "$name: rc $rc in $((SECONDS - t0)) s (limit $limit s)"
}

CHECK=(python3 benchmarks/gpu_check.py)
LOSS_ARGS=(--device "$DEVICE")
[ "$SMOKE" = 1 ] && LOSS_ARGS+=(--steps 1 --warmup 1)
step versions     25 "${CHECK[@]}" versions
step attention    70 "${CHECK[@]}" attention
step model_init   45 "${CHECK[@]}" model_init
step recompiles   45 "${CHECK[@]}" recompiles
step throughput  120 "${CHECK[@]}" throughput
step profiler     40 "${CHECK[@]}" profiler
step loss         35 python3 benchmarks/bench_loss.py "${LOSS_ARGS[@]}"
step demo_fits    60 "${CHECK[@]}" demo_fits
step fsdp2        50 "${CHECK[@]}" fsdp2
step loader       50 "${CHECK[@]}" loader

if [ ! -f "$WORK/prep.rc" ] && [ -f "$WORK/prep.pid" ]; then  # unfinished (its steps dropped): stop it
  kill -TERM -- "-$(cat "$WORK/prep.pid")" 2> /dev/null
fi
wait
"${CHECK[@]}" summary "$OUT" "$WORK/logs"
