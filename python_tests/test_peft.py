"""LoRDS PEFT: B/A gradients against the dense float64 reference, prepare_for_peft on a tiny Llama,
adapter save/load (round trip and every mismatch), and the transformers Trainer."""
import json

import pytest
import torch
from torch import nn

from conftest import random_lords
from lords_ext import LordsConfig, LordsLinear
from lords_ext.formats import unpack
from lords_ext.peft import (ADAPTER_META, ADAPTER_TENSORS, AdapterError, check_codes_frozen, load_adapter,
                            prepare_for_peft, save_adapter)


pytestmark = pytest.mark.usefixtures("one_thread")


def layer_from(qweight, B, A, cb, bits, bias):
    N, K = B.shape[0], A.shape[1]
    layer = LordsLinear(K, N, bits=bits, rank=B.shape[1], codebook=cb, bias=bias is not None, dtype=B.dtype)
    with torch.no_grad():
        layer.qweight.copy_(qweight)
        layer.B.copy_(B)
        layer.A.copy_(A)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


# --- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N,K,r", [(7, 24, 3), (13, 40, 5), (1, 8, 1)])
def test_scale_gradients_match_dense_reference_float64(bits, N, K, r, gen):
    qweight, B, A, cb, codes = random_lords(N, K, r, bits, gen, dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    layer = layer_from(qweight, B, A, cb, bits, bias)
    layer.train_scales()
    layer.bias.requires_grad_(True)
    x = torch.randn(2, 3, K, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, N, generator=gen, dtype=torch.float64)
    (layer(x) * g).sum().backward()

    Bd, Ad = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
    bd = bias.clone().requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    W = cb.double()[codes.long()] * (Bd @ Ad)
    ((xd @ W.T + bd) * g).sum().backward()
    for name, got, want in (("B", layer.B.grad, Bd.grad), ("A", layer.A.grad, Ad.grad),
                            ("x", x.grad, xd.grad), ("bias", layer.bias.grad, bd.grad)):
        assert got is not None, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")
    assert layer.qweight.grad is None and not layer.qweight.requires_grad


def test_scale_gradients_float32_close_to_float64(gen):
    qweight, B, A, cb, codes = random_lords(16, 48, 4, 3, gen, dtype=torch.float64)
    x = torch.randn(5, 48, generator=gen, dtype=torch.float64)
    g = torch.randn(5, 16, generator=gen, dtype=torch.float64)
    grads = {}
    for dt in (torch.float32, torch.float64):
        layer = layer_from(qweight, B.to(dt), A.to(dt), cb, 3, None).train_scales()
        (layer(x.to(dt)) * g.to(dt)).sum().backward()
        grads[dt] = (layer.B.grad, layer.A.grad)
    for a, b in zip(grads[torch.float32], grads[torch.float64]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4])
def test_compiled_training_step_matches_eager(bits, gen):
    """torch.compile (fullgraph) traces the forward and both backward helper ops: same output and
    x / B / A gradients as eager. Compiling the step is how a user removes the per-op host cost."""
    qweight, B, A, cb, _ = random_lords(24, 64, 3, bits, gen)
    bias = torch.randn(24, generator=gen)
    x = torch.randn(2, 5, 64, generator=gen)
    g = torch.randn(2, 5, 24, generator=gen)
    layer = layer_from(qweight, B, A, cb, bits, bias).train_scales()

    def step(mod):
        xx = x.clone().requires_grad_()
        layer.B.grad = layer.A.grad = None
        y = mod(xx)
        (y * g).sum().backward()
        return y.detach(), xx.grad, layer.B.grad.clone(), layer.A.grad.clone()

    eager = step(layer)
    compiled = step(torch.compile(layer, backend="aot_eager", fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert eager[2].abs().sum() > 0 and eager[3].abs().sum() > 0


# --- tiny Llama ---------------------------------------------------------------------------------

def tiny_quantized_llama(seed=0, bits=4, steps=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    from lords_ext.model import quantize_model
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    quantize_model(model, LordsConfig(bits=bits, block=16, steps=steps), device="cpu", progress=False)
    return model


def test_prepare_for_peft_freezes_everything_but_scales_and_lowers_loss():
    pytest.importorskip("transformers")
    model = tiny_quantized_llama()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LordsLinear)}
    assert len(layers) == 14  # 7 per decoder layer, lm_head skipped
    n = prepare_for_peft(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    want = {f"{ln}.{p}" for ln in layers for p in ("B", "A")}
    assert trainable == want
    assert n == sum(m.B.numel() + m.A.numel() for m in layers.values())
    assert not model.model.embed_tokens.weight.requires_grad
    check_codes_frozen(model)

    torch.manual_seed(1)
    ids = torch.randint(0, 64, (4, 24))
    codes_before = {ln: m.qweight.clone() for ln, m in layers.items()}
    embed_before = model.model.embed_tokens.weight.detach().clone()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, losses
    for ln, m in layers.items():
        assert torch.equal(m.qweight, codes_before[ln])
    assert torch.equal(model.model.embed_tokens.weight, embed_before)


def test_prepare_for_peft_scales_dtype_and_bias_option():
    pytest.importorskip("transformers")
    model = tiny_quantized_llama(seed=3).to(torch.bfloat16)
    n = prepare_for_peft(model, scales_dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, LordsLinear):
            assert m.B.dtype == torch.float32 and m.A.dtype == torch.float32 and m.B.requires_grad
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert n > 0


def test_training_codes_or_non_lords_model_raises():
    pytest.importorskip("transformers")
    model = tiny_quantized_llama(seed=4)
    for bad in ("codes", "qweight", "codebook"):
        with pytest.raises(ValueError, match=f"train: '{bad}' cannot be trained"):
            prepare_for_peft(model, train=("B", "A", bad))
    with pytest.raises(ValueError, match="train: expected names"):
        prepare_for_peft(model, train=("weight",))
    with pytest.raises(ValueError, match="found none"):
        prepare_for_peft(nn.Sequential(nn.Linear(4, 4)))
    layer = next(m for m in model.modules() if isinstance(m, LordsLinear))
    with pytest.raises(RuntimeError):  # integer codes cannot require grad at all
        layer.qweight.requires_grad_(True)
    layer.codebook.requires_grad_(True)
    with pytest.raises(ValueError, match="codebook: expected frozen"):
        check_codes_frozen(model)


# --- adapters -----------------------------------------------------------------------------------

def trained_copy(seed=0, bits=4, steps=3):
    """A quantized tiny Llama after a few PEFT steps (so B, A differ from the base)."""
    model = tiny_quantized_llama(seed=seed, bits=bits)
    prepare_for_peft(model)
    torch.manual_seed(seed + 10)
    ids = torch.randint(0, 64, (2, 16))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model.eval(), ids


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_adapter_round_trip_bit_identical(tmp_path, bits):
    pytest.importorskip("safetensors")
    model, ids = trained_copy(bits=bits)
    with torch.no_grad():
        y = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "ad", base="tiny")
    meta = json.loads((tmp_path / "ad" / ADAPTER_META).read_text())
    assert meta["format_version"] == 1 and len(meta["layers"]) == 14
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / ADAPTER_TENSORS), "pt") as f:
        keys = set(f.keys())
    assert keys and all(k.endswith(".B") or k.endswith(".A") for k in keys)  # only scales stored

    fresh = tiny_quantized_llama(seed=0, bits=bits).eval()  # the same base, untrained scales
    with torch.no_grad():
        assert not torch.equal(fresh(input_ids=ids).logits, y)
        load_adapter(fresh, tmp_path / "ad")
        y2 = fresh(input_ids=ids).logits
    assert torch.equal(y, y2)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.dtype == p2.dtype


def test_adapter_mismatches_raise(tmp_path):
    pytest.importorskip("safetensors")
    model, _ = trained_copy(seed=0)
    save_adapter(model, tmp_path / "ad")

    with pytest.raises(ValueError, match="found none"):
        load_adapter(nn.Sequential(nn.Linear(32, 32)), tmp_path / "ad")
    other_codes = tiny_quantized_llama(seed=5)  # same shapes, ranks and codebook; other weights
    with pytest.raises(AdapterError, match="codes_fingerprint"):
        load_adapter(other_codes, tmp_path / "ad")
    load_adapter(other_codes, tmp_path / "ad", check_codes=False)  # explicitly allowed
    with pytest.raises(AdapterError, match="bits"):
        load_adapter(tiny_quantized_llama(seed=0, bits=3), tmp_path / "ad")

    base = tiny_quantized_llama(seed=0)
    name = "model.layers.0.self_attn.q_proj"
    layer = base.get_submodule(name)
    with torch.no_grad():  # same codes, other levels
        layer.codebook.mul_(0.5)
    with pytest.raises(AdapterError, match=f"layer {name}: codebook_fingerprint"):
        load_adapter(base, tmp_path / "ad")

    base = tiny_quantized_llama(seed=0)
    lay = base.get_submodule(name)
    wider = LordsLinear(lay.in_features, lay.out_features, bits=4, rank=lay.rank + 1, bias=False)
    base.model.layers[0].self_attn.q_proj = wider
    with pytest.raises(AdapterError, match=f"layer {name}: rank: adapter has {lay.rank}, model has {lay.rank + 1}"):
        load_adapter(base, tmp_path / "ad")

    base = tiny_quantized_llama(seed=0)
    base.model.layers[0].self_attn.q_proj = LordsLinear(32, 16, bits=4, rank=1, bias=False)
    with pytest.raises(AdapterError, match=f"layer {name}: out_features: adapter has 32, model has 16"):
        load_adapter(base, tmp_path / "ad")

    base = tiny_quantized_llama(seed=0)
    base.model.layers[1].mlp.down_proj = nn.Linear(64, 32)
    with pytest.raises(AdapterError, match="model lacks as LordsLinear.*layers.1.mlp.down_proj"):
        load_adapter(base, tmp_path / "ad")

    meta_path = tmp_path / "ad" / ADAPTER_META
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="format_version"):
        load_adapter(tiny_quantized_llama(seed=0), tmp_path / "ad")
    with pytest.raises(AdapterError, match="no lords_adapter.json"):
        load_adapter(tiny_quantized_llama(seed=0), tmp_path / "nothing")


def test_adapter_truncated_tensor_file_raises(tmp_path):
    pytest.importorskip("safetensors")
    model, _ = trained_copy(seed=0, steps=1)
    save_adapter(model, tmp_path / "ad")
    p = tmp_path / "ad" / ADAPTER_TENSORS
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(AdapterError, match="cannot read the adapter tensors"):
        load_adapter(tiny_quantized_llama(seed=0), tmp_path / "ad")


# --- transformers Trainer -----------------------------------------------------------------------

def test_transformers_trainer_two_steps(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny_quantized_llama(seed=6)
    prepare_for_peft(model)
    layer = model.model.layers[0].mlp.down_proj
    B0, codes0 = layer.B.detach().clone(), layer.qweight.clone()
    torch.manual_seed(7)
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 64, (8, 16))]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    out = trainer.train()
    assert out.global_step == 2
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert not torch.equal(layer.B.detach(), B0)
    assert torch.equal(layer.qweight, codes0)
    assert torch.equal(unpack(layer.qweight, 4, layer.in_features), unpack(codes0, 4, layer.in_features))
