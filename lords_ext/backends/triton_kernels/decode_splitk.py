"""Few tokens (the default for M <= 128): y^T = W_tile @ x^T with K split over the grid.

With one M tile (BLOCK_M = next power of two of M, 16 to 256) there are only N / BLOCK_N output
tiles (64 for N = 4096), too few for 132 SMs, so SPLIT_K programs share each tile's K range and
reduce through fp32 atomics; the last one to arrive writes y (see `splitk_epilogue`). The weight
tile is the left operand of the dot so the token dimension, padded to 16, is the cheap one.
"""
import triton
import triton.language as tl

from ._common import mma, load_b_tile, load_levels, splitk_epilogue, weight_tile
from ._tuning import autotune_kwargs, DECODE_KEY, decode_configs, with_split_k


@triton.jit
def decode_splitk_kernel(x_ptr, q_ptr, b_ptr, a_ptr, cb_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                         M, N, K, R, stride_q, M_BUCKET,
                         HAS_BIAS: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr,
                         R_PAD: tl.constexpr, LUT: tl.constexpr, S_PREC: tl.constexpr,
                         X_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b_tile = load_b_tile(b_ptr, offs_n, N, R, R_PAD)
    levels = load_levels(cb_ptr, LEVELS, BLOCK_N, LUT)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_begin = pid_k * per_split
    kt_end = tl.minimum(kt_begin + per_split, k_tiles)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(kt_begin, kt_end):
        k0 = kt * BLOCK_K
        w = weight_tile(q_ptr, stride_q, cb_ptr, levels, b_tile, a_ptr, offs_n, k0, N, K, R,
                        BITS, LEVELS, R_PAD, BLOCK_N, BLOCK_K, LUT, S_PREC)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_t = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * K + offs_k[:, None],
                      mask=(offs_m[None, :] < M) & (offs_k[:, None] < K), other=0.0)
        acc = mma(w.to(x_t.dtype), x_t, acc, X_PREC)
    splitk_epilogue(acc, offs_n, offs_m, pid_m * tl.num_programs(0) + pid_n, y_ptr, bias_ptr,
                    ws_ptr, cnt_ptr, M, N, HAS_BIAS, SPLIT_K)


decode_splitk_tuned = triton.autotune(**autotune_kwargs(), configs=decode_configs(), key=DECODE_KEY,
                                      prune_configs_by={"early_config_prune": with_split_k},
                                      reset_to_zero=["ws_ptr", "cnt_ptr"])(decode_splitk_kernel)
