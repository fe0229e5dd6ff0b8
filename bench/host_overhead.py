"""Host (CPU) time per call of the training-path ops, where small layers make a step launch-bound.

The H100 step profile of issue 6 (bench/peft_notes.md) showed a SmolLM2 training step at ~0.4 s of
wall time against ~37 ms of GPU kernels: the host is the limit. This script times, on one
SmolLM2-sized layer (1536 x 576, r = 6, 2048 tokens, bf16), the host cost of each piece of a
linear layer's forward + backward, LoRDS against bitsandbytes NF4 + LoRA (QLoRA), and prints
a cProfile of the LoRDS forward + backward so the Python hot spots are visible.

Method: each case runs `n` times back to back without synchronizing, then synchronizes once;
per-call wall time = total / n. The "event us" column is CUDA-event time around the same loop:
equal to the wall time when the host is the limit, and the GPU time when the GPU is.

    python3 bench/host_overhead.py [--n 300] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_call(fn, n: int) -> tuple[float, float]:
    """(wall us per call, CUDA-event us per call) over n back-to-back calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e6
    return wall, e0.elapsed_time(e1) * 1e3 / n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--N", type=int, default=1536)
    ap.add_argument("--K", type=int, default=576)
    ap.add_argument("--rank", type=int, default=6)
    ap.add_argument("--M", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the LoRDS forward + backward")
    args = ap.parse_args(argv)
    import lords_ext
    from lords_ext.backends import dispatch, triton_backend
    from lords_ext.formats import get_codebook, packed_cols

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    N, K, r, M, n = args.N, args.K, args.rank, args.M, args.n
    q = torch.randint(0, 256, (N, packed_cols(K, 4)), dtype=torch.uint8, device=dev, generator=g)
    cb = get_codebook("nf4", 4)[0].to(dev)
    B = (torch.rand(N, r, device=dev, generator=g) / r ** 0.5).requires_grad_()
    A = (torch.rand(r, K, device=dev, generator=g) / r ** 0.5).requires_grad_()
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
    gy = torch.randn(M, N, device=dev, dtype=torch.bfloat16, generator=g)
    W = torch.randn(N, K, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(False)
    print(f"layer {N}x{K}, r={r}, M={M}, bf16 x, fp32 B/A; dispatch "
          f"{ {op: dispatch.choose(op, x, M, r, K) for op in ('dequant_matmul', 'grad_x', 'grad_scales')} }; "
          f"lords_ext from {Path(lords_ext.__file__).parent}")
    xd, Bd, Ad = x.detach(), B.detach(), A.detach()

    def lords_fwd_bwd():
        y = torch.ops.lords.dequant_matmul(x, q, B, A, cb)
        y.backward(gy)

    cases = {
        "F.linear forward (bf16 weight)": lambda: torch.nn.functional.linear(xd, W),
        "torch.ops.lords.dequant_matmul, no grad": lambda: torch.ops.lords.dequant_matmul(xd, q, Bd, Ad, cb),
        "triton_backend.dequant_matmul (no op layer)": lambda: triton_backend.dequant_matmul(xd, q, Bd, Ad, cb),
        "triton_backend.dequant (the kernel launch alone)": lambda: triton_backend.dequant(q, Bd, Ad, cb, out_dtype=xd.dtype),
        "torch.ops.lords.dequant_matmul_grad_x": lambda: torch.ops.lords.dequant_matmul_grad_x(gy, q, Bd, Ad, cb),
        "triton_backend.grad_x": lambda: triton_backend.grad_x(gy, q, Bd, Ad, cb),
        "torch.ops.lords.dequant_matmul_grad_scales": lambda: torch.ops.lords.dequant_matmul_grad_scales(gy, xd, q, Bd, Ad, cb),
        "triton_backend.grad_scales": lambda: triton_backend.grad_scales(gy, xd, q, Bd, Ad, cb),
        "LoRDS forward + backward (x, B, A)": lords_fwd_bwd,
    }
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        qw, qs = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True)
        lA = (torch.randn(r, K, device=dev, generator=g) * 0.01).requires_grad_()
        lB = (torch.randn(N, r, device=dev, generator=g) * 0.01).requires_grad_()

        def qlora_fwd_bwd():
            y = bnb.matmul_4bit(x, qw.t(), qs) + (x @ lA.to(x.dtype).T) @ lB.to(x.dtype).T * 2.0
            y.backward(gy)

        cases["bnb matmul_4bit forward"] = lambda: bnb.matmul_4bit(xd, qw.t(), qs)
        cases["QLoRA forward + backward (x, LoRA A, B)"] = qlora_fwd_bwd
    except ImportError as exc:
        print(f"bitsandbytes not importable ({exc}): no QLoRA rows")

    rows = []
    for name, fn in cases.items():
        wall, gpu = per_call(fn, n)
        rows.append((name, wall, gpu))
        x.grad = B.grad = A.grad = None
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(n):
            lords_fwd_bwd()
        torch.cuda.synchronize()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print(f"cProfile, {n} LoRDS forward + backward calls, by own time:")
        print("\n".join(s.getvalue().splitlines()[:60]))
    print(f"\n| case ({N}x{K}, r={r}, M={M}) | wall us per call | event us per call |")
    print("|---|---|---|")
    for name, wall, gpu in rows:
        print(f"| {name} | {wall:.1f} | {gpu:.1f} |")


if __name__ == "__main__":
    main()
