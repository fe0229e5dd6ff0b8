"""W = codebook[Q] * (B @ A) written to memory in one pass: the `dequant` op, and the first half
of the "dequantize, then cuBLAS" path for large M (where one pass over W is cheaper than
rebuilding weight tiles once per M tile)."""
import triton
import triton.language as tl

from ._common import load_b_tile, load_levels, weight_tile
from ._tuning import autotune_kwargs, dequant_configs


@triton.jit
def dequant_kernel(q_ptr, b_ptr, a_ptr, cb_ptr, w_ptr, N, K, R, stride_q,
                   BITS: tl.constexpr, LEVELS: tl.constexpr, R_PAD: tl.constexpr,
                   LUT: tl.constexpr, S_PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    b_tile = load_b_tile(b_ptr, offs_n, N, R, R_PAD)
    levels = load_levels(cb_ptr, LEVELS, BLOCK_N, LUT)
    w = weight_tile(q_ptr, stride_q, cb_ptr, levels, b_tile, a_ptr, offs_n, k0, N, K, R,
                    BITS, LEVELS, R_PAD, BLOCK_N, BLOCK_K, LUT, S_PREC)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
             w.to(w_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


dequant_tuned = triton.autotune(**autotune_kwargs(), configs=dequant_configs(),
                                key=["N", "K", "R", "BITS", "LUT"])(dequant_kernel)
