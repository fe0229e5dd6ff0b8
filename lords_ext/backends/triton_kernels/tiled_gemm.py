"""Mid and large M: a tiled fused GEMM, y^T tile [BLOCK_N, BLOCK_M] = W_tile @ x^T.

Each program rebuilds its weight tiles (codes, codebook, rank-r scale on the tensor cores) once
per K step and reuses them across BLOCK_M tokens; programs are ordered in groups of GROUP_N
weight-tile rows so that the tiles of x a group needs stay in L2. The dequantization work is
repeated once per M tile, which is what makes "dequantize once, then cuBLAS" win at large M.
"""
import triton
import triton.language as tl

from ._common import mma, load_b_tile, load_levels, splitk_epilogue, weight_tile
from ._tuning import autotune_kwargs, TILED_KEY, prune_tiled, tiled_configs


@triton.jit
def tiled_gemm_kernel(x_ptr, q_ptr, b_ptr, a_ptr, cb_ptr, bias_ptr, y_ptr,
                      M, N, K, R, stride_q, M_BUCKET,
                      HAS_BIAS: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr,
                      R_PAD: tl.constexpr, LUT: tl.constexpr, S_PREC: tl.constexpr,
                      X_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_N * tiles_m
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(tiles_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_m = (pid % per_group) // group_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b_tile = load_b_tile(b_ptr, offs_n, N, R, R_PAD)
    levels = load_levels(cb_ptr, LEVELS, BLOCK_N, LUT)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = weight_tile(q_ptr, stride_q, cb_ptr, levels, b_tile, a_ptr, offs_n, k0, N, K, R,
                        BITS, LEVELS, R_PAD, BLOCK_N, BLOCK_K, LUT, S_PREC)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_t = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * K + offs_k[:, None],
                      mask=(offs_m[None, :] < M) & (offs_k[:, None] < K), other=0.0)
        acc = mma(w.to(x_t.dtype), x_t, acc, X_PREC)
    splitk_epilogue(acc, offs_n, offs_m, 0, y_ptr, bias_ptr, y_ptr, y_ptr, M, N, HAS_BIAS, 1)


tiled_gemm_tuned = triton.autotune(**autotune_kwargs(), configs=tiled_configs(), key=TILED_KEY,
                                   prune_configs_by={"early_config_prune": prune_tiled})(tiled_gemm_kernel)
