"""Where a CUDA kernel's executed instructions and stall samples go, by program region, from Nsight
Compute's per-instruction source page (the GPU side of bench/sass_static.py's static counts).

    ncu --section SourceCounters --kernel-name regex:reassoc --launch-skip 3 --launch-count 1 \
        -o rep python3 bench/ncu_decode.py 4096 4096 1 2
    ncu --import rep.ncu-rep --page source --print-source sass --csv > rep.csv
    python3 bench/ncu_regions.py rep.csv [--top 15]

Regions as in sass_static.py: prologue (before the first tensor-core mma), main loop (first to last
mma), epilogue (after the last mma). Regions are SASS positions, not phases: loop code placed before the
loop's first mma (the cp.async copies of the A ring in decode_gemm.cu) counts as prologue; the
executed column (per warp per superchunk there) shows it. Prints one row per region, the stall reasons (overall and per
region, from the page's stall_* columns) and the instructions with the most stall samples.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from collections import Counter


def _column(header: list[str], *needles: str) -> int | None:
    for i, name in enumerate(header):
        low = name.lower()
        if all(n in low for n in needles):
            return i
    return None


def _number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text.strip() else 0.0
    except ValueError:
        return 0.0


def read_rows(text: str) -> tuple[list[str], list[list[str]]]:
    """The CSV table of the source page (ncu may print lines before it)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "Source" in line and "Address" in line), None)
    if start is None:
        raise ValueError("no 'Address' / 'Source' header in the ncu source page: was --page source --csv used?")
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    return rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]


def summarize(header: list[str], rows: list[list[str]]) -> dict:
    src = _column(header, "source")
    exe = _column(header, "instructions executed")
    stall = _column(header, "warp stall sampling", "all")
    if stall is None:
        stall = _column(header, "warp stall sampling")
    if src is None or exe is None or stall is None:
        raise ValueError(f"expected Source, Instructions Executed and Warp Stall Sampling columns, got {header}")
    mma = [i for i, r in enumerate(rows) if any("MMA" in tok for tok in r[src].split()[:2])]
    first, last = (mma[0], mma[-1]) if mma else (len(rows), len(rows))
    reasons = [(i, name[len("stall_"):]) for i, name in enumerate(header)
               if name.startswith("stall_") and "not issued" not in name.lower()]
    out = {name: {"static": 0, "executed": 0.0, "stalls": 0.0, "reasons": Counter()}
           for name in ("prologue", "main loop", "epilogue")}
    ranked = []
    for i, r in enumerate(rows):
        region = "prologue" if i < first else "main loop" if i <= last else "epilogue"
        e, s = _number(r[exe]), _number(r[stall])
        out[region]["static"] += 1
        out[region]["executed"] += e
        out[region]["stalls"] += s
        for col, reason in reasons:
            out[region]["reasons"][reason] += _number(r[col])
        ranked.append((s, region, i, r[src].strip(), e))
    ranked.sort(reverse=True)
    return {"regions": out, "top": ranked}


def _shares(counts: Counter, n: int) -> str:
    tot = sum(counts.values()) or 1.0
    return ", ".join(f"{k} {100 * v / tot:.0f}%" for k, v in counts.most_common(n) if v > 0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="ncu --page source --print-source sass --csv output (.gz read as gzip; '-' for stdin)")
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args(argv)
    if a.csv == "-":
        text = sys.stdin.read()
    else:
        with (gzip.open(a.csv, "rt") if a.csv.endswith(".gz") else open(a.csv)) as f:
            text = f.read()
    header, rows = read_rows(text)
    res = summarize(header, rows)
    tot_e = sum(v["executed"] for v in res["regions"].values()) or 1.0
    tot_s = sum(v["stalls"] for v in res["regions"].values()) or 1.0
    print("| region | static instr | warp instr executed | share | stall samples | share |")
    print("|---|---|---|---|---|---|")
    for name, v in res["regions"].items():
        print(f"| {name} | {v['static']} | {v['executed']:.0f} | {100 * v['executed'] / tot_e:.1f} % "
              f"| {v['stalls']:.0f} | {100 * v['stalls'] / tot_s:.1f} % |")
    overall = sum((v["reasons"] for v in res["regions"].values()), Counter())
    if overall:
        print("\nstall samples: " + _shares(overall, 8))
        for name, v in res["regions"].items():
            print(f"  {name}: " + _shares(v["reasons"], 4))
    print(f"\ntop {a.top} instructions by stall samples (samples, region, index, executed, SASS):")
    for s, region, i, text_, e in res["top"][: a.top]:
        print(f"  {s:6.0f}  {region:9s} #{i:<5d} x{e:<8.0f} {text_[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
