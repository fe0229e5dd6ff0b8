"""`lords selftest`: every backend available on this machine against the reference backend.

For each accelerated backend (CUDA, Triton) and each op it implements, on fresh random inputs of every
bit width (2, 3, 4) and several shapes (odd N, K not a multiple of any tile, ranks from 1 to past the
CUDA kernels' single-launch limit, M from 1 to past the decode/GEMM switch), compares the result with
the reference computed in float32 on the same (already rounded) inputs, and prints the max abs error
and the relative error ||out - ref|| / ||ref|| per backend, then the dispatch table for this GPU.

The Triton kernels run with their fixed configs by default (LORDS_TRITON_TUNE=0 for the duration of the
check): the autotuner would time every candidate config of every one of the ~100 GPU cases, which took
over two minutes on an H100 (sessions 2 and 13) for a check whose point is parity. `tune=True` (`lords
selftest --tune`) checks the configs the autotuner picks instead, as a model would run them.

fp16/bf16 kernels round W to 16 bits before the product, which alone gives a relative error of a few
1e-3; the bound below (2e-2) is loose enough for that and tight enough to catch any indexing or
packing mistake (those give errors of order 1).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time

import torch

from . import backends
from .formats import get_codebook, pack

REL_TOL = 2e-2

# (M, N, K, r): decode sizes, odd sizes (N not a multiple of 16/256, K not of 128), r > 128, large M.
GPU_SHAPES = [
    (1, 4096, 4096, 32),
    (1, 1000, 1032, 49),  # re-associated CUDA kernel, K not a multiple of 128
    (3, 1000, 1024, 17),
    (8, 520, 1032, 1),
    (16, 768, 2048, 64),
    (5, 300, 392, 130),
    (300, 512, 1024, 32),
]
CPU_SHAPES = [(1, 40, 64, 4), (3, 24, 48, 5)]


def _inputs(M, N, K, r, bits, dtype, device, gen):
    cb, _ = get_codebook(f"nf{bits}")
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen)
    qweight = pack(codes, bits).to(device)
    # Scales of the size LoRDS produces (positive, ~1e-2..1e-1 per weight) and unit-scale activations.
    B = (torch.rand(N, r, generator=gen) + 0.1) / math.sqrt(r)
    A = (torch.rand(r, K, generator=gen) + 0.1) / math.sqrt(r) * 0.2
    x = torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    cast = lambda t: t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return cast(x), qweight, cast(B), cast(A), cb.to(device), cast(bias)


def _poison_allocator(device: torch.device, nbytes: int) -> None:
    """Fill freed cached memory with NaN so an output element a kernel forgot to write shows up."""
    if device.type == "cuda":
        torch.full((max(nbytes, 1 << 20) // 4,), float("nan"), device=device)


def _compare(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf, math.inf
    diff = out - ref
    return diff.abs().max().item(), (diff.norm() / ref.norm().clamp_min(1e-30)).item()


def _cases(device: torch.device):
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float32,)
    for M, N, K, r in shapes:
        for bits in (2, 3, 4):
            for dtype in dtypes:
                yield M, N, K, r, bits, dtype


def run_backend(name: str, device: torch.device, gen: torch.Generator, out=print) -> list[dict]:
    """Check one backend; returns one record per (op, case)."""
    from . import backends as _b
    from .backends import reference

    mod = _b.get(name)
    records = []
    for M, N, K, r, bits, dtype in _cases(device):
        x, qweight, B, A, cb, bias = _inputs(M, N, K, r, bits, dtype, device, gen)
        f32 = lambda t: t.float()  # noqa: E731
        checks = []
        if hasattr(mod, "dequant_matmul") and mod.supports("dequant_matmul", x, M):
            ref = reference.dequant_matmul(f32(x), qweight, f32(B), f32(A), cb, f32(bias))
            _poison_allocator(device, M * N * 4 * 64)
            y = mod.dequant_matmul(x, qweight, B, A, cb, bias)
            checks.append(("dequant_matmul", y, ref))
        if hasattr(mod, "dequant") and mod.supports("dequant", qweight, N):
            ref = reference.dequant(qweight, f32(B), f32(A), cb)
            checks.append(("dequant", mod.dequant(qweight, B, A, cb), ref))
        if hasattr(mod, "grad_x") and mod.supports("grad_x", x, M):
            gy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
            ref = reference.grad_x(f32(gy), qweight, f32(B), f32(A), cb)
            checks.append(("grad_x", mod.grad_x(gy, qweight, B, A, cb), ref))
        for op, got, ref in checks:
            max_abs, rel = _compare(got, ref)
            ok = tuple(got.shape) == tuple(ref.shape) and got.dtype == (x.dtype if op != "dequant" else B.dtype) \
                and rel <= REL_TOL
            records.append(dict(backend=name, op=op, M=M, N=N, K=K, r=r, bits=bits, dtype=str(dtype).replace("torch.", ""),
                                max_abs=max_abs, rel=rel, ok=ok))
            if not ok:
                out(f"  MISMATCH {name} {op} M={M} N={N} K={K} r={r} bits={bits} {dtype}: "
                    f"max abs {max_abs:.3g}, rel {rel:.3g} (bound {REL_TOL})")
    return records


@contextlib.contextmanager
def _triton_tuning(tune: bool):
    """LORDS_TRITON_TUNE=0 inside unless `tune` (the variable is read per call); restored after."""
    key, before = "LORDS_TRITON_TUNE", os.environ.get("LORDS_TRITON_TUNE")
    if not tune:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def selftest(device: str | torch.device | None = None, seed: int = 0, out=print, tune: bool = False) -> bool:
    """Run the parity check; print the per-backend summary and the dispatch table. True when all pass.
    tune: let the Triton autotuner pick each case's config (slow on a fresh GPU) instead of the fixed ones."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with _triton_tuning(tune):
        return _selftest(device, seed, out, tune)


def _selftest(device: torch.device, seed: int, out, tune: bool) -> bool:
    gen = torch.Generator().manual_seed(seed)
    out(f"lords selftest on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    out("Triton configs: " + ("autotuned per case (--tune)" if tune else
                              "fixed (LORDS_TRITON_TUNE=0 during the check; --tune checks the autotuner's picks)"))
    from .backends import cuda as cuda_backend

    if cuda_backend.built():  # which kernel variants this build and GPU run (the sm_90a wgmma kernel)
        out(f"CUDA extension lords_ext._C: built ({torch.ops.lords.cuda_features()})")
    else:
        out(f"CUDA extension lords_ext._C: not built ({cuda_backend.LOAD_ERROR})")
    tested = [n for n in backends.names() if n != "reference" and backends.available(n)]
    if device.type == "cuda":
        tested = [n for n in tested if backends.get(n).supports("dequant_matmul", torch.empty(1, device=device, dtype=torch.bfloat16), 1)]
    records: list[dict] = []
    for name in tested:
        t0 = time.perf_counter()
        recs = run_backend(name, device, gen, out)
        records += recs
        out(f"  {name}: {len(recs)} checks in {time.perf_counter() - t0:.1f} s")
    if not tested:
        out("no accelerated backend available here: only the reference backend runs (nothing to compare)")
    out(f"{'backend':<10} {'op':<15} {'checks':>6} {'failed':>6} {'max abs err':>12} {'max rel err':>12}")
    for name in tested:
        for op in ("dequant_matmul", "dequant", "grad_x"):
            sel = [r for r in records if r["backend"] == name and r["op"] == op]
            if not sel:
                continue
            out(f"{name:<10} {op:<15} {len(sel):>6} {sum(not r['ok'] for r in sel):>6} "
                f"{max(r['max_abs'] for r in sel):>12.3e} {max(r['rel'] for r in sel):>12.3e}")
    out("dispatch table:")
    out(_dispatch_table(device))
    ok = all(r["ok"] for r in records)
    out("selftest: " + ("PASS" if ok else "FAIL"))
    return ok


def _dispatch_table(device: torch.device) -> str:
    from .backends import dispatch

    return dispatch.describe(device)


def main() -> int:
    return 0 if selftest() else 1


if __name__ == "__main__":
    sys.exit(main())
