"""Host time of the Python layers around the LoRDS kernels, on any machine (no GPU needed).

The reference backend's functions are replaced by stubs that return preallocated tensors, so what is
timed is everything else a call does: the op or LordsLinear's eager entry, argument checks, the
dispatch, autograd. Compared with nn.Linear (real, tiny matmuls) on the same shapes. One torch thread;
best of 5 rounds of `--n` calls.

    python3 bench/host_overhead_cpu.py [--n 4000]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def best_us(fn, n: int) -> float:
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args(argv)
    import lords_ext
    from lords_ext import _ops
    from lords_ext.backends import reference

    N, K, r, M = 16, 32, 2, 2
    g = torch.Generator().manual_seed(0)
    qweight = lords_ext.pack(torch.randint(0, 16, (N, K), generator=g), 4)
    cb = lords_ext.get_codebook("nf4")[0]
    B = (torch.rand(N, r, generator=g) + 0.5).requires_grad_(True)
    A = (torch.rand(r, K, generator=g) + 0.5).requires_grad_(True)
    x = torch.randn(M, K, generator=g)
    y0, gx, gB, gA = torch.randn(M, N), torch.randn(M, K), torch.randn(N, r), torch.randn(r, K)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stubs = contextlib.ExitStack()  # the real reference functions (and the thread count) come back on exit
    stubs.callback(torch.set_num_threads, threads)
    stubs.enter_context(mock.patch.object(reference, "dequant_matmul", lambda *a, **k: y0.clone()))
    stubs.enter_context(mock.patch.object(reference, "grad_x", lambda *a, **k: gx))
    stubs.enter_context(mock.patch.object(reference, "grad_scales", lambda *a, **k: (gB, gA)))
    with stubs:
        def fwd_bwd(f):
            def run():
                f(x, qweight, B, A, cb, None).sum().backward()
                B.grad = A.grad = None
            return run

        lin = torch.nn.Linear(K, N)

        def linear_fwd_bwd():
            lin(x).sum().backward()
            lin.weight.grad = lin.bias.grad = None

        rows = []
        for name, f in (("torch.ops.lords.dequant_matmul", torch.ops.lords.dequant_matmul),
                        ("LordsLinear's eager entry (_ops.dequant_matmul)", _ops.dequant_matmul)):
            with torch.no_grad():
                fwd = best_us(lambda: f(x, qweight, B, A, cb, None), args.n)
            rows.append((name, fwd, best_us(fwd_bwd(f), args.n)))
        with torch.no_grad():
            lin_fwd = best_us(lambda: lin(x), args.n)
        rows.append(("nn.Linear (real matmuls)", lin_fwd, best_us(linear_fwd_bwd, args.n)))
    print(f"host us per call, {N}x{K}, r={r}, M={M}, backends stubbed, one thread, best of 5 x {args.n}")
    print("| path | forward, no grad | forward + backward (x frozen, B and A train) |")
    print("|---|---|---|")
    for name, fwd, fb in rows:
        print(f"| {name} | {fwd:.1f} | {fb:.1f} |")
    return rows


if __name__ == "__main__":
    main()
