"""Every Triton kernel of the LoRDS backend, run on the CPU under TRITON_INTERPRET=1, against the
reference backend in float64 on fresh random layers: bits 2/3/4, NF / INT / custom codebooks,
fp16 / bf16 / fp32 activations, ranks 1, 3 and 20, odd N and K, with and without bias.

The interpreter runs each program in numpy, so shapes stay small and every autotuning space
shrinks to one config (see triton_kernels/_tuning.py) that still spans several K tiles, split-K
and masked edges."""
from __future__ import annotations

import os

import pytest
import torch

# On a machine with a GPU the compiled kernels are tested there (test_gpu_*.py), and one process cannot hold both
# forms: the decorator picks the interpreter when a kernel is defined, and load_interpreted below re-imports the
# shared backend modules, so every later test of the session would run interpreted kernels (a whole-suite run on
# the H100 failed its selftest and CUDA-vs-Triton checks that way, session 12). Set TRITON_INTERPRET=1 yourself to
# run this module there.
if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("GPU present: the compiled Triton kernels are tested by the GPU modules; run this module alone "
                "with TRITON_INTERPRET=1 to test the interpreter here", allow_module_level=True)
# Must precede the first import of triton.jit kernels: the decorator picks the interpreter then.
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from lords_ext import formats  # noqa: E402
from lords_ext.backends import reference  # noqa: E402
from backend_checks import codebook_for, load_interpreted, rel_err  # noqa: E402

_KERNEL_MODULES = [
    "lords_ext.backends.triton_kernels._tuning",
    "lords_ext.backends.triton_kernels._common",
    "lords_ext.backends.triton_kernels.decode_splitk",
    "lords_ext.backends.triton_kernels.decode_reassoc",
    "lords_ext.backends.triton_kernels.tiled_gemm",
    "lords_ext.backends.triton_kernels.dequant",
    "lords_ext.backends.triton_kernels.grad_x",
    "lords_ext.backends.triton_backend",
]


tb = load_interpreted(_KERNEL_MODULES)

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_layer(N, K, r, bits, cb_kind, sdtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen)
    qweight = formats.pack(codes, bits)
    # scales of one sign and order, like an SVD of absmax scales, plus noise
    B = (torch.rand(N, r, generator=gen) + 0.5) / r ** 0.5
    A = (torch.rand(r, K, generator=gen) + 0.5) / r ** 0.5 + 0.1 * torch.randn(r, K, generator=gen)
    return qweight, B.to(sdtype), A.to(sdtype), codebook_for(cb_kind, bits, gen)


def ref_y(x, qweight, B, A, codebook, bias):
    return reference.dequant_matmul(x.double(), qweight, B.double(), A.double(), codebook.double(),
                                    None if bias is None else bias.double())


# (N, K) valid per bit width: K a multiple of the packing group (2 / 8 / 4) but not of the tiles
SHAPES = {4: (37, 70), 3: (21, 72), 2: (19, 68)}

MATMUL_CASES = [
    # bits, codebook, x dtype, r, bias, M, algo
    (4, "nf", torch.bfloat16, 20, True, 1, "reassoc"),
    (4, "nf", torch.float16, 3, False, 2, "reassoc"),
    (3, "custom", torch.float32, 1, True, 1, "reassoc"),
    (2, "int", torch.bfloat16, 3, False, 2, "reassoc"),
    (4, "nf", torch.bfloat16, 20, True, 1, "splitk"),
    (4, "int", torch.float16, 1, False, 5, "splitk"),
    (4, "custom", torch.float32, 3, True, 16, "splitk"),
    (3, "nf", torch.bfloat16, 3, True, 3, "splitk"),
    (3, "int", torch.float16, 20, False, 17, "splitk"),
    (2, "nf", torch.float32, 20, True, 7, "splitk"),
    (2, "custom", torch.bfloat16, 1, False, 1, "splitk"),
    (4, "nf", torch.float16, 3, True, 33, "tiled"),
    (3, "custom", torch.bfloat16, 20, False, 21, "tiled"),
    (2, "int", torch.float32, 1, True, 40, "tiled"),
    (4, "int", torch.bfloat16, 20, True, 35, "dequant_mm"),
    (3, "nf", torch.float32, 3, False, 9, "dequant_mm"),
    (2, "nf", torch.float16, 20, True, 18, "dequant_mm"),
]


@pytest.mark.parametrize("bits,cb,dtype,r,has_bias,M,algo", MATMUL_CASES)
def test_dequant_matmul(bits, cb, dtype, r, has_bias, M, algo):
    N, K = SHAPES[bits]
    qweight, B, A, codebook = make_layer(N, K, r, bits, cb, seed=bits * 100 + M)
    gen = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype) if has_bias else None
    y = tb.dequant_matmul(x, qweight, B, A, codebook, bias, algo=algo)
    assert y.dtype == dtype and y.shape == (M, N)
    err = rel_err(y, ref_y(x, qweight, B, A, codebook, bias))
    assert err < TOL[dtype], f"{algo} bits={bits} {cb} {dtype} r={r} M={M}: rel err {err:.3g}"


@pytest.mark.parametrize("lut", ["gather", "global", "select"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_lookups(monkeypatch, lut, bits):
    monkeypatch.setenv("LORDS_TRITON_LUT", lut)
    N, K = SHAPES[bits]
    qweight, B, A, codebook = make_layer(N, K, 3, bits, "custom", seed=7 * bits)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(bits)).to(torch.float32)
    y = tb.dequant_matmul(x, qweight, B, A, codebook, None, algo="splitk")
    err = rel_err(y, ref_y(x, qweight, B, A, codebook, None))
    assert err < TOL[torch.float32], f"LUT {lut} bits={bits}: rel err {err:.3g}"


def test_bf16_scales_and_auto_dispatch():
    N, K = SHAPES[4]
    qweight, B, A, codebook = make_layer(N, K, 20, 4, "nf", sdtype=torch.bfloat16, seed=3)
    for M in (1, 4, 70):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
        y = tb.dequant_matmul(x, qweight, B, A, codebook, None)
        err = rel_err(y, ref_y(x, qweight, B, A, codebook, None))
        assert err < TOL[torch.bfloat16], f"auto M={M} ({tb.choose_algo(M, 20)}): rel err {err:.3g}"


def test_split_k_workspace_is_left_clean():
    """The split-K epilogue zeroes its workspace for the next call: repeated calls must agree."""
    N, K = SHAPES[4]
    qweight, B, A, codebook = make_layer(N, K, 3, 4, "nf", seed=11)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(5))
    y1 = tb.dequant_matmul(x, qweight, B, A, codebook, None, algo="splitk")
    y2 = tb.dequant_matmul(x, qweight, B, A, codebook, None, algo="splitk")
    y3 = tb.dequant_matmul(x, qweight, B, A, codebook, None, algo="reassoc")
    assert torch.equal(y1, y2)
    assert rel_err(y3, ref_y(x, qweight, B, A, codebook, None)) < TOL[torch.float32]
    for buf in tb._workspaces.values():
        assert not buf.any(), "split-K workspace not zeroed after the call"


@pytest.mark.parametrize("bits,cb,sdtype,r", [(4, "nf", torch.float32, 20), (3, "int", torch.bfloat16, 3),
                                               (2, "custom", torch.float16, 1)])
def test_dequant(bits, cb, sdtype, r):
    N, K = SHAPES[bits]
    qweight, B, A, codebook = make_layer(N, K, r, bits, cb, sdtype=sdtype, seed=r + bits)
    W = tb.dequant(qweight, B, A, codebook)
    assert W.dtype == sdtype and W.shape == (N, K)
    ref = reference.dequant(qweight, B.double(), A.double(), codebook.double())
    tol = 1e-5 if sdtype == torch.float32 else TOL[sdtype]
    err = rel_err(W, ref)
    assert err < tol, f"dequant bits={bits} {cb} {sdtype}: rel err {err:.3g}"


@pytest.mark.parametrize("bits,dtype,r,M,algo", [(4, torch.bfloat16, 20, 3, None), (3, torch.float32, 1, 17, None),
                                                 (2, torch.float16, 3, 1, None), (4, torch.float16, 5, 3, "dequant_mm"),
                                                 (3, torch.bfloat16, 2, 130, None), (2, torch.float32, 4, 129, "fused")])
def test_grad_x(bits, dtype, r, M, algo):
    N, K = SHAPES[bits]
    qweight, B, A, codebook = make_layer(N, K, r, bits, "nf", seed=M)
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(bits)).to(dtype)
    gx = tb.grad_x(gy, qweight, B, A, codebook, algo=algo)
    assert gx.dtype == dtype and gx.shape == (M, K)
    ref = reference.grad_x(gy.double(), qweight, B.double(), A.double(), codebook.double())
    err = rel_err(gx, ref)
    assert err < TOL[dtype], f"grad_x bits={bits} {dtype} M={M}: rel err {err:.3g}"


def test_supports_cpu_only_under_interpreter(monkeypatch):
    x = torch.randn(2, 8)
    assert tb.supports("dequant_matmul", x, 2)
    assert tb.supports("dequant", torch.zeros(2, 4, dtype=torch.uint8), 0)
    assert not tb.supports("dequant_matmul", x.double(), 2)
    assert not tb.supports("no_such_op", x, 2)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not tb.supports("dequant_matmul", x, 2)


def test_bad_overrides_name_the_variable(monkeypatch):
    monkeypatch.setenv("LORDS_TRITON_LUT", "table")
    with pytest.raises(ValueError, match="LORDS_TRITON_LUT"):
        tb._lut()
    monkeypatch.setenv("LORDS_TRITON_ALGO", "fast")
    with pytest.raises(ValueError, match="LORDS_TRITON_ALGO"):
        tb.choose_algo(1, 8)
    monkeypatch.setenv("LORDS_TRITON_GRADX", "fast")
    with pytest.raises(ValueError, match="LORDS_TRITON_GRADX"):
        tb.choose_grad_x_algo(1)


def test_grad_x_path_by_token_count(monkeypatch):
    monkeypatch.delenv("LORDS_TRITON_GRADX", raising=False)
    assert tb.choose_grad_x_algo(1) == tb.choose_grad_x_algo(tb.GRAD_X_FUSED_MAX_M) == "fused"
    assert tb.choose_grad_x_algo(tb.GRAD_X_FUSED_MAX_M + 1) == "dequant_mm"
    monkeypatch.setenv("LORDS_TRITON_GRADX", "fused")
    assert tb.choose_grad_x_algo(4096) == "fused"


def test_float64_scales_take_the_exact_path():
    """No tensor-core path exists for float64 scales (gradcheck): results match the reference."""
    N, K = SHAPES[3]
    qweight, B, A, codebook = make_layer(N, K, 3, 3, "nf", seed=21)
    B, A = B.double(), A.double()
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    y = tb.dequant_matmul(x, qweight, B, A, codebook, None)
    assert y.dtype == torch.float64
    assert rel_err(y, ref_y(x, qweight, B, A, codebook, None)) < 1e-12
    W = tb.dequant(qweight, B, A, codebook)
    assert W.dtype == torch.float64
    assert rel_err(W, reference.dequant(qweight, B, A, codebook.double())) < 1e-6
    gy = torch.randn(2, N, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    gx = tb.grad_x(gy, qweight, B, A, codebook)
    assert rel_err(gx, reference.grad_x(gy, qweight, B, A, codebook.double())) < 1e-6
