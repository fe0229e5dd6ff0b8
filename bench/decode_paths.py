"""Small-M kernel paths of the CUDA backend, side by side, on the H100.

For each Llama-3-8B shape (4-bit NF4, parity rank for block 64) and M in --ms, times in one process:
the direct fused decode kernel (path 0), the re-associated kernel (path 2, where M*ceil(r/8)*8 <= 64; its
wgmma variant where this build and GPU run it, which also takes up to 128 columns with Z streamed) and the same kernel on mma.sync alone (path 3),
the automatic choice (path -1), with --sweep split-K sweeps of both fused kernels, and the contenders of
bench/methods.py that are available (cuBLAS bf16, bitsandbytes NF4, torch int4, the read floor). Same timing method as
bench_kernels.py (CUDA graphs over weight copies rotated past L2, median per call); each LoRDS path is
checked against the fp32 reference before it is timed. Prints one table per shape and writes JSON.

    python -m bench.decode_paths [--ms 1,2,4,8,16] [--shapes 4096x4096,1024x4096r49,...] [--sweep] [--triton]

A shape NxK takes the parity rank; NxKrR takes rank R instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

from bench import methods, timing

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def parse_shape(text: str) -> tuple[int, int, int | None]:
    """"NxK" -> (N, K, None: the parity rank), "NxKrR" -> (N, K, R)."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:r(\d+))?", text.strip())
    if m is None:
        raise ValueError(f"shape: expected NxK or NxKrR (e.g. 4096x4096 or 1024x4096r49), got {text!r}")
    return int(m[1]), int(m[2]), int(m[3]) if m[3] else None


def cuda_ready(tool: str) -> int | None:
    """None where a GPU and the built extension are there; otherwise says why and returns the exit code
    (0 without a GPU: nothing to time; 1 with a GPU but no extension: a broken build)."""
    if not torch.cuda.is_available():
        print(f"{tool}: needs a CUDA GPU")
        return 0
    import lords_ext.backends.cuda as cuda_backend

    if not cuda_backend.built():
        print(f"{tool}: lords_ext._C not built:", cuda_backend.LOAD_ERROR)
        return 1
    return None


def checked_us(fn, copies, ref: torch.Tensor, tol: float, what: str) -> tuple[float, float]:
    """(us per call, relative error): fn(*copies[0]) is checked against ref first (AssertionError naming
    `what` past tol), then fn is timed over every weight copy (rotated past L2)."""
    err = timing.rel_error(fn(*copies[0]), ref)
    if not err < tol:
        raise AssertionError(f"{what}: rel err {err:.3g}")
    return timing.time_calls([lambda s=s: fn(*s) for s in copies], log=lambda *_: None).us, err


def _time(c: methods.Contender, x: torch.Tensor) -> float:
    t = timing.time_calls([lambda s=s: c.call(s, x) for s in c.copies], log=lambda *_: None)
    return t.us


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ms", default="1,2,4,8,16")
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    p.add_argument("--sweep", action="store_true", help="split-K sweeps of the direct and re-associated kernels")
    p.add_argument("--triton", action="store_true",
                   help="also time the Triton backend (the public op's choice where dispatch.POLICY puts it first)")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench/results"), "decode_paths.json"))
    a = p.parse_args(argv)
    if (rc := cuda_ready("decode_paths")) is not None:
        return rc
    dev = torch.device("cuda")
    op = torch.ops.lords.dequant_matmul_cuda
    ms = [int(m) for m in a.ms.split(",")]
    rows = []
    for shape in a.shapes.split(","):
        N, K, rank = parse_shape(shape)
        lw = methods.LordsWeights(N, K, dev, rank=rank)
        cb = lw.codebook
        others = {}
        triton = None
        if a.triton:
            try:
                triton = methods.build("lords_triton", N, K, dev, lambda: lw)
            except methods.Unavailable as e:
                print(f"lords_triton: unavailable ({e})")
        for key in ("cublas", "bnb_nf4", "torch_int4"):
            try:
                others[key] = methods.build(key, N, K, dev, lambda: lw)
            except methods.Unavailable as e:
                print(f"{key}: unavailable ({e})")
        floor = min(_time(c, None) for c in methods.floor_variants(N, K, dev, r=lw.r))
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = lw.weight0()
            yref = x.float() @ ref.T
            rec = dict(N=N, K=K, r=lw.r, M=M, floor_us=floor)

            def lords_path(path, splits=0):
                return checked_us(lambda q, B, A: op(x, q, B, A, cb, None, path, splits), lw.copies, yref, 2e-2,
                                  f"path {path} splits {splits} at N={N} K={K} M={M}")

            rec["direct_us"], rec["direct_err"] = lords_path(0)
            if a.sweep:
                k_super = -(-K // 128)
                rec["direct_sweep"] = {sp: lords_path(0, sp)[0] for sp in (1, 2, 3, 4, 6, 7, 8, 11, 16, 32)
                                       if sp <= k_super}
            cols = M * ((lw.r + 7) // 8) * 8
            fits = cols <= 64 and M <= 4
            # 65..128 columns: path 2 alone (wgmma, Z streamed through shared memory)
            streamed = 64 < cols <= 128 and M <= 4 and "reassoc_wgmma_ready=1" in torch.ops.lords.cuda_features()
            if fits or streamed:
                rec["reassoc_us"], rec["reassoc_err"] = lords_path(2)
                if fits:
                    rec["reassoc_mma_us"], _ = lords_path(3)
                if a.sweep:
                    rec["reassoc_sweep"] = {sp: lords_path(2, sp)[0] for sp in (2, 4, 8, 16, 32)}
            rec["auto_us"], _ = lords_path(-1)
            if triton is not None and triton.supports(x) is None:  # checked against the reference like the CUDA paths
                rec["triton_us"], rec["triton_err"] = checked_us(lambda q, B, A: triton.call((q, B, A), x), lw.copies,
                                                                 yref, 2e-2, f"Triton at N={N} K={K} M={M}")
            for key, c in others.items():
                try:
                    rec[f"{key}_us"] = _time(c, x) if c.supports(x) is None else float("nan")
                except Exception as e:  # noqa: BLE001 - one contender failing must not end the table
                    print(f"{key} M={M}: {type(e).__name__}: {str(e)[:120]}")
                    rec[f"{key}_us"] = float("nan")
            rows.append(rec)
            sweeps = {k: v for k, v in rec.items() if k.endswith("_sweep")}
            print(f"{N}x{K} M={M}: " + " ".join(f"{k}={v:.2f}" for k, v in rec.items() if k.endswith("_us"))
                  + "".join(f" {k} {{{', '.join(f'{sp}: {us:.2f}' for sp, us in v.items())}}}" for k, v in sweeps.items()),
                  flush=True)
        del lw, others
        torch.cuda.empty_cache()

    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    nan = float("nan")
    feats = torch.ops.lords.cuda_features()
    print(f"\n{feats}")
    print("\n| N x K (r) | M | direct | re-assoc | re-assoc mma.sync | auto | Triton | cuBLAS | bnb NF4 | torch int4 | floor | "
          "auto/floor | bnb/auto | int4/auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for d in rows:
        au = d["auto_us"]
        print(f"| {d['N']}x{d['K']} ({d['r']}) | {d['M']} | {d['direct_us']:.2f} | {d.get('reassoc_us', nan):.2f} | "
              f"{d.get('reassoc_mma_us', nan):.2f} | {au:.2f} | {d.get('triton_us', nan):.2f} | {d.get('cublas_us', nan):.2f} | {d.get('bnb_nf4_us', nan):.2f} | "
              f"{d.get('torch_int4_us', nan):.2f} | {d['floor_us']:.2f} | {au / d['floor_us']:.2f} | "
              f"{d.get('bnb_nf4_us', nan) / au:.2f} | {d.get('torch_int4_us', nan) / au:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
