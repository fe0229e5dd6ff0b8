"""The quantizer runs on whatever device the weight is on (skipped without a GPU)."""
import pytest
import torch

import lords_ext

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("kw", [{}, {"init": "exact"}, {"learn_codebook": True}, {"optimizer": "adam", "steps": 30}])
def test_quantize_on_gpu_matches_cpu(bits, kw):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(96, 256, generator=g) * (torch.rand(96, 1, generator=g) + 0.2)
    cfg = lords_ext.LordsConfig(bits=bits, block=32, **kw)
    q_gpu = lords_ext.quantize_weight(W.cuda(), cfg)
    q_cpu = lords_ext.quantize_weight(W, cfg)
    assert q_gpu.B.is_cuda and q_gpu.qweight.is_cuda
    # different BLAS, same algorithm: errors agree closely
    assert abs(q_gpu.rel_error - q_cpu.rel_error) < 0.02 * q_cpu.rel_error
    bw = lords_ext.blockwise_quantize(W.cuda(), bits=bits, block=32, search=True)
    assert abs(bw.rel_error - lords_ext.blockwise_quantize(W, bits=bits, block=32, search=True).rel_error) < 1e-4


def test_activation_aware_on_gpu():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 128, generator=g)
    X = torch.randn(256, 128, generator=g)
    q = lords_ext.quantize_weight(W.cuda(), lords_ext.LordsConfig(bits=3, block=32, steps=20), hessian=(X.T @ X).cuda())
    assert q.B.is_cuda and q.rel_error < 0.5
