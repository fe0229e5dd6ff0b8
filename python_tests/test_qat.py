"""QAT: straight-through gradients reach W, B, A (and block scales); freeze() reproduces the QAT
forward as a deployable LordsLinear; torch.compile(fullgraph=True); learning-rate groups; bad input."""
import pytest
import torch
from torch import nn

from lords_ext import LordsConfig, LordsLinear, blockwise_quantize, get_codebook
from lords_ext.formats import nearest_level
from lords_ext.qat import (BlockQATLinear, LordsQATLinear, freeze_model, param_groups, prepare_for_qat,
                           ste_round_to_level)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_qat(N, K, r, bits, gen, dtype=torch.float64, codebook=None):
    """A LordsQATLinear whose latent weight has entries beyond the codebook range too (clipping)."""
    cb, _ = get_codebook(codebook, bits)
    B = torch.rand(N, r, generator=gen, dtype=dtype) + 0.5
    A = torch.rand(r, K, generator=gen, dtype=dtype) * 0.5 + 0.5
    W = torch.randn(N, K, generator=gen, dtype=dtype) * (B @ A) * 0.6
    bias = torch.randn(N, generator=gen, dtype=dtype)
    return LordsQATLinear(W, B, A, bits=bits, codebook=cb, bias=bias)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N,K,r", [(7, 24, 3), (12, 16, 2)])
def test_ste_gradients_reach_weight_and_scales(bits, N, K, r, gen):
    layer = random_qat(N, K, r, bits, gen)
    x = torch.randn(3, 5, K, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 5, N, generator=gen, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    # The estimator by hand: dL/dW_hat = g^T x; inside the codebook range dW_hat/dW = 1 and
    # dW_hat/dS = cb[Q] - u; outside it, dW_hat/dW = 0 and dW_hat/dS = cb[Q] (the clipped level).
    cb = layer.codebook.double()
    W, B, A = layer.weight.detach(), layer.B.detach(), layer.A.detach()
    S = B @ A
    u = W / S
    level = cb[nearest_level(u, cb).long()]
    inside = (u >= cb[0]) & (u <= cb[-1])
    G = g.reshape(-1, N).T @ x.reshape(-1, K)
    gW = torch.where(inside, G, torch.zeros_like(G))
    gS = G * torch.where(inside, level - u, level)
    assert bool((~inside).any()) and bool(inside.any())
    torch.testing.assert_close(layer.weight.grad, gW, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.B.grad, gS @ A.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.A.grad, B.T @ gS, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.bias.grad, g.reshape(-1, N).sum(0), rtol=1e-10, atol=1e-10)
    for p in (layer.weight, layer.B, layer.A):
        assert float(p.grad.abs().sum()) > 0


def test_ste_value_is_exactly_the_level(gen):
    cb, _ = get_codebook("nf3", 3)
    u = torch.randn(1000, generator=gen) * 0.7
    v = ste_round_to_level(u.requires_grad_(True), cb)
    assert torch.equal(v.detach(), cb[nearest_level(u.detach(), cb).long()])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_freeze_equals_qat_forward(bits, gen):
    layer = random_qat(9, 40, 3, bits, gen, dtype=torch.float32)
    frozen = layer.freeze()
    assert isinstance(frozen, LordsLinear) and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.equal(frozen.dequantize(), layer.quantized_weight())
        x = torch.randn(4, 40, generator=gen)
        torch.testing.assert_close(frozen(x), layer(x), rtol=1e-6, atol=1e-6)


def test_quantized_weight_ignores_autocast(gen):
    layer = random_qat(8, 32, 2, 4, gen, dtype=torch.float32)
    with torch.no_grad():
        plain = layer.quantized_weight()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = layer.quantized_weight()
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)


def test_from_linear_starts_at_the_ptq_result(gen):
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    cfg = LordsConfig(bits=3, block=16, steps=5)
    qat = LordsQATLinear.from_linear(lin, cfg)
    ptq = LordsLinear.from_linear(lin, cfg)
    with torch.no_grad():
        assert torch.equal(qat.quantized_weight(), ptq.dequantize())
        assert torch.equal(qat.freeze().qweight, ptq.qweight)
    assert qat.codebook_name == "nf3" and qat.rank == ptq.rank


def test_block_qat_gradients_init_and_freeze(gen):
    torch.manual_seed(1)
    lin = nn.Linear(64, 10)
    layer = BlockQATLinear.from_linear(lin, bits=4, block=16, search=True)
    bw = blockwise_quantize(lin.weight.detach(), bits=4, block=16, search=True)
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), bw.dequantize())
    x = torch.randn(6, 64, generator=gen)
    layer(x).square().sum().backward()
    assert float(layer.weight.grad.abs().sum()) > 0 and float(layer.scales.grad.abs().sum()) > 0
    frozen = layer.freeze()
    assert frozen.rank == 4
    with torch.no_grad():
        assert torch.equal(frozen.dequantize(), layer.quantized_weight())
        torch.testing.assert_close(frozen(x), layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls", ["lords", "block"])
def test_torch_compile_fullgraph_matches_eager(cls, gen):
    torch._dynamo.reset()
    if cls == "lords":
        layer = random_qat(8, 32, 2, 4, gen, dtype=torch.float32)
    else:
        torch.manual_seed(2)
        layer = BlockQATLinear.from_linear(nn.Linear(32, 8), bits=3, block=8)
    x = torch.randn(5, 32, generator=gen)
    layer(x).square().sum().backward()
    eager = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, layer(x), rtol=1e-6, atol=1e-6)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_qat_fine_tuning_lowers_loss_of_the_frozen_model(bits, gen):
    # A task PTQ cannot solve by itself: a shifted target weight seen through anisotropic inputs.
    # (Against the latent weight itself with isotropic inputs, PTQ is already at the optimum.)
    torch.manual_seed(3)
    source = nn.Linear(32, 16, bias=False)
    x = torch.randn(256, 32, generator=gen) * torch.logspace(-1, 1, 32)
    W = source.weight.detach()
    target = W + 0.3 * W.abs().mean() * torch.randn(16, 32, generator=gen)
    y = x @ target.T
    layer = LordsQATLinear.from_linear(source, LordsConfig(bits=bits, block=16, steps=3))
    with torch.no_grad():
        start = float((layer.freeze()(x) - y).square().mean())
    opt = torch.optim.Adam(param_groups(layer, lr_scales=3e-3, lr_weights=3e-4))
    for _ in range(60):
        opt.zero_grad()
        (layer(x) - y).square().mean().backward()
        opt.step()
    with torch.no_grad():
        end = float((layer.freeze()(x) - y).square().mean())
    assert end < 0.9 * start, (start, end)


def test_param_groups_split_scales_and_weights(gen):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(4)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    n = prepare_for_qat(model, LordsConfig(bits=4, block=16, steps=1))
    qat = [m for m in model.modules() if isinstance(m, LordsQATLinear)]
    assert len(qat) == 7 and isinstance(model.lm_head, nn.Linear)
    assert n == sum(p.numel() for m in qat for p in m.parameters())
    model.model.norm.weight.requires_grad_(True)
    groups = {g["name"]: g for g in param_groups(model, lr_scales=1e-2, lr_weights=1e-4)}
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(groups["scales"]["params"]) == ids(p for m in qat for p in (m.B, m.A))
    assert ids(groups["weights"]["params"]) == ids(m.weight for m in qat)
    assert ids(groups["other"]["params"]) == {id(model.model.norm.weight)}
    assert groups["scales"]["lr"] == 1e-2 and groups["weights"]["lr"] == 1e-4

    # The groups' rates are what the optimizer uses: a near-zero weight rate leaves W nearly still.
    opt = torch.optim.SGD(param_groups(model, lr_scales=1e-1, lr_weights=1e-12), lr=1.0)
    W0, B0 = qat[0].weight.detach().clone(), qat[0].B.detach().clone()
    ids_in = torch.randint(0, 48, (2, 12))
    model(input_ids=ids_in, labels=ids_in).loss.backward()
    opt.step()
    assert float((qat[0].weight.detach() - W0).abs().max()) < 1e-9 < float((qat[0].B.detach() - B0).abs().max())

    with torch.no_grad():
        before = model(input_ids=ids_in).logits
        freeze_model(model)
        after = model(input_ids=ids_in).logits
    assert sum(isinstance(m, LordsLinear) for m in model.modules()) == 7
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_prepare_for_qat_block_kind():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    prepare_for_qat(model, LordsConfig(bits=2, block=16), kind="block")
    assert sum(isinstance(m, BlockQATLinear) for m in model.modules()) == 7
    ids = torch.randint(0, 48, (2, 10))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bad_input(gen):
    W = torch.randn(8, 16, generator=gen)
    with pytest.raises(ValueError, match=r"B, A: expected \[N, r\] and \[r, K\]"):
        LordsQATLinear(W, torch.rand(8, 2), torch.rand(3, 16))
    with pytest.raises(ValueError, match="bias: expected shape"):
        LordsQATLinear(W, torch.rand(8, 2), torch.rand(2, 16), bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"weight.shape\[1\] \(in_features\): expected a positive multiple of 8"):
        LordsQATLinear(torch.randn(8, 12), torch.rand(8, 2), torch.rand(2, 12), bits=3)
    with pytest.raises(ValueError, match="block: expected a positive divisor of K=16"):
        BlockQATLinear(W, torch.rand(8, 3), block=5)
    with pytest.raises(ValueError, match=r"scales: expected shape \(8, 2\)"):
        BlockQATLinear(W, torch.rand(8, 3), block=8)
    with pytest.raises(ValueError, match="linear: expected a torch.nn.Linear"):
        LordsQATLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="kind: expected one of"):
        prepare_for_qat(nn.Sequential(nn.Linear(16, 16)), kind="nf")
    with pytest.raises(ValueError, match="found none"):
        freeze_model(nn.Sequential(nn.Linear(16, 16)))
    with pytest.raises(ValueError, match="lr_weights: expected a positive number"):
        param_groups(nn.Linear(4, 4), lr_scales=1e-3, lr_weights=0)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(nn.Linear(4, 4).requires_grad_(False), lr_scales=1e-3, lr_weights=1e-3)
    wide = BlockQATLinear(torch.randn(2, 64, generator=gen), torch.rand(2, 8) + 0.1, block=8)
    with pytest.raises(ValueError, match="K/block=8 <= N=2"):
        wide.freeze()
