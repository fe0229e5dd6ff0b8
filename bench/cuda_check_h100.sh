#!/usr/bin/env bash
# One device call after a change in csrc/ (bench/cuda_notes.md, "Session 5"): build, the CUDA GPU tests,
# a compute-sanitizer memcheck pass, then the M = 1..16 decode timings of every CUDA path. Table last.
#   bash bench/cuda_check_h100.sh        (OUT is set by the device tool)
source "$(dirname "${BASH_SOURCE[0]}")/device_build.sh"
timeout 150 python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_cuda.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -n 15 "$OUT/pytest.log"
timeout 60 compute-sanitizer --tool memcheck --print-limit 5 python3 bench/sanitize_cuda.py > "$OUT/sanitize.log" 2>&1
echo "sanitizer rc=$?"; grep -E "ERROR SUMMARY|worst" "$OUT/sanitize.log"
timeout 150 python3 -m bench.decode_paths --ms 1,2,4,8,16 --json "$OUT/decode_paths.json" 2>&1 | tee "$OUT/decode_paths.log" | tail -n 40
