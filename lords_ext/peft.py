"""Multiplicative PEFT on a LoRDS-quantized model: train only the scale factors B, A.

The codes Q (and the codebook) stay frozen; every LordsLinear trains its B [N, r] and A [r, K], so the
fine-tuned layer is still `codebook[Q] * (B' @ A')`: the trained model is already the deployable
quantized model (no adapter branch, no merge step). Everything else in the model is frozen.

An adapter on disk (`save_adapter`) holds only the B, A tensors (safetensors) plus a JSON record
that pins the base it belongs to: per layer the shape, rank, bits, a fingerprint of the codebook
levels and one of the packed codes. `load_adapter` refuses a base that differs in any of these,
naming the layer and what differed, because B, A trained against other codes or levels would load
without complaint and silently compute a different (wrong) model.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ._records import read_record, read_tensors
from .nn import LordsLinear

ADAPTER_FORMAT = "lords-adapter"
ADAPTER_VERSION = 1
ADAPTER_TENSORS = "lords_adapter.safetensors"
ADAPTER_META = "lords_adapter.json"

# What PEFT may train, and what it refuses to (the frozen quantized parts of a LordsLinear).
TRAINABLE = ("B", "A", "bias")
_FROZEN = {"codes": "the packed codes Q", "qweight": "the packed codes Q", "codebook": "the codebook levels"}


class AdapterError(ValueError):
    """An adapter cannot be saved or applied: wrong format or version, or a base it was not trained on."""


def lords_layers(model: nn.Module) -> dict[str, LordsLinear]:
    """{qualified name: LordsLinear} of `model` (the model itself under the name '' if it is one)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LordsLinear)}


def _require_lords(model: nn.Module, what: str) -> dict[str, LordsLinear]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    layers = lords_layers(model)
    if not layers:
        raise ValueError(f"model: {what} needs LordsLinear layers, found none in this "
                         f"{type(model).__name__} (quantize it first: lords_ext.quantize_model or load_quantized)")
    return layers


def prepare_for_peft(model: nn.Module, train=("B", "A"), *, scales_dtype: torch.dtype | None = None) -> int:
    """Freeze every parameter of `model`, then make B and A of every LordsLinear trainable.

    train: which LordsLinear parameters train, a subset of ("B", "A", "bias"); asking for the codes
      ("codes", "qweight") or the "codebook" raises: they are frozen integers / levels, and training
      the weights themselves is QAT (lords_ext.qat).
    scales_dtype: cast the trainable B, A to this dtype (e.g. torch.float32 on a bf16 model, the
      usual mixed-precision choice for trained parameters); None keeps their dtype.
    Returns the number of trainable parameters (elements)."""
    if isinstance(train, str):
        train = (train,)
    train = tuple(train)
    for t in train:
        if t in _FROZEN:
            raise ValueError(f"train: {t!r} cannot be trained: {_FROZEN[t]} of a LordsLinear are frozen in "
                             f"LoRDS PEFT (only {TRAINABLE} can train); to train the weights use QAT, "
                             "lords_ext.qat.LordsQATLinear")
        if t not in TRAINABLE:
            raise ValueError(f"train: expected names from {TRAINABLE}, got {t!r}")
    if not train:
        raise ValueError(f"train: expected at least one of {TRAINABLE}, got an empty selection")
    if scales_dtype is not None and not (isinstance(scales_dtype, torch.dtype) and scales_dtype.is_floating_point):
        raise ValueError(f"scales_dtype: expected a floating torch.dtype or None, got {scales_dtype!r}")
    layers = _require_lords(model, "prepare_for_peft")
    model.requires_grad_(False)
    for layer in layers.values():
        layer.codebook.requires_grad_(False)
        if scales_dtype is not None:
            for p in (layer.B, layer.A):
                p.data = p.data.to(scales_dtype)
        layer.train_scales(False)
        if "B" in train:
            layer.B.requires_grad_(True)
        if "A" in train:
            layer.A.requires_grad_(True)
        if "bias" in train and layer.bias is not None:
            layer.bias.requires_grad_(True)
    return count_trainable(model)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable elements, each shared (tied) parameter counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_codes_frozen(model: nn.Module) -> None:
    """Raise if anything made a LordsLinear's codes or codebook trainable (e.g. a codebook turned
    into a Parameter): the op's autograd gives them no gradient, so training would silently not happen."""
    for name, layer in lords_layers(model).items():
        for buf in ("qweight", "codebook"):
            t = getattr(layer, buf)
            if t.requires_grad:
                raise ValueError(f"{name}.{buf}: expected frozen ({_FROZEN[buf]} never train in LoRDS PEFT), "
                                 "found requires_grad=True")


# --- fingerprints -------------------------------------------------------------------------------

def _digest(t: torch.Tensor) -> str:
    b = t.detach().to("cpu").contiguous()
    return hashlib.sha256(b.view(torch.uint8).numpy().tobytes() if b.numel() else b"").hexdigest()[:16]


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """Hash of the levels as float32 (so a codebook stored in another float width still matches)."""
    return _digest(codebook.detach().float())


def codes_fingerprint(qweight: torch.Tensor) -> str:
    return _digest(qweight)


def _layer_record(layer: LordsLinear) -> dict:
    return {
        "out_features": layer.out_features, "in_features": layer.in_features, "rank": layer.rank,
        "bits": layer.bits, "codebook": layer.codebook_name,
        "codebook_fingerprint": codebook_fingerprint(layer.codebook),
        "codes_fingerprint": codes_fingerprint(layer.qweight),
        "B_dtype": str(layer.B.dtype).replace("torch.", ""), "A_dtype": str(layer.A.dtype).replace("torch.", ""),
    }


# --- save / load --------------------------------------------------------------------------------

def save_adapter(model: nn.Module, directory, *, base: str | None = None) -> Path:
    """Write the B, A of every LordsLinear of `model` to `directory` (lords_adapter.safetensors and
    lords_adapter.json). `base`: free text naming the quantized base (e.g. its directory). Returns the directory."""
    from safetensors.torch import save_file
    layers = _require_lords(model, "save_adapter")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, records = {}, {}
    for name, layer in layers.items():
        tensors[f"{name}.B"] = layer.B.detach().to("cpu").contiguous()
        tensors[f"{name}.A"] = layer.A.detach().to("cpu").contiguous()
        records[name] = _layer_record(layer)
    save_file(tensors, str(d / ADAPTER_TENSORS),
              metadata={"format": ADAPTER_FORMAT, "format_version": str(ADAPTER_VERSION)})
    from . import __version__
    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION, "lords_ext_version": __version__,
            "base": base or "", "trainable_parameters": sum(t.numel() for t in tensors.values()),
            "layers": records}
    (d / ADAPTER_META).write_text(json.dumps(meta, indent=1))
    return d


def read_adapter_metadata(directory) -> dict:
    p, meta = read_record(directory, ADAPTER_META, ADAPTER_FORMAT, ADAPTER_VERSION, AdapterError,
                          "lords_ext.save_adapter")
    if not isinstance(meta.get("layers"), dict) or not meta["layers"]:
        raise AdapterError(f"{p}: layers: expected a non-empty mapping of layer records, got {meta.get('layers')!r}")
    return meta


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_tensors(path, ADAPTER_VERSION, AdapterError, what="adapter tensors")


def load_adapter(model: nn.Module, directory, *, check_codes: bool = True) -> nn.Module:
    """Put the B, A saved by `save_adapter` into the LordsLinear layers of `model`, in place.

    The base must be the one the adapter was trained on: the same LordsLinear layer names, and per
    layer the same shape, rank, bits and codebook levels, and (check_codes=True) the same packed
    codes. Any difference raises AdapterError naming the layer and the field. The tensors keep the
    dtype they were saved in (a round trip is bit-identical); trainability flags are kept."""
    layers = _require_lords(model, "load_adapter")
    d = Path(directory)
    meta = read_adapter_metadata(d)
    saved = meta["layers"]
    missing = sorted(set(saved) - set(layers))
    if missing:
        raise AdapterError(f"{d}: the adapter has layers the model lacks as LordsLinear: {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    extra = sorted(set(layers) - set(saved))
    if extra:
        raise AdapterError(f"{d}: the model has LordsLinear layers the adapter lacks: {extra[:5]}"
                           f"{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)")
    fields = ["out_features", "in_features", "rank", "bits", "codebook_fingerprint"]
    if check_codes:
        fields.append("codes_fingerprint")
    for name, layer in layers.items():
        mine, theirs = _layer_record(layer), saved[name]
        for f in fields:
            if theirs.get(f) != mine[f]:
                hint = {"codebook_fingerprint": f" (codebook levels differ: adapter {theirs.get('codebook')}, "
                                                f"model {mine['codebook']})",
                        "codes_fingerprint": " (the packed codes differ: another quantization of the weights; "
                                             "pass check_codes=False only if that is intended)"}.get(f, "")
                raise AdapterError(f"{d}: layer {name}: {f}: adapter has {theirs.get(f)!r}, model has "
                                   f"{mine[f]!r}{hint}")
    tensors = _read_tensors(d / ADAPTER_TENSORS)
    for name, layer in layers.items():
        for p in ("B", "A"):
            key = f"{name}.{p}"
            if key not in tensors:
                raise AdapterError(f"{d / ADAPTER_TENSORS}: tensor {key} missing")
            want = tuple(getattr(layer, p).shape)
            if tuple(tensors[key].shape) != want:
                raise AdapterError(f"{d / ADAPTER_TENSORS}: tensor {key}: expected shape {want}, got "
                                   f"{tuple(tensors[key].shape)}")
            if not tensors[key].dtype.is_floating_point:
                raise AdapterError(f"{d / ADAPTER_TENSORS}: tensor {key}: expected a float dtype, got {tensors[key].dtype}")
    unexpected = sorted(set(tensors) - {f"{n}.{p}" for n in layers for p in ("B", "A")})
    if unexpected:
        raise AdapterError(f"{d / ADAPTER_TENSORS}: unexpected tensor(s) {unexpected[:5]}")
    with torch.no_grad():
        for name, layer in layers.items():
            for p in ("B", "A"):
                param = getattr(layer, p)
                param.data = tensors[f"{name}.{p}"].to(param.device)
    return model
