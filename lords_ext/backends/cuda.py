"""The CUDA backend: hand-written kernels from csrc/, compiled into lords_ext._C by setup.py.

Ops it calls (registered by csrc/ops.cpp):
  torch.ops.lords.dequant_matmul_cuda(x2d, qweight, B, A, codebook, bias, path, splits)
      path -1: re-associated kernel for M = 1 and 16 < r <= 64 (csrc/reassoc_gemv.cu) and, on the sm_90a
      build, for M = 2 with 32 < r <= 56 and M = 1 with 64 < r <= 128, both where N >= 4096 (Z = A * x
      streamed through shared memory), fused
      tensor-core decode kernel for M <= 16, else fused dequantize + cuBLAS; path 2 forces the
      re-associated kernel (M * ceil(r/8)*8 <= 64; on a 9.0 GPU with the default sm_90a build its
      wgmma variant, which also takes up to 128 columns with Z streamed, K % 128 == 0), path 3 the same
      kernel on mma.sync alone (for A/B timing), path 4 the fused wgmma
      GEMM (csrc/fused_gemm.cu: sm_90a build on a 9.0 GPU, r <= 64, K % 128 == 0), which path -1 takes for
      32 < r <= 64 with 6 <= M <= 128 where N fills the GPU with 128-row blocks, or 16 < M <= 256 where
      its tiles fit one wave (dispatch.fused_gemm_first);
      path 5 the same GEMM on a stream-K schedule (4 bits; `splits` blocks, 0 = one per SM: each block takes an
      equal share of the (tile, superchunk) units, partial tiles reduced through a workspace in block order);
      splits 0: the kernel's own split-K plan (other values are for tuning).
  torch.ops.lords.dequant_cuda(qweight, B, A, codebook, superchunks=0) -> W in B.dtype (float16 / bfloat16);
    superchunks (128-wide k ranges per block) is a tuning knob, 0 = the kernel's choice.
Both take any rank r up to 128 in one launch. `y = x @ (codebook[Q] * (B @ A)).T` is linear in
`S = B @ A`, so a larger rank runs as a sum over rank chunks of 128 (W likewise).

Not here: grad_scales (left to the other backends), float32/float64 activations (the kernels
multiply in fp16/bf16 on tensor cores; `supports` says no). B and A in another dtype than x are cast
to x.dtype first (one extra small copy per call).
"""
from __future__ import annotations

import functools

import torch

_RANK_CHUNK = 128  # csrc/lords_kernels.h kMaxRank
_HALF = (torch.float16, torch.bfloat16)

try:
    from .. import _C  # noqa: F401  (importing it registers torch.ops.lords.*_cuda)

    LOAD_ERROR: str | None = None
except (ImportError, OSError) as e:  # not built, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"


def built() -> bool:
    """Was lords_ext._C built and loadable here (independent of a GPU being present)?"""
    return _C is not None and hasattr(torch.ops.lords, "dequant_matmul_cuda")


def available() -> bool:
    return built() and torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _features(index: int) -> str:
    if not hasattr(torch.ops.lords, "cuda_features"):  # an extension built before session 9
        return ""
    with torch.cuda.device(index):
        return torch.ops.lords.cuda_features()


def _feature_ready(device: torch.device, flag: str) -> bool:
    """`flag` (e.g. "fused_gemm_ready") is 1 in cuda_features() for this device."""
    if not (available() and device.type == "cuda"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"{flag}=1" in _features(index)


def fused_gemm_ready(device: torch.device) -> bool:
    """Can the fused wgmma GEMM (path 4) run on this device: built with sm_90a code, compute capability 9.0."""
    return _feature_ready(device, "fused_gemm_ready")


def reassoc_wgmma_ready(device: torch.device) -> bool:
    """Can the re-associated kernel's wgmma variant run here (sm_90a build, compute capability 9.0): the one that
    path -1 takes for M = 1 above r = 64 and M = 2 at 32 < r <= 56 (Z streamed), where N >= 4096."""
    return _feature_ready(device, "reassoc_wgmma_ready")


def supports(op: str, t: torch.Tensor, M: int) -> bool:
    if not (available() and t.is_cuda):
        return False
    if _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) < (8, 0):
        return False  # bf16 mma.sync needs sm_80
    if op == "dequant":
        return t.dtype == torch.uint8
    if op in ("dequant_matmul", "grad_x"):
        return t.dtype in _HALF
    return False


def _rank_chunks(B: torch.Tensor, A: torch.Tensor):
    r = B.shape[1]
    for j in range(0, r, _RANK_CHUNK):
        yield B[:, j : j + _RANK_CHUNK].contiguous(), A[j : j + _RANK_CHUNK].contiguous()


def dequant(qweight, B, A, codebook):
    if B.dtype not in _HALF:
        # The scale product runs on fp16/bf16 tensor cores; a float32/float64 W is the reference's job.
        from . import reference

        return reference.dequant(qweight, B, A, codebook)
    A = A.to(B.dtype)
    if B.shape[1] <= _RANK_CHUNK:
        return torch.ops.lords.dequant_cuda(qweight, B, A, codebook)
    W = None
    for Bc, Ac in _rank_chunks(B, A):
        part = torch.ops.lords.dequant_cuda(qweight, Bc, Ac, codebook).float()
        W = part if W is None else W + part
    return W.to(B.dtype)


def dequant_matmul(x2d, qweight, B, A, codebook, bias, path: int = -1):
    if B.shape[1] <= _RANK_CHUNK:
        return torch.ops.lords.dequant_matmul_cuda(x2d, qweight, B, A, codebook, bias, path)
    y = None
    for Bc, Ac in _rank_chunks(B, A):
        part = torch.ops.lords.dequant_matmul_cuda(x2d, qweight, Bc, Ac, codebook, None, path).float()
        y = part if y is None else y + part
    if bias is not None:
        y = y + bias.float()
    return y.to(x2d.dtype)


def grad_x(grad_y2d, qweight, B, A, codebook):
    W = dequant(qweight, B.to(grad_y2d.dtype), A.to(grad_y2d.dtype), codebook)
    return grad_y2d @ W
