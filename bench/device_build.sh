# Sourced by the device scripts (cuda_check_h100.sh, ncu_profile_h100.sh): strict mode, repository root,
# $OUT, and the in-place build of the CUDA extension for the H100 alone (about half the time of a
# multi-arch build). Exits the calling script when the build fails, with the log's tail.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/lords_device}"
mkdir -p "$OUT"
_t0=$SECONDS
MAX_JOBS=16 LORDS_CUDA_ARCH="${LORDS_CUDA_ARCH:-9.0}" timeout 240 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { echo "build FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build ok in $((SECONDS - _t0)) s"
