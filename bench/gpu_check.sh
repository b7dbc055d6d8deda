#!/usr/bin/env bash
# The checks that need a GPU, in one run of at most ~10 minutes, with no network:
#
#   1. device and toolchain information (nvidia-smi, torch, nvcc, compute-sanitizer, ncu)
#   2. build the extension for this card's architecture only (setup.py build_ext --inplace)
#   3. pytest: every test that touches CUDA (tests/test_cuda.py and the device="cuda" cases
#      of the other files), in parallel workers when pytest-xdist is there
#   4. compute-sanitizer memcheck on bench/sanitize_case.py (every regime)
#   5. achieved bandwidth per regime against a device copy (bench/sanitize_case.py --profile)
#   6. the GPU benchmark: python -m bench --device cuda
#   7. compute-sanitizer racecheck, the CPU tests under this torch, ncu counters: if time is left
#
# Every step runs under `timeout`, logs to OUTDIR/<step>.log, and a failed step does not stop
# the next one.  A summary is printed (and written to OUTDIR/summary.txt) at the end; the exit
# status is 1 if any step failed or timed out.
#
# Usage: bash bench/gpu_check.sh OUTDIR
# Environment:
#   PYTHON                 interpreter with torch (default: python, else python3)
#   XENT_GPU_CHECK_BUDGET  seconds for the whole run (default 570)
#   XENT_GPU_CHECK_QUICK=1 benchmark with --quick whatever the time left
#   XENT_GPU_CHECK_STEPS   comma list of the steps to run (default: all of them)
#   XENT_GPU_BENCH_SHAPES, XENT_GPU_BENCH_DTYPES, XENT_GPU_BENCH_IMPLS
#                          passed to the bench as --shapes, --dtypes, --impls when set
set -u

OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
# bench/sanitize_case.py and the tests import xent_ext from this checkout (built in place).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET=${XENT_GPU_CHECK_BUDGET:-570}
START=$(date +%s)
SUMMARY=()
FAILED=0

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME CAP MIN CMD...: run CMD with a timeout of min(CAP, time left - 10); skip the step if
# that leaves less than MIN seconds.  With SOFT=1 a failure is reported as WARN and does not
# change the exit status (profiler permissions, for instance).
step() {
  local name=$1 cap=$2 min=$3
  shift 3
  local left t rc status began took
  if [[ -n "${XENT_GPU_CHECK_STEPS:-}" && ",$XENT_GPU_CHECK_STEPS," != *",$name,"* ]]; then
    return 0
  fi
  left=$(remaining)
  t=$((cap < left - 10 ? cap : left - 10))
  if ((t < min)); then
    SUMMARY+=("$(printf '%-9s %-20s %5s  %s' SKIPPED "$name" - "only ${left}s left")")
    echo "== $name: skipped (${left}s left)"
    return 0
  fi
  echo "== $name (timeout ${t}s) > $OUT/$name.log"
  began=$(date +%s)
  timeout --kill-after=15 "$t" "$@" >"$OUT/$name.log" 2>&1 </dev/null
  rc=$?
  took=$(($(date +%s) - began))
  if ((rc == 0)); then
    status=PASS
  elif ((rc == 5)) && [[ "$1" == "$PY" && "$*" == *pytest* ]]; then
    status=PASS  # pytest: no tests collected
  elif [[ "${SOFT:-0}" == 1 ]]; then
    status="WARN:$rc"
  elif ((rc == 124 || rc == 137)); then
    status=TIMEOUT
    FAILED=1
  else
    status="FAIL:$rc"
    FAILED=1
  fi
  tail -n 4 "$OUT/$name.log" | sed 's/^/   | /'
  SUMMARY+=("$(printf '%-9s %-20s %4ss  %s' "$status" "$name" "$took" \
    "$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-110)")")
}

find_tool() {  # the first of: PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, sanitizer's own dir
  local name=$1 home=${CUDA_HOME:-/usr/local/cuda} c
  for c in "$(command -v "$name" 2>/dev/null)" "$home/bin/$name" "$home/$name/$name" \
    "$home/compute-sanitizer/$name" /usr/local/cuda/bin/"$name"; do
    if [[ -n "$c" && -x "$c" ]]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}

SANITIZER=$(find_tool compute-sanitizer || true)
NCU=$(find_tool ncu || true)
NVCC=$(find_tool nvcc || true)

# 1. Information.
info() {
  set -x
  nvidia-smi
  nvidia-smi --query-gpu=name,compute_cap,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print(p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
      round(p.total_memory / 2**30, 1), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF
  ${NVCC:-nvcc} --version | tail -n 2
  ${SANITIZER:-compute-sanitizer} --version | head -n 2
  ${NCU:-ncu} --version | tail -n 1
  nproc
  git log -1 --format='commit %h %s' 2>/dev/null
  true
}
export -f info
export PY NVCC SANITIZER NCU
step info 60 10 bash -c info

# 2. Build for this card only.
ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" \
  2>/dev/null || echo "9.0")
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=${MAX_JOBS:-16}
step build 330 60 "$PY" setup.py build_ext --inplace
step import 60 10 "$PY" -c "import xent_ext, torch; assert xent_ext.has_cuda(), 'no CUDA in the build'; \
x = torch.randn(4, 1000, device='cuda', requires_grad=True); t = torch.randint(0, 1000, (4,), device='cuda'); \
xent_ext.cross_entropy(x, t).backward(); torch.cuda.synchronize(); print('import and one call: ok')"

# 3. Tests: everything that runs on the GPU.  test_cuda_static.py (disassembly, CPU
# emulation) needs no GPU and runs in CI.  Several workers when pytest-xdist is importable.
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider)
XDIST=()
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  XDIST=(-n "$(($(nproc) / 2 > 8 ? 8 : ($(nproc) / 2 > 1 ? $(nproc) / 2 : 1)))")
fi
OMP_NUM_THREADS=2 step tests_cuda 240 60 "${PYTEST[@]}" "${XDIST[@]}" tests -k cuda \
  --ignore=tests/test_cuda_static.py

# 4. compute-sanitizer memcheck (racecheck comes after the bench: it is the slower one).
sanitize() {
  if [[ -n "$SANITIZER" ]]; then
    # Races are looked for in our kernels only (the float64 reference that sanitize_case.py
    # computes runs PyTorch's own reductions).
    local filter=()
    [[ "$1" == racecheck ]] && filter=(--kernel-name kns=xent)
    step "sanitize_$1" "$2" 40 "$SANITIZER" --tool "$1" "${filter[@]}" --error-exitcode 86 \
      --print-limit 20 "$PY" bench/sanitize_case.py
  else
    SUMMARY+=("$(printf '%-9s %-20s %5s  %s' SKIPPED "sanitize_$1" - 'no compute-sanitizer')")
  fi
}
sanitize memcheck 150

# 5. Bandwidth per regime.
step bandwidth 90 30 "$PY" bench/sanitize_case.py --profile

# 6. Benchmark (written by the bench package; only called here).
BENCH_ARGS=(--device cuda --out "$OUT/bench" --no-progress)
[[ -n "${XENT_GPU_BENCH_SHAPES:-}" ]] && BENCH_ARGS+=(--shapes "$XENT_GPU_BENCH_SHAPES")
[[ -n "${XENT_GPU_BENCH_DTYPES:-}" ]] && BENCH_ARGS+=(--dtypes "$XENT_GPU_BENCH_DTYPES")
[[ -n "${XENT_GPU_BENCH_IMPLS:-}" ]] && BENCH_ARGS+=(--impls "$XENT_GPU_BENCH_IMPLS")
if [[ "${XENT_GPU_CHECK_QUICK:-0}" == 1 || $(remaining) -lt 300 ]]; then
  BENCH_ARGS+=(--quick)
fi
step bench 300 45 "$PY" -m bench "${BENCH_ARGS[@]}"

# 7. If time is left: racecheck, an error raised from the CPU kernel (a bad target) in a plain
# process, under cuda-gdb for a native backtrace if it crashes, the CPU tests under this
# machine's torch, ncu counters of the hot kernels in the --profile shapes.
sanitize racecheck 150
CPU_ERROR='import torch, xent_ext
try:
    xent_ext.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 9]))
    raise SystemExit("no error raised")
except IndexError as e:
    print("raised IndexError:", e)'
step cpu_error 60 10 "$PY" -X faulthandler -c "$CPU_ERROR"
if [[ "$(printf '%s\n' "${SUMMARY[@]}" | grep ' cpu_error ')" != PASS* ]]; then
  GDB=$(find_tool cuda-gdb || true)
  [[ -n "$GDB" ]] && SOFT=1 step cpu_error_gdb 90 20 "$GDB" -batch -ex run -ex bt \
    --args "$PY" -c "$CPU_ERROR"
fi
OMP_NUM_THREADS=2 step tests_cpu 150 60 "${PYTEST[@]}" "${XDIST[@]}" tests -k "not cuda"
if [[ -n "$NCU" ]]; then
  SOFT=1 step ncu 120 60 "$NCU" --kernel-name "regex:rows_kernel|split_" --launch-count 12 \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_limit_registers \
    "$PY" bench/sanitize_case.py --profile
fi

{
  echo "gpu_check summary ($(date -u +%FT%TZ), $(($(date +%s) - START))s of ${BUDGET}s, arch $ARCH)"
  printf '%s\n' "${SUMMARY[@]}"
  echo "logs: $OUT"
} | tee "$OUT/summary.txt"
exit "$FAILED"
