#!/usr/bin/env bash
# One device call that A/B-tests kernel patches (bench/wip/*.patch) against the tree as it is: build and
# time the tree, then for each patch in order (each on top of the previous ones) apply it, rebuild,
# run the CUDA GPU tests selected by LORDS_AB_TESTS, and time again. The timings of every variant are
# printed side by side last (us).
#   bash bench/ab_patches_h100.sh bench/wip/decode-nt1.patch
#   LORDS_AB_BENCH="dequant_paths --ms 256,4096" LORDS_AB_TESTS="dequant or odd or matrix" \
#     bash bench/ab_patches_h100.sh bench/wip/dequant-bulk-store.patch
# Environment: LORDS_AB_BENCH, the timing module and its arguments (default "decode_paths --ms
# $LORDS_AB_MS", LORDS_AB_MS default 1,2,4), several separated by ";" (their records are merged per
# variant); LORDS_AB_TESTS, a pytest -k expression over
# test_gpu_cuda.py (default "reassoc or matrix"); LORDS_AB_BASE_TESTS, a -k expression run on the tree
# before any patch (none by default). About 100 s for the first build, then ~160 s per patch.
source "$(dirname "${BASH_SOURCE[0]}")/device_build.sh"
BENCH="${LORDS_AB_BENCH:-decode_paths --ms ${LORDS_AB_MS:-1,2,4}}"
TESTS="${LORDS_AB_TESTS:-reassoc or matrix}"
IFS=';' read -r -a BENCHES <<< "$BENCH"
source "$(dirname "${BASH_SOURCE[0]}")/ab_timing.sh"
if [ -n "${LORDS_AB_BASE_TESTS:-}" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider python_tests/test_gpu_cuda.py -k "$LORDS_AB_BASE_TESTS" \
    > "$OUT/pytest_0_base.log" 2>&1
  echo "base: GPU tests rc=$? ($(tail -n 1 "$OUT/pytest_0_base.log"))"
fi
time_modules 0_base
i=0
for p in "$@"; do
  i=$((i + 1))
  tag="${i}_$(basename "$p" .patch)"
  if ! { git apply "$p" 2>/dev/null || patch -p1 --forward --quiet < "$p"; }; then
    echo "$p: does not apply, stopping"; break
  fi
  if ! lords_build "$OUT/build_$tag.log"; then
    echo "$p: build FAILED"; tail -20 "$OUT/build_$tag.log"; break
  fi
  timeout 150 python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_cuda.py -k "$TESTS" \
    > "$OUT/pytest_$tag.log" 2>&1
  rc=$?
  echo "$p: GPU tests rc=$rc ($(tail -n 1 "$OUT/pytest_$tag.log"))"
  [ $rc -ne 0 ] && { tail -n 30 "$OUT/pytest_$tag.log"; break; }
  time_modules "$tag"
done
python3 bench/ab_table.py "$OUT"/dp_*.json
