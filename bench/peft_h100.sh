#!/usr/bin/env bash
# Device calls of issue 6 (PEFT / QAT on the re-encoded SmolLM2 pack, bench/peft_notes.md), one per
# argument, each sized for one 600 s call. Carry .data/peft_pack.safetensors and .data/peft_whl.
#
#   bash bench/peft_h100.sh profile   # where a training step goes (4-bit LoRDS-PEFT vs QLoRA-eq, 30 steps)
#                                     # + the 3-bit PEFT comparison, seed 0, lr 1e-3 and 3e-3
#   bash bench/peft_h100.sh seed1     # 3-bit PEFT, seed 1 (lr 3e-3), then the 3-bit QAT rows (seed 0)
#   bash bench/peft_h100.sh host      # GPU tests of the Triton paths, host time per op, 4-bit step (seed 0)
#   bash bench/peft_h100.sh host2     # the 4-bit step comparison with seed 1 (+ QLoRA rank 16), more GPU tests
#   bash bench/peft_h100.sh paired    # 4-bit step times side by side (--paired-steps 40) + step profiles
#   bash bench/peft_h100.sh compiled  # 4-bit steps with the training forward under torch.compile (inductor),
#                                     # both methods, + step profiles (compile time on the H100 host not yet known)
#   bash bench/peft_h100.sh graphs    # the same under torch.compile(mode="reduce-overhead"): CUDA graphs
#   bash bench/peft_h100.sh graphs100 # CUDA-graph steps, 100 steps, seed 1, + QLoRA rank 16
#   bash bench/peft_h100.sh calib0    # 4 bits, activation-aware LoRDS PTQ vs QLoRA-eq, lr 1e-3 and 3e-3, seed 0
#   bash bench/peft_h100.sh calib1    # the same with seed 1
#   bash bench/peft_h100.sh calib3    # 3 bits, activation-aware LoRDS PTQ vs nflora-eq (QLoRA's recipe), seed 0
# The exact pack (--make-pack .data/exact.safetensors --pack-exact --pack-parts 2: the GGUF's own Q4_1 /
# Q8_0 values, ~78 MB) does not fit one call, so it travels in two; the machine must stay warm between
# them (/tmp is kept while it is held):
#   bash bench/peft_h100.sh exact-stage  # carry .data/exact.part1of2.safetensors only: copies it to
#                                        # /tmp/lords_exact/ and lists it (no wheels, no runs)
#   bash bench/peft_h100.sh exact0       # carry .data/exact.part2of2.safetensors and .data/peft_whl: the calib0
#                                        # comparison (4 bits, activation-aware LoRDS PTQ vs QLoRA-eq, lr 1e-3
#                                        # and 3e-3) on the exact model, seed 0
#   bash bench/peft_h100.sh exact1       # the same with seed 1 (part 2 already staged by exact0, or carried)
#   bash bench/peft_h100.sh exact3       # 3 bits (LoRDS-PEFT vs nflora-eq, lr 3e-3), then QLoRA rank 16 and
#                                        # LoRDS-QAT vs block-QAT at 4 bits, seed 0 (carry part 2 as for exact0)
# JSON and logs go to $OUT; the result tables are printed last. LORDS_PEFT_BUDGET_S (compiled: 480) lets
# a call that builds the CUDA extension first keep within its 600 s.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/peft_h100_out}"
mkdir -p "$OUT"
step="${1:-profile}"
EXACT_DIR=/tmp/lords_exact
EXACT_PARTS=("$EXACT_DIR/exact.part1of2.safetensors" "$EXACT_DIR/exact.part2of2.safetensors")
# stage_exact N: copy the carried part N of the exact pack to $EXACT_DIR, out of the working tree's reach
# (a later call's tree replaces .data/ paths it carries; /tmp stays while the machine is held)
stage_exact() {
  local src=".data/exact.part${1}of2.safetensors"
  mkdir -p "$EXACT_DIR" && [ -f "$src" ] && cp "$src" "$EXACT_DIR/" && echo "staged $src"
}
if [ "$step" = exact-stage ]; then  # before the wheels: this call carries part 1 only
  stage_exact 1 || { echo "exact-stage: expected .data/exact.part1of2.safetensors in the carried tree"; exit 1; }
  ls -l "$EXACT_DIR"
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .data/peft_whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
python3 -c 'import torch, triton, peft, bitsandbytes; print("torch", torch.__version__, "triton", triton.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__)'
# pc NAME ARGS...: one peft_compare.py run on the pack files in PACK, its JSON and log in $OUT/NAME.json / NAME.log
PACK=(.data/peft_pack.safetensors)
pc() {
  local name="$1"; shift
  python3 bench/peft_compare.py --pack "${PACK[@]}" "$@" --out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
}
case "$step" in
  profile)
    pc profile4 --bits 4 --methods lords-peft qlora-eq --steps 30 --profile-steps 5
    pc peft3_seed0 --bits 3 --methods lords-peft nflora-eq --lr-peft 3e-3 1e-3 --steps 100 --seed 0 --budget-s 330
    ;;
  seed1)
    python3 bench/host_overhead.py --profile 2>&1 | tee "$OUT/host_overhead.log"
    pc peft3_seed1 --bits 3 --methods lords-peft nflora-eq --lr-peft 3e-3 --steps 100 --seed 1
    pc qat3_seed0 --bits 3 --methods lords-qat block-qat --steps 100 --seed 0 --budget-s 300
    ;;
  host)
    # after a host-overhead change: GPU tests of the Triton paths, the per-op host table, the 4-bit step
    timeout 200 python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_grad_scales.py \
      python_tests/test_gpu_triton.py 2>&1 | tail -n 15
    python3 bench/host_overhead.py --profile 2>&1 | tee "$OUT/host_overhead.log"
    pc peft4_seed0 --bits 4 --methods lords-peft qlora-eq --steps 100 --seed 0
    ;;
  host2)
    # second seed of the 4-bit step comparison, with QLoRA's usual rank 16; then more GPU tests
    pc peft4_seed1 --bits 4 --methods lords-peft qlora-eq qlora-r16 --lr-peft 1e-3 --steps 100 --seed 1
    timeout 100 python3 -m pytest -x -q -p no:cacheprovider python_tests/test_gpu_triton.py -k "odd_shapes or graph or grad_x" 2>&1 | tail -n 5
    ;;
  paired)
    # step time side by side (alternating single steps, cancels host drift) + a step profile, 4 bits
    pc peft4_paired --bits 4 --methods lords-peft qlora-eq qlora-r16 --lr-peft 1e-3 --steps 30 --profile-steps 5 \
      --paired-steps 40
    # host time per call at one token (decoding) as well as at training size
    python3 bench/host_overhead.py --M 1 2>&1 | tee "$OUT/host_overhead_m1.log"
    ;;
  compiled)
    # the steps are host-bound (Python, autograd, launches): compiled steps compare the kernels' work
    pc peft4_compiled --bits 4 --methods lords-peft qlora-eq --lr-peft 1e-3 --steps 20 --profile-steps 5 --compile inductor \
      --budget-s "${LORDS_PEFT_BUDGET_S:-480}"
    ;;
  graphs)
    # the same with CUDA graphs of the compiled training forward and backward (reduce-overhead): the
    # host's Python, autograd and launch costs leave the step for both methods
    pc peft4_graphs --bits 4 --methods lords-peft qlora-eq --lr-peft 1e-3 --steps 20 --profile-steps 5 --compile reduce-overhead \
      --budget-s "${LORDS_PEFT_BUDGET_S:-480}"
    ;;
  graphs100)
    # CUDA-graph steps over a full 100-step run (seed 1) with QLoRA's usual rank 16 as well: step time
    # and the eval loss after training, in the mode where the host is out of the step
    pc peft4_graphs100 --bits 4 --methods lords-peft qlora-eq qlora-r16 --lr-peft 1e-3 --steps 100 --seed 1 --compile reduce-overhead \
      --budget-s "${LORDS_PEFT_BUDGET_S:-480}"
    ;;
  calib0|calib1)
    # 4 bits with the activation-aware LoRDS PTQ (ALS first, then Adam under the layer Hessians of the
    # first 65,536 training tokens) against QLoRA at equal trainable numbers, both at lr 1e-3 and 3e-3
    seed="${1#calib}"
    pc "peft4_calib_seed$seed" --bits 4 --methods lords-peft qlora-eq --lr-peft 1e-3 3e-3 --steps 100 --seed "$seed" \
      --ptq-calibration-tokens 65536 --budget-s "${LORDS_PEFT_BUDGET_S:-420}"
    ;;
  calib3)
    # 3 bits with the activation-aware LoRDS PTQ against QLoRA's recipe at 3 bits (nflora-eq), seed 0, lr 3e-3
    pc peft3_calib_seed0 --bits 3 --methods lords-peft nflora-eq --lr-peft 3e-3 --steps 100 --seed 0 \
      --ptq-calibration-tokens 65536 --budget-s "${LORDS_PEFT_BUDGET_S:-420}"
    ;;
  exact0|exact1|exact3)
    # on the exact pack (the GGUF's own Q4_1 linears, Q8_0 embedding rows; restricted vocabulary)
    stage_exact 2 || echo "part 2 not carried: using the one staged before"
    for f in "${EXACT_PARTS[@]}"; do
      [ -f "$f" ] || { echo "$step: expected $f (exact-stage, then exact0 carrying part 2, on a warm machine)"; ls -l "$EXACT_DIR"; exit 1; }
    done
    PACK=("${EXACT_PARTS[@]}")
    if [ "$step" = exact3 ]; then
      # 3 bits: calib3's comparison; then QLoRA's usual rank 16 and the two QAT methods at 4 bits (seed 0)
      pc peft3_exact_seed0 --bits 3 --methods lords-peft nflora-eq --lr-peft 3e-3 --steps 100 --seed 0 \
        --ptq-calibration-tokens 65536 --budget-s 280
      pc peft4_exact_r16_qat_seed0 --bits 4 --methods qlora-r16 lords-qat block-qat --lr-peft 1e-3 --steps 100 --seed 0 \
        --ptq-calibration-tokens 65536 --budget-s 200
    else
      # calib0/calib1's comparison (4 bits, activation-aware LoRDS PTQ vs QLoRA-eq, lr 1e-3 and 3e-3)
      seed="${1#exact}"
      pc "peft4_exact_seed$seed" --bits 4 --methods lords-peft qlora-eq --lr-peft 1e-3 3e-3 --steps 100 --seed "$seed" \
        --ptq-calibration-tokens 65536 --budget-s "${LORDS_PEFT_BUDGET_S:-420}"
    fi
    ;;
  *) echo "unknown step $1 (profile | seed1 | host | host2 | paired | compiled | graphs | graphs100 | calib0 | calib1 | calib3 | exact-stage | exact0 | exact1 | exact3)"; exit 2 ;;
esac
