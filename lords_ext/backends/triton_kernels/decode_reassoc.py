"""One or two tokens: the re-associated product of LORDS.md,

    y[n] = sum_j B[n, j] * sum_k codebook[Q[n, k]] * (A[j, k] * x[k]),

a look-up-table GEMM of the decoded codes against BLOCK_M * r "virtual tokens" A[j, :] * x[m, :].
No scale tile is formed per weight: per K tile there is one decode and one dot with N = M * R_PAD,
and B is applied once per output tile at the end. Worth it while M * R_PAD stays small.
"""
import triton
import triton.language as tl

from ._common import mma, load_b_tile, load_codes, load_levels, lookup, splitk_epilogue
from ._tuning import autotune_kwargs, DECODE_KEY, reassoc_configs, with_split_k


@triton.jit
def decode_reassoc_kernel(x_ptr, q_ptr, b_ptr, a_ptr, cb_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
                          M, N, K, R, stride_q, M_BUCKET,
                          HAS_BIAS: tl.constexpr, BITS: tl.constexpr, LEVELS: tl.constexpr,
                          R_PAD: tl.constexpr, LUT: tl.constexpr, X_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    levels = load_levels(cb_ptr, LEVELS, BLOCK_N, LUT)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_begin = pid_k * per_split
    kt_end = tl.minimum(kt_begin + per_split, k_tiles)
    if BLOCK_M == 1:
        # one token: plain 2-D tiles (the 3-D broadcast below costs layout shuffles)
        acc1 = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for kt in range(kt_begin, kt_end):
            k0 = kt * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            codes = load_codes(q_ptr, stride_q, offs_n, k0, N, K, BITS, BLOCK_N, BLOCK_K)
            xk = tl.load(x_ptr + pid_m.to(tl.int64) * K + offs_k, mask=offs_k < K, other=0.0)
            a_t = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None],
                          mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            xa = (a_t.to(tl.float32) * xk.to(tl.float32)[:, None]).to(xk.dtype)
            vals = lookup(codes, levels, cb_ptr, LEVELS, LUT)
            acc1 = mma(vals.to(xk.dtype), xa, acc1, X_PREC)
        b_tile = load_b_tile(b_ptr, offs_n, N, R, R_PAD).to(tl.float32)
        out = tl.sum(acc1 * b_tile, axis=1)[:, None]
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M * R_PAD), dtype=tl.float32)
        for kt in range(kt_begin, kt_end):
            k0 = kt * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            codes = load_codes(q_ptr, stride_q, offs_n, k0, N, K, BITS, BLOCK_N, BLOCK_K)
            x_t = tl.load(x_ptr + offs_m[None, :].to(tl.int64) * K + offs_k[:, None],
                          mask=(offs_m[None, :] < M) & (offs_k[:, None] < K), other=0.0)
            a_t = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None],
                          mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            # virtual tokens: column m * R_PAD + j holds A[j, k] * x[m, k]
            xa = tl.reshape(x_t.to(tl.float32)[:, :, None] * a_t.to(tl.float32)[:, None, :],
                            (BLOCK_K, BLOCK_M * R_PAD))
            vals = lookup(codes, levels, cb_ptr, LEVELS, LUT)
            acc = mma(vals.to(x_t.dtype), xa.to(x_t.dtype), acc, X_PREC)
        b_tile = load_b_tile(b_ptr, offs_n, N, R, R_PAD).to(tl.float32)
        out = tl.sum(tl.reshape(acc, (BLOCK_N, BLOCK_M, R_PAD)) * b_tile[:, None, :], axis=2)
    splitk_epilogue(out, offs_n, offs_m, pid_m * tl.num_programs(0) + pid_n, y_ptr, bias_ptr,
                    ws_ptr, cnt_ptr, M, N, HAS_BIAS, SPLIT_K)


decode_reassoc_tuned = triton.autotune(**autotune_kwargs(), configs=reassoc_configs(), key=DECODE_KEY,
                                       prune_configs_by={"early_config_prune": with_split_k},
                                       reset_to_zero=["ws_ptr", "cnt_ptr"])(decode_reassoc_kernel)
