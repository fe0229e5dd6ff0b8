"""Whole-model post-training quantization, and saving / loading the result without the original weights.

`quantize_model` walks a model's nn.Linear layers one at a time (only one float weight is ever
copied to the quantization device), replaces each with a `LordsLinear`, and records per-layer error
and time. Three methods share that path:
  * "lords":     LoRDS, `quantize_weight(W, cfg, hessian=H)`; H from `hessians` or `calibration`
                 makes the refinement activation-aware (trace(E H E^T) instead of ||E||^2).
  * "nf", "nf-search": the block-wise baseline (absmax or clipping-searched block scales). Its block
                 scales are an exact rank-K/block factorization B @ A (B = the scales, A = the 0/1
                 block indicator), so it runs, saves and loads through the same LordsLinear.

Saved layout of a directory (`save_quantized`):
  model.safetensors   every tensor of the model's state dict (quantized layers: qweight, B, A,
                      codebook, bias), tied duplicates stored once; no pickle anywhere
  lords_quant.json    format name and version, method, LordsConfig fields, source model, per-layer
                      shapes / bits / rank / codebook, tied-tensor map, tensors file size
  config.json (+ generation_config.json, tokenizer files)   from the Hugging Face model
`load_quantized` builds the model from config.json with empty (meta) weights, swaps in empty
LordsLinear layers of the recorded shapes, checks every tensor name and shape against the file, and
assigns the loaded tensors.
"""
from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ._records import read_record, read_tensors
from .formats import CODEBOOK_NAMES, get_codebook, pack_group
from .nn import LordsLinear
from .quantize import LordsConfig, LordsQuantized, blockwise_quantize, quantize_weight

FORMAT_NAME = "lords-quantized"
FORMAT_VERSION = 1
METADATA_FILE = "lords_quant.json"
TENSORS_FILE = "model.safetensors"
DEFAULT_SKIP = ("lm_head",)
METHODS = ("lords", "nf", "nf-search")


class QuantizedFormatError(ValueError):
    """A saved quantized model cannot be loaded: wrong version, missing or mismatched tensors, damaged file."""


# --- report -------------------------------------------------------------------------------------

@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    rel_error: float
    frobenius_error: float
    bits_per_weight: float
    seconds: float
    rank: int
    steps_run: int = 0
    init_loss: float = float("nan")
    final_loss: float = float("nan")


@dataclass
class QuantizeReport:
    method: str
    config: dict
    activation_aware: bool
    device: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # name -> why it stayed float
    calibration_seconds: float = 0.0

    @property
    def mean_rel_error(self) -> float:
        return sum(l.rel_error for l in self.layers) / max(1, len(self.layers))

    @property
    def summed_frobenius_error(self) -> float:
        """The paper's metric: sum over layers of ||W - W_hat||_F."""
        return sum(l.frobenius_error for l in self.layers)

    @property
    def bits_per_weight(self) -> float:
        n = sum(l.shape[0] * l.shape[1] for l in self.layers)
        return sum(l.bits_per_weight * l.shape[0] * l.shape[1] for l in self.layers) / max(1, n)

    @property
    def seconds(self) -> float:
        return self.calibration_seconds + sum(l.seconds for l in self.layers)

    def to_dict(self) -> dict:
        return {
            "method": self.method, "config": self.config, "activation_aware": self.activation_aware,
            "device": self.device, "mean_rel_error": self.mean_rel_error,
            "summed_frobenius_error": self.summed_frobenius_error, "bits_per_weight": self.bits_per_weight,
            "seconds": self.seconds, "calibration_seconds": self.calibration_seconds,
            "skipped": self.skipped,
            "layers": [dict(l.__dict__, shape=list(l.shape)) for l in self.layers],
        }


# --- layer selection ----------------------------------------------------------------------------

def _skipped(name: str, skip) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(name == s or last == s or fnmatch.fnmatchcase(name, s) for s in skip)


def eligible_linears(model: nn.Module, skip=DEFAULT_SKIP, bits: int = 4, block: int | None = None):
    """([(name, nn.Linear)] to quantize, {name: reason} for the nn.Linear layers left in float).
    Embeddings are never nn.Linear, so they always stay as they are."""
    todo, left = [], {}
    group = pack_group(bits)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, LordsLinear):
            continue
        K = mod.in_features
        if _skipped(name, skip):
            left[name] = "skip list"
        elif K % group:
            left[name] = f"in_features={K} is not a multiple of {group} ({bits}-bit packing)"
        elif block is not None and K % block:
            left[name] = f"in_features={K} is not a multiple of block={block}"
        else:
            todo.append((name, mod))
    return todo, left


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --- the block-wise baseline as a LordsLinear ----------------------------------------------------

def blockwise_as_lords(W: torch.Tensor, cfg: LordsConfig, search: bool) -> tuple[LordsQuantized, float]:
    """Block-wise NF/INT quantization of W written exactly as codebook[Q] * (B @ A): B = the
    [N, K/block] block scales, A = the [K/block, K] 0/1 block indicator. Returns it and the
    block-wise storage cost in bits per weight (bits + 16/block, the indicator costs nothing)."""
    bw = blockwise_quantize(W, bits=cfg.bits, codebook=cfg.codebook, block=cfg.block, search=search,
                            grid=cfg.search_grid)
    N, K = W.shape
    nb = K // cfg.block
    if nb > N:
        raise ValueError(f"block: the block-wise layout of a {N}x{K} weight needs rank K/block={nb} <= N; "
                         f"use a block of at least {math.ceil(K / N)}")
    B = bw.scales.float().contiguous()
    A = torch.zeros(nb, K, device=B.device, dtype=B.dtype)
    A[torch.arange(K, device=B.device) // cfg.block, torch.arange(K, device=B.device)] = 1.0
    qw = LordsQuantized(bw.qweight, B, A, bw.codebook, cfg.bits, cfg.codebook_name, rel_error=bw.rel_error,
                        stats={"rank": nb, "steps_run": 0})
    return qw, bw.bits_per_weight


# --- quantize -----------------------------------------------------------------------------------

def quantize_model(model: nn.Module, cfg: LordsConfig | None = None, *, method: str = "lords",
                   skip=DEFAULT_SKIP, hessians: dict | None = None, calibration: torch.Tensor | None = None,
                   calibration_seq_len: int = 512, device=None, progress: bool = True,
                   source: str | None = None) -> nn.Module:
    """Replace every eligible nn.Linear of `model` with a LordsLinear, in place, one layer at a time.

    cfg: LordsConfig (bits, codebook, block, rank, init, steps, lr, ...); method: "lords", "nf"
    (block-wise absmax) or "nf-search" (block-wise, clipping-searched scales).
    skip: names, last name components or fnmatch patterns of layers to keep in float.
    hessians: {layer name: H [K, K]} for activation-aware LoRDS; or calibration: token ids
    ([n, seq_len] windows, or a 1-D stream cut into `calibration_seq_len` windows) from which
    they are collected first (see calibration.collect_hessians).
    device: where each weight is quantized (the GPU when there is one); layers go back to the
    device of the weight they replace.
    Returns the model; `model.lords_report` holds the QuantizeReport (per-layer error and time).
    """
    cfg = cfg or LordsConfig()
    if not isinstance(cfg, LordsConfig):
        raise ValueError(f"cfg: expected a lords_ext.LordsConfig, got {type(cfg).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if isinstance(skip, str):
        skip = (skip,)
    if method != "lords" and (hessians is not None or calibration is not None):
        raise ValueError(f"hessians/calibration: only method='lords' uses them, got method={method!r}")
    dev = torch.device(device) if device is not None else _default_device()
    todo, left = eligible_linears(model, skip, cfg.bits, cfg.block if (method != "lords" or cfg.init == "block") else None)
    if not todo:
        raise ValueError(f"model: no nn.Linear layer to quantize (skip={tuple(skip)}; left in float: {left})")

    report = QuantizeReport(method, cfg.to_dict(), hessians is not None or calibration is not None, str(dev),
                            skipped=left)
    if calibration is not None:
        from .calibration import calibration_windows, collect_hessians
        windows = calibration if calibration.dim() == 2 else calibration_windows(calibration, calibration_seq_len)
        t0 = time.perf_counter()
        hessians = collect_hessians(model, windows, [n for n, _ in todo], progress=progress)
        report.calibration_seconds = time.perf_counter() - t0
    if hessians is not None:
        hessians = dict(hessians)  # popped layer by layer below; the caller's dict stays whole
        missing = [n for n, _ in todo if n not in hessians]
        if missing:
            raise ValueError(f"hessians: expected an entry for every layer to quantize, missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")

    from tqdm.auto import tqdm
    bar = tqdm(todo, desc=f"{method} {cfg.bits}-bit", unit="layer", disable=not progress)
    for name, mod in bar:
        home = mod.weight.device
        W = mod.weight.detach().to(dev, torch.float32)
        H = hessians[name].to(dev) if hessians is not None else None
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        if method == "lords":
            qw = quantize_weight(W, cfg, hessian=H)
            bpw = qw.bits_per_weight
        else:
            qw, bpw = blockwise_as_lords(W, cfg, search=method == "nf-search")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        bias = None if mod.bias is None else mod.bias.detach().to(dev)
        new = LordsLinear.from_quantized(qw, bias).to(home)
        new.requires_grad_(False)
        _set_submodule(model, name, new)
        err = qw.rel_error
        stats = qw.stats or {}
        report.layers.append(LayerReport(
            name, (mod.out_features, mod.in_features), err, err * float(torch.linalg.norm(W.double())), bpw,
            seconds, qw.rank, int(stats.get("steps_run", 0)), float(stats.get("init_loss", float("nan"))),
            float(stats.get("final_loss", float("nan")))))
        bar.set_postfix_str(f"{name} {mod.out_features}x{mod.in_features} err={err:.4f} {seconds:.2f}s")
        del W, H, mod
        if hessians is not None:
            # Drop our reference as soon as the layer is done: an H shared by several layers
            # (one input feeding q/k/v) is freed after the last of them.
            hessians.pop(name)
    model.lords_report = report
    model._lords_meta = {
        "method": method, "config": cfg.to_dict(), "activation_aware": report.activation_aware,
        "source_model": source or getattr(getattr(model, "config", None), "_name_or_path", None) or "",
    }
    return model


# --- save ---------------------------------------------------------------------------------------

def _quantized_layers(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LordsLinear):
            out[name] = {
                "in_features": mod.in_features, "out_features": mod.out_features, "bits": mod.bits,
                "rank": mod.rank, "codebook": mod.codebook_name, "bias": mod.bias is not None,
                "dtype": str(mod.B.dtype).replace("torch.", ""),
            }
    return out


def save_quantized(model: nn.Module, directory, tokenizer=None, *, source: str | None = None) -> Path:
    """Write `model` (with LordsLinear layers) to `directory`: model.safetensors, lords_quant.json,
    the Hugging Face config (and `tokenizer` when given). Returns the directory."""
    from safetensors.torch import save_file
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("model: expected at least one LordsLinear layer (run quantize_model first)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    # Tied parameters (e.g. lm_head = embed_tokens) share storage, which safetensors refuses: store
    # each storage once and record the other names.
    tensors, tied, seen = {}, {}, {}
    for key, t in model.state_dict(keep_vars=False).items():
        if t.is_meta:
            raise ValueError(f"model: tensor {key} has no data (meta device); cannot save it")
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, str(t.device))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous()
    path = d / TENSORS_FILE
    save_file(tensors, str(path), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})

    from . import __version__
    meta_src = dict(getattr(model, "_lords_meta", {}) or {})
    meta = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "lords_ext_version": __version__,
        "method": meta_src.get("method", "lords"),
        "config": meta_src.get("config"),
        "codebooks": sorted({info["codebook"] for info in layers.values()}),
        "activation_aware": meta_src.get("activation_aware", False),
        "source_model": source if source is not None else meta_src.get("source_model", ""),
        "tensors_file": TENSORS_FILE,
        "tensors_bytes": path.stat().st_size,
        "tied": tied,
        "layers": layers,
    }
    report = getattr(model, "lords_report", None)
    if isinstance(report, QuantizeReport):
        meta["quantize_summary"] = {k: v for k, v in report.to_dict().items() if k != "layers"}
    (d / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(str(d))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(d))
            except Exception:  # generation defaults are a convenience, never worth a failed save
                pass
    if tokenizer is not None:
        tokenizer.save_pretrained(str(d))
    return d


# --- load ---------------------------------------------------------------------------------------

def read_metadata(directory) -> dict:
    """lords_quant.json of a saved directory, checked for format name and version."""
    p, meta = read_record(directory, METADATA_FILE, FORMAT_NAME, FORMAT_VERSION, QuantizedFormatError,
                          "lords_ext.save_quantized")
    for key in ("layers", "tensors_file", "tensors_bytes"):
        if key not in meta:
            raise QuantizedFormatError(f"{p}: expected a {key!r} entry, missing")
    return meta


def is_quantized_dir(directory) -> bool:
    return (Path(directory) / METADATA_FILE).is_file()


def _read_tensors(path: Path, expected_bytes: int) -> dict[str, torch.Tensor]:
    return read_tensors(path, FORMAT_VERSION, QuantizedFormatError, expected_bytes=expected_bytes)


def _empty_model_from_config(d: Path, dtype=None):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    if not (d / "config.json").is_file():
        raise QuantizedFormatError(f"{d}: config.json missing (the Hugging Face config saved beside the tensors)")
    config = AutoConfig.from_pretrained(str(d), local_files_only=True)
    kw = {"dtype": dtype} if dtype is not None else {}
    # Parameters on the meta device (no memory, no init); buffers such as rotary tables stay real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, **kw)
    return model


def load_quantized(directory, device=None, *, progress: bool = False) -> nn.Module:
    """Rebuild a model written by `save_quantized` from its config and tensors alone."""
    d = Path(directory)
    meta = read_metadata(d)
    tensors = _read_tensors(d / meta["tensors_file"], int(meta["tensors_bytes"]))
    model = _empty_model_from_config(d)

    for name, info in meta["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QuantizedFormatError(f"{d}: layer {name} of {METADATA_FILE} does not exist in the model built "
                                       "from config.json") from None
        K, N = int(info["in_features"]), int(info["out_features"])
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (K, N):
            got = (f"{old.out_features}x{old.in_features} nn.Linear" if isinstance(old, nn.Linear)
                   else type(old).__name__)
            raise QuantizedFormatError(f"{d}: layer {name}: {METADATA_FILE} says {N}x{K}, the model built from "
                                       f"config.json has {got}")
        cb = info["codebook"] if info["codebook"] in CODEBOOK_NAMES else tensors.get(f"{name}.codebook")
        if cb is None:
            raise QuantizedFormatError(f"{d}: tensor {name}.codebook missing (custom codebook of layer {name})")
        try:
            get_codebook(cb, int(info["bits"]))
        except ValueError as e:
            raise QuantizedFormatError(f"{d}: layer {name}: bad codebook ({e})") from e
        new = LordsLinear(K, N, bits=int(info["bits"]), rank=int(info["rank"]), codebook=cb,
                          bias=bool(info["bias"]), device="meta", dtype=getattr(torch, info.get("dtype", "float32")))
        new.requires_grad_(False)
        _set_submodule(model, name, new)

    expected = model.state_dict()
    tied = dict(meta.get("tied", {}))
    missing = [k for k in expected if k not in tensors and k not in tied]
    if missing:
        raise QuantizedFormatError(f"{d / meta['tensors_file']}: missing tensor(s) {missing[:5]}"
                                   f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise QuantizedFormatError(f"{d / meta['tensors_file']}: tensor(s) {unexpected[:5]} do not belong to the "
                                   "model built from config.json")
    for k, t in tensors.items():
        want = expected[k]
        if tuple(want.shape) != tuple(t.shape):
            raise QuantizedFormatError(f"{d / meta['tensors_file']}: tensor {k}: expected shape {tuple(want.shape)}, "
                                       f"got {tuple(t.shape)}")
        if k.endswith(".qweight") and t.dtype != torch.uint8:
            raise QuantizedFormatError(f"{d / meta['tensors_file']}: tensor {k}: expected dtype torch.uint8, got {t.dtype}")
    for alias, target in tied.items():
        if alias not in expected or target not in tensors:
            raise QuantizedFormatError(f"{d / METADATA_FILE}: tied: {alias} -> {target} names a tensor the model "
                                       "or the file does not have")
    model.load_state_dict(tensors, strict=False, assign=True)
    # The tied name must become the same Parameter object as its target, not a copy.
    for alias, target in tied.items():
        parent_name, _, leaf = alias.rpartition(".")
        t_parent, _, t_leaf = target.rpartition(".")
        src = getattr(model.get_submodule(t_parent) if t_parent else model, t_leaf)
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(src, nn.Parameter):
            setattr(parent, leaf, src)
        else:
            parent._buffers[leaf] = src
    left = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise QuantizedFormatError(f"{d}: tensors {left[:5]} were not filled from the file")
    model.eval()
    model._lords_meta = {k: meta.get(k) for k in ("method", "config", "activation_aware", "source_model")}
    if device is not None:
        model.to(device)
    return model


def directory_bytes(directory) -> int:
    """Total size of the files in a saved directory (what `du` would call its size on disk)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
