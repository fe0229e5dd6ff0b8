"""Fine-tuning a quantized SmolLM2: LoRDS-PEFT vs QLoRA (bitsandbytes NF4 + peft LoRA) vs LoRDS-QAT vs
block-wise QAT, on the same data, steps, seed and schedule.

Task: continued training (next-token loss) on the calibration Wikipedia articles of lords_ext.data,
evaluated on the held-out articles (lords_ext.data.wiki_split: even articles train, odd ones evaluate).
Per run: eval loss / perplexity of the quantized model before and after training, trainable
parameters, median step time (forward + backward + optimizer, CUDA-synchronized) and peak GPU memory
during training. Frozen parts of every model are bf16 (--frozen-dtype fp32 for CPU runs); trained
parameters are fp32 (LoRA's A/B, LoRDS' B/A, QAT latent weights and scales); no autocast.

Methods (bits 4, and 3 where the method has a 3-bit form):
  lords-peft   LoRDS PTQ (block-64 parity rank, ALS refinement) then train B, A only (codes frozen).
               --ptq-calibration-tokens N makes that PTQ (also lords-qat's) activation-aware, with layer
               Hessians from the first N training tokens; the default 0 is the weight-only PTQ.
  qlora-eq     bitsandbytes NF4 (block 64, double quant) + peft LoRA on the same layers, per-layer rank
               = the LoRDS layer's rank, so the trainable count is exactly LoRDS-PEFT's; alpha = 2 r.
  qlora-r16    the same with the usual rank 16, alpha 32.
  nflora-eq    QLoRA's recipe at any width, simulated: block-wise NF{bits} (block 64, absmax, no double
               quant) dequantized into frozen weights + the same LoRA as qlora-eq (nflora-r16: rank 16).
               Same arithmetic as a packed kernel, not its memory or speed; at 4 bits it checks that
               the simulation tracks qlora-eq, at 3 bits it is the baseline QLoRA cannot run.
  lords-qat    LordsQATLinear from the LoRDS PTQ: latent fp32 W + B, A, straight-through rounding;
               evaluated after freeze() as the deployable (Q, B, A) model.
  block-qat    BlockQATLinear: latent fp32 W + block-64 scales (clipping-searched init), NF codebook.
QLoRA is skipped with a message where bitsandbytes or peft is missing, and at 3 bits (bitsandbytes
has no 3-bit format); nflora where peft is missing.

Model source: the packaged SmolLM2-135M GGUF (lords_ext.data.load_smollm2) where it is installed, or
a "pack" made by `--make-pack` for a machine without it (the GPU machine: one call carries 64 MiB,
the exact model is 96 MB). A pack keeps all 30 blocks but restricts the vocabulary to the tokens of
the carried text and re-encodes the linear weights to --pack-bits min/max per --pack-block (see
make_pack); it records the eval loss of the exact and of the re-encoded model, and the run prints both.
--pack-exact stores the GGUF's own Q4_1 / Q8_0 values instead (bit-exact, ~78 MB), which needs
--pack-parts 2: two files that travel in two device calls and are read back together.

    python bench/peft_compare.py --make-pack .data/peft_pack.safetensors --cal-tokens 160000
    python bench/peft_compare.py --pack .data/peft_pack.safetensors --steps 150 --out results.json
    python bench/peft_compare.py --make-pack .data/exact.safetensors --pack-exact --pack-parts 2 --cal-tokens 160000
    python bench/peft_compare.py --pack .data/exact.part1of2.safetensors .data/exact.part2of2.safetensors
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lords_ext import LordsConfig, LordsLinear  # noqa: E402

LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "rope_parameters",
               "attention_bias", "mlp_bias", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id")


def log(*a):
    print(*a, flush=True)


# --- the pack (for machines without the packaged model) -----------------------------------------

def encode_minmax(W: torch.Tensor, bits: int, block: int, scale_dtype=torch.float16):
    """Uniform min/max re-encoding per `block` weights of a row: (packed codes, d, m) with
    w ~ d * q + m, q in [0, 2**bits), d and m stored in `scale_dtype`; the codes are the nearest
    for the stored (rounded) d and m."""
    from lords_ext.formats import pack
    N, K = W.shape
    Wb = W.reshape(N, K // block, block)
    lo, hi = Wb.amin(-1), Wb.amax(-1)
    d = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-6).to(scale_dtype)
    m = lo.to(scale_dtype)
    q = ((Wb - m.float().unsqueeze(-1)) / d.float().unsqueeze(-1)).round().clamp(0, (1 << bits) - 1)
    return pack(q.reshape(N, K).to(torch.uint8), bits), d, m


def decode_minmax(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    from lords_ext.formats import unpack
    N, nb = d.shape
    q = unpack(codes, bits, K).float().reshape(N, nb, K // nb)
    return (q * d.float().unsqueeze(-1) + m.float().unsqueeze(-1)).reshape(N, K)


GGUF_BLOCK = 32  # Q4_1 and Q8_0: one (d[, m]) per 32 consecutive weights of a row


def encode_q8_0(W: torch.Tensor):
    """Q8_0 codes of a weight: (q int8 [N, K], d fp16 [N, K/32]) with w = d * q, d = fp16(max|w| / 127)
    per block. llama.cpp's quantizer maps each block's largest |w| to q = +-127, so on weights
    dequantized from Q8_0 this recovers the stored d and q (check with exact_q8_0)."""
    N, K = W.shape
    if K % GGUF_BLOCK:
        raise ValueError(f"W: expected a multiple of {GGUF_BLOCK} columns for Q8_0, got shape {tuple(W.shape)}")
    Wb = W.float().reshape(N, K // GGUF_BLOCK, GGUF_BLOCK)
    d = (Wb.abs().amax(-1) / 127).to(torch.float16)
    df = d.float().unsqueeze(-1)
    # all-zero blocks have d = 0 and decode to 0 with any q: divide by 1 there instead of 0
    q = (Wb / torch.where(df > 0, df, torch.ones_like(df))).round().clamp(-127, 127)
    return q.reshape(N, K).to(torch.int8), d


def decode_q8_0(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] = d * q, in the order (and float32 arithmetic) of gguf's dequantization."""
    N, nb = d.shape
    return (q.float().reshape(N, nb, -1) * d.float().unsqueeze(-1)).reshape(q.shape)


def _check_exact(name: str, W: torch.Tensor, R: torch.Tensor, fmt: str) -> None:
    """Raise unless the decoded R equals W bit for bit (as float32 values), naming the blocks that differ."""
    if torch.equal(R, W.float()):
        return
    N, K = W.shape
    bad = (R != W.float()).reshape(N, K // GGUF_BLOCK, GGUF_BLOCK).any(-1)
    err = float((R - W.float()).abs().max())
    raise ValueError(f"{name}: expected values on the {fmt} grid (exact pack), but {int(bad.sum())} of {bad.numel()} "
                     f"blocks of {GGUF_BLOCK} do not decode bit-exactly (max |error| {err:.3g}); is this the GGUF's "
                     f"{fmt} tensor, dequantized to float32 unchanged?")


def exact_q4_1(W: torch.Tensor, name: str):
    """(codes, d, m) of a weight dequantized from Q4_1, verified to decode to W bit for bit.
    llama.cpp's Q4_1 quantizer maps each block's min to q = 0 (so min = fp16 m exactly) and its max to
    q = 15, so encode_minmax's d = fp16((max - min) / 15) is the stored d and the nearest codes are the
    stored codes. Constant blocks get encode_minmax's d floor and q = 0, which decodes to m exactly; a
    block whose span is below 15 * 1e-6 would not, and fails the check rather than passing silently."""
    codes, d, m = encode_minmax(W, 4, GGUF_BLOCK, torch.float16)
    _check_exact(name, W, decode_minmax(codes, d, m, 4, W.shape[1]), "Q4_1")
    return codes, d, m


def exact_q8_0(W: torch.Tensor, name: str):
    """(q, d) of a weight dequantized from Q8_0, verified to decode to W bit for bit."""
    q, d = encode_q8_0(W)
    _check_exact(name, W, decode_q8_0(q, d), "Q8_0")
    return q, d


EXACT_ENCODING = "exact: linears Q4_1 (4-bit min/max per 32, fp16 d, m), embedding rows Q8_0 (int8 per 32, fp16 d)"
PART_LIMIT_MIB = 45  # a device call carries 64 MiB, the working tree and the wheels included


def part_paths(path: str, parts: int) -> list[str]:
    """The files of a pack in `parts` parts: PATH itself for one, else dir/stem.partIofN.suffix
    (.data/exact.safetensors -> .data/exact.part1of2.safetensors, .data/exact.part2of2.safetensors)."""
    if parts < 1:
        raise ValueError(f"--pack-parts: expected a positive number of parts, got {parts}")
    if parts == 1:
        return [path]
    p = Path(path)
    return [str(p.with_name(f"{p.stem}.part{i}of{parts}{p.suffix}")) for i in range(1, parts + 1)]


def split_parts(tensors: dict, parts: int) -> list[dict]:
    """Tensors into `parts` dicts of similar byte size: largest first, each to the lightest part so far
    (the 210 linears' codes are many similar pieces, so the parts come out within a few MB)."""
    out, sizes = [{} for _ in range(parts)], [0] * parts
    for name in sorted(tensors, key=lambda k: (-tensors[k].numel() * tensors[k].element_size(), k)):
        i = sizes.index(min(sizes))
        out[i][name] = tensors[name]
        sizes[i] += tensors[name].numel() * tensors[name].element_size()
    return out


def save_pack(tensors: dict, meta: dict, path: str, parts: int = 1) -> list[str]:
    """Write the pack as `parts` safetensors files (part_paths), each with the same metadata plus its
    "part": "i/N"; returns the paths."""
    from safetensors.torch import save_file
    paths = part_paths(path, parts)
    for i, (p, chunk) in enumerate(zip(paths, split_parts(tensors, parts)), 1):
        save_file({k: t.contiguous() for k, t in chunk.items()}, p,
                  metadata=dict(meta, part=f"{i}/{parts}") if parts > 1 else meta)
        mib = os.path.getsize(p) / 2**20
        if parts > 1 and mib > PART_LIMIT_MIB:
            log(f"WARNING: {p} is {mib:.1f} MiB, above the {PART_LIMIT_MIB} MiB that fit one device call "
                f"next to the working tree (raise --pack-parts)")
    return paths


def make_pack(path: str, cal_tokens: int, eval_tokens: int, ref_tokens: int, bits: int, block: int,
              embed_bits: int = 4, embed_block: int = 32, exact: bool = False, parts: int = 1):
    """Write the pack for a machine without the packaged model, within what one device call carries.

    The exact source (all 30 blocks: 66 MB of Q4_1 linears + a 30 MB Q8_0 embedding) does not fit the
    64 MiB a call carries, and dropping blocks breaks the model (eval loss > 15). So the pack keeps
    every block but changes the model in two stated ways: (1) the vocabulary is restricted to the
    tokens that occur in the carried train/eval streams (their exact Q8_0 embedding rows; the softmax
    runs over those tokens only), and (2) every linear weight is re-encoded from its Q4_1 values to
    `bits`-bit uniform min/max codes per `block` weights (fp16 d, m). The eval loss of the exact
    model and of the re-encoded one (both on the restricted vocabulary) are recorded in the pack.

    exact=True keeps (1) but not (2): the linears' own Q4_1 codes and the embedding rows' own Q8_0
    codes, each verified to decode to the loaded weights bit for bit (~78 MB: write it in parts=2
    files, one per device call). Both recorded losses are then the same number, and that is checked."""
    from lords_ext import data
    part_paths(path, parts)  # a bad --pack-parts fails now, not after the model has loaded
    t0 = time.time()
    model, tok = data.load_smollm2(dtype=torch.float32)  # fp32 already; GGUF models refuse .float()
    cfg = model.config
    cal_a, ev_a = data.wiki_split()
    cal = data.tokenize_text(tok, data.join_articles(cal_a), cal_tokens)
    ev = data.tokenize_text(tok, data.join_articles(ev_a), eval_tokens)
    vocab = torch.unique(torch.cat([cal, ev]))          # sorted original ids kept
    remap = torch.full((cfg.vocab_size,), -1, dtype=torch.long)
    remap[vocab] = torch.arange(vocab.numel())
    V = cfg.vocab_size
    E = model.model.embed_tokens.weight.detach()[vocab].clone()
    common = {"norm.weight": model.model.norm.weight.detach().clone(),
              "ids.cal": remap[cal].to(torch.int16 if vocab.numel() < 32768 else torch.int32),
              "ids.eval": remap[ev].to(torch.int16 if vocab.numel() < 32768 else torch.int32),
              "vocab": vocab.int()}
    exact_t, packed = dict(common, **{"embed.weight": E}), dict(common)
    if exact:
        packed["embed.q"], packed["embed.d"] = exact_q8_0(E, "model.embed_tokens.weight (restricted rows)")
    else:
        packed["embed.codes"], packed["embed.d"], packed["embed.m"] = encode_minmax(E, embed_bits, embed_block)
    for i in range(cfg.num_hidden_layers):
        for hf in LINEARS:
            W = model.get_submodule(f"model.layers.{i}.{hf}").weight.detach()
            exact_t[f"layers.{i}.{hf}.weight"] = W
            c, d, m = (exact_q4_1(W, f"model.layers.{i}.{hf}.weight") if exact else
                       encode_minmax(W, bits, block, torch.float8_e4m3fn))
            packed[f"layers.{i}.{hf}.codes"], packed[f"layers.{i}.{hf}.d"], packed[f"layers.{i}.{hf}.m"] = c, d, m
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = model.get_submodule(f"model.layers.{i}.{norm}").weight.detach().clone()
            exact_t[f"layers.{i}.{norm}.weight"] = packed[f"layers.{i}.{norm}.weight"] = w
    config = {k: getattr(cfg, k) for k in CONFIG_KEYS if hasattr(cfg, k) and not k.endswith("token_id")}
    config["num_hidden_layers"] = cfg.num_hidden_layers
    config["vocab_size"] = int(vocab.numel())
    meta = {"config": json.dumps(config),
            "encoding": EXACT_ENCODING if exact else
                        f"linears {bits}-bit uniform min/max per {block} (fp8 d, m); embedding rows "
                        f"{embed_bits}-bit min/max per {embed_block} (fp16 d, m)",
            "bits": "4" if exact else str(bits), "block": str(GGUF_BLOCK if exact else block),
            "embed_bits": "8" if exact else str(embed_bits),
            "source": f"{data.SMOLLM2_GGUF} ({data.SMOLLM2_PACKAGE}); wiki: gensim test articles (lords_ext.data split)",
            "tokens": f"cal {cal.numel()}, eval {ev.numel()}, vocabulary {vocab.numel()} of {V}"}
    del model
    ref = {}
    for name, t in (("exact", exact_t), ("pack", packed)):
        m, _, e, _ = model_from_tensors(t, meta)
        ref[name] = eval_loss(m, e[:ref_tokens], seq_len=256, batch=4)
        del m
    if exact and ref["exact"] != ref["pack"]:
        raise RuntimeError(f"exact pack: eval loss of the decoded pack {ref['pack']!r} differs from the exact "
                           f"model's {ref['exact']!r} although every weight decoded bit-exactly")
    meta["ref_eval_loss"] = repr(ref["pack"])
    meta["exact_eval_loss"] = repr(ref["exact"])
    meta["ref_eval_tokens"] = str(ref_tokens)
    paths = save_pack(packed, meta, path, parts)
    files = ", ".join(f"{p} {os.path.getsize(p) / 2**20:.1f} MiB" for p in paths)
    log(f"pack {files}; vocabulary {vocab.numel()} tokens; eval loss on "
        f"{ref_tokens} held-out tokens (restricted vocabulary, CPU fp32): exact SmolLM2 {ref['exact']:.4f}, "
        f"{'packed' if exact else 're-encoded'} ({meta['encoding']}) {ref['pack']:.4f}; {time.time() - t0:.0f} s")
    return paths


def _embedding(tensors: dict, meta: dict, H: int) -> torch.Tensor:
    """The (restricted) embedding rows as float32, from whichever form the pack holds."""
    if "embed.weight" in tensors:
        return tensors["embed.weight"].float()
    if "embed.q" in tensors:  # exact pack: Q8_0
        return decode_q8_0(tensors["embed.q"], tensors["embed.d"])
    return decode_minmax(tensors["embed.codes"], tensors["embed.d"], tensors["embed.m"], int(meta["embed_bits"]), H)


def model_from_tensors(tensors: dict, meta: dict):
    """(float32 LlamaForCausalLM, cal ids, eval ids, info) from a pack's tensors and metadata."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = json.loads(meta["config"])
    L = config["num_hidden_layers"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).float().eval()
    H = config["hidden_size"]
    bits = int(meta.get("bits", 0) or 0)
    state = {"model.embed_tokens.weight": _embedding(tensors, meta, H),
             "model.norm.weight": tensors["norm.weight"].float()}
    for i in range(L):
        for hf in LINEARS:
            key = f"layers.{i}.{hf}"
            lin = model.get_submodule(f"model.layers.{i}.{hf}")
            if f"{key}.weight" in tensors:
                W = tensors[f"{key}.weight"].float()
            else:  # min/max codes: the lossy re-encoding or the exact Q4_1 (block from d's shape)
                W = decode_minmax(tensors[f"{key}.codes"], tensors[f"{key}.d"], tensors[f"{key}.m"], bits,
                                  lin.in_features)
            state[f"model.layers.{i}.{hf}.weight"] = W
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = tensors[f"layers.{i}.{norm}.weight"].float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"pack: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if config.get("tie_word_embeddings", True):
        model.lm_head.weight = model.model.embed_tokens.weight
    info = {"blocks": f"all {L}", "source": meta.get("source"), "tokens": meta.get("tokens"),
            "encoding": meta.get("encoding"),
            "exact_eval_loss": float(meta["exact_eval_loss"]) if "exact_eval_loss" in meta else None,
            "ref_eval_loss": float(meta["ref_eval_loss"]) if "ref_eval_loss" in meta else None,
            "ref_eval_tokens": int(meta.get("ref_eval_tokens", 0))}
    return model, tensors["ids.cal"].long(), tensors["ids.eval"].long(), info


def _part_of(meta: dict, path: str) -> tuple[int, int]:
    """(i, N) of a pack file's "part": "i/N" metadata; (1, 1) for a pack written as one file."""
    if "part" not in meta:
        return 1, 1
    try:
        i, n = (int(x) for x in meta["part"].split("/"))
    except ValueError:
        raise ValueError(f"--pack {path}: expected metadata part 'i/N', got {meta['part']!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--pack {path}: expected metadata part 'i/N' with 1 <= i <= N, got {meta['part']!r}")
    return i, n


def read_pack(paths) -> tuple[dict, dict]:
    """(tensors, metadata) of a pack given as one path or the paths of all its parts (any order).
    The parts must carry the same metadata (config, encoding, losses: one make_pack call) and together
    every part 1..N exactly once."""
    from safetensors import safe_open
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("--pack: expected the path of the pack (or of each of its parts), got none")
    tensors, meta0, seen = {}, None, {}
    for path in map(str, paths):
        with safe_open(path, "pt") as f:
            meta = dict(f.metadata() or {})
            i, n = _part_of(meta, path)
            meta.pop("part", None)
            if meta0 is None:
                meta0, n0, first = meta, n, path
            elif meta != meta0 or n != n0:
                keys = sorted(k for k in set(meta) | set(meta0) if meta.get(k) != meta0.get(k))
                raise ValueError(f"--pack: {path} is not a part of the same pack as {first} (part of {n} vs "
                                 f"{n0}; metadata differing in {keys or 'none'})")
            if i in seen:
                raise ValueError(f"--pack: part {i}/{n} given twice ({seen[i]} and {path})")
            seen[i] = path
            for k in f.keys():
                if k in tensors:
                    raise ValueError(f"--pack: tensor {k!r} in more than one part (again in {path})")
                tensors[k] = f.get_tensor(k)
    missing = [i for i in range(1, n0 + 1) if i not in seen]
    if missing:
        want = ", ".join(f"{i}/{n0}" for i in missing)
        guess = ", ".join(re.sub(r"\.part\d+of", f".part{i}of", first) for i in missing) if ".part" in first else ""
        raise ValueError(f"--pack: part {want} missing: the pack has {n0} parts, got {len(seen)} "
                         f"({', '.join(seen[i] for i in sorted(seen))})" + (f"; expected also {guess}" if guess else ""))
    return tensors, meta0


def load_pack(paths):
    """load_pack(path or [part paths]) -> model_from_tensors of the whole pack."""
    return model_from_tensors(*read_pack(paths))


def stdlib_split() -> tuple[str, str]:
    """A second corpus, a domain shift from Wikipedia: the Python standard library's own modules (top-level
    and package .py files, tests and site-packages left out), sorted by path, even files for training and odd
    ones for evaluation. Its text depends on the Python version (recorded in the results)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not ({"test", "tests", "site-packages", "idle_test", "__pycache__"} & set(p.relative_to(root).parts)))
    if not files:
        raise RuntimeError(f"--corpus pystdlib: no .py files under {root}")
    texts = [f"# file: {p.relative_to(root)}\n" + p.read_text(encoding="utf-8", errors="replace") for p in files]
    return "\n\n".join(texts[0::2]), "\n\n".join(texts[1::2])


def load_packaged(cal_tokens: int, eval_tokens: int, corpus: str = "wiki"):
    """The whole packaged SmolLM2 (30 blocks) and the token ids of the corpus: the wiki articles of
    lords_ext.data, or the Python standard library's source (stdlib_split)."""
    from lords_ext import data
    model, tok = data.load_smollm2(dtype=torch.float32)  # fp32 already; GGUF models refuse .float()
    if corpus == "pystdlib":
        cal_text, ev_text = stdlib_split()
    else:
        cal_a, ev_a = data.wiki_split()
        cal_text, ev_text = data.join_articles(cal_a), data.join_articles(ev_a)
    cal = data.tokenize_text(tok, cal_text, cal_tokens)
    ev = data.tokenize_text(tok, ev_text, eval_tokens)
    return model.eval(), cal, ev, {"blocks": "all 30", "source": data.SMOLLM2_GGUF, "encoding": "exact",
                                           "tokens": "", "ref_eval_loss": None, "ref_eval_tokens": 0,
                                           "corpus": corpus if corpus != "pystdlib" else f"pystdlib (Python {sys.version.split()[0]})"}


# --- evaluation ---------------------------------------------------------------------------------

def eval_loss(model, ids: torch.Tensor, seq_len: int, batch: int) -> float:
    """Mean next-token loss (nats) over non-overlapping windows of the held-out stream."""
    from lords_ext.evaluate import perplexity
    r = perplexity(model, ids, seq_len=seq_len, batch_size=batch, progress=False)
    return r.nll / r.tokens


# --- methods ------------------------------------------------------------------------------------

def _set(model, name, new):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


FROZEN_DTYPE = torch.bfloat16  # --frozen-dtype; fp32 on CPUs, where bf16 matmuls are ~10x slower


def frozen_to_bf16(model: nn.Module) -> None:
    """Parameters and float buffers that do not train become FROZEN_DTYPE (bf16 unless --frozen-dtype). Quantized layers (LordsLinear,
    QAT layers) keep their own dtypes (fp32 scales and codebook), so a frozen LoRDS model is
    evaluated with the same precision whether its scales were trained (PEFT) or not (QAT, frozen)."""
    from lords_ext.qat import QAT_LAYERS
    skip = set()
    for mod in model.modules():
        if isinstance(mod, (LordsLinear,) + QAT_LAYERS):
            skip.update(id(m) for m in mod.modules())
    for mod in model.modules():
        if id(mod) in skip:
            continue
        for p in mod.parameters(recurse=False):
            if not p.requires_grad and p.dtype.is_floating_point and p.dtype != FROZEN_DTYPE:
                p.data = p.data.to(FROZEN_DTYPE)
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.dtype == torch.float32 and "inv_freq" not in name:  # rotary tables stay fp32, as in HF
                mod._buffers[name] = b.to(FROZEN_DTYPE)


class Runner:
    def __init__(self, src: nn.Module, args, dev, cal: torch.Tensor | None = None):
        self.src, self.args, self.dev = src, args, dev
        self.cal = cal  # the training token stream (calibration for --ptq-calibration-tokens)
        self.ptq: dict[int, tuple[nn.Module, float]] = {}

    def ptq_calibration(self) -> torch.Tensor | None:
        """[n, seq_len] token windows for activation-aware LoRDS PTQ: the first --ptq-calibration-tokens
        tokens of the training stream, cut at --seq-len (the context the model trains and is evaluated at,
        so the activations are those it will see); None (weight-only PTQ) when the option is 0. Never the
        evaluation stream: calibrating on it would leak the held-out text into the model evaluated."""
        n = self.args.ptq_calibration_tokens
        if not n:
            return None
        if self.cal is None or n > self.cal.numel():
            have = 0 if self.cal is None else self.cal.numel()
            raise ValueError(f"--ptq-calibration-tokens {n}: only {have} training tokens loaded (raise --cal-tokens)")
        from lords_ext.calibration import calibration_windows
        return calibration_windows(self.cal[:n], self.args.seq_len)

    def lords_ptq(self, bits: int):
        """LoRDS PTQ of the source model (cached per bit width, on the CPU between runs)."""
        if bits not in self.ptq:
            from lords_ext.model import quantize_model
            m = copy.deepcopy(self.src).to(self.dev)
            cfg = LordsConfig(bits=bits, block=64, steps=self.args.ptq_steps)
            calibration = self.ptq_calibration()
            sync(self.dev)
            t0 = time.perf_counter()
            # quantize.py builds one small tensor on the default device (the CPU) while quantizing on the
            # GPU; making the GPU the default device for the call avoids the device mismatch.
            with torch.device(self.dev):
                quantize_model(m, cfg, calibration=calibration, device=self.dev, progress=False)
            sync(self.dev)
            self.ptq[bits] = (m.to("cpu"), time.perf_counter() - t0)
        m, secs = self.ptq[bits]
        return copy.deepcopy(m).to(self.dev), secs

    def build(self, method: str, bits: int, lr: float, lr_w: float):
        """(model on the device, optimizer param groups, info) for one run."""
        from lords_ext.peft import prepare_for_peft
        from lords_ext.qat import LordsQATLinear, param_groups, prepare_for_qat
        info = {}
        if method in ("lords-peft", "lords-qat"):  # both LoRDS methods start from the same PTQ
            info["ptq"] = (f"activation-aware ({self.args.ptq_calibration_tokens} training tokens)"
                           if self.args.ptq_calibration_tokens else "weight-only")
            m, info["quantize_s"] = self.lords_ptq(bits)  # quantize_s includes the Hessian collection
            info["ptq_calibration_s"] = m.lords_report.calibration_seconds
        if method == "lords-peft":
            prepare_for_peft(m, scales_dtype=torch.float32)
            groups = [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr}]
        elif method == "lords-qat":
            m.requires_grad_(False)
            for name, layer in [(n, x) for n, x in m.named_modules() if isinstance(x, LordsLinear)]:
                W = self.src.get_submodule(name).weight.detach().to(self.dev, torch.float32)
                _set(m, name, LordsQATLinear.from_lords(layer, W))
            groups = param_groups(m, lr_scales=lr, lr_weights=lr_w)
        elif method == "block-qat":
            m = copy.deepcopy(self.src).to(self.dev)
            sync(self.dev)
            t0 = time.perf_counter()
            prepare_for_qat(m, LordsConfig(bits=bits, block=64), kind="block")
            sync(self.dev)
            info["quantize_s"] = time.perf_counter() - t0
            groups = param_groups(m, lr_scales=lr, lr_weights=lr_w)
        elif method.startswith(("qlora", "nflora")):
            m, info = (self.qlora if method.startswith("qlora") else self.nflora)(method, bits)
            groups = [{"params": [p for p in m.parameters() if p.requires_grad], "lr": lr}]
        else:
            raise ValueError(f"method: unknown {method!r}")
        frozen_to_bf16(m)
        for g in groups:
            for p in g["params"]:
                p.data = p.data.float()
        return m, groups, info

    def qlora(self, method: str, bits: int):
        import bitsandbytes as bnb
        if bits != 4:
            raise SkipRun("bitsandbytes has no 3-bit format")
        m = copy.deepcopy(self.src).to(FROZEN_DTYPE)
        m.requires_grad_(False)
        t0 = time.perf_counter()
        for name, lin in self._linears(m):
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=FROZEN_DTYPE, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4", blocksize=64)
            _set(m, name, q)
        m = m.to(self.dev)  # quantizes
        sync(self.dev)
        return self._lora(m, method, time.perf_counter() - t0)

    def nflora(self, method: str, bits: int):
        """QLoRA's recipe at any width: block-wise NF{bits} (block 64, round to nearest, absmax
        scales, as bitsandbytes NF4 without double quantization) held as frozen dequantized
        weights, plus the same peft LoRA. Same numbers as a packed kernel would compute, not its
        memory or speed: the row that QLoRA cannot have at 3 bits."""
        from lords_ext import blockwise_quantize
        m = copy.deepcopy(self.src).to(self.dev)
        m.requires_grad_(False)
        t0 = time.perf_counter()
        for _, lin in self._linears(m):
            lin.weight.data = blockwise_quantize(lin.weight.data.float(), bits=bits, block=64).dequantize()
        sync(self.dev)
        return self._lora(m, method, time.perf_counter() - t0)

    @staticmethod
    def _linears(m: nn.Module):
        return [(n, x) for n, x in m.named_modules() if isinstance(x, nn.Linear) and n != "lm_head"]

    def _lora(self, m: nn.Module, method: str, quantize_s: float):
        """peft LoRA on the 7 projections: rank 16 for *-r16, else per layer the LoRDS parity rank
        (block 64) so that the trainable count equals LoRDS-PEFT's exactly; alpha = 2 r."""
        from peft import LoraConfig, get_peft_model

        from lords_ext.quantize import parity_rank
        ranks, alphas = {}, {}
        if method.endswith("-eq"):
            for name, lin in self._linears(self.src):
                r = parity_rank(lin.out_features, lin.in_features, 64)
                ranks[name], alphas[name] = r, 2 * r
        r = 16 if method.endswith("-r16") else 4
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         target_modules=[k.rsplit(".", 1)[-1] for k in LINEARS],
                         rank_pattern={re.escape(k): v for k, v in ranks.items()},
                         alpha_pattern={re.escape(k): v for k, v in alphas.items()})
        m = get_peft_model(m, cfg)
        info = {"quantize_s": quantize_s, "lora_rank": "per layer = LoRDS parity rank" if ranks else r}
        if ranks:  # the point of this run: exactly LoRDS-PEFT's trainable count
            want = sum(r * (lin.in_features + lin.out_features) for name, r in ranks.items()
                       for lin in [self.src.get_submodule(name)])
            got = sum(p.numel() for p in m.parameters() if p.requires_grad)
            if got != want:
                raise RuntimeError(f"{method}: peft made {got} trainable parameters, expected {want} (rank_pattern "
                                   "not applied by this peft version?)")
        return m, info


class SkipRun(Exception):
    pass


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def upper_median(v):
    """The middle value (the upper one of an even count): the step-time statistic of every table."""
    return sorted(v)[len(v) // 2]


# --compile: how the training forward (+ its backward) is compiled; evaluation always runs eager.
COMPILE_MODES = {"off": None, "inductor": {}, "reduce-overhead": {"mode": "reduce-overhead"},
                 "aot_eager": {"backend": "aot_eager"}}


def compiled(model, how: str):
    """The module a training step calls: `model` itself, or torch.compile of it (same parameters). The
    steps are host-bound on the H100 machine (bench/peft_notes.md), so compiling both methods is the
    comparison that takes the Python and autograd overhead out of the step time."""
    kw = COMPILE_MODES[how]
    return model if kw is None else torch.compile(model, dynamic=False, **kw)


def train_step(model, params, opt, b):
    """Forward + backward + clip + optimizer step on one batch; returns the loss tensor."""
    loss = model(input_ids=b, labels=b).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def paired_timing(runner, args, batches, dev) -> dict:
    """Step time of the PEFT methods measured side by side: every model is built, then single steps
    alternate between them (the order flips every round) on the same batches. Each round gives a
    ratio to the first method, so slow drifts of the host (which moved one method's median step by
    ~40 % between two machine starts on the H100) cancel. Returns per method the median step ms and
    the median over rounds of (its step / the first method's step)."""
    bits, lr = args.bits[0], args.lr_peft[0]
    methods = [m for m in args.methods if not m.endswith("qat")]
    built = {}
    for m in methods:
        torch.manual_seed(args.seed)
        try:
            model, groups, _ = runner.build(m, bits, lr, None)
        except SkipRun as e:
            log(f"paired timing: {m} skipped ({e})")
            continue
        model.train()
        params = [p for g in groups for p in g["params"]]
        built[m] = (compiled(model, args.compile), params, torch.optim.AdamW(groups, weight_decay=0.0))
    names = list(built)
    if len(names) < 2:
        return {"skipped": f"fewer than two PEFT methods could be built ({names})"}
    times = {m: [] for m in names}
    warm = 3
    for i in range(args.paired_steps + warm):
        b = batches[i % len(batches)].to(dev)
        for m in (names if i % 2 == 0 else names[::-1]):
            model, params, opt = built[m]
            sync(dev)
            t0 = time.perf_counter()
            train_step(model, params, opt, b)
            sync(dev)
            if i >= warm:
                times[m].append(time.perf_counter() - t0)

    out = {"bits": bits, "lr": lr, "rounds": args.paired_steps, "methods": {}}
    for m in names:
        ratios = [t / t0 for t, t0 in zip(times[m], times[names[0]])]
        out["methods"][m] = {"step_ms": 1e3 * upper_median(times[m]), "ratio_to_first": upper_median(ratios),
                             "rounds_faster_than_first": sum(r < 1 for r in ratios)}
    for m, r in out["methods"].items():
        log(f"paired timing, {bits}-bit, {args.paired_steps} alternating rounds: {m:<10} median step "
            f"{r['step_ms']:.1f} ms, median ratio to {names[0]} {r['ratio_to_first']:.3f} "
            f"(faster than it in {r['rounds_faster_than_first']} of {args.paired_steps} rounds)")
    del built
    return out


def train(model, groups, batches, args, dev):
    """AdamW (no weight decay), linear warmup over 10% of the steps then cosine to 10%, grad-norm clip 1.
    Returns (per-step seconds, losses, peak bytes, profile summary or None)."""
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    warm = max(1, len(batches) // 10)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, len(batches) - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses = [], []
    prof, summary, first = None, None, min(5, len(batches) - 1)  # profile after the warm-up steps (autotuning, caches)
    n_prof = min(args.profile_steps, len(batches) - first)
    step_model = compiled(model, args.compile)
    for i, b in enumerate(batches):
        if n_prof > 0 and i == first:
            prof = start_profiler(dev)
        b = b.to(dev)
        sync(dev)
        t0 = time.perf_counter()
        loss = train_step(step_model, params, opt, b)
        sched.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        if prof is not None and i == first + n_prof - 1:
            prof.stop()
            summary = summarize_profile(prof, dev, n_prof, sum(times[first:]))
            prof = None
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss became {losses[-1]} at step {len(losses)}")
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    model.eval()
    return times, losses, peak, summary


def start_profiler(dev):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    prof = profile(activities=acts)
    prof.start()
    return prof


def summarize_profile(prof, dev, steps: int, wall_s: float, top: int = 12) -> dict:
    """Where a training step's time goes: wall time vs the summed GPU kernel time per step (their
    difference is host overhead the GPU waits through), kernel launches per step, and the ops with
    the most self time on the device and on the host."""
    ev = prof.key_averages()
    dev_key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"

    def rows(key):
        best = sorted(ev, key=lambda e: getattr(e, key, 0.0), reverse=True)[:top]
        return [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": getattr(e, key, 0.0) / 1e3 / steps}
                for e in best]
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]
    out = {"steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps,
           "kernel_ms_per_step": sum(e.device_time for e in kernels) / 1e3 / steps if kernels else None,
           "kernel_launches_per_step": len(kernels) / steps if kernels else None,
           "top_device": rows(dev_key), "top_host": rows("self_cpu_time_total")}
    log(f"  profile ({steps} steps): wall {out['wall_ms_per_step']:.1f} ms/step"
        + (f", GPU kernels {out['kernel_ms_per_step']:.1f} ms/step in {out['kernel_launches_per_step']:.0f} launches"
           if kernels else ""))
    for title, key in (("device", "top_device"), ("host", "top_host")):
        log(f"  top {title} self time per step: " + "; ".join(
            f"{r['op'][:48]} {r['ms_per_step']:.2f} ms x{r['calls_per_step']:.0f}" for r in out[key][:8]))
    return out


def probe_backend(runner: Runner, dev, report: dict):
    """Check the dispatched LoRDS backend against the reference on one real layer (forward and the
    B/A/x gradients, bf16 activations); fall back to the reference backend if it fails or disagrees."""
    from lords_ext.backends import dispatch
    m, _ = runner.lords_ptq(4)
    layer = next(x for x in m.modules() if isinstance(x, LordsLinear))
    M = runner.args.batch * runner.args.seq_len
    x = torch.randn(M, layer.in_features, device=dev, dtype=FROZEN_DTYPE)
    report["backend"] = {op: dispatch.choose(op, x, M) for op in ("dequant_matmul", "grad_x", "grad_scales")}

    def run():
        layer.train_scales()
        layer.B.grad = layer.A.grad = None
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.float().square().mean().backward()
        return y.float(), xx.grad.float(), layer.B.grad.float(), layer.A.grad.float()

    try:
        got = run()
        saved = os.environ.get(dispatch.ENV)
        os.environ[dispatch.ENV] = "reference"
        want = run()
        if saved is None:
            del os.environ[dispatch.ENV]
        else:
            os.environ[dispatch.ENV] = saved
        errs = [float((g - w).norm() / w.norm().clamp_min(1e-30)) for g, w in zip(
            [t.detach() for t in got], [t.detach() for t in want])]
        report["backend_probe_rel_err"] = dict(zip(("y", "grad_x", "grad_B", "grad_A"), errs))
        if max(errs) > 3e-2:
            raise RuntimeError(f"relative errors {errs} above 3e-2")
    except Exception as e:  # a broken fast path must not sink the whole comparison
        report["backend_fallback"] = f"{type(e).__name__}: {e}"
        os.environ[dispatch.ENV] = "reference"
        report["backend"] = {op: "reference" for op in report["backend"]}
    log(f"LoRDS backend: {report['backend']} probe {report.get('backend_probe_rel_err')} "
        f"{report.get('backend_fallback', '')}")


def runnable(method: str, bits: int, have_qlora: bool) -> bool:
    if method.startswith("qlora"):
        return bits == 4 and have_qlora
    return have_qlora or not method.startswith("nflora")  # nflora needs peft (checked with bitsandbytes)


def plan(args, have_qlora: bool):
    """Runs in order of priority (the budget may stop the tail): (bits, method, lr, lr_weights)."""
    runs = []
    for bits in args.bits:
        for method in args.methods:
            if not runnable(method, bits, have_qlora):
                continue
            lrs = args.lr_qat if method.endswith("qat") else args.lr_peft
            runs.append((bits, method, lrs[0], args.lr_weights[0]))
    for bits in args.bits:  # the rest of the learning-rate sweep
        for method in args.methods:
            if not runnable(method, bits, have_qlora):
                continue
            if method.endswith("qat"):
                extra = [(lr, lw) for lr in args.lr_qat for lw in args.lr_weights][1:]
            else:
                extra = [(lr, 0.0) for lr in args.lr_peft[1:]]
            runs += [(bits, method, lr, lw) for lr, lw in extra]
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--make-pack", metavar="PATH", help="write a pack file for machines without the packages, then exit")
    ap.add_argument("--pack-bits", type=int, default=4, help="bits of the pack's re-encoded linear weights")
    ap.add_argument("--pack-block", type=int, default=192, help="min/max block of the pack's re-encoding")
    ap.add_argument("--pack-embed-bits", type=int, default=4, help="bits of the pack's re-encoded embedding rows")
    ap.add_argument("--pack-exact", action="store_true",
                    help="--make-pack: store the GGUF's own Q4_1 linears and Q8_0 embedding rows, verified bit-exact "
                         "(--pack-bits, --pack-block, --pack-embed-bits do not apply); ~78 MB, so with --pack-parts 2")
    ap.add_argument("--pack-parts", type=int, default=1,
                    help="--make-pack: write the pack as N files PATH-stem.partIofN.suffix of similar size (one per "
                         "device call); --pack then takes all of them")
    ap.add_argument("--pack", metavar="PATH", nargs="+",
                    help="read the model and tokens from this pack (all its part files) instead of lords_ext.data")
    ap.add_argument("--corpus", choices=("wiki", "pystdlib"), default="wiki",
                    help="training / evaluation text without --pack: the wiki articles or the Python stdlib source")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--methods", nargs="+", default=["lords-peft", "qlora-eq", "qlora-r16", "lords-qat", "block-qat"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr-peft", type=float, nargs="+", default=[1e-3, 3e-4],
                    help="learning rates of the PEFT runs (LoRDS B/A, LoRA A/B); the first is the main run")
    ap.add_argument("--lr-qat", type=float, nargs="+", default=[1e-3], help="QAT scale learning rates")
    ap.add_argument("--lr-weights", type=float, nargs="+", default=[1e-5], help="QAT latent-weight learning rates")
    ap.add_argument("--ptq-steps", type=int, default=25, help="ALS refinement steps of the LoRDS PTQ")
    ap.add_argument("--cal-tokens", type=int, default=320_000)
    ap.add_argument("--ptq-calibration-tokens", type=int, default=0,
                    help="activation-aware LoRDS PTQ (lords-peft, lords-qat): layer Hessians from the first N "
                         "training tokens (never the eval text) in --seq-len windows; 0 = weight-only PTQ")
    ap.add_argument("--eval-tokens", type=int, default=32_768)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip runs that would start after this many seconds")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--paired-steps", type=int, default=0,
                    help="after the runs, build the PEFT methods side by side and time this many alternating "
                         "single steps of each (step-time comparison that cancels host drift)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="profile this many training steps (after 5 warm-up steps) of every run with torch.profiler "
                         "and report wall vs GPU-kernel time per step and the top ops (those steps stay in step_ms)")
    ap.add_argument("--compile", choices=tuple(COMPILE_MODES), default="off",
                    help="torch.compile the training forward of every method (the first steps then include "
                         "compilation: step_ms is a median, paired timing skips 3 warm-up rounds)")
    ap.add_argument("--frozen-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="dtype of everything that does not train (and of QLoRA's compute); fp32 for CPU runs")
    ap.add_argument("--smoke-blocks", type=int, default=0,
                    help="pipeline test only: keep the first N decoder blocks (a broken model; never for results)")
    args = ap.parse_args(argv)
    global FROZEN_DTYPE
    FROZEN_DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.frozen_dtype]
    t_start = time.time()

    if args.make_pack:
        make_pack(args.make_pack, args.cal_tokens, args.eval_tokens, 2048, args.pack_bits, args.pack_block,
                  args.pack_embed_bits, exact=args.pack_exact, parts=args.pack_parts)
        return 0
    if args.pack_exact or args.pack_parts != 1:
        ap.error("--pack-exact / --pack-parts: only with --make-pack (--pack reads any pack, exact or not)")

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.pack:
        src, cal, ev, info = load_pack(args.pack)
    else:
        src, cal, ev, info = load_packaged(args.cal_tokens, args.eval_tokens, args.corpus)
    ev = ev[:args.eval_tokens]
    if args.smoke_blocks:
        src.model.layers = src.model.layers[:args.smoke_blocks]
        src.config.num_hidden_layers = args.smoke_blocks
        info["blocks"] = f"SMOKE TEST: first {args.smoke_blocks} only"
        info["ref_eval_loss"] = None
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": info, "args": vars(args), "runs": []}
    log(f"model: SmolLM2-135M-Instruct (Q4_1 source), {src.config.num_hidden_layers} blocks, vocabulary "
        f"{src.config.vocab_size}" + (f"; PACK: {info['encoding']}, {info['tokens']}" if args.pack else "")
        + f"; device {report['device']}; torch {torch.__version__}")
    if info.get("ref_eval_loss") is not None:
        got = eval_loss(copy.deepcopy(src).to(dev), ev[:info["ref_eval_tokens"]], 256, 4)
        report["pack_check"] = {"packed": info["ref_eval_loss"], "here": got, "exact_model": info["exact_eval_loss"]}
        log(f"pack check: eval loss on {info['ref_eval_tokens']} tokens here {got:.4f}, when packed "
            f"{info['ref_eval_loss']:.4f} (exact SmolLM2 on the same vocabulary: {info['exact_eval_loss']:.4f})")
        if abs(got - info["ref_eval_loss"]) > 1e-2:
            log("WARNING: the model rebuilt from the pack differs from the packed one (transformers version?)")

    have_qlora = True
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        report["versions"] = {"bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__}
    except Exception as e:
        have_qlora = False
        log(f"QLoRA runs skipped: bitsandbytes/peft not importable ({type(e).__name__}: {e})")
        report["qlora_skipped"] = f"{type(e).__name__}: {e}"

    # Same windows, same order, for every run.
    windows = cal[: cal.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(windows.shape[0], generator=g)
    need = args.steps * args.batch
    order = order.repeat(math.ceil(need / order.numel()))[:need]
    batches = [windows[order[i * args.batch:(i + 1) * args.batch]] for i in range(args.steps)]
    log(f"data: {windows.shape[0]} training windows of {args.seq_len} tokens, {args.steps} steps x batch {args.batch} "
        f"({need * args.seq_len} tokens, {need / windows.shape[0]:.2f} epochs); eval {ev.numel()} held-out tokens")

    runner = Runner(src, args, dev, cal)
    with torch.no_grad():
        base = copy.deepcopy(src).to(dev).to(FROZEN_DTYPE)
        report["float_eval_loss"] = eval_loss(base, ev, args.seq_len, args.eval_batch)
        del base
    log(f"unquantized source model ({args.frozen_dtype}): eval loss {report['float_eval_loss']:.4f} "
        f"ppl {math.exp(report['float_eval_loss']):.2f}")
    if any(m.startswith("lords") for m in args.methods):
        probe_backend(runner, dev, report)

    durations = []
    for bits, method, lr, lr_w in plan(args, have_qlora):
        elapsed = time.time() - t_start
        guess = max(durations) if durations else 0.0
        row = {"bits": bits, "method": method, "lr": lr, "lr_weights": lr_w if method.endswith("qat") else None}
        if elapsed + guess > args.budget_s:
            row["skipped"] = f"time budget ({elapsed:.0f} s used of {args.budget_s:.0f})"
            report["runs"].append(row)
            log(f"skip {bits}-bit {method} lr {lr}: {row['skipped']}")
            continue
        t0 = time.time()
        torch.manual_seed(args.seed)
        try:
            model, groups, extra = runner.build(method, bits, lr, lr_w)
            row.update(extra)
            row["trainable"] = sum(p.numel() for grp in groups for p in grp["params"])
            with torch.no_grad():
                row["eval_before"] = eval_loss(model, ev, args.seq_len, args.eval_batch)
            times, losses, peak, prof = train(model, groups, batches, args, dev)
            row["train_s"] = sum(times)
            if prof is not None:
                row["profile"] = prof
            if method.endswith("qat"):
                from lords_ext.qat import freeze_model
                model = freeze_model(model)  # evaluate what deploys: (Q, B, A) LordsLinear layers
                frozen_to_bf16(model)
            with torch.no_grad():
                row["eval_after"] = eval_loss(model, ev, args.seq_len, args.eval_batch)
            skip = min(5, len(times) - 1)
            row["step_ms"] = 1e3 * upper_median(times[skip:])
            row["peak_gib"] = peak / 2**30
            row["train_loss_first_last"] = [losses[0], sum(losses[-10:]) / len(losses[-10:])]
            del model, groups
        except SkipRun as e:
            row["skipped"] = str(e)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        row["seconds"] = time.time() - t0
        durations.append(row["seconds"])
        report["runs"].append(row)
        if "eval_after" in row:
            log(f"{bits}-bit {method:<10} lr {lr:g}{f' w {lr_w:g}' if method.endswith('qat') else ''}: eval "
                f"{row['eval_before']:.4f} -> {row['eval_after']:.4f}, trainable {row['trainable']:,}, step "
                f"{row['step_ms']:.1f} ms, peak {row['peak_gib']:.2f} GiB ({row['seconds']:.0f} s)")
        else:
            log(f"{bits}-bit {method} lr {lr:g}: {row.get('skipped') or row.get('error')}")

    if args.paired_steps:
        report["paired_timing"] = paired_timing(runner, args, batches, dev)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.time() - t_start
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)
    return 0


def print_table(report):
    fl = report["float_eval_loss"]
    log("")
    log(f"{report['device']}, {report['model']['blocks']} blocks; unquantized {report['args']['frozen_dtype']} eval loss {fl:.4f} "
        f"(ppl {math.exp(fl):.2f})")
    log("| bits | method | lr (scales/adapter; weights) | trainable | eval loss before | after | ppl before | after "
        "| step ms | peak GiB |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        lr = f"{r['lr']:g}" + (f"; {r['lr_weights']:g}" if r.get("lr_weights") else "")
        if "eval_after" not in r:
            log(f"| {r['bits']} | {r['method']} | {lr} | - | - | - | - | - | - | {r.get('skipped') or r.get('error')} |")
            continue
        log(f"| {r['bits']} | {r['method']} | {lr} | {r['trainable']:,} | {r['eval_before']:.4f} | {r['eval_after']:.4f} "
            f"| {math.exp(r['eval_before']):.2f} | {math.exp(r['eval_after']):.2f} | {r['step_ms']:.1f} "
            f"| {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
