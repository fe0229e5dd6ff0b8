"""Side-by-side table of timing JSONs from bench/ab_patches_h100.sh (one file per variant).

Each file is a list of records as written by bench.decode_paths or bench.dequant_paths: a record is
identified by its shape, rank, token count and kind (N, K, r, M, kind; absent fields ignored; the rank is
shown where one shape appears at several ranks), and every
`*_us` field is one timed path. Prints one row per (record, path) with one column per variant, in
the order the files are given; a variant without that record or path shows "-".

    python bench/ab_table.py OUT/dp_0_base.json OUT/dp_1_patch.json
"""
from __future__ import annotations

import json
import os
import sys

KEY_FIELDS = ("N", "K", "M", "kind", "r")


def variant_name(path: str) -> str:
    name = os.path.basename(path)
    name = name[3:] if name.startswith("dp_") else name
    return name[:-5] if name.endswith(".json") else name


def record_key(rec: dict) -> tuple:
    return tuple(rec.get(f) for f in KEY_FIELDS)


def table(paths: list[str]) -> str:
    runs = {}
    for p in paths:
        with open(p) as f:
            runs[variant_name(p)] = {record_key(r): r for r in json.load(f)}
    names = list(runs)
    keys = []
    for recs in runs.values():
        keys += [k for k in recs if k not in keys]
    ranks = {}
    for k in keys:
        ranks.setdefault(k[:2], set()).add(k[4])
    lines = ["| N x K | M | kind | path | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for k in keys:
        fields = []
        for recs in runs.values():
            fields += [f for f in recs.get(k, {}) if f.endswith("_us") and f not in fields]
        for field in fields:
            vals = [runs[n].get(k, {}).get(field) for n in names]
            cells = " | ".join("-" if v is None else f"{v:.2f}" for v in vals)
            m = "" if k[2] is None else k[2]
            kind = "" if k[3] is None else k[3]
            shape = f"{k[0]}x{k[1]}" + (f" r{k[4]}" if len(ranks[k[:2]]) > 1 else "")
            lines.append(f"| {shape} | {m} | {kind} | {field[:-3]} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        print("ab_table: no timing files")
        return 1
    print(table(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
