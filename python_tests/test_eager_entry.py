"""LordsLinear's eager entry (`lords_ext._ops.dequant_matmul`): the same results and gradients as the
public op, the op itself under tracing, and the op's errors. CPU, reference backend."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lords_ext
from lords_ext import _ops
from conftest import random_lords


def _leaves(gen, N, K, r, bits, dtype, shape):
    qweight, B, A, cb, _ = random_lords(N, K, r, bits, gen, dtype=dtype)
    x = torch.randn(*shape, K, generator=gen, dtype=dtype)
    bias = torch.randn(N, generator=gen, dtype=dtype)
    return x, qweight, B, A, cb, bias


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_eager_entry_equals_the_op_with_gradients(bits, shape, with_bias, gen):
    x, qweight, B, A, cb, bias = _leaves(gen, 13, 48, 3, bits, torch.float64, shape)
    bias = bias if with_bias else None
    grads = []
    assert lords_ext.dequant_matmul is _ops.dequant_matmul
    for fn in (torch.ops.lords.dequant_matmul, lords_ext.dequant_matmul):
        leaves = [t.clone().requires_grad_(True) for t in (x, B, A)]
        b = None if bias is None else bias.clone().requires_grad_(True)
        y = fn(leaves[0], qweight, leaves[1], leaves[2], cb, b)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        y.backward(gy)
        grads.append((y.detach(), *(t.grad for t in leaves), None if b is None else b.grad))
    for got, want in zip(grads[1], grads[0]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eager_entry_takes_one_autograd_node_and_no_graph_without_grad(gen):
    x, qweight, B, A, cb, bias = _leaves(gen, 7, 16, 2, 4, torch.float32, (3,))
    B.requires_grad_(True)
    y = _ops.dequant_matmul(x, qweight, B, A, cb, bias)
    assert type(y.grad_fn).__name__ == "_DequantMatmulEagerBackward"
    with torch.no_grad():
        y0 = _ops.dequant_matmul(x, qweight, B, A, cb, bias)
    assert y0.grad_fn is None and not y0.requires_grad
    torch.testing.assert_close(y0, y.detach(), rtol=0, atol=0)
    # only the bias trains: gradient through the same node
    bias.requires_grad_(True)
    B.requires_grad_(False)
    _ops.dequant_matmul(x, qweight, B, A, cb, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 3.0))


def test_lords_linear_uses_it_and_its_parameters_train(gen):
    layer = lords_ext.LordsLinear.from_linear(torch.nn.Linear(32, 12), lords_ext.LordsConfig(bits=3, rank=4, block=16))
    x = torch.randn(4, 32, generator=gen)
    with torch.no_grad():
        assert layer(x).grad_fn is None
    layer.B.requires_grad_(True)  # as prepare_for_peft leaves them
    layer.A.requires_grad_(True)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_DequantMatmulEagerBackward"
    y.square().sum().backward()
    assert layer.B.grad is not None and layer.A.grad is not None and layer.B.grad.abs().sum() > 0
    torch.testing.assert_close(y, torch.ops.lords.dequant_matmul(x, layer.qweight, layer.B, layer.A,
                                                                 layer.codebook, layer.bias))


def test_traced_calls_keep_the_op(gen):
    x, qweight, B, A, cb, bias = _leaves(gen, 7, 16, 2, 4, torch.float32, (3,))
    with FakeTensorMode() as mode:
        fx, fq, fB, fA, fcb, fb = (mode.from_tensor(t) for t in (x, qweight, B, A, cb, bias))
        out = _ops.dequant_matmul(fx, fq, fB, fA, fcb, fb)
        assert out.shape == (3, 7)
    f = torch.compile(lambda x: _ops.dequant_matmul(x, qweight, B, A, cb, bias) * 2, fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(x), torch.ops.lords.dequant_matmul(x, qweight, B, A, cb, bias) * 2)


def test_eager_entry_raises_the_ops_errors(gen):
    x, qweight, B, A, cb, bias = _leaves(gen, 7, 16, 2, 4, torch.float32, (3,))
    B.requires_grad_(True)
    with pytest.raises(ValueError, match=r"x: expected last dimension K \(in_features\)=16"):
        _ops.dequant_matmul(torch.randn(3, 15), qweight, B, A, cb, bias)
    with pytest.raises(ValueError, match=r"bias: expected shape \(7,\)"):
        _ops.dequant_matmul(x, qweight, B, A, cb, torch.randn(6))
    with pytest.raises(ValueError, match="qweight: expected dtype torch.uint8"):
        _ops.dequant_matmul(x, qweight.float(), B, A, cb, bias)


def test_a_codebook_that_requires_grad_behaves_as_in_the_op(gen):
    """The codebook is not differentiated (its gradient stays None), in the op and in the eager entry."""
    x, qweight, B, A, cb, bias = _leaves(gen, 7, 16, 2, 4, torch.float32, (3,))
    for fn in (torch.ops.lords.dequant_matmul, lords_ext.dequant_matmul):
        c = cb.clone().requires_grad_(True)
        y = fn(x, qweight, B, A, c, bias)
        assert y.requires_grad
        y.sum().backward()
        assert c.grad is None
