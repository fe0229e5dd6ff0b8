#!/usr/bin/env bash
# One device call that A/B-tests several stacks of kernel patches (bench/wip/*.patch) with all builds at
# once: each variant is a copy of the tree under build/ab/<tag>/ (git-ignored, so a warm machine keeps it
# for the next call) with its patches applied in order, and all copies compile concurrently. A build is
# one long nvcc process per .cu file (fused_gemm.cu alone takes most of it), so N variants build in
# about the wall time of one, where bench/ab_patches_h100.sh rebuilds one after the other (~200 s each).
# Then, one variant at a time: the CUDA GPU tests chosen by LORDS_AB_TESTS (not on the base), the timing
# modules of LORDS_AB_BENCH (as in ab_patches_h100.sh), and last the base timed a second time, so drift
# of the machine during the call shows as the difference between 0_base and 9_base_again.
#   bash bench/ab_parallel_h100.sh "look=bench/wip/a.patch" "pairs=bench/wip/a.patch,bench/wip/b.patch"
# A variant "tag=patches@VAR=value" runs its tests and timings with that environment variable set; variants
# with the same patch list share one build ("pdl0=p.patch@LORDS_FUSED_PDL=0" "pdl1=p.patch@LORDS_FUSED_PDL=1").
# LORDS_AB_BASE_PATCHES: patches applied to every variant, base included (comma-separated).
# LORDS_AB_ONLY_BUILT=1: skip the builds and use the copies a previous call left (warm machine); build/ab/tag_<tag>
# links to each variant's copy (build/ab/tag_0_base for the tree as is).
# LORDS_AB_BASE_TESTS: if set, a pytest -k expression of test_gpu_cuda.py run on the base too (empty: the whole module,
# LORDS_AB_BASE_TESTS_TIMEOUT seconds, default 240). LORDS_AB_AGAIN=0: no second base timing.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
OUT="${OUT:-/tmp/lords_device}"
mkdir -p "$OUT" build/ab
BENCH="${LORDS_AB_BENCH:-decode_paths --ms ${LORDS_AB_MS:-1,2,4}}"
TESTS="${LORDS_AB_TESTS:-fused or stream_k or graph}"
IFS=';' read -r -a BENCHES <<< "$BENCH"
source bench/ab_timing.sh

specs=("0_base=" "$@")
declare -A dir_of env_of patches_of
builds=()
i=0
for s in "${specs[@]}"; do
  tag="${s%%=*}"; rest="${s#*=}"
  [ "$i" -gt 0 ] && tag="${i}_$tag"
  i=$((i + 1))
  env=""
  [[ "$rest" == *@* ]] && { env="${rest#*@}"; rest="${rest%%@*}"; }
  plist="${LORDS_AB_BASE_PATCHES:-}${LORDS_AB_BASE_PATCHES:+,}$rest"
  key=$(echo "$plist" | sha1sum | cut -c1-10)
  dir_of[$tag]="build/ab/$key"; env_of[$tag]="$env"; patches_of[$key]="$plist"
  [[ " ${builds[*]} " == *" $key "* ]] || builds+=("$key")
  ln -sfn "$key" "build/ab/tag_$tag"
  tags+=("$tag")
done

if [ "${LORDS_AB_ONLY_BUILT:-0}" != 1 ]; then
  t0=$SECONDS
  jobs_each=$(( 16 / ${#builds[@]} )); [ "$jobs_each" -lt 2 ] && jobs_each=2
  for key in "${builds[@]}"; do
    d="build/ab/$key"
    rm -rf "$d"; mkdir -p "$d"
    tar --exclude=./build --exclude=./.git --exclude=./.whl --exclude='./lords_ext/*.so' -cf - . | tar -xf - -C "$d"
    IFS=',' read -r -a plist <<< "${patches_of[$key]}"
    for p in "${plist[@]}"; do
      [ -z "$p" ] && continue
      (cd "$d" && patch -p1 --forward --quiet < "$ROOT/$p") || { echo "$p does not apply in $d"; exit 1; }
    done
    (cd "$d" && MAX_JOBS=$jobs_each LORDS_CUDA_ARCH="${LORDS_CUDA_ARCH:-9.0a}" \
      timeout "${LORDS_BUILD_TIMEOUT:-480}" python3 setup.py build_ext --inplace > "$OUT/build_$key.log" 2>&1
     echo "build $key (${patches_of[$key]:-tree as is}): rc=$? after $((SECONDS - t0)) s") &
  done
  wait
fi

# run_variant TAG NAME: tests (except on the base) and every timing module, merged into $OUT/dp_NAME.json.
run_variant() {
  local tag=$1 name=$2 d=${dir_of[$1]}
  local -a envs=()
  [ -n "${env_of[$tag]}" ] && envs=("${env_of[$tag]}")
  if ! ls "$d"/lords_ext/*.so > /dev/null 2>&1; then echo "$name: no build in $d"; return; fi
  if [ "$name" = 0_base ] && [ -n "${LORDS_AB_BASE_TESTS+set}" ]; then
    local kargs=()
    [ -n "$LORDS_AB_BASE_TESTS" ] && kargs=(-k "$LORDS_AB_BASE_TESTS")
    (cd "$d" && timeout "${LORDS_AB_BASE_TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider \
      python_tests/test_gpu_cuda.py "${kargs[@]}" > "$OUT/pytest_0_base.log" 2>&1)
    echo "0_base: GPU tests rc=$? ($(tail -n 1 "$OUT/pytest_0_base.log"))"
  fi
  if [ "$tag" != 0_base ] && [ "${LORDS_AB_SKIP_TESTS:-0}" != 1 ]; then
    (cd "$d" && env "${envs[@]}" timeout 200 python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_cuda.py \
      -k "$TESTS" > "$OUT/pytest_$name.log" 2>&1)
    local rc=$?
    echo "$name: GPU tests rc=$rc ($(tail -n 1 "$OUT/pytest_$name.log"))"
    [ $rc -ne 0 ] && { tail -n 30 "$OUT/pytest_$name.log"; return; }
  fi
  (cd "$d" && time_modules "$name" "${envs[@]}")
}
for tag in "${tags[@]}"; do run_variant "$tag" "$tag"; done
[ "${LORDS_AB_AGAIN:-1}" != 0 ] && run_variant 0_base 9_base_again
python3 bench/ab_table.py "$OUT"/dp_*.json | tee "$OUT/ab_table.md"
# The device tool returns only a few files: everything but the table goes into one archive.
(cd "$OUT" && tar czf ab_logs.tgz --remove-files $(ls | grep -v -e '^ab_table.md$' -e '^ab_logs.tgz$'))
