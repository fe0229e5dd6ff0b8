"""Time the fused Triton grad_scales kernel (gradients of B and A of dequant_matmul) against the
paths that materialize dS = (grad_y^T @ x) * codebook[Q] in memory, and report the extra memory
each one needs.

Contenders, per layer shape (N, K, r) and token count M, activations and grad_y in bf16:
  triton       the fused kernel, autotuned, fp32 atomics across tiles (the default)
  triton-det   the same kernel, per-tile partial sums summed by torch (deterministic mode)
  reference    lords_ext.backends.reference.grad_scales: unpack the codes, fp32 dS, fp32 matmuls
               (what training ran before this kernel)
  torch-bf16   cuBLAS in bf16 with codebook[Q] decoded beforehand (decoding not timed, favours it):
               dS = (grad_y^T @ x) * C in bf16, then the two rank-r products in bf16; the fastest a
               materializing path gets, at bf16 rounding of dS

Method (bench/timing.py, BENCHMARKING.md): CUDA-graph replays of a loop over distinct weight copies
(>= 240 MB in all, so codes and scales come from HBM), median per call. Peak extra memory is
max_memory_allocated during one eager call minus what was allocated before it (outputs included).
The relative error of each contender is against the float64 formula on copy 0.

    python bench/bench_grad_scales.py [--tokens 256,1024,4096] [--scales-dtype fp32,bf16] [--json PATH]

Without CUDA it says so and exits 0. `--device cpu` (with TRITON_INTERPRET=1) runs the harness on a
tiny shape on the CPU, untimed in any meaningful sense: a smoke test of this script only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

if __package__ in (None, ""):  # run as a script: make `bench` and `lords_ext` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from bench import timing

DEFAULT_SHAPES = "4096x4096:32,14336x4096:49"
DEFAULT_TOKENS = "256,1024,4096"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("triton", "triton-det", "reference", "torch-bf16")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        try:
            nk, r = item.split(":")
            n, k = nk.lower().split("x")
            out.append((int(n), int(k), int(r)))
        except ValueError:
            raise SystemExit(f"--shapes: expected items like 4096x4096:32 (NxK:rank), got {item!r}") from None
    return out


def parse_ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{name}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise SystemExit(f"{name}: expected positive integers, got {text!r}")
    return vals


def make_copies(N, K, r, sdtype, device, count, seed=0):
    """`count` distinct (qweight, B, A, C) with random 4-bit codes and NF4 levels; C = codebook[Q]
    in bf16 is what the torch-bf16 contender starts from."""
    from lords_ext import formats
    cb = formats.get_codebook("nf4")[0].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    amp = (0.02 / r) ** 0.5
    copies = []
    for _ in range(count):
        codes = torch.randint(0, 16, (N, K), device=device, generator=gen)
        B = ((torch.rand(N, r, device=device, generator=gen) + 0.5) * amp).to(sdtype)
        A = ((torch.rand(r, K, device=device, generator=gen) + 0.5) * amp).to(sdtype)
        copies.append((formats.pack(codes, 4), B, A, cb[codes].to(torch.bfloat16)))
    return cb, copies


def contender(name, tb, reference, gy, x, cb):
    if name == "triton":
        return lambda q, B, A, C: tb.grad_scales(gy, x, q, B, A, cb, deterministic=False)
    if name == "triton-det":
        return lambda q, B, A, C: tb.grad_scales(gy, x, q, B, A, cb, deterministic=True)
    if name == "reference":
        return lambda q, B, A, C: reference.grad_scales(gy, x, q, B, A, cb)

    def torch_bf16(q, B, A, C):
        dS = (gy.T @ x) * C
        return ((dS @ A.to(dS.dtype).T).to(B.dtype), (B.to(dS.dtype).T @ dS).to(A.dtype))
    return torch_bf16


def peak_extra_mib(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def exact(gy, x, q, B, A, cb):
    from lords_ext.backends import reference
    return reference.grad_scales(gy.double(), x.double(), q, B.double(), A.double(), cb.double())


def run_case(N, K, r, M, sdtype, device, methods, log):
    from lords_ext.backends import reference
    from lords_ext.backends import triton_backend as tb

    per_copy = N * K // 2 + (N * r + r * K) * torch.finfo(sdtype).bits // 8
    count = timing.copies_for(per_copy) if device.type == "cuda" else 2
    cb, copies = make_copies(N, K, r, sdtype, device, count, seed=N + r)
    gen = torch.Generator(device=device).manual_seed(M)
    x = torch.randn(M, K, device=device, generator=gen).to(torch.bfloat16)
    gy = (torch.randn(M, N, device=device, generator=gen) * 1e-2).to(torch.bfloat16)
    ref_b, ref_a = exact(gy, x, copies[0][0], copies[0][1], copies[0][2], cb)
    row = {"N": N, "K": K, "r": r, "M": M, "scales": str(sdtype).replace("torch.", ""), "copies": count}
    for name in methods:
        fn = contender(name, tb, reference, gy, x, cb)
        gb, ga = fn(*copies[0])
        err = max(timing.rel_error(gb, ref_b), timing.rel_error(ga, ref_a))
        mib = peak_extra_mib(lambda: fn(*copies[0]), device)
        t = timing.time_calls([(lambda c=c: fn(*c)) for c in copies], log=log, device=device)
        row[name] = {"us": t.us, "p10_us": t.p10_us, "p90_us": t.p90_us, "graph": t.graph,
                     "extra_mib": mib, "rel_err": err}
        log(f"  {N}x{K} r={r} M={M} scales={row['scales']} {name:<10s} {t.us:10.1f} us  "
            f"extra {mib:8.1f} MiB  rel err {err:.2e}{'' if t.graph else '  (eager)'}")
    return row


def table(rows, methods) -> str:
    head = ["shape", "r", "M", "scales"] + [f"{m} us" for m in methods] + [f"{m} MiB" for m in methods]
    if "triton" in methods and "reference" in methods:
        head.append("ref/triton")
    if "triton" in methods and "torch-bf16" in methods:
        head.append("bf16/triton")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['N']}x{row['K']}", str(row["r"]), str(row["M"]), row["scales"]]
        cells += [f"{row[m]['us']:.1f}" + ("" if row[m]["graph"] else "*") for m in methods]
        cells += ["-" if math.isnan(row[m]["extra_mib"]) else f"{row[m]['extra_mib']:.1f}" for m in methods]
        if "triton" in methods and "reference" in methods:
            cells.append(f"{row['reference']['us'] / row['triton']['us']:.2f}x")
        if "triton" in methods and "torch-bf16" in methods:
            cells.append(f"{row['torch-bf16']['us'] / row['triton']['us']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    errs = "; ".join(f"{m} {max(row[m]['rel_err'] for row in rows):.1e}" for m in methods)
    lines.append(f"max relative error vs float64: {errs}")
    if any(not row[m]["graph"] for row in rows for m in methods):
        lines.append("* timed eagerly, not from a CUDA graph: includes Python launch overhead")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="NxK:rank items, comma-separated")
    p.add_argument("--tokens", default=DEFAULT_TOKENS, help="token counts M, comma-separated")
    p.add_argument("--scales-dtype", default="fp32,bf16", help="dtypes of B and A: fp32, bf16, fp16")
    p.add_argument("--methods", default=",".join(METHODS), help=f"subset of {METHODS}")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: expected names from {METHODS}, got {bad}")
    sdtypes = []
    for name in args.scales_dtype.split(","):
        if name not in DTYPES:
            raise SystemExit(f"--scales-dtype: expected names from {sorted(DTYPES)}, got {name!r}")
        sdtypes.append(DTYPES[name])
    shapes = parse_shapes(args.shapes)
    tokens = parse_ints(args.tokens, "--tokens")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_grad_scales: no CUDA device here; nothing to time (use --device cpu with "
              "TRITON_INTERPRET=1 for a smoke test of the script)")
        return 0
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("--device cpu: set TRITON_INTERPRET=1 (the Triton kernel runs on the CPU only interpreted)")
    device = torch.device(args.device)
    import triton
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter, smoke test)"
    print(f"bench_grad_scales on {where}; torch {torch.__version__}, triton {triton.__version__}; "
          f"bf16 activations and grad_y, 4-bit NF4")
    rows = []
    for N, K, r in shapes:
        for sdtype in sdtypes:
            for M in tokens:
                rows.append(run_case(N, K, r, M, sdtype, device, methods, print))
                if device.type == "cuda":  # the weight copies of the last case are garbage now
                    torch.cuda.empty_cache()
                if args.json:  # checkpoint after each case: a cut run keeps what it measured
                    with open(args.json, "w") as fh:
                        json.dump({"device": where, "rows": rows}, fh, indent=1)
    print()
    print(table(rows, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
