"""Codebooks (NF2/3/4, INT2/3/4, custom) and the canonical 2/3/4-bit packing.

Canonical packing (DESIGN.md), little-endian along K, row by row:
  4 bits: byte j holds code 2j in its low nibble and 2j+1 in its high nibble.
  2 bits: byte j holds codes 4j..4j+3, code 4j in the lowest two bits.
  3 bits: each run of 8 codes is one 24-bit little-endian integer in 3 bytes, code 8g+i in bits 3i..3i+2.
"""
from __future__ import annotations

import math

import torch

BITS = (2, 3, 4)
# Codes per packing group and bytes per group: K must be a multiple of the group.
_GROUP = {2: (4, 1), 3: (8, 3), 4: (2, 1)}


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
        raise ValueError(f"{name}: expected one of {BITS}, got {bits!r}")
    return bits


def pack_group(bits: int) -> int:
    """K must be a multiple of this for the packing of `bits`."""
    return _GROUP[check_bits(bits)][0]


def packed_cols(K: int, bits: int) -> int:
    codes, nbytes = _GROUP[check_bits(bits)]
    return K // codes * nbytes


def check_packable_K(K: int, bits: int, name: str = "K") -> None:
    group = pack_group(bits)
    if K <= 0 or K % group:
        raise ValueError(f"{name}: expected a positive multiple of {group} for {bits}-bit packing, got {K}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] integer codes in [0, 2**bits) -> uint8 [N, K*bits/8] in the canonical layout."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"codes: expected a 2-D [N, K] tensor, got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes: expected an integer dtype, got {codes.dtype}")
    N, K = codes.shape
    check_packable_K(K, bits, "codes.shape[1] (K)")
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes: expected values in [0, {1 << bits}), got range [{int(c.min())}, {int(c.max())}]")
    per, nbytes = _GROUP[bits]
    shifts = torch.arange(per, device=c.device, dtype=torch.int32) * bits
    word = (c.view(N, K // per, per) << shifts).sum(-1, dtype=torch.int32)
    if nbytes == 1:
        return word.to(torch.uint8)
    byte_shifts = torch.arange(nbytes, device=c.device, dtype=torch.int32) * 8
    return ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(N, K // per * nbytes)


def unpack(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """uint8 [N, K*bits/8] canonical -> uint8 [N, K] codes."""
    check_bits(bits)
    check_packable_K(K, bits)
    if qweight.dtype != torch.uint8:
        raise ValueError(f"qweight: expected dtype torch.uint8, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[1] != packed_cols(K, bits):
        raise ValueError(
            f"qweight: expected shape [N, {packed_cols(K, bits)}] for K={K} at {bits} bits, got {tuple(qweight.shape)}"
        )
    N = qweight.shape[0]
    per, nbytes = _GROUP[bits]
    q = qweight.to(torch.int32).view(N, K // per, nbytes)
    if nbytes == 1:
        word = q[..., 0]
    else:
        word = (q << (torch.arange(nbytes, device=q.device, dtype=torch.int32) * 8)).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    return ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(N, K)


# --- codebooks ---------------------------------------------------------------------------------

def normal_float(bits: int, offset: float = 0.9677083) -> torch.Tensor:
    """The QLoRA/bitsandbytes NormalFloat map for `bits`: quantiles of N(0, 1), asymmetric
    (2**(bits-1) positive levels, one fewer negative, an exact zero), scaled to max level 1.0.
    For 4 bits this reproduces bitsandbytes' NF4 table."""
    check_bits(bits)
    half = 1 << (bits - 1)
    nd = torch.special.ndtri
    pos = nd(torch.linspace(offset, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -nd(torch.linspace(offset, 0.5, half, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.abs().max()).to(torch.float32)


def symmetric_int(bits: int) -> torch.Tensor:
    """Symmetric uniform grid of 2**bits levels on [-1, 1]: (2i - (2**bits - 1)) / (2**bits - 1).
    Symmetric about zero (so no level is wasted and the block absmax maps to +-1), with no exact zero:
    INT4 = {-15, -13, ..., 13, 15} / 15, INT2 = {-1, -1/3, 1/3, 1}."""
    check_bits(bits)
    n = (1 << bits) - 1
    return (torch.arange(n + 1, dtype=torch.float64) * 2 - n).div(n).to(torch.float32)


_NAMED = {f"nf{b}": (normal_float, b) for b in BITS} | {f"int{b}": (symmetric_int, b) for b in BITS}
CODEBOOK_NAMES = tuple(_NAMED)


def check_codebook(codebook: torch.Tensor, name: str = "codebook") -> int:
    """Validate a codebook tensor; return its bit width."""
    if not isinstance(codebook, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(codebook).__name__}")
    if not codebook.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating dtype, got {codebook.dtype}")
    if codebook.dim() != 1 or codebook.numel() not in (4, 8, 16):
        raise ValueError(f"{name}: expected a 1-D tensor of 4, 8 or 16 levels, got shape {tuple(codebook.shape)}")
    if not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"{name}: expected finite levels, got {codebook.tolist()}")
    if not bool((codebook[1:] > codebook[:-1]).all()):
        raise ValueError(f"{name}: expected strictly increasing (sorted) levels, got {codebook.tolist()}")
    return int(math.log2(codebook.numel()))


def get_codebook(codebook: str | torch.Tensor | None, bits: int | None = None) -> tuple[torch.Tensor, str]:
    """Resolve a codebook name or tensor to (float32 levels, name). `None` means nf{bits}.
    A custom tensor is returned as given (in float32) and named 'custom'."""
    if bits is not None:
        check_bits(bits)
    if codebook is None:
        if bits is None:
            raise ValueError("codebook: expected a name or tensor when bits is not given, got None")
        codebook = f"nf{bits}"
    if isinstance(codebook, str):
        key = codebook.lower()
        if key not in _NAMED:
            raise ValueError(f"codebook: expected one of {CODEBOOK_NAMES} or a tensor, got {codebook!r}")
        fn, b = _NAMED[key]
        if bits is not None and b != bits:
            raise ValueError(f"codebook: {codebook!r} has {b} bits but bits={bits}")
        return fn(b), key
    b = check_codebook(codebook)
    if bits is not None and b != bits:
        raise ValueError(f"codebook: expected {1 << bits} levels for bits={bits}, got {codebook.numel()}")
    return codebook.detach().to(torch.float32), "custom"


def nearest_level(v: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook level for every element of `v` (uint8, same shape).
    Uses the midpoints between sorted levels, so it costs one searchsorted, not 2**bits compares."""
    cb = codebook.to(device=v.device, dtype=v.dtype)
    mids = (cb[1:] + cb[:-1]) * 0.5
    return torch.bucketize(v, mids).to(torch.uint8)
