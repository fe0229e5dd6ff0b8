#!/usr/bin/env bash
# One device call after a change in csrc/ (bench/cuda_notes.md, "Session 5"): build, the CUDA GPU tests,
# a compute-sanitizer memcheck pass, then a timing module (default: the M = 1..16 decode timings of every
# CUDA path; arguments replace it, e.g. `dequant_paths` for the dequant pass and M >= 32). Table last.
#   bash bench/cuda_check_h100.sh                       (OUT is set by the device tool)
#   bash bench/cuda_check_h100.sh dequant_paths --ms 32,64,256,1024,4096
source "$(dirname "${BASH_SOURCE[0]}")/device_build.sh"
timeout "${LORDS_PYTEST_TIMEOUT:-240}" python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_cuda.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -n 15 "$OUT/pytest.log"
timeout "${LORDS_SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool memcheck --print-limit 5 python3 bench/sanitize_cuda.py > "$OUT/sanitize.log" 2>&1
echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|worst" "$OUT/sanitize.log"
[ $# -eq 0 ] && set -- decode_paths --ms 1,2,4,8,16
mod="$1"; shift
timeout "${LORDS_BENCH_TIMEOUT:-200}" python3 -m "bench.$mod" "$@" --json "$OUT/$mod.json" 2>&1 | tee "$OUT/$mod.log" | tail -n 40
