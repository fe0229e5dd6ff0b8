"""Backward of dequant_matmul for x: grad_x = grad_y @ W, computed as grad_x^T tile
[BLOCK_K, BLOCK_M] = W_tile^T @ grad_y^T, reducing over N (split over the grid like decode's
split-K), so training never materializes W. A program owns one K tile, so its columns of A are
loaded once; the scale tile B_tile @ A_tile is rebuilt per N step on the tensor cores."""
import triton
import triton.language as tl

from ._common import mma, load_a_tile, load_b_tile, load_codes, load_levels, lookup, splitk_epilogue
from ._tuning import autotune_kwargs, grad_x_configs, with_split_n


@triton.jit
def grad_x_kernel(gy_ptr, q_ptr, b_ptr, a_ptr, cb_ptr, gx_ptr, ws_ptr, cnt_ptr,
                  M, N, K, R, stride_q, M_BUCKET,
                  BITS: tl.constexpr, LEVELS: tl.constexpr, R_PAD: tl.constexpr,
                  LUT: tl.constexpr, S_PREC: tl.constexpr, X_PREC: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                  SPLIT_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    a_tile = load_a_tile(a_ptr, offs_k, K, R, R_PAD)
    levels = load_levels(cb_ptr, LEVELS, BLOCK_N, LUT)
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLIT_N)
    nt_begin = pid_s * per_split
    nt_end = tl.minimum(nt_begin + per_split, n_tiles)
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for nt in range(nt_begin, nt_end):
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        b_tile = load_b_tile(b_ptr, offs_n, N, R, R_PAD)
        s = mma(b_tile, a_tile, None, S_PREC)
        codes = load_codes(q_ptr, stride_q, offs_n, k0, N, K, BITS, BLOCK_N, BLOCK_K)
        w = lookup(codes, levels, cb_ptr, LEVELS, LUT) * s
        gy_t = tl.load(gy_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None],
                       mask=(offs_m[None, :] < M) & (offs_n[:, None] < N), other=0.0)
        acc = mma(tl.trans(w.to(gy_t.dtype)), gy_t, acc, X_PREC)
    splitk_epilogue(acc, offs_k, offs_m, pid_m * tl.num_programs(0) + pid_k, gx_ptr, gx_ptr,
                    ws_ptr, cnt_ptr, M, K, False, SPLIT_N)


grad_x_tuned = triton.autotune(**autotune_kwargs(), configs=grad_x_configs(), key=["M_BUCKET", "N", "K", "R", "BITS", "LUT"],
                               prune_configs_by={"early_config_prune": with_split_n},
                               reset_to_zero=["ws_ptr", "cnt_ptr"])(grad_x_kernel)
