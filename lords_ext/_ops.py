"""The `lords` op schemas, their fake (meta) implementations, autograd and the dispatch entry.

Schema first (as bitsandbytes' _ops.py): the public ops are defined here in Python; the CUDA
extension registers only backend ops (`lords::*_cuda`) beside them, so the public contract does not
depend on whether the extension was built. Every input is validated once here, on shapes and dtypes
only (no device sync, so the ops stay capturable in CUDA graphs and traceable by torch.compile), and
the chosen backend receives contiguous, valid tensors.
"""
from __future__ import annotations

import math

import torch

from . import backends
from .backends import dispatch
from .formats import pack_group, packed_cols

_lib = torch.library.Library("lords", "FRAGMENT")
_lib.define("dequant(Tensor qweight, Tensor B, Tensor A, Tensor codebook) -> Tensor")
_lib.define(
    "dequant_matmul(Tensor x, Tensor qweight, Tensor B, Tensor A, Tensor codebook, Tensor? bias=None) -> Tensor"
)
# Backward helpers, ops of their own so that they dispatch to fused kernels and trace cleanly.
_lib.define("dequant_matmul_grad_x(Tensor grad_y, Tensor qweight, Tensor B, Tensor A, Tensor codebook) -> Tensor")
_lib.define(
    "dequant_matmul_grad_scales(Tensor grad_y, Tensor x, Tensor qweight, Tensor B, Tensor A, Tensor codebook)"
    " -> (Tensor, Tensor)"
)

_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(t: torch.Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point dtype, got {t.dtype}")


def check_weight(qweight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, codebook: torch.Tensor) -> int:
    """Validate the quantized weight triple; return bits."""
    if qweight.dtype != torch.uint8:
        raise ValueError(f"qweight: expected dtype torch.uint8, got {qweight.dtype}")
    if codebook.dim() != 1 or codebook.numel() not in (4, 8, 16):
        raise ValueError(f"codebook: expected a 1-D tensor of 4, 8 or 16 levels, got shape {tuple(codebook.shape)}")
    _check_float(codebook, "codebook")
    _check_float(B, "B")
    _check_float(A, "A")
    bits = int(math.log2(codebook.numel()))
    if B.dim() != 2 or A.dim() != 2:
        raise ValueError(f"B, A: expected 2-D [N, r] and [r, K], got {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] != A.shape[0] or B.shape[1] < 1:
        raise ValueError(f"B, A: expected B [N, r] and A [r, K] with the same r >= 1, got {tuple(B.shape)} and {tuple(A.shape)}")
    N, K = B.shape[0], A.shape[1]
    if K % pack_group(bits):
        raise ValueError(f"A.shape[1] (K): expected a multiple of {pack_group(bits)} for {bits}-bit codes, got {K}")
    if qweight.dim() != 2 or tuple(qweight.shape) != (N, packed_cols(K, bits)):
        raise ValueError(
            f"qweight: expected shape {(N, packed_cols(K, bits))} for N={N}, K={K} at {bits} bits, got {tuple(qweight.shape)}"
        )
    for name, t in (("B", B), ("A", A), ("codebook", codebook)):
        if t.device != qweight.device:
            raise ValueError(f"{name}: expected device {qweight.device} (that of qweight), got {t.device}")
    return bits


def check_activation(x: torch.Tensor, name: str, last: int, what: str, qweight: torch.Tensor) -> None:
    if x.dtype not in _X_DTYPES:
        raise ValueError(f"{name}: expected dtype in {_X_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != last:
        raise ValueError(f"{name}: expected last dimension {what}={last}, got shape {tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"{name}: expected device {qweight.device} (that of qweight), got {x.device}")


def check_bias(bias: torch.Tensor | None, N: int, qweight: torch.Tensor) -> None:
    if bias is None:
        return
    _check_float(bias, "bias")
    if bias.dim() != 1 or bias.shape[0] != N:
        raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
    if bias.device != qweight.device:
        raise ValueError(f"bias: expected device {qweight.device} (that of qweight), got {bias.device}")


def _backend(op: str, t: torch.Tensor, M: int, rank: int, K: int, N: int | None = None, bits: int = 4):
    return backends.get(dispatch.choose(op, t, M, rank, K, N, bits))


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# --- dequant ------------------------------------------------------------------------------------

@torch.library.impl(_lib, "dequant", "CompositeExplicitAutograd")
def _dequant(qweight, B, A, codebook):
    check_weight(qweight, B, A, codebook)
    return _backend("dequant", qweight, B.shape[0], B.shape[1], A.shape[1]).dequant(_c(qweight), _c(B), _c(A), _c(codebook))


@torch.library.register_fake("lords::dequant")
def _dequant_fake(qweight, B, A, codebook):
    check_weight(qweight, B, A, codebook)
    return B.new_empty((B.shape[0], A.shape[1]))


def _dequant_setup(ctx, inputs, output):
    qweight, B, A, codebook = inputs
    ctx.save_for_backward(qweight, B, A, codebook)


def _dequant_backward(ctx, grad_w):
    qweight, B, A, codebook = ctx.saved_tensors
    from .backends.reference import codes_of

    dt = torch.promote_types(torch.promote_types(B.dtype, A.dtype), torch.float32)
    dS = grad_w.to(dt) * codebook.to(dt)[codes_of(qweight, codebook, A.shape[1])]
    grad_B = (dS @ A.to(dt).T).to(B.dtype) if ctx.needs_input_grad[1] else None
    grad_A = (B.to(dt).T @ dS).to(A.dtype) if ctx.needs_input_grad[2] else None
    return None, grad_B, grad_A, None


torch.library.register_autograd("lords::dequant", _dequant_backward, setup_context=_dequant_setup)


# --- dequant_matmul -----------------------------------------------------------------------------

@torch.library.impl(_lib, "dequant_matmul", "CompositeExplicitAutograd")
def _dequant_matmul(x, qweight, B, A, codebook, bias=None):
    bits = check_weight(qweight, B, A, codebook)
    N, K = B.shape[0], A.shape[1]
    check_activation(x, "x", K, "K (in_features)", qweight)
    check_bias(bias, N, qweight)
    flat = x.dim() == 2  # the usual case: no reshapes (~3 us of host time per call)
    x2d = x.contiguous() if flat else x.reshape(-1, K).contiguous()
    if x2d.shape[0] == 0:
        return x.new_empty((*x.shape[:-1], N))
    y = _backend("dequant_matmul", x2d, x2d.shape[0], B.shape[1], A.shape[1], B.shape[0], bits).dequant_matmul(
        x2d, _c(qweight), _c(B), _c(A), _c(codebook), _c(bias)
    )
    return y if flat else y.reshape(*x.shape[:-1], N)


@torch.library.register_fake("lords::dequant_matmul")
def _dequant_matmul_fake(x, qweight, B, A, codebook, bias=None):
    check_weight(qweight, B, A, codebook)
    check_activation(x, "x", A.shape[1], "K (in_features)", qweight)
    check_bias(bias, B.shape[0], qweight)
    return x.new_empty((*x.shape[:-1], B.shape[0]))


def _dequant_matmul_setup(ctx, inputs, output):
    x, qweight, B, A, codebook, bias = inputs
    ctx.save_for_backward(x, qweight, B, A, codebook)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dequant_matmul_backward(ctx, grad_y):
    return _matmul_grads(ctx, grad_y, torch.ops.lords.dequant_matmul_grad_x, torch.ops.lords.dequant_matmul_grad_scales)


def _matmul_grads(ctx, grad_y, grad_x_fn, grad_scales_fn):
    x, qweight, B, A, codebook = ctx.saved_tensors
    K, N = A.shape[1], B.shape[0]
    gy2d = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, N)
    grad_x = grad_B = grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_x_fn(gy2d, qweight, B, A, codebook)
        grad_x = grad_x if x.dim() == 2 else grad_x.reshape(x.shape)
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        grad_B, grad_A = grad_scales_fn(gy2d, x.reshape(-1, K), qweight, B, A, codebook)
        grad_B = grad_B if ctx.needs_input_grad[2] else None
        grad_A = grad_A if ctx.needs_input_grad[3] else None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[5]:
        grad_bias = gy2d.sum(0, dtype=torch.promote_types(gy2d.dtype, torch.float32)).to(ctx.bias_dtype)
    return grad_x, None, grad_B, grad_A, None, grad_bias


torch.library.register_autograd("lords::dequant_matmul", _dequant_matmul_backward, setup_context=_dequant_matmul_setup)


# --- backward helpers ---------------------------------------------------------------------------

@torch.library.impl(_lib, "dequant_matmul_grad_x", "CompositeExplicitAutograd")
def _grad_x(grad_y, qweight, B, A, codebook):
    check_weight(qweight, B, A, codebook)
    check_activation(grad_y, "grad_y", B.shape[0], "N (out_features)", qweight)
    return _grad_x_checked(grad_y, qweight, B, A, codebook)


def _grad_x_checked(grad_y, qweight, B, A, codebook):
    flat = grad_y.dim() == 2
    g = grad_y.contiguous() if flat else grad_y.reshape(-1, B.shape[0]).contiguous()
    out = _backend("grad_x", g, g.shape[0], B.shape[1], A.shape[1]).grad_x(g, _c(qweight), _c(B), _c(A), _c(codebook))
    return out if flat else out.reshape(*grad_y.shape[:-1], A.shape[1])


@torch.library.register_fake("lords::dequant_matmul_grad_x")
def _grad_x_fake(grad_y, qweight, B, A, codebook):
    check_weight(qweight, B, A, codebook)
    check_activation(grad_y, "grad_y", B.shape[0], "N (out_features)", qweight)
    return grad_y.new_empty((*grad_y.shape[:-1], A.shape[1]))


@torch.library.impl(_lib, "dequant_matmul_grad_scales", "CompositeExplicitAutograd")
def _grad_scales(grad_y, x, qweight, B, A, codebook):
    check_weight(qweight, B, A, codebook)
    check_activation(grad_y, "grad_y", B.shape[0], "N (out_features)", qweight)
    check_activation(x, "x", A.shape[1], "K (in_features)", qweight)
    g = grad_y.reshape(-1, B.shape[0])
    x2d = x.reshape(-1, A.shape[1])
    if g.shape[0] != x2d.shape[0]:
        raise ValueError(f"grad_y, x: expected the same number of rows, got {g.shape[0]} and {x2d.shape[0]}")
    return _grad_scales_checked(g, x2d, qweight, B, A, codebook)


def _grad_scales_checked(g, x2d, qweight, B, A, codebook):
    # g [M, N] and x2d [M, K]: both callers hand over 2-D rows
    g, x2d = g.contiguous(), x2d.contiguous()
    grad_B, grad_A = _backend("grad_scales", g, g.shape[0], B.shape[1], A.shape[1]).grad_scales(g, x2d, _c(qweight), _c(B), _c(A), _c(codebook))
    return grad_B, grad_A


@torch.library.register_fake("lords::dequant_matmul_grad_scales")
def _grad_scales_fake(grad_y, x, qweight, B, A, codebook):
    check_weight(qweight, B, A, codebook)
    return B.new_empty(B.shape), A.new_empty(A.shape)


# --- the eager entry of LordsLinear ---------------------------------------------------------------
# A Python custom op with a Python autograd formula crosses the dispatcher into Python twice per call
# (the autograd kernel, then the implementation): ~20 us of host time on the development machine's CPU
# (`bench/host_overhead_cpu.py`), several times that on the H100 machine's host, for each of a training
# step's ~600 op calls. In eager mode LordsLinear runs the same implementation and the same gradient
# formula through one torch.autograd.Function instead (or no autograd at all where nothing needs a
# gradient); traced code (torch.compile, export, fake or other tensor subclasses) keeps the op.

class _DequantMatmulEager(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: with the latter, every apply binds the
    # arguments through inspect.signature (~30 us of host time here).
    @staticmethod
    def forward(ctx, x, qweight, B, A, codebook, bias):
        y = _dequant_matmul(x, qweight, B, A, codebook, bias)
        _dequant_matmul_setup(ctx, (x, qweight, B, A, codebook, bias), y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        # the forward checked the weight and x, and autograd hands back grad_y in y's shape
        return _matmul_grads(ctx, grad_y, _grad_x_checked, _grad_scales_checked)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def dequant_matmul(x, qweight, B, A, codebook, bias=None):
    """`torch.ops.lords.dequant_matmul` with less host time in eager mode (same checks, backends,
    results and gradients); under tracing it is that op."""
    if torch.compiler.is_compiling() or any(type(t) not in _PLAIN for t in (x, qweight, B, A, codebook)) or (
        bias is not None and type(bias) not in _PLAIN
    ):
        return torch.ops.lords.dequant_matmul(x, qweight, B, A, codebook, bias)
    if torch.is_grad_enabled() and (x.requires_grad or B.requires_grad or A.requires_grad or codebook.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _DequantMatmulEager.apply(x, qweight, B, A, codebook, bias)
    return _dequant_matmul(x, qweight, B, A, codebook, bias)
