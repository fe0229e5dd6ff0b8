"""The public ops against a float64 reference computed here from first principles, opcheck and
gradcheck; run on the CPU (the reference backend) unless LORDS_BACKEND says otherwise."""
import pytest
import torch

import lords_ext
from conftest import random_lords


def first_principles(x, codes, B, A, cb, bias=None):
    W = cb.double()[codes] * (B.double() @ A.double())
    y = x.double() @ W.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("codebook", ["nf", "int", "custom"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequant_matmul_matches_first_principles(bits, codebook, dtype, gen):
    N, K, r = 37, 48, 5
    cb = (torch.sort(torch.randn(1 << bits, generator=gen)).values if codebook == "custom"
          else lords_ext.get_codebook(f"{codebook}{bits}")[0])
    qweight, B, A, cb, codes = random_lords(N, K, r, bits, gen, codebook=cb)
    x = torch.randn(2, 3, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen)
    y = torch.ops.lords.dequant_matmul(x, qweight, B, A, cb, bias)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    ref = first_principles(x, codes, B, A, cb, bias)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < tol, rel
    W = torch.ops.lords.dequant(qweight, B, A, cb)
    assert W.shape == (N, K) and W.dtype == B.dtype
    torch.testing.assert_close(W.double(), cb.double()[codes] * (B.double() @ A.double()), rtol=1e-5, atol=1e-5)


def test_dequant_matmul_without_bias_and_1d_x(gen):
    qweight, B, A, cb, codes = random_lords(9, 16, 2, 4, gen)
    x = torch.randn(16, generator=gen)
    y = torch.ops.lords.dequant_matmul(x, qweight, B, A, cb)
    assert y.shape == (9,)
    torch.testing.assert_close(y.double(), first_principles(x[None], codes, B, A, cb)[0], rtol=1e-5, atol=1e-5)


def test_empty_batch(gen):
    qweight, B, A, cb, _ = random_lords(9, 16, 2, 4, gen)
    assert torch.ops.lords.dequant_matmul(torch.randn(0, 16), qweight, B, A, cb).shape == (0, 9)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_opcheck(bits, gen):
    qweight, B, A, cb, _ = random_lords(12, 16, 3, bits, gen)
    B.requires_grad_(True)
    A.requires_grad_(True)
    x = torch.randn(4, 16, generator=gen, requires_grad=True)
    bias = torch.randn(12, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.lords.dequant_matmul.default, (x, qweight, B, A, cb, bias))
    torch.library.opcheck(torch.ops.lords.dequant_matmul.default, (x, qweight, B, A, cb, None))
    torch.library.opcheck(torch.ops.lords.dequant.default, (qweight, B, A, cb))
    gy = torch.randn(4, 12, generator=gen)
    torch.library.opcheck(torch.ops.lords.dequant_matmul_grad_x.default, (gy, qweight, B.detach(), A.detach(), cb))
    torch.library.opcheck(torch.ops.lords.dequant_matmul_grad_scales.default,
                          (gy, x.detach(), qweight, B.detach(), A.detach(), cb))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gradcheck_float64(bits, gen):
    qweight, B, A, cb, _ = random_lords(6, 8, 2, bits, gen, dtype=torch.float64)
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    B.requires_grad_(True)
    A.requires_grad_(True)
    f = lambda x, B, A, bias: torch.ops.lords.dequant_matmul(x, qweight, B, A, cb, bias)
    assert torch.autograd.gradcheck(f, (x, B, A, bias))
    assert torch.autograd.gradcheck(lambda B, A: torch.ops.lords.dequant(qweight, B, A, cb), (B, A))


def test_grads_match_autograd_of_the_dense_weight(gen):
    qweight, B, A, cb, codes = random_lords(10, 24, 3, 3, gen)
    x = torch.randn(5, 24, generator=gen)
    gy = torch.randn(5, 10, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, B, A)]
    torch.ops.lords.dequant_matmul(*leaves[:1], qweight, *leaves[1:], cb).backward(gy)
    dense = [t.double().requires_grad_(True) for t in (x, B, A)]
    (dense[0] @ (cb.double()[codes] * (dense[1] @ dense[2])).T).backward(gy.double())
    for got, want in zip(leaves, dense):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph(gen):
    qweight, B, A, cb, codes = random_lords(10, 16, 2, 4, gen)
    x = torch.randn(3, 16, generator=gen)
    f = torch.compile(lambda x: torch.ops.lords.dequant_matmul(x, qweight, B, A, cb) * 2, fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(x), torch.ops.lords.dequant_matmul(x, qweight, B, A, cb) * 2)


def test_forced_backend_env(monkeypatch, gen):
    qweight, B, A, cb, _ = random_lords(10, 16, 2, 4, gen)
    monkeypatch.setenv("LORDS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="LORDS_BACKEND: expected one of"):
        torch.ops.lords.dequant_matmul(torch.randn(2, 16), qweight, B, A, cb)
    monkeypatch.setenv("LORDS_BACKEND", "reference")
    assert torch.ops.lords.dequant_matmul(torch.randn(2, 16), qweight, B, A, cb).shape == (2, 10)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LORDS_BACKEND", "cuda")
        with pytest.raises(RuntimeError, match="LORDS_BACKEND=cuda"):
            torch.ops.lords.dequant_matmul(torch.randn(2, 16), qweight, B, A, cb)
