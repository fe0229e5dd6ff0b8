"""Backend registry for the `lords` ops.

A backend is a module (reference, triton, cuda) registered here under a name. The public ops in
`lords_ext._ops` validate every input once, flatten `x` to 2-D, pick a backend with
`dispatch.choose` and call one of its functions. Backends therefore receive only valid, contiguous
inputs and never re-check them; they must not launch anything on inputs they do not support, and
say so through `supports` instead.

Every backend module provides:
    available() -> bool
        Can it run at all on this machine (CUDA present, extension built, triton importable...).
    supports(op: str, x_or_qweight: Tensor, M: int) -> bool
        Can it run this op on this device/dtype/shape (op in {"dequant", "dequant_matmul", "grad_x"}).
    dequant(qweight, B, A, codebook) -> Tensor [N, K] in B.dtype
    dequant_matmul(x2d, qweight, B, A, codebook, bias) -> Tensor [M, N] in x2d.dtype
        x2d: [M, K] contiguous; bias: [N] or None. y = x2d @ W.T + bias, accumulated in fp32.
    grad_x(grad_y2d, qweight, B, A, codebook) -> Tensor [M, K] in grad_y2d.dtype
        grad_y2d @ W, the backward of dequant_matmul with respect to x.
    grad_scales(grad_y2d, x2d, qweight, B, A, codebook) -> (grad_B [N, r], grad_A [r, K])  (optional)
        dS = (grad_y2d.T @ x2d) * codebook[Q];  grad_B = dS @ A.T;  grad_A = B.T @ dS.
Shapes: qweight uint8 [N, K*bits/8] (canonical packing, see formats.py), B [N, r], A [r, K],
codebook [2**bits] float; bits = log2(codebook.numel()), K = A.shape[1].
"""
from __future__ import annotations

import importlib
from types import ModuleType

# name -> module path; loaded lazily so importing lords_ext never pulls in triton or the extension.
_BACKEND_MODULES = {
    "reference": "lords_ext.backends.reference",
    "triton": "lords_ext.backends.triton_backend",
    "cuda": "lords_ext.backends.cuda",
}
_loaded: dict[str, ModuleType | None] = {}
_OPS = ("dequant", "dequant_matmul", "grad_x", "grad_scales")


def names() -> tuple[str, ...]:
    return tuple(_BACKEND_MODULES)


def get(name: str) -> ModuleType | None:
    """The backend module, or None where it cannot be imported on this machine."""
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend: expected one of {sorted(_BACKEND_MODULES)}, got {name!r}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def available(name: str) -> bool:
    mod = get(name)
    return mod is not None and bool(mod.available())


def implements(name: str, op: str) -> bool:
    if op not in _OPS:
        raise ValueError(f"op: expected one of {_OPS}, got {op!r}")
    mod = get(name)
    return mod is not None and hasattr(mod, op)
