"""The Triton backend on a CUDA GPU against the reference backend (fp32), on the shape matrix of
BENCHMARKING.md (Llama-3-8B linears, M = 1 .. 8192) and on odd shapes for every bit width, dtype
and a wide range of ranks. Skipped without CUDA.

Run as a script it is also the variant benchmark behind bench/triton_notes.md:
    python python_tests/test_gpu_triton.py [--quick] [--json PATH]
times each kernel variant (CUDA-graph replays, weights rotated past L2, via bench/timing.py)
against cuBLAS bf16 and the streaming-read floor, and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch
from backend_checks import compiled_triton, rel_err

from lords_ext.quantize import parity_rank

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LLAMA_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
LLAMA_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_layer(N, K, r, bits=4, codebook="nf4", sdtype=torch.bfloat16, seed=0, device="cuda"):
    from lords_ext import formats
    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), device=device, generator=gen)
    qweight = formats.pack(codes, bits)
    amp = (0.02 / r) ** 0.5
    B = ((torch.rand(N, r, device=device, generator=gen) + 0.5) * amp).to(sdtype)
    A = ((torch.rand(r, K, device=device, generator=gen) + 0.5) * amp
         + 0.2 * amp * torch.randn(r, K, device=device, generator=gen)).to(sdtype)
    if codebook == "custom":
        cb = torch.randn(1 << bits, device=device, generator=gen).sort().values
    else:
        cb = formats.get_codebook(codebook)[0].to(device)
    return qweight, B, A, cb


def reference_y(x, qweight, B, A, cb, bias):
    from lords_ext.backends import reference
    return reference.dequant_matmul(x.float(), qweight, B.float(), A.float(), cb.float(),
                                    None if bias is None else bias.float())


@cuda
@pytest.mark.parametrize("N,K", LLAMA_SHAPES)
def test_llama_shapes_every_m(N, K):
    tb = compiled_triton()
    r = parity_rank(N, K, 64)
    qweight, B, A, cb = make_layer(N, K, r, seed=N + K)
    gen = torch.Generator(device="cuda").manual_seed(1)
    bias = torch.randn(N, device="cuda", generator=gen).to(torch.bfloat16)
    for M in LLAMA_M:
        x = torch.randn(M, K, device="cuda", generator=gen).to(torch.bfloat16)
        b = bias if M % 2 else None
        y = tb.dequant_matmul(x, qweight, B, A, cb, b)
        err = rel_err(y, reference_y(x, qweight, B, A, cb, b))
        assert err < TOL[torch.bfloat16], f"{N}x{K} r={r} M={M} ({tb.choose_algo(M, r)}): rel err {err:.3g}"


ODD_CASES = [
    # bits, codebook, x dtype, B/A dtype, r, N, K, bias
    (4, "nf4", torch.float16, torch.float16, 1, 1001, 1030, True),
    (4, "int4", torch.float32, torch.float32, 49, 517, 770, False),
    (4, "custom", torch.bfloat16, torch.float32, 128, 300, 1026, True),
    (3, "nf3", torch.bfloat16, torch.bfloat16, 3, 777, 1000, False),
    (3, "custom", torch.float16, torch.float32, 100, 129, 2056, True),
    (3, "int3", torch.float32, torch.float32, 16, 250, 520, True),
    (2, "nf2", torch.bfloat16, torch.bfloat16, 17, 1023, 1028, True),
    (2, "int2", torch.float32, torch.bfloat16, 64, 64, 4092, False),
    (2, "custom", torch.float16, torch.float16, 5, 333, 516, False),
]


@cuda
@pytest.mark.parametrize("bits,codebook,dtype,sdtype,r,N,K,has_bias", ODD_CASES)
@pytest.mark.parametrize("algo", ["reassoc", "splitk", "tiled", "dequant_mm", None])
def test_odd_shapes(bits, codebook, dtype, sdtype, r, N, K, has_bias, algo):
    tb = compiled_triton()
    qweight, B, A, cb = make_layer(N, K, r, bits, codebook, sdtype, seed=r * 7 + bits)
    gen = torch.Generator(device="cuda").manual_seed(2)
    bias = torch.randn(N, device="cuda", generator=gen).to(dtype) if has_bias else None
    for M in ((1, 2) if algo == "reassoc" else (1, 3, 16, 37, 200)):
        x = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        y = tb.dequant_matmul(x, qweight, B, A, cb, bias, algo=algo)
        assert y.dtype == dtype
        err = rel_err(y, reference_y(x, qweight, B, A, cb, bias))
        assert err < TOL[dtype], f"{algo} bits={bits} {codebook} {dtype} r={r} {N}x{K} M={M}: {err:.3g}"


@cuda
@pytest.mark.parametrize("bits,dtype,sdtype,r,N,K", [(4, torch.bfloat16, torch.bfloat16, 32, 4096, 4096),
                                                     (3, torch.float32, torch.float32, 7, 999, 1016),
                                                     (2, torch.float16, torch.bfloat16, 40, 130, 2052)])
def test_grad_x_and_dequant(bits, dtype, sdtype, r, N, K):
    from lords_ext.backends import reference
    tb = compiled_triton()
    qweight, B, A, cb = make_layer(N, K, r, bits, f"nf{bits}", sdtype, seed=bits)
    W = tb.dequant(qweight, B, A, cb)
    Wref = reference.dequant(qweight, B.float(), A.float(), cb)
    assert W.dtype == sdtype
    assert rel_err(W, Wref) < (1e-5 if sdtype == torch.float32 else TOL[sdtype])
    gen = torch.Generator(device="cuda").manual_seed(3)
    for M, algo in ((1, None), (16, None), (300, None), (300, "fused"), (16, "dequant_mm")):
        gy = torch.randn(M, N, device="cuda", generator=gen).to(dtype)
        gx = tb.grad_x(gy, qweight, B, A, cb, algo=algo)
        ref = gy.float() @ Wref.float()
        err = rel_err(gx, ref)
        assert err < TOL[dtype], f"grad_x bits={bits} {dtype} M={M} {algo}: rel err {err:.3g}"


@cuda
def test_cuda_graph_replay_matches_eager():
    """Split-K reuses a self-cleaning workspace: replays of a captured call must stay exact."""
    tb = compiled_triton()
    qweight, B, A, cb = make_layer(4096, 4096, 32, seed=9)
    x = torch.randn(4, 4096, device="cuda").to(torch.bfloat16)
    eager = tb.dequant_matmul(x, qweight, B, A, cb, None)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = tb.dequant_matmul(x, qweight, B, A, cb, None)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    # fp32 atomics add in any order, so bits may differ; a stale workspace would double y
    assert rel_err(out, eager) < 1e-2
    assert rel_err(out, reference_y(x, qweight, B, A, cb, None)) < TOL[torch.bfloat16]


# ----------------------------------------------------------------------------- variant benchmark

def _bench(quick: bool, auto: bool, json_path: str | None):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import methods, timing
    from bench.bench_kernels import measure_floor
    from lords_ext.backends import triton_backend as tb

    dev = torch.device("cuda")
    rows = []

    def timed(label, shape, M, fn, copies, ref=None, env=None):
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            y = fn(copies[0])
            err = timing.rel_error(y, ref) if ref is not None else float("nan")
            if ref is not None and not err < 2e-2:
                print(f"  {label:<34s} {shape} M={M:<5d} WRONG rel err {err:.3g}")
                rows.append(dict(label=label, shape=shape, M=M, us=None, err=err))
                return None
            t = timing.time_calls([lambda st=st: fn(st) for st in copies], target_s=0.08, log=print)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not end the sweep
            print(f"  {label:<34s} {shape} M={M:<5d} error {type(exc).__name__}: {str(exc)[:300]}")
            rows.append(dict(label=label, shape=shape, M=M, us=None, error=str(exc)[:300]))
            return None
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        print(f"  {label:<34s} {shape} M={M:<5d} {t.us:8.2f} us  err {err:.1e}  graph={t.graph}", flush=True)
        rows.append(dict(label=label, shape=shape, M=M, us=t.us, p10=t.p10_us, p90=t.p90_us, err=err))
        return t.us

    plan = _plan(quick, auto)
    table = {}
    for (N, K), cases in plan.items():
        shape = f"{N}x{K}"
        lw = methods.LordsWeights(N, K, dev)
        cb = lw.codebook
        W0 = lw.weight0()
        floor = measure_floor((N, K), methods.floor_variants(N, K, dev), 0.08, dev)
        table[(shape, "floor")] = floor["us"] if floor else None
        cub = methods.cublas(N, K, dev)
        for M, variants in cases:
            x = torch.randn(M, K, device=dev).to(torch.bfloat16)
            ref = x.float() @ W0.T
            table[(shape, M, "cublas")] = timed("cuBLAS bf16 F.linear", shape, M,
                                                lambda st: cub.call(st, x), cub.copies)
            for label, algo, config, env in variants:
                us = timed(label, shape, M,
                           lambda st, a=algo, c=config: tb.dequant_matmul(x, st[0], st[1], st[2], cb, None,
                                                                          algo=a, config=c),
                           lw.copies, ref=ref, env=env)
                table[(shape, M, label)] = us
        del lw, W0, cub
        torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    print("\nshape       M     label                               us     x bf16  x floor")
    for (N, K), cases in plan.items():
        shape = f"{N}x{K}"
        fl = table.get((shape, "floor"))
        for M, variants in cases:
            cub = table.get((shape, M, "cublas"))
            for label, *_ in variants:
                us = table.get((shape, M, label))
                if us is None:
                    print(f"{shape:<11s} {M:<5d} {label:<34s}  failed")
                    continue
                print(f"{shape:<11s} {M:<5d} {label:<34s} {us:7.2f}  {cub / us if cub else float('nan'):6.2f}"
                      f"  {us / fl if fl else float('nan'):6.2f}")
            print(f"{shape:<11s} {M:<5d} {'cuBLAS bf16':<34s} {cub if cub else float('nan'):7.2f}")


def _plan(quick: bool, auto: bool):
    """Which variants run where: fixed configs to compare algorithms (LORDS_TRITON_TUNE=0 where no
    config is given), then the tuned dispatch ("triton auto") if `auto`."""
    fixed = {"LORDS_TRITON_TUNE": "0"}

    def v(label, algo, env=None, **cfg):
        config = None
        if cfg:
            config = {"num_warps": 4, "num_stages": 3, **cfg}
        return (label, algo, config, {**fixed, **(env or {})})

    dec = lambda bn, bk, sk, w=4, st=3: dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
    m1 = [v("reassoc-1 64x128 s4 w4", "reassoc", **dec(64, 128, 4)),
          v("reassoc-1 64x128 s8 w4", "reassoc", **dec(64, 128, 8)),
          v("reassoc-1 64x64 s4 w4 st4", "reassoc", **dec(64, 64, 4, 4, 4)),
          v("splitk 64x128 s4 w4", "splitk", **dec(64, 128, 4)),
          v("splitk 64x128 s4 w8", "splitk", **dec(64, 128, 4, 8)),
          v("splitk 64x64 s4 w4 st4", "splitk", **dec(64, 64, 4, 4, 4)),
          v("splitk 64x64 s8 w8", "splitk", **dec(64, 64, 8, 8)),
          v("splitk 32x128 s8 w4", "splitk", **dec(32, 128, 8)),
          v("splitk 128x64 s4 w8", "splitk", **dec(128, 64, 4, 8))]
    small = [v("splitk 64x128 s4 w4", "splitk", **dec(64, 128, 4)),
             v("splitk 64x128 s4 w8", "splitk", **dec(64, 128, 4, 8)),
             v("splitk 64x64 s4 w8", "splitk", **dec(64, 64, 4, 8))]
    dq = lambda bn, bk, w: dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1)
    big = [v("dequant 64x128 w4 + cuBLAS", "dequant_mm", **dq(64, 128, 4)),
           v("dequant 128x128 w8 + cuBLAS", "dequant_mm", **dq(128, 128, 8)),
           v("dequant 64x256 w8 + cuBLAS", "dequant_mm", **dq(64, 256, 8)),
           v("dequant 128x64 w4 + cuBLAS", "dequant_mm", **dq(128, 64, 4))]
    plan = {(4096, 4096): [
        (1, m1), (4, small), (16, small),
        (64, [v("splitk bm64 64x128 s4 w4", "splitk", **dec(64, 128, 4)),
              v("splitk bm64 64x64 s4 w8", "splitk", **dec(64, 64, 4, 8))]),
        (256, [v("splitk bm256 64x64 s2 w8", "splitk", **dec(64, 64, 2, 8)),
               v("splitk bm256 64x64 s4 w8", "splitk", **dec(64, 64, 4, 8)),
               v("dequant 64x128 w4 + cuBLAS", "dequant_mm", **dq(64, 128, 4))]),
        (1024, big), (4096, big),
    ]}
    if auto:
        tuned = ("triton auto (tuned)", None, None, {})
        plan = {shape: [(M, [tuned]) for M in [1, 2, 4, 8, 16, 64, 256, 1024, 4096]] for shape in LLAMA_SHAPES}
    if quick:
        plan = {k: [(M, vs) for M, vs in v_ if M in (1, 16, 256, 4096)] for k, v_ in list(plan.items())[:2]}
    return plan


def _profile_target():
    """One fixed-config M=1 call at 4096x4096 r=32, for `ncu -k regex:decode_splitk`."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lords_ext.backends import triton_backend as tb
    qweight, B, A, cb = make_layer(4096, 4096, 32, seed=5)
    x = torch.randn(1, 4096, device="cuda").to(torch.bfloat16)
    cfg = dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3)
    for _ in range(3):
        tb.dequant_matmul(x, qweight, B, A, cb, None, algo="splitk", config=cfg)
    tb.dequant(qweight, B, A, cb, out_dtype=torch.bfloat16,
               config=dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1))
    torch.cuda.synchronize()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[-1])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--auto", action="store_true", help="time only the tuned dispatch, every shape and M")
    ap.add_argument("--profile", action="store_true", help="run one split-K and one dequant launch (for ncu)")
    a = ap.parse_args()
    if a.profile:
        _profile_target()
    else:
        _bench(a.quick, a.auto, a.json)
