#!/usr/bin/env bash
# One device call: Nsight Compute profiles of the CUDA decode kernels at the decode shapes, reduced to
# a few lines each (speed of light, occupancy; stall reasons, executed instructions and stall samples
# per program region via bench/ncu_regions.py). Per case only the source page (CSV, for a closer look at
# the hot instructions) comes back in $OUT, gzipped: the device tool returns a limited number of files,
# so the reports and logs stay in a scratch folder on the device.
#   bash bench/ncu_profile_h100.sh ["N K M PATH" ...]     default: the M = 1 re-associated launches
#   bash bench/ncu_profile_h100.sh "4096 4096 1 dq1"      the dequant kernel, one superchunk per block
source "$(dirname "${BASH_SOURCE[0]}")/device_build.sh"
SCRATCH="$(mktemp -d)"
[ $# -gt 0 ] && CASES=("$@") || CASES=("4096 4096 1 2" "14336 4096 1 2" "4096 4096 4 0")
for c in "${CASES[@]}"; do
  set -- $c
  tag="n$1_k$2_m$3_p$4"
  echo; echo "=== $c (N K M path; 0 = direct, 2 = re-associated, dq<S> = dequant kernel, S superchunks per block)"
  timeout 150 ncu --clock-control none --kernel-name regex:'reassoc|decode_gemm|dequant_kernel|dequant_wgmma_kernel|fused_gemm' --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
    --section SourceCounters --import-source no -f -o "$SCRATCH/$tag" python3 bench/ncu_decode.py $1 $2 $3 $4 \
    > "$SCRATCH/$tag.log" 2>&1 || { echo "ncu failed"; tail -5 "$SCRATCH/$tag.log"; continue; }
  ncu --import "$SCRATCH/$tag.ncu-rep" --page details --print-units base > "$SCRATCH/$tag.details.txt" 2>&1
  grep -E "^\s+(Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Block Size|Grid Size|Dynamic Shared Memory Per Block|Achieved Active Warps Per SM|Issued Warp Per Scheduler|No Eligible|Active Warps Per Scheduler|Eligible Warps Per Scheduler|Warp Cycles Per Issued Instruction|Executed Instructions) " \
    "$SCRATCH/$tag.details.txt" | sed 's/  */ /g' | sort -u
  ncu --import "$SCRATCH/$tag.ncu-rep" --page source --print-source sass --csv > "$SCRATCH/$tag.source.csv" 2>&1
  python3 bench/ncu_regions.py "$SCRATCH/$tag.source.csv" --top 12 || head -5 "$SCRATCH/$tag.source.csv"
  gzip -c "$SCRATCH/$tag.source.csv" > "$OUT/$tag.source.csv.gz"
done
