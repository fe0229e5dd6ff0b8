#!/usr/bin/env bash
# One device call that A/B-tests kernel patches (bench/wip/*.patch) against the tree as it is: build and
# time the tree, then for each patch in order (each on top of the previous ones) apply it, rebuild,
# run the CUDA GPU tests of the re-associated kernel and the full-matrix checks, and time again.
# The decode timings of every variant are printed side by side last (us, bench.decode_paths).
#   bash bench/ab_patches_h100.sh bench/wip/reassoc-nj7.patch bench/wip/reassoc-w8.patch
# About 100 s for the first build, then ~160 s per patch on the H100.
source "$(dirname "${BASH_SOURCE[0]}")/device_build.sh"
MS="${LORDS_AB_MS:-1,2,4}"
timeout 120 python3 -m bench.decode_paths --ms "$MS" --json "$OUT/dp_0_base.json" > "$OUT/dp_0_base.log" 2>&1
echo "base timed"
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
  timeout 150 python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_cuda.py -k "reassoc or matrix" \
    > "$OUT/pytest_$tag.log" 2>&1
  rc=$?
  echo "$p: GPU tests rc=$rc ($(tail -n 1 "$OUT/pytest_$tag.log"))"
  [ $rc -ne 0 ] && { tail -n 30 "$OUT/pytest_$tag.log"; break; }
  timeout 120 python3 -m bench.decode_paths --ms "$MS" --json "$OUT/dp_$tag.json" > "$OUT/dp_$tag.log" 2>&1
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "dp_*.json")))
runs = {os.path.basename(f)[3:-5]: {(r["N"], r["K"], r["M"]): r for r in json.load(open(f))} for f in files}
names = list(runs)
keys = sorted({k for v in runs.values() for k in v}, key=lambda k: (k[0] * k[1], k[0], k[2]))
print("\n| N x K | M | path | " + " | ".join(names) + " |")
print("|---|---|---|" + "---|" * len(names))
for k in keys:
    for path in ("reassoc_us", "direct_us", "auto_us"):
        vals = [runs[n].get(k, {}).get(path) for n in names]
        if all(v is None for v in vals):
            continue
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
        print(f"| {k[0]}x{k[1]} | {k[2]} | {path[:-3]} | {cells} |")
PY
