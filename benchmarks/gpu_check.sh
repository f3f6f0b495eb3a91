#!/usr/bin/env bash
# One prepared check of porder's CUDA kernels on an accelerator machine (issue 13).
#
# From a bare start (CuPy, torch, torchvision, numba, h5py, click, pytest there;
# nothing to download): install porder, compile every kernel, run the GPU tests,
# time the kernels against the generic CuPy and host paths, time and compare
# JPEG decoding on the GPU (--decoder nvjpeg) with Pillow's, run
# compute-sanitizer, and keep logs and JSON under $OUT (default
# ./gpu-check-out; 8 files). Each stage runs under `timeout`, even when an
# earlier one failed, within GPU_CHECK_BUDGET seconds in all (default 470:
# 7 minutes 50 s); a failed stage prints the end of its log at once. One
# summary is printed last. GPU_CHECK_SKIP=name,name skips stages by name.
#
#   bash benchmarks/gpu_check.sh          # or: make gpu-check
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

if [[ ${1:-} == --env ]]; then  # the env stage: what the machine has
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    "${PY:-python3}" -V
    command -v nvcc > /dev/null && nvcc --version | tail -n 2
    command -v compute-sanitizer || echo "no compute-sanitizer"
    "${PY:-python3}" -c '
import numpy
print("numpy", numpy.__version__)
try:
    import cupy
    rt = cupy.cuda.runtime
    print("cupy", cupy.__version__, "runtime", rt.runtimeGetVersion(), "driver",
          rt.driverGetVersion(), "devices", rt.getDeviceCount())
    from cupy_backends.cuda.libs import nvrtc
    print("nvrtc", nvrtc.getVersion())
except Exception as e:
    print("cupy problem:", type(e).__name__, e)
for mod in ("torch", "numba", "h5py", "click", "pytest"):
    try:
        m = __import__(mod)
        print(mod, m.__version__, *(["cuda", m.cuda.is_available()] if mod == "torch" else []))
    except Exception as e:
        print(mod, "missing:", e)
'
    nproc
    exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}
T0=$(date +%s)
export PY
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}  # this checkout, installed or not
export PYTHONUNBUFFERED=1
ROWS=()
FAILED=0
for f in env.txt pytest_kernels.log bench.log sanitizer.log pytest_gpu_all.log train.log; do
    : > "$OUT/$f"
done

elapsed() { echo $(( $(date +%s) - T0 )); }

# stage NAME LIMIT_S LOG COMMAND...: run COMMAND, its output appended to LOG.
stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    if [[ ,${GPU_CHECK_SKIP:-}, == *",$name,"* ]]; then
        ROWS+=("$name|skipped: GPU_CHECK_SKIP|0")
        return 0
    fi
    local left=$(( BUDGET - $(elapsed) ))
    if (( left < 20 )); then
        ROWS+=("$name|skipped: budget spent|0")
        return 0
    fi
    (( limit > left - 5 )) && limit=$(( left - 5 ))
    echo "== $name (limit ${limit}s, at $(elapsed)s)"
    echo "== $name: $*" >> "$log"
    local s
    s=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local dt=$(( $(date +%s) - s ))
    local status=ok
    if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${limit}s"
    elif (( rc != 0 )); then status="FAILED (rc $rc)"; fi
    ROWS+=("$name|$status|$dt")
    if [[ $status != ok ]]; then
        FAILED=1
        echo "---- $name: $status; last 40 lines of $(basename "$log"):"
        tail -n 40 "$log"
        echo "----"
    fi
}

# 1. what the machine has
stage env 40 "$OUT/env.txt" bash "$ROOT/benchmarks/gpu_check.sh" --env
grep -E "^(numpy|cupy|torch|Python) |^NVIDIA" "$OUT/env.txt" | head -n 6

# 2. install (editable, no network); PYTHONPATH above is the fallback
stage install 90 "$OUT/env.txt" "$PY" -m pip install --no-deps --no-build-isolation -e .

# 3. compile every kernel the paper's cases use (NVRTC log on failure; registers, spills)
stage compile 150 "$OUT/env.txt" "$PY" benchmarks/bench_gpu.py --compile

# 4. the kernels' GPU tests (shared mode, and stream mode: any size, issue 21)
stage pytest-kernels 200 "$OUT/pytest_kernels.log" \
    "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider -m gpu tests/test_kernels_cuda.py \
    tests/test_kernels_cuda_stream.py

# 5. the benchmark (its own budget: what is left, less a minimum for the later stages)
BENCH_BUDGET=$(( BUDGET - $(elapsed) - 100 ))
(( BENCH_BUDGET > 180 )) && BENCH_BUDGET=180
(( BENCH_BUDGET < 40 )) && BENCH_BUDGET=40
stage bench $(( BENCH_BUDGET + 25 )) "$OUT/bench.log" \
    "$PY" benchmarks/bench_gpu.py --out "$OUT" --budget "$BENCH_BUDGET"

# 5a. native resolution (issue 21): the fused kernels in stream mode at 128 p16, 224 p16,
# 224 p32 and 256 p32 (mi je kl l1 ssim entropy), perms against the CPU kernels, the
# generic CuPy path they replaced, and shared vs stream mode at 32x32 (JSON in bench.log)
stage bench-large 110 "$OUT/bench.log" \
    "$PY" benchmarks/bench_gpu.py --large --budget 95 --out "$(mktemp -d)"

# 5b. training on the GPU: ResNet-18 batch 512 bf16 channels-last, with and without --reorder mi
stage train 120 "$OUT/train.log" "$PY" benchmarks/bench_train.py --gpu-only
stage profile 60 "$OUT/train.log" "$PY" benchmarks/profile_gpu_reorder.py

# 5c. JPEG decoding on the GPU (decoder='nvjpeg'): its gpu tests against Pillow, then
# img/s end to end (threads, processes, nvjpeg) and the pixel differences (JSON in train.log)
stage nvjpeg-tests 40 "$OUT/train.log" \
    "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider -m gpu -s tests/sources/test_gpu_decode.py
stage nvjpeg-bench 55 "$OUT/train.log" "$PY" benchmarks/bench_gpu_decode.py --budget 40

# 5d. lockstep training on the GPU (issue 22): 16 VGG runs one after another against the
# same runs in lockstep, batch 1 and 32, and the speed-up curve over M (JSON in train.log)
stage lockstep 90 "$OUT/train.log" "$PY" benchmarks/bench_lockstep.py --device cuda --quick

# 5e. Nsight Systems timelines (GPU issue, item 6): `porder reorder --device cuda` on 50,000
# CIFAR-sized images, and a short lockstep run; their kernel, API and memory-copy
# summaries (nsys stats) go to train.log (the .nsys-rep files stay on the device: at
# most 8 files come back)
NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
       2> /dev/null | head -n 1)
if [[ -n $NSYS ]]; then
    TL=$(mktemp -d)
    stage nsys-reorder 60 "$OUT/train.log" "$NSYS" profile --force-overwrite true -t cuda,nvtx,osrt \
        -o "$TL/reorder" "$PY" -m porder reorder --device cuda -m mi -p 8 --no-progress \
        --overwrite synthetic:50000 "$TL/reorder.h5"
    stage nsys-lockstep 60 "$OUT/train.log" "$NSYS" profile --force-overwrite true -t cuda,nvtx,osrt \
        -o "$TL/lockstep" "$PY" -c "
import sys; sys.argv = ['bench_lockstep']
sys.path.insert(0, 'benchmarks')
import bench_lockstep as b, tempfile, pathlib
from porder.train.lockstep import train_group
with tempfile.TemporaryDirectory() as d:
    root = pathlib.Path(d)
    files = [b.make_file(root / 'a.h5'), b.make_file(root / 'b.h5')]
    print('lockstep img/s', b.lockstep(files, 1, 16, 200, 10, None, root, 'cuda'))
"
    for r in reorder lockstep; do
        [[ -f $TL/$r.nsys-rep ]] || continue
        "$NSYS" stats -q --report cuda_gpu_kern_sum,cuda_api_sum,cuda_gpu_mem_time_sum \
            "$TL/$r.nsys-rep" >> "$OUT/train.log" 2>&1
    done
else
    ROWS+=("nsys|skipped: no nsys|0")
fi

# 6. compute-sanitizer: out-of-bounds accesses and shared-memory races in the kernels
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
      /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2> /dev/null | head -n 1)
if [[ -n $SAN ]]; then
    stage memcheck 60 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 3 \
        --print-limit 20 "$PY" benchmarks/bench_gpu.py --sanitize --measures mi,kl,entropy,ssim,psnr
    stage racecheck 75 "$OUT/sanitizer.log" "$SAN" --tool racecheck --error-exitcode 3 \
        --print-limit 20 "$PY" benchmarks/bench_gpu.py --sanitize --measures mi,kl,entropy,l2 \
        --patches 4,16
    stage memcheck-large 60 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 3 \
        --print-limit 20 "$PY" benchmarks/bench_gpu.py --large --sanitize --cells 64p32,128p16 \
        --large-measures mi,kl,entropy,ssim
else
    ROWS+=("sanitizer|skipped: no compute-sanitizer|0")
fi

# 7. every other gpu-marked test (the generic CuPy path), then this file's CPU tests
stage pytest-gpu-all 120 "$OUT/pytest_gpu_all.log" \
    "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider -m gpu tests \
    --ignore=tests/test_kernels_cuda.py --ignore=tests/sources/test_gpu_decode.py
stage pytest-harness 90 "$OUT/pytest_kernels.log" \
    "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider -m "not gpu" tests/test_kernels_cuda.py \
    tests/test_kernels_cuda_stream.py

# Summary, last
{
    echo
    echo "================ gpu_check summary: $(elapsed)s of ${BUDGET}s, logs in $OUT ================"
    grep -E "^(numpy|cupy|torch) " "$OUT/env.txt" | head -n 3
    grep -A1 "^name, driver" "$OUT/env.txt" | tail -n 1
    printf "%-16s %-28s %6s\n" stage status seconds
    for r in "${ROWS[@]}"; do
        IFS='|' read -r n s d <<< "$r"
        printf "%-16s %-28s %6s\n" "$n" "$s" "$d"
    done
    echo "-- kernels (registers per thread; local bytes = spills):"
    grep -E " regs |COMPILE ERROR" "$OUT/env.txt" | head -n 20
    echo "-- tests:"
    for f in pytest_kernels.log pytest_gpu_all.log; do
        grep -E " in [0-9.]+s( \([0-9:]+\))?( =+)?$" "$OUT/$f" | sed "s/^/$f: /"
        grep -E "^(FAILED|ERROR) " "$OUT/$f" | head -n 8
    done
    echo "-- sanitizer:"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|DIFFER|Invalid .* of size|Race reported" \
        "$OUT/sanitizer.log" | head -n 10
    echo "-- training:"
    grep -E "^train resnet|ms/call" "$OUT/train.log" | tail -n 8
    echo "-- nvjpeg decoding (tests; img/s; pixel differences, nvjpeg vs Pillow):"
    grep -E "^(FAILED|ERROR) tests/sources/test_gpu_decode|deselected in [0-9.]+s|^nvjpeg vs Pillow|^counts |^decode " \
        "$OUT/train.log" | head -n 24
    echo "-- benchmark (full numbers in bench_gpu.json):"
    sed -n '/images 32x32x3 on the GPU/,/^== /{/^== /!p}' "$OUT/bench.log" | tail -n 40
    echo "-- native resolution, stream mode (JSON: the bench_gpu_large.json line of bench.log):"
    sed -n '/fused kernels at native resolution/,$p' "$OUT/bench.log" | tail -n 40
} | tee "$OUT/summary.txt"
find "$OUT" -maxdepth 1 -type f -empty -delete  # at most 8 files come back from the device
exit $FAILED
