"""The fused Triton grad_scales kernel on a CUDA GPU against autograd through the reference
dequant_matmul in float64: Llama-3-8B shapes (4096x4096 r=32, 14336x4096 r=49) at M = 16 and 256,
odd shapes for every bit width and ranks 1 .. 130, the deterministic mode, the fixed-config path,
and autograd of lords::dequant_matmul through the default dispatch. Skipped without CUDA.

Tolerances follow the precision the kernel computes in: fp32 activations use 3xTF32 everywhere
(about fp32); 16-bit activations give an exact grad_y^T @ x in fp32 but one-pass TF32 rank
products (rounding ~5e-4 per operand); bf16 scales make the rank products bf16 (dS rounded to
bf16, ~3e-3 measured in the interpreter) before the result is rounded to bf16."""
from __future__ import annotations

import pytest
import torch
from backend_checks import autograd_scales_ref, compiled_triton, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (activation dtype, scales dtype) -> relative error bound
TOL = {(torch.float32, torch.float32): 1e-4,
       (torch.bfloat16, torch.float32): 2e-3,
       (torch.float16, torch.float32): 2e-3,
       (torch.bfloat16, torch.bfloat16): 1e-2,
       (torch.float16, torch.float16): 3e-3}


def make_case(N, K, M, r, bits=4, codebook="nf4", xdtype=torch.bfloat16, sdtype=torch.float32, seed=0):
    from lords_ext import formats
    gen = torch.Generator(device="cuda").manual_seed(seed)
    qweight = formats.pack(torch.randint(0, 1 << bits, (N, K), device="cuda", generator=gen), bits)
    amp = (0.02 / r) ** 0.5
    B = ((torch.rand(N, r, device="cuda", generator=gen) + 0.5) * amp).to(sdtype)
    A = ((torch.rand(r, K, device="cuda", generator=gen) + 0.5) * amp
         + 0.2 * amp * torch.randn(r, K, device="cuda", generator=gen)).to(sdtype)
    if codebook == "custom":
        cb = torch.randn(1 << bits, device="cuda", generator=gen).sort().values
    else:
        cb = formats.get_codebook(codebook)[0].to("cuda")
    x = torch.randn(M, K, device="cuda", generator=gen).to(xdtype)
    gy = (torch.randn(M, N, device="cuda", generator=gen) * 1e-2).to(xdtype)
    return gy, x, qweight, B, A, cb


def check(gb, ga, gy, x, qweight, B, A, cb, label):
    assert gb.dtype == B.dtype and ga.dtype == A.dtype, f"{label}: dtypes {gb.dtype}, {ga.dtype}"
    rb, ra = autograd_scales_ref(gy, x, qweight, B, A, cb)
    tol = TOL[(x.dtype, B.dtype)]
    eb, ea = rel_err(gb, rb), rel_err(ga, ra)
    assert eb < tol and ea < tol, f"{label}: rel err grad_B {eb:.3g}, grad_A {ea:.3g} (bound {tol:g})"


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@cuda
@pytest.mark.parametrize("N,K,r", [(4096, 4096, 32), (14336, 4096, 49)])
@pytest.mark.parametrize("M", [16, 256])
@pytest.mark.parametrize("xdtype,sdtype", DTYPES)
def test_llama_shapes(N, K, r, M, xdtype, sdtype):
    tb = compiled_triton()
    case = make_case(N, K, M, r, xdtype=xdtype, sdtype=sdtype, seed=N + M)
    gb, ga = tb.grad_scales(*case)
    check(gb, ga, *case, f"{N}x{K} r={r} M={M} x={xdtype} s={sdtype}")


ODD = [
    # N, K, M, r, bits, codebook, x dtype, scales dtype
    (333, 328, 1, 1, 4, "nf4", torch.bfloat16, torch.float32),
    (517, 264, 7, 5, 3, "nf3", torch.float16, torch.float16),
    (129, 516, 33, 16, 2, "int2", torch.float32, torch.float32),
    (1000, 1032, 130, 33, 3, "custom", torch.bfloat16, torch.float32),
    (250, 392, 17, 128, 4, "int4", torch.float32, torch.float32),
    (190, 264, 5, 130, 2, "custom", torch.bfloat16, torch.bfloat16),
]


@cuda
@pytest.mark.parametrize("N,K,M,r,bits,cb,xdtype,sdtype", ODD)
def test_odd_shapes(N, K, M, r, bits, cb, xdtype, sdtype):
    tb = compiled_triton()
    case = make_case(N, K, M, r, bits, cb, xdtype, sdtype, seed=N * 7 + r)
    gb, ga = tb.grad_scales(*case)
    check(gb, ga, *case, f"{N}x{K} M={M} r={r} bits={bits} {cb}")


@cuda
def test_deterministic_mode_is_repeatable():
    tb = compiled_triton()
    case = make_case(4096, 4096, 256, 32, seed=3)
    d1 = tb.grad_scales(*case, deterministic=True)
    d2 = tb.grad_scales(*case, deterministic=True)
    assert torch.equal(d1[0], d2[0]) and torch.equal(d1[1], d2[1]), "deterministic mode differs between calls"
    check(*d1, *case, "deterministic 4096x4096 M=256")
    a = tb.grad_scales(*case, deterministic=False)
    assert rel_err(a[0], d1[0].double()) < 1e-5 and rel_err(a[1], d1[1].double()) < 1e-5


@cuda
def test_fixed_config_path(monkeypatch):
    tb = compiled_triton()
    monkeypatch.setenv("LORDS_TRITON_TUNE", "0")
    case = make_case(14336, 4096, 64, 49, xdtype=torch.float16, sdtype=torch.float32, seed=4)
    gb, ga = tb.grad_scales(*case)
    check(gb, ga, *case, "LORDS_TRITON_TUNE=0 14336x4096 M=64")


@cuda
def test_autograd_dispatches_to_triton():
    tb = compiled_triton()
    from lords_ext.backends import dispatch

    if dispatch.forced() not in (None, "triton"):
        pytest.skip(f"LORDS_BACKEND={dispatch.forced()} forces another backend")
    gy, x, qweight, B, A, cb = make_case(4096, 4096, 256, 32, seed=5)
    assert tb.supports("grad_scales", gy, 256)
    assert dispatch.choose("grad_scales", gy, 256, 32) == "triton"
    Bp, Ap = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    y = torch.ops.lords.dequant_matmul(x.view(4, 64, 4096), qweight, Bp, Ap, cb, None)
    y.backward(gy.view(4, 64, 4096))
    check(Bp.grad, Ap.grad, gy, x, qweight, B, A, cb, "autograd of lords::dequant_matmul")
