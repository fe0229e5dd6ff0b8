"""The reference backend: plain torch on any device, the ground truth every other backend is checked
against. It materializes W (it is not meant to be fast) and computes in float32, or in float64 when
any floating input is float64 (so gradcheck can run through it)."""
from __future__ import annotations

import math

import torch

from ..formats import unpack


def available() -> bool:
    return True


def supports(op: str, t: torch.Tensor, M: int) -> bool:
    return True


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def codes_of(qweight: torch.Tensor, codebook: torch.Tensor, K: int) -> torch.Tensor:
    return unpack(qweight, int(math.log2(codebook.numel())), K).long()


def weight(qweight, B, A, codebook, dtype: torch.dtype) -> torch.Tensor:
    """W = codebook[Q] * (B @ A) in `dtype`."""
    codes = codes_of(qweight, codebook, A.shape[1])
    return codebook.to(dtype)[codes] * (B.to(dtype) @ A.to(dtype))


def dequant(qweight, B, A, codebook):
    return weight(qweight, B, A, codebook, compute_dtype(B, A)).to(B.dtype)


def dequant_matmul(x2d, qweight, B, A, codebook, bias):
    dt = compute_dtype(x2d, B, A)
    y = x2d.to(dt) @ weight(qweight, B, A, codebook, dt).T
    if bias is not None:
        y = y + bias.to(dt)
    return y.to(x2d.dtype)


def grad_x(grad_y2d, qweight, B, A, codebook):
    dt = compute_dtype(grad_y2d, B, A)
    return (grad_y2d.to(dt) @ weight(qweight, B, A, codebook, dt)).to(grad_y2d.dtype)


def grad_scales(grad_y2d, x2d, qweight, B, A, codebook):
    dt = compute_dtype(grad_y2d, x2d, B, A)
    codes = codes_of(qweight, codebook, A.shape[1])
    dS = (grad_y2d.to(dt).T @ x2d.to(dt)) * codebook.to(dt)[codes]
    return (dS @ A.to(dt).T).to(B.dtype), (B.to(dt).T @ dS).to(A.dtype)
