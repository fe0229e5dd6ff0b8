"""Fit the constants of `fused_stream_k_preferred` (csrc/fused_gemm.cu) to a timing of the split-K plan and stream-K.

Input: a JSON from `python3 -m bench.dequant_paths --ms 16 --no-dequant --no-triton --stream-k 0 --shapes ...` on a
132-SM H100 (records with `cuda_fused_s0_us`, the split-K plan, and `cuda_sk_b0_us`, stream-K on one block per SM).
The rule, in half superchunk steps of one block:

    split-K  = waves x (2 x superchunks per split + SPLIT)
    stream-K = 2 x ceil(tiles x superchunks / SMs) + FIXED + SHARE x SMs / tiles

and path -1 takes stream-K where split-K > stream-K. The plan's split count and waves per shape are not visible from
Python (the C++ plan counts the thread block clusters that fit at once), so PLANS holds them as read off session 22's
explicit split timings (bench/h100/session22/rule_fit); a shape outside PLANS is skipped with a note.

    python3 bench/stream_k_rule_fit.py bench/h100/session23/release_check/dp_0_base.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import math

SMS = 132
K_SUPER = 128
ROWS = 128
# (N, K) -> (split count, waves) of the split-K plan at 16 tokens, 4 bits, parity rank, H100.
PLANS = {
    (14336, 4096): (1, 1), (11008, 4096): (4, 3), (4096, 14336): (3, 1), (4096, 11008): (3, 1),
    (5120, 13824): (2, 1), (4096, 4096): (3, 1), (2048, 8192): (6, 1), (8192, 4096): (2, 1), (4096, 8192): (3, 1),
    (8192, 8192): (2, 1), (13824, 5120): (1, 1), (3584, 18944): (4, 1), (6144, 4096): (2, 1), (12288, 4096): (1, 1),
    (5120, 5120): (2, 1), (7168, 7168): (2, 1), (2560, 10240): (8, 1), (3072, 8192): (4, 1),
}


def steps(n: int, k: int, split: float, fixed: float, share: float) -> tuple[float, float]:
    splits, waves = PLANS[(n, k)]
    tiles, k_super = math.ceil(n / ROWS), k // K_SUPER
    split_k = waves * (2 * math.ceil(k_super / splits) + split)
    stream_k = 2 * math.ceil(tiles * k_super / SMS) + fixed + share * SMS / tiles
    return split_k, stream_k


def excess(records: list[dict], split: float, fixed: float, share: float) -> tuple[float, list[str]]:
    """Summed us lost to the rule's wrong choices, and those shapes with the loss in percent."""
    total, misses = 0.0, []
    for r in records:
        a, b = r["cuda_fused_s0_us"], r["cuda_sk_b0_us"]
        split_k, stream_k = steps(r["N"], r["K"], split, fixed, share)
        chosen = b if split_k > stream_k else a
        if chosen > min(a, b):
            total += chosen - min(a, b)
            misses.append(f"{r['N']}x{r['K']} {100 * (chosen / min(a, b) - 1):.1f} %")
    return total, misses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="bench.dequant_paths output (M = 16 records with the plan and stream-K timed)")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    records = []
    for r in json.load(open(args.json)):
        if r.get("M") != 16 or "cuda_sk_b0_us" not in r or "cuda_fused_s0_us" not in r:
            continue
        if (r["N"], r["K"]) not in PLANS:
            print(f"skipped {r['N']}x{r['K']}: its split-K plan is not in PLANS")
            continue
        records.append(r)
    fits = []
    for split, fixed, share in itertools.product([2, 3, 4], range(0, 21), [0, 0.5, 1, 1.5, 2, 2.5, 3]):
        total, misses = excess(records, split, fixed, share)
        fits.append((round(total, 2), split, fixed, share, misses))
    fits.sort(key=lambda f: (f[0], len(f[4])))
    print(f"{len(records)} shapes; best fits (summed us lost, SPLIT, FIXED, SHARE, wrong choices):")
    for f in fits[:args.top]:
        print(f"  {f[0]:6.2f} us  SPLIT {f[1]}  FIXED {f[2]}  SHARE {f[3]}  {', '.join(f[4]) or 'none'}")
    print("current (3, 5, 2):", excess(records, 3, 5, 2))


if __name__ == "__main__":
    main()
