#!/usr/bin/env bash
# The paper's whole Fig. 4 experiment on one GPU (issue 22's device script; its
# measurement is the GPU issue's): `porder compare --preset paper` as the paper
# describes it (Inception, width 1.0, batch 1, 10,000 steps, every ordering x
# patches 4/8/16 x 3 seeds: 84 runs), trained in lockstep groups sized to the
# device's free memory, on a CIFAR-10 JPEG subset small enough to carry
# (benchmarks/cifar_subset.py: 20,000 train + 2,000 test images, 20 MB; a
# batch-1 run of 10,000 steps sees 10,000 images).
#
# Prepare here (once):   python benchmarks/cifar_subset.py CIFAR10_DIR gpu-data/cifar10-20k
# On the device:          bash benchmarks/gpu_paper.sh   (carry gpu-data)
#
# Stages, each under `timeout` within GPU_PAPER_BUDGET seconds in all (default
# 560): install porder (no dependencies: the device is offline), the dry run
# (the plan, its lockstep groups with memory and time estimates), the comparison
# itself, and a summary. Logs, summary.md, paired.csv and the figures land in
# $OUT (default gpu-paper-out/). An interrupted comparison resumes: run the
# script again with the same $OUT (and `--preset paper` again) to go on.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-paper-out}
DATA=${GPU_PAPER_DATA:-$ROOT/gpu-data/cifar10-20k}
PY=${PY:-python3}
BUDGET=${GPU_PAPER_BUDGET:-560}
T0=$(date +%s)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/paper.log
: > "$LOG"
elapsed() { echo $(( $(date +%s) - T0 )); }

if [[ ! -d $DATA/train || ! -d $DATA/test ]]; then
    echo "gpu_paper: no CIFAR-10 subset at '$DATA' (make it with benchmarks/cifar_subset.py and carry it)" >&2
    exit 2
fi

echo "== install (at $(elapsed)s)" | tee -a "$LOG"
timeout 90 "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 \
    || echo "gpu_paper: install failed (running from the checkout through PYTHONPATH)" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >> "$LOG" 2>&1

echo "== dry run (at $(elapsed)s)" | tee -a "$LOG"
timeout 120 "$PY" -m porder compare "$DATA" --preset paper --device cuda -o "$OUT/paper" --dry-run \
    > "$OUT/dry-run.txt" 2>&1
echo "dry run: exit $? (the plan and its groups in $OUT/dry-run.txt)" | tee -a "$LOG"
cat "$OUT/dry-run.txt"

LEFT=$(( BUDGET - $(elapsed) - 10 ))
echo "== compare --preset paper (limit ${LEFT}s, at $(elapsed)s)" | tee -a "$LOG"
S=$(date +%s)
timeout "$LEFT" "$PY" -m porder compare "$DATA" --preset paper --device cuda -o "$OUT/paper" \
    >> "$LOG" 2>&1
RC=$?
echo "compare: exit $RC after $(( $(date +%s) - S ))s (124: out of time; run again to resume)" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.used --format=csv >> "$LOG" 2>&1
{
    echo "================ gpu_paper: $(elapsed)s of ${BUDGET}s, exit $RC, logs in $OUT ================"
    tail -n 5 "$LOG"
    [[ -f $OUT/paper/summary.md ]] && head -n 60 "$OUT/paper/summary.md"
} | tee "$OUT/summary.txt"
exit $RC
