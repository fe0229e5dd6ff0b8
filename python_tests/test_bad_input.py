"""Every bad input raises ValueError/RuntimeError naming the argument and what was expected."""
import pytest
import torch

import lords_ext
from conftest import random_lords


@pytest.fixture
def good(gen):
    qweight, B, A, cb, _ = random_lords(12, 16, 3, 4, gen)
    return torch.randn(2, 16, generator=gen), qweight, B, A, cb


def call(x, qweight, B, A, cb, bias=None):
    return torch.ops.lords.dequant_matmul(x, qweight, B, A, cb, bias)


@pytest.mark.parametrize("mutate,pattern", [
    (lambda a: {**a, "x": a["x"].to(torch.int32)}, "x: expected dtype"),
    (lambda a: {**a, "x": torch.randn(2, 15)}, "x: expected last dimension K"),
    (lambda a: {**a, "qweight": a["qweight"].to(torch.int8)}, "qweight: expected dtype torch.uint8"),
    (lambda a: {**a, "qweight": a["qweight"][:, :5]}, r"qweight: expected shape \(12, 8\)"),
    (lambda a: {**a, "qweight": a["qweight"][:11]}, r"qweight: expected shape \(12, 8\)"),
    (lambda a: {**a, "B": a["B"][:, :2]}, "B, A: expected B"),
    (lambda a: {**a, "B": a["B"].to(torch.int32)}, "B: expected a floating-point dtype"),
    (lambda a: {**a, "A": a["A"][None]}, "B, A: expected 2-D"),
    (lambda a: {**a, "cb": torch.linspace(-1, 1, 5)}, "codebook: expected a 1-D tensor of 4, 8 or 16 levels"),
    (lambda a: {**a, "cb": torch.arange(16)}, "codebook: expected a floating-point dtype"),
    (lambda a: {**a, "bias": torch.randn(11)}, r"bias: expected shape \(12,\)"),
    (lambda a: {**a, "x": a["x"].to("meta")}, "x: expected device cpu"),
    (lambda a: {**a, "B": a["B"].to("meta")}, "B: expected device cpu"),
])
def test_op_rejects(good, mutate, pattern):
    x, qweight, B, A, cb = good
    a = mutate({"x": x, "qweight": qweight, "B": B, "A": A, "cb": cb, "bias": None})
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        call(a["x"], a["qweight"], a["B"], a["A"], a["cb"], a["bias"])


def test_op_rejects_K_not_multiple_of_packing(gen):
    # 3-bit codes need K % 8 == 0: K = 12 cannot be packed.
    with pytest.raises(ValueError, match=r"A.shape\[1\] \(K\): expected a multiple of 8"):
        call(torch.randn(2, 12), torch.zeros(4, 5, dtype=torch.uint8), torch.rand(4, 2), torch.rand(2, 12),
             torch.linspace(-1, 1, 8))


def test_fake_impl_rejects_too():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with pytest.raises(ValueError, match="x: expected last dimension"):
            call(torch.randn(2, 15), torch.zeros(12, 8, dtype=torch.uint8), torch.rand(12, 3), torch.rand(3, 16),
                 torch.linspace(-1, 1, 16))


@pytest.mark.parametrize("kwargs,pattern", [
    ({"bits": 5}, r"bits: expected one of \(2, 3, 4\)"),
    ({"bits": 4, "codebook": "nf3"}, "codebook"),
    ({"bits": 4, "codebook": torch.tensor([0.5, -1.0] * 8)}, "codebook: expected strictly increasing"),
    ({"bits": 3, "codebook": torch.linspace(-1, 1, 16)}, "codebook: expected 8 levels"),
    ({"rank": 0}, "rank: expected None or an integer >= 1"),
    ({"block": 0}, "block: expected a positive integer"),
    ({"init": "svd"}, "init: expected one of"),
    ({"optimizer": "sgd"}, "optimizer: expected one of"),
    ({"steps": -1}, "steps: expected an integer >= 0"),
    ({"lr": 0.0}, "lr: expected a positive float"),
])
def test_config_rejects(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        lords_ext.LordsConfig(**kwargs)


def test_quantize_rejects(gen):
    W = torch.randn(16, 64, generator=gen)
    with pytest.raises(ValueError, match=r"rank: expected 1 <= rank <= min\(N, K\) = 16, got 17"):
        lords_ext.quantize_weight(W, lords_ext.LordsConfig(rank=17))
    bad = W.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="W: expected finite values"):
        lords_ext.quantize_weight(bad)
    bad[3, 5] = float("inf")
    with pytest.raises(ValueError, match="W: expected finite values"):
        lords_ext.blockwise_quantize(bad)
    with pytest.raises(ValueError, match="block: expected a divisor of K=64, got 48"):
        lords_ext.quantize_weight(W, lords_ext.LordsConfig(block=48))
    with pytest.raises(ValueError, match="block: expected a divisor of K=64, got 48"):
        lords_ext.blockwise_quantize(W, block=48)
    with pytest.raises(ValueError, match=r"W.shape\[1\] \(K\): expected a positive multiple of 8"):
        lords_ext.quantize_weight(torch.randn(16, 60, generator=gen), lords_ext.LordsConfig(bits=3, block=4))
    with pytest.raises(ValueError, match="W: expected a floating-point dtype"):
        lords_ext.quantize_weight(torch.ones(16, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="W: expected a 2-D"):
        lords_ext.quantize_weight(torch.randn(64, generator=gen))
    with pytest.raises(ValueError, match=r"hessian: expected a \[64, 64\] tensor"):
        lords_ext.quantize_weight(W, hessian=torch.eye(16))


def test_linear_rejects():
    with pytest.raises(ValueError, match="rank: expected an integer in"):
        lords_ext.LordsLinear(64, 16, bits=4, rank=0)
    with pytest.raises(ValueError, match="in_features: expected a positive multiple of 8"):
        lords_ext.LordsLinear(60, 16, bits=3, rank=2)
    with pytest.raises(ValueError, match="linear: expected a torch.nn.Linear"):
        lords_ext.LordsLinear.from_linear(torch.nn.Conv1d(4, 4, 1))
