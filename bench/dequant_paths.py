"""The dequantize pass and the "dequantize, then cuBLAS" path at larger M, side by side, on the H100.

For each Llama-3-8B shape (4-bit NF4, parity rank for block 64), times in one process:
* W = codebook[Q] * (B @ A) written once in bf16: the CUDA kernel at each block depth (`superchunks`
  of 128 k per block; 0 = its own choice) and the Triton kernel, against a measured write floor (a
  bf16 fill of the same N x K elements: the bytes the pass must write, without the code reads);
* y = x @ W.T at M in --ms: the CUDA dequant + cuBLAS path (path 1), the fused wgmma GEMM (path 4, where
  the sm_90a image runs; its own split plan and each count of --fused-splits), the Triton backend's own
  choice, the public op (dispatch) and cuBLAS bf16 on a dense weight.
Same timing method as bench_kernels.py (CUDA graphs over weight copies rotated past L2, median per
call); every LoRDS path is checked against the fp32 reference before it is timed.

    python -m bench.dequant_paths [--ms 32,64,256,1024,4096] [--shapes 4096x4096,...] [--fused-splits 1,2,4]
    python -m bench.dequant_paths --no-dequant ...   (the y rows alone; --no-triton: without Triton's)
    python -m bench.dequant_paths --stream-k 0,264 ...  (also path 5, the stream-K fused GEMM, on that many blocks)

A shape NxK takes the parity rank; NxKrR takes rank R instead (bench.decode_paths.parse_shape).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from bench import methods, timing
from bench.decode_paths import SHAPES, checked_us, cuda_ready, parse_shape

DEPTHS = (0, 1, 2, 4)


def _us(calls) -> float:
    return timing.time_calls(calls, log=lambda *_: None).us


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="32,64,256,1024,4096")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--fused-splits", default="", help="split counts to time path 4 at, besides its own plan")
    p.add_argument("--stream-k", default="",
                   help="block counts to time path 5 (the fused GEMM's stream-K schedule, 4 bits) at; 0 = one per SM")
    p.add_argument("--no-dequant", action="store_true", help="skip the dequantize-pass timings")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton backend's y rows (its autotuning)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "dequant_paths.json"))
    a = p.parse_args(argv)
    if (rc := cuda_ready("dequant_paths")) is not None:
        return rc
    import lords_ext  # noqa: F401  (registers the public op)
    from lords_ext.backends import triton_backend

    dev = torch.device("cuda")
    ms = [int(m) for m in a.ms.split(",") if m]
    fused = "fused_gemm_ready=1" in torch.ops.lords.cuda_features()
    fsplits = [int(v) for v in a.fused_splits.split(",") if v]
    sk_blocks = [int(v) for v in a.stream_k.split(",") if v] if fused else []
    rows = []
    for shape in a.shapes.split(","):
        N, K, rank = parse_shape(shape)
        lw = methods.LordsWeights(N, K, dev, rank=rank)
        cb = lw.codebook
        ref = lw.weight0()
        rec = dict(N=N, K=K, r=lw.r, kind="dequant")
        fills = [torch.empty(N, K, device=dev, dtype=torch.bfloat16) for _ in range(len(lw.copies))]
        rec["write_floor_us"] = _us([lambda w=w: w.fill_(1.0) for w in fills])
        del fills

        def checked(name, fn):
            rec[f"{name}_us"] = checked_us(fn, lw.copies, ref, 1e-2, f"{name} at N={N} K={K}")[0]

        for d in () if a.no_dequant else DEPTHS:
            checked(f"cuda_sc{d}", lambda q, B, A, d=d: torch.ops.lords.dequant_cuda(q, B, A, cb, d))
        if not a.no_dequant:
            checked("triton", lambda q, B, A: triton_backend.dequant(q, B, A, cb))
            rows.append(rec)
        print(f"{N}x{K} dequant: " + " ".join(f"{k}={v:.2f}" for k, v in rec.items() if k.endswith("_us")),
              flush=True)

        dense = methods.cublas(N, K, dev)
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            yref = x.float() @ ref.T
            mrec = dict(N=N, K=K, r=lw.r, M=M, kind="matmul", write_floor_us=rec["write_floor_us"])

            def mm(name, fn):
                mrec[f"{name}_us"] = checked_us(fn, lw.copies, yref, 2e-2, f"{name} at N={N} K={K} M={M}")[0]

            mm("cuda_dequant_mm", lambda q, B, A: torch.ops.lords.dequant_matmul_cuda(x, q, B, A, cb, None, 1, 0))
            if fused:
                for sp in [0] + fsplits:
                    mm(f"cuda_fused_s{sp}",
                       lambda q, B, A, sp=sp: torch.ops.lords.dequant_matmul_cuda(x, q, B, A, cb, None, 4, sp))
            for nb in sk_blocks:
                mm(f"cuda_sk_b{nb}", lambda q, B, A, nb=nb: torch.ops.lords.dequant_matmul_cuda(x, q, B, A, cb, None, 5, nb))
            if not a.no_triton:
                mm("triton", lambda q, B, A: triton_backend.dequant_matmul(x, q, B, A, cb))
            mm("op", lambda q, B, A: torch.ops.lords.dequant_matmul(x, q, B, A, cb, None))
            mrec["cublas_us"] = _us([lambda w=w: F.linear(x, w) for w in dense.copies])
            rows.append(mrec)
            print(f"{N}x{K} M={M}: " + " ".join(f"{k}={v:.2f}" for k, v in mrec.items() if k.endswith("_us")),
                  flush=True)
        del lw, dense
        torch.cuda.empty_cache()

    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    if not a.no_dequant:
        print_dequant(rows)
    print_matmul(rows, ([f"cuda_fused_s{sp}" for sp in [0] + fsplits] if fused else [])
                 + [f"cuda_sk_b{nb}" for nb in sk_blocks])
    return 0


def print_dequant(rows) -> None:
    print("\n| N x K (r) | write floor | " + " | ".join(f"cuda sc={d}" for d in DEPTHS) + " | triton | best / floor |")
    print("|---|---|" + "---|" * (len(DEPTHS) + 2))
    for d in (r for r in rows if r["kind"] == "dequant"):
        best = min(d[f"cuda_sc{x}_us"] for x in DEPTHS)
        print(f"| {d['N']}x{d['K']} ({d['r']}) | {d['write_floor_us']:.2f} | "
              + " | ".join(f"{d[f'cuda_sc{x}_us']:.2f}" for x in DEPTHS)
              + f" | {d['triton_us']:.2f} | {best / d['write_floor_us']:.2f} |")


def print_matmul(rows, fcols) -> None:
    head = (["N x K (r)", "M", "cuda dequant+mm"]
            + [c.replace("cuda_fused_s", "fused s=").replace("cuda_sk_b", "stream-K b=") for c in fcols]
            + ["triton", "op", "cuBLAS", "cuBLAS / cuda best", "cuBLAS / op"])
    print("\n| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d in (r for r in rows if r["kind"] == "matmul"):
        best = min([d["cuda_dequant_mm_us"]] + [d[c + "_us"] for c in fcols])
        print(f"| {d['N']}x{d['K']} ({d['r']}) | {d['M']} | {d['cuda_dequant_mm_us']:.2f} | "
              + "".join(f"{d[c + '_us']:.2f} | " for c in fcols)
              + f"{d.get('triton_us', float('nan')):.2f} | {d['op_us']:.2f} | {d['cublas_us']:.2f} | {d['cublas_us'] / best:.2f} | "
              f"{d['cublas_us'] / d['op_us']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
