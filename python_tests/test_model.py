"""Whole-model quantization, save/load and perplexity on tiny Llama models built in the test."""
import json
import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")

from lords_ext.calibration import calibration_windows, collect_hessians  # noqa: E402
from lords_ext.evaluate import perplexity  # noqa: E402
from lords_ext.model import (  # noqa: E402
    METADATA_FILE, TENSORS_FILE, QuantizedFormatError, blockwise_as_lords, load_quantized, quantize_model,
    save_quantized)
from lords_ext.nn import LordsLinear  # noqa: E402
from lords_ext.quantize import LordsConfig, blockwise_quantize  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, tie=True, hidden=64, inter=128, vocab=96, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def n_linears(model):
    return sum(isinstance(m, nn.Linear) for m in model.modules())


# --- perplexity ---------------------------------------------------------------------------------

def test_perplexity_matches_hand_computed_cross_entropy():
    model = tiny_llama(seed=1)
    torch.manual_seed(2)
    ids = torch.randint(0, 96, (101,))
    seq = 32
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, ids.numel(), seq):
            w = ids[s:s + seq]
            if w.numel() < 2:
                continue
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
            for t in range(w.numel() - 1):
                nll -= float(logp[t, w[t + 1]])
                count += 1
    want = math.exp(nll / count)
    res = perplexity(model, ids, seq_len=seq, progress=False)
    assert res.tokens == count == 31 * 3 + 4  # three full windows, a last window of 5 tokens
    assert res.windows == 4
    assert res.perplexity == pytest.approx(want, rel=1e-5)
    # Batching full windows together does not change the figure.
    res2 = perplexity(model, ids, seq_len=seq, batch_size=3, progress=False)
    assert res2.perplexity == pytest.approx(want, rel=1e-5)
    # A random model on a random stream is near the uniform-guess perplexity, not far below it.
    assert 0.5 * 96 < want < 2 * 96


def test_perplexity_max_tokens_and_bad_input():
    model = tiny_llama(seed=3)
    ids = torch.randint(0, 96, (80,))
    a = perplexity(model, ids, seq_len=16, max_tokens=48, progress=False)
    b = perplexity(model, ids[:48], seq_len=16, progress=False)
    assert a.tokens == 45 and a.perplexity == b.perplexity
    with pytest.raises(ValueError, match="ids"):
        perplexity(model, ids.float(), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, ids, seq_len=1, progress=False)


# --- calibration --------------------------------------------------------------------------------

def test_collect_hessians_matches_captured_inputs_and_shares_inputs():
    model = tiny_llama(seed=4)
    windows = torch.randint(0, 96, (3, 20))
    captured = {}

    def keep(name):
        def hook(mod, args):
            captured.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        return hook
    names = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    hs = [model.get_submodule(n).register_forward_pre_hook(keep(n)) for n in names]
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None])
    for h in hs:
        h.remove()
    H = collect_hessians(model, windows, progress=False)
    assert len(H) == n_linears(model)  # lm_head too: names=None means every nn.Linear
    for n in names:
        X = torch.cat(captured[n])
        want = X.T @ X / X.shape[0]
        assert torch.allclose(H[n].double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
    # q/k/v (and gate/up) read the same tensor: one shared H, collected once.
    for i in range(2):
        p = f"model.layers.{i}"
        assert H[f"{p}.self_attn.q_proj"] is H[f"{p}.self_attn.k_proj"] is H[f"{p}.self_attn.v_proj"]
        assert H[f"{p}.mlp.gate_proj"] is H[f"{p}.mlp.up_proj"]
        assert H[f"{p}.self_attn.o_proj"] is not H[f"{p}.self_attn.q_proj"]
    w2 = calibration_windows(torch.arange(50), seq_len=16)
    assert w2.shape == (3, 16) and int(w2[2, 0]) == 32
    with pytest.raises(ValueError, match="seq_len=64"):
        calibration_windows(torch.arange(50), seq_len=64)


# --- quantize_model -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantize_save_load_round_trip_is_bit_identical(tmp_path, bits):
    model = tiny_llama(seed=10 + bits)
    ids = torch.randint(0, 96, (2, 24))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    quantize_model(model, LordsConfig(bits=bits, steps=3), progress=False, device="cpu", source="tiny-test")
    rep = model.lords_report
    assert len(rep.layers) == 14 and rep.skipped == {"lm_head": "skip list"}
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LordsLinear)
    assert all(isinstance(model.get_submodule(l.name), LordsLinear) for l in rep.layers)
    assert all(0 < l.rel_error < 0.6 and l.seconds >= 0 for l in rep.layers)
    assert rep.bits_per_weight == pytest.approx(
        sum(model.get_submodule(l.name).bits_per_weight * l.shape[0] * l.shape[1] for l in rep.layers)
        / sum(l.shape[0] * l.shape[1] for l in rep.layers))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    # Quantization changed the function but not beyond recognition.
    assert not torch.equal(out, ref)
    assert float((out - ref).norm() / ref.norm()) < 1.0

    d = save_quantized(model, tmp_path / "q")
    meta = json.loads((d / METADATA_FILE).read_text())
    assert meta["format_version"] == 1 and meta["source_model"] == "tiny-test"
    assert meta["config"]["bits"] == bits and meta["config"]["block"] == 64 and meta["config"]["steps"] == 3
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    lay = meta["layers"]["model.layers.0.mlp.down_proj"]
    assert (lay["out_features"], lay["in_features"], lay["bits"], lay["codebook"]) == (64, 128, bits, f"nf{bits}")
    assert (d / "config.json").is_file()

    loaded = load_quantized(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)


def test_round_trip_with_learned_per_layer_codebooks(tmp_path):
    model = tiny_llama(seed=21, layers=1)
    quantize_model(model, LordsConfig(bits=3, steps=3, learn_codebook=True), progress=False, device="cpu")
    q = model.model.layers[0].mlp.down_proj
    assert not torch.equal(q.codebook, model.model.layers[0].self_attn.q_proj.codebook)  # fitted per layer
    ids = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    loaded = load_quantized(save_quantized(model, tmp_path / "q"))
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.codebook, q.codebook)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)


def test_untied_model_and_skip_patterns(tmp_path):
    model = tiny_llama(seed=5, tie=False)
    quantize_model(model, LordsConfig(bits=4, steps=0), skip=("lm_head", "*.o_proj"), progress=False, device="cpu")
    rep = model.lords_report
    assert set(rep.skipped) == {"lm_head", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    assert len(rep.layers) == 12
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    d = save_quantized(model, tmp_path / "q")
    assert json.loads((d / METADATA_FILE).read_text())["tied"] == {}
    loaded = load_quantized(d)
    assert isinstance(loaded.model.layers[0].self_attn.o_proj, nn.Linear)
    assert not isinstance(loaded.model.layers[0].self_attn.o_proj, LordsLinear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, out)


@pytest.mark.parametrize("bits,search", [(2, False), (3, True), (4, False)])
def test_blockwise_baseline_as_exact_lords_layer(bits, search):
    torch.manual_seed(bits)
    W = torch.randn(48, 192) * torch.rand(48, 1)  # rows of different scale, 3 blocks of 64
    cfg = LordsConfig(bits=bits, block=64)
    qw, bpw = blockwise_as_lords(W, cfg, search=search)
    bw = blockwise_quantize(W, bits=bits, block=64, search=search)
    assert qw.rank == 3 and bpw == pytest.approx(bits + 16 / 64)
    lin = LordsLinear.from_quantized(qw)
    assert torch.equal(lin.dequantize(), bw.dequantize())
    assert qw.rel_error == pytest.approx(bw.rel_error)


def test_nf_methods_in_quantize_model():
    base = tiny_llama(seed=6)
    errs = {}
    for method in ("nf", "nf-search"):
        m = quantize_model(tiny_llama(seed=6), LordsConfig(bits=3), method=method, progress=False, device="cpu")
        errs[method] = m.lords_report.mean_rel_error
        assert m.lords_report.bits_per_weight == pytest.approx(3.25)
        # Each layer reproduces block-wise quantization of the original weight exactly.
        name = "model.layers.1.mlp.up_proj"
        want = blockwise_quantize(base.get_submodule(name).weight, bits=3, block=64, search=method == "nf-search")
        assert torch.equal(m.get_submodule(name).dequantize(), want.dequantize())
    assert errs["nf-search"] < errs["nf"]
    with pytest.raises(ValueError, match="method"):
        quantize_model(tiny_llama(), LordsConfig(), method="gptq", progress=False)
    with pytest.raises(ValueError, match="hessians"):
        quantize_model(tiny_llama(), LordsConfig(), method="nf", hessians={}, progress=False)


def test_activation_aware_option_lowers_output_error():
    """Given strongly anisotropic input statistics H, refining against trace(E H E^T) must beat
    weight-only refinement on that objective (summed over the model's layers)."""
    torch.manual_seed(7)
    base = tiny_llama(seed=7, layers=1)
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    hessians = {}
    for n in names:
        K = base.get_submodule(n).in_features
        X = torch.randn(4 * K, K) * torch.logspace(0, 1.5, K)[torch.randperm(K)]
        hessians[n] = X.T @ X / X.shape[0]
    cfg = LordsConfig(bits=3, steps=30)
    plain = quantize_model(tiny_llama(seed=7, layers=1), cfg, progress=False, device="cpu")
    aware = quantize_model(tiny_llama(seed=7, layers=1), cfg, hessians=hessians, progress=False, device="cpu")
    assert aware.lords_report.activation_aware and not plain.lords_report.activation_aware
    assert len(hessians) == len(names)  # the caller's dict is left whole

    def out_err(m):
        tot = 0.0
        for n in names:
            W = base.get_submodule(n).weight.detach()
            E = m.get_submodule(n).dequantize() - W
            tot += float((E @ hessians[n] * E).sum() / (W @ hessians[n] * W).sum())
        return tot
    assert out_err(aware) < 0.95 * out_err(plain)
    with pytest.raises(ValueError, match="hessians"):
        quantize_model(tiny_llama(seed=7, layers=1), cfg, hessians={names[0]: hessians[names[0]]}, progress=False)


def test_quantize_model_with_calibration_tokens():
    model = tiny_llama(seed=8, layers=1)
    calib = torch.randint(0, 96, (70,))
    quantize_model(model, LordsConfig(bits=4, steps=2), calibration=calib, calibration_seq_len=16,
                   progress=False, device="cpu")
    rep = model.lords_report
    assert rep.activation_aware and rep.calibration_seconds > 0 and len(rep.layers) == 7


def test_quantized_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a whole quantized Llama: every LordsLinear is one traced op
    (no graph break), logits equal to eager. This is how a user takes the per-op host cost out of
    decoding (e.g. with mode="reduce-overhead" on a GPU)."""
    model = tiny_llama(seed=5).eval()
    quantize_model(model, LordsConfig(bits=3, block=16, steps=1), device="cpu", progress=False)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert ref.abs().max() > 0


def test_quantize_model_bad_arguments():
    with pytest.raises(ValueError, match="cfg"):
        quantize_model(tiny_llama(), {"bits": 4}, progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), LordsConfig(), progress=False)
    # in_features not a multiple of the block: left in float with the reason, not silently mangled
    seq = nn.Sequential(nn.Linear(96, 40), nn.Linear(40, 64))
    quantize_model(seq, LordsConfig(bits=4, block=32, steps=0), progress=False, device="cpu")
    assert isinstance(seq[0], LordsLinear) and isinstance(seq[1], nn.Linear)
    assert "block=32" in seq.lords_report.skipped["1"]


# --- damaged files ------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    model = quantize_model(tiny_llama(seed=9), LordsConfig(bits=3, steps=0), progress=False, device="cpu")
    return save_quantized(model, tmp_path / "q")


def _rewrite(d, edit_tensors=None, edit_meta=None):
    from safetensors.torch import load_file, save_file
    path = d / TENSORS_FILE
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
        save_file(tensors, str(path), metadata={"format": "lords-quantized", "format_version": "1"})
    meta = json.loads((d / METADATA_FILE).read_text())
    meta["tensors_bytes"] = path.stat().st_size
    if edit_meta:
        edit_meta(meta)
    (d / METADATA_FILE).write_text(json.dumps(meta))


def test_truncated_file_is_a_clear_error(saved):
    path = saved / TENSORS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantizedFormatError, match="truncated"):
        load_quantized(saved)


def test_damaged_header_is_a_clear_error(saved):
    path = saved / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # same size, unreadable JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(QuantizedFormatError, match="damaged"):
        load_quantized(saved)


def test_wrong_version_is_a_clear_error(saved):
    _rewrite(saved, edit_meta=lambda m: m.update(format_version=99))
    with pytest.raises(QuantizedFormatError, match=r"format_version.*version 1.*99"):
        load_quantized(saved)


def test_missing_tensor_is_a_clear_error(saved):
    _rewrite(saved, edit_tensors=lambda t: t.pop("model.layers.1.self_attn.v_proj.B"))
    with pytest.raises(QuantizedFormatError, match=r"missing tensor.*v_proj\.B"):
        load_quantized(saved)


def test_mismatched_shape_is_a_clear_error(saved):
    def widen(t):
        t["model.layers.0.mlp.gate_proj.A"] = torch.randn(t["model.layers.0.mlp.gate_proj.A"].shape[0] + 1, 64)
    _rewrite(saved, edit_tensors=widen)
    with pytest.raises(QuantizedFormatError, match=r"gate_proj\.A: expected shape"):
        load_quantized(saved)


def test_metadata_disagreeing_with_config_is_a_clear_error(saved):
    def bad(m):
        m["layers"]["model.layers.0.mlp.up_proj"]["in_features"] = 192
    _rewrite(saved, edit_meta=bad)
    with pytest.raises(QuantizedFormatError, match=r"up_proj.*128x192.*config.json"):
        load_quantized(saved)


def test_not_a_lords_directory(tmp_path):
    with pytest.raises(QuantizedFormatError, match=METADATA_FILE):
        load_quantized(tmp_path)
    with pytest.raises(ValueError, match="LordsLinear"):
        save_quantized(tiny_llama(), tmp_path / "x")
