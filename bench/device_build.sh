# Sourced by the device scripts (cuda_check_h100.sh, ncu_profile_h100.sh, ab_patches_h100.sh): strict
# mode, repository root, $OUT, and the in-place build of the CUDA extension for the H100 alone (about
# half the time of a multi-arch build; `lords_build LOG` rebuilds; LORDS_BUILD_TIMEOUT seconds, default 420:
# 208-235 s on most lent H100 machines, over 300 s on one in session 21). Exits the calling script when the
# first build fails, with the log's tail. sm_90a machine code alone, as the default build makes it for
# Hopper (setup.py: the wgmma variant of the re-associated kernel is compiled in).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/lords_device}"
mkdir -p "$OUT"
source bench/build_stamp.sh
# lords_build LOG: the in-place build (incremental after the first), its output in LOG; fails with rc.
lords_build() {
  lords_sources_check
  MAX_JOBS=16 LORDS_CUDA_ARCH="${LORDS_CUDA_ARCH:-9.0a}" timeout "${LORDS_BUILD_TIMEOUT:-420}" python3 setup.py build_ext --inplace > "$1" 2>&1 &&
    lords_sources_stamp
}
_t0=$SECONDS
lords_build "$OUT/build.log" || { echo "build FAILED"; tail -40 "$OUT/build.log"; exit 1; }
echo "build ok in $((SECONDS - _t0)) s"
