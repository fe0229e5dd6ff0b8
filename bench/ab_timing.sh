# Sourced by the A/B device scripts (ab_patches_h100.sh, ab_parallel_h100.sh): the timing half of a variant.
# BENCHES: timing modules with their arguments, one per element (LORDS_AB_BENCH split at ";").
# time_modules NAME [VAR=value ...]: every module of BENCHES run from the current directory (the tree whose build
# is timed) with those environment variables, its records merged into $OUT/dp_NAME.json (log: $OUT/dp_NAME.log).
time_modules() {
  local name=$1 j=0 parts=() args b
  shift
  for b in "${BENCHES[@]}"; do
    j=$((j + 1))
    read -r -a args <<< "$b"
    env "$@" timeout 200 python3 -m "bench.${args[0]}" "${args[@]:1}" --json "$OUT/part_${name}_$j.json" \
      >> "$OUT/dp_$name.log" 2>&1
    echo "$name: ${args[0]} rc=$?"
    parts+=("$OUT/part_${name}_$j.json")
  done
  python3 -c 'import json,os,sys; json.dump(sum((json.load(open(p)) for p in sys.argv[2:] if os.path.exists(p)), []), open(sys.argv[1], "w"))' \
    "$OUT/dp_$name.json" "${parts[@]}"
  rm -f "${parts[@]}"
}
