#!/usr/bin/env bash
# The one device command of the kernel benchmark: install the carried wheels, build the package in
# place where setup.py exists, run the benchmark, leave JSON / PNG / logs under $OUT, print the table last.
#
#   bash bench/run_h100.sh --quick                  # anchor shapes and Ms (BENCHMARKING.md)
#   bash bench/run_h100.sh                          # every shape and M
#   bash bench/run_h100.sh --methods cublas,bnb_nf4 --shapes 4096x4096
# Arguments go to `python -m bench.bench_kernels`. Environment:
#   OUT                  results folder (the device tool sets it; default bench/results)
#   LORDS_BUDGET_S       seconds the whole script may take (default 270; keep it >= 20 s under the
#                        device call's timeout): the benchmark stops timing new cases 45 s before
#                        it and prints what it has
#   LORDS_BUILD_TIMEOUT  seconds for the extension build (default 280); LORDS_SKIP_BUILD=1 skips it;
#                        LORDS_CUDA_ARCH defaults to 9.0a here (setup.py's own default builds 8.0 too)
#   LORDS_BENCH_PYTEST=1 also run a short pytest-benchmark pass (4096x4096) before the benchmark
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
BUDGET="${LORDS_BUDGET_S:-270}"
START=$SECONDS

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv,noheader 2>&1 || true
python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

echo "== wheels"
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    ls .whl
  else
    echo "wheel install FAILED: bitsandbytes / gemlite will be reported as unavailable"
  fi
else
  echo "no .whl folder carried: bitsandbytes / gemlite only if the image has them"
fi

if [ -f setup.py ] && [ "${LORDS_SKIP_BUILD:-0}" != 1 ]; then
  # Only the H100's own machine code, sm_90a as in setup.py's default (the wgmma kernel): the GPU runs
  # that cubin of a multi-arch build anyway, and one architecture compiles in about half the time.
  export LORDS_CUDA_ARCH="${LORDS_CUDA_ARCH:-9.0a}"
  echo "== build (LORDS_CUDA_ARCH=$LORDS_CUDA_ARCH python3 setup.py build_ext --inplace; log $OUT/build.log)"
  source bench/build_stamp.sh
  lords_sources_check
  if MAX_JOBS=16 timeout "${LORDS_BUILD_TIMEOUT:-280}" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
    lords_sources_stamp
    echo "build ok ($((SECONDS - START)) s so far)"
  else
    echo "build FAILED or timed out (rc $?): going on with the Triton / reference backends; last lines:"
    tail -n 25 "$OUT/build.log"
  fi
fi

echo "== lords_ext dispatch"
python3 -c 'from lords_ext.backends import dispatch; print(dispatch.describe())' 2>&1 | tail -n 15 || true

if [ "${LORDS_BENCH_PYTEST:-0}" = 1 ]; then
  echo "== pytest-benchmark pass (log $OUT/pytest.log)"
  LORDS_BENCH_MS=1,4096 timeout 90 python3 -m pytest bench/ --benchmark-only -q -rs -p no:cacheprovider \
    > "$OUT/pytest.log" 2>&1
  echo "pytest rc $?"
  grep -E "passed|failed|error|SKIPPED|^LoRDS|^cuBLAS|^bnb|^x vs" "$OUT/pytest.log" | tail -n 16
fi

echo "== benchmark"
# The benchmark's own budget leaves room for Python start-up and imports (~15 s), the case in flight
# when it runs out, and the JSON and plots; a hard timeout backs it up, after which the table is
# rebuilt from the progress log, so a cut run still ends with its table.
LEFT=$((BUDGET - (SECONDS - START)))
[ "$LEFT" -lt 60 ] && LEFT=60
timeout "$LEFT" python3 -m bench.bench_kernels --out "$OUT/bench_kernels.json" --plot-dir "$OUT" \
  --budget-s "$((LEFT - 45))" "$@" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && grep -q " us  \[p10" "$OUT/bench.log"; then
  echo "(benchmark stopped, rc $rc: table rebuilt from its log)"
  python3 -m bench.bench_kernels --from-log "$OUT/bench.log" --out "$OUT/bench_kernels.json" \
    --plot-dir "$OUT" 2>&1 | tail -n +2
fi
echo "(run_h100.sh: $((SECONDS - START)) s in all, benchmark rc $rc)"
exit "$rc"
