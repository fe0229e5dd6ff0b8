"""Backward of dequant_matmul for the scale factors B and A, fused so that the [N, K] gradient of
the scale matrix never reaches global memory:

    dS = (grad_y^T @ x) * codebook[Q]      grad_B = dS @ A^T      grad_A = B^T @ dS

A program owns one K tile (BLOCK_K columns) and a contiguous range of N tiles (the N range is
split over the grid, SPLIT_N ways, as grad_x splits its reduction). For each N tile it builds the
dS tile in registers: G = grad_y^T @ x reduced over M in BLOCK_M chunks on the tensor cores, times
the decoded codebook tile. Then both rank products run on that tile:
  * grad_A[:, cols] += B[rows, :]^T @ dS stays in registers across the whole N range, so it
    reaches memory once per program;
  * grad_B[rows, :] gets one [BLOCK_N, r] partial per K tile, which has to leave the program.

How the partials meet (DET constexpr):
  * DET=False (default): fp32 atomics into zeroed [N, r] / [r, K] buffers. Extra memory is only
    the fp32 results; the summation order, hence the last bits, may change from run to run.
  * DET=True (torch.use_deterministic_algorithms): every partial is stored in its own slot,
    [k_tiles, N, r] for grad_B and [SPLIT_N, r, K] for grad_A, and torch sums the slots in a fixed
    order afterwards. Bit-reproducible, but the grad_B slots take k_tiles * N * r * 4 bytes
    (90 MB for 14336x4096 r=49 at BLOCK_K=128), a sizeable fraction of the dS this kernel exists
    not to materialize (235 MB in fp32); hence not the default.

The rank products run in the precision of the result. When B and A are bf16 (and the activations
16-bit), grad_B / grad_A are rounded to bf16 anyway, so dS, B and A enter them as bf16 (R_BF16:
half the tensor-core time and operand memory of TF32). Otherwise they take fp32 operands (dS is
fp32; B and A are widened) at R_PREC: 3xTF32 for fp32 activations, one TF32 pass for 16-bit ones.
fp16 operands are never used there: dS sums over every token and could overflow fp16.
"""
import triton
import triton.language as tl

from ._common import load_codes, load_levels, lookup, mma
from ._tuning import _cfg, autotune_kwargs, interpreting, split_for

MAX_R_PAD = 128  # larger ranks run in chunks of 128 from the launcher (the grad_A tile is r x BLOCK_K)


@triton.jit
def grad_scales_kernel(gy_ptr, x_ptr, q_ptr, b_ptr, a_ptr, cb_ptr, gb_ptr, ga_ptr,
                       M, N, K, R, stride_q, M_BUCKET,
                       BITS: tl.constexpr, LEVELS: tl.constexpr, R_PAD: tl.constexpr,
                       LUT: tl.constexpr, X_PREC: tl.constexpr, R_PREC: tl.constexpr,
                       R_BF16: tl.constexpr, DET: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       SPLIT_N: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_k = offs_k < K
    mask_r = offs_r < R
    # A[:, cols]^T, loaded transposed so both rank products are plain dots; padded ranks and
    # columns past K are zero, so they add nothing to either gradient
    a_t = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None],
                  mask=mask_r[None, :] & mask_k[:, None], other=0.0)
    if R_BF16:
        a_t = a_t.to(tl.bfloat16)
    else:
        a_t = a_t.to(tl.float32)
    levels = load_levels(cb_ptr, LEVELS, BLOCK_N, LUT)
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, SPLIT_N)
    nt_begin = pid_s * per_split
    nt_end = tl.minimum(nt_begin + per_split, n_tiles)
    ga = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for nt in range(nt_begin, nt_end):
        offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            gy_t = tl.load(gy_ptr + offs_m[None, :].to(tl.int64) * N + offs_n[:, None],
                           mask=mask_m[None, :] & mask_n[:, None], other=0.0)
            xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            g = mma(gy_t, xt, g, X_PREC)
        # rows past N and columns past K have G = 0 (masked loads), so their code (fetched as 0)
        # does not matter
        codes = load_codes(q_ptr, stride_q, offs_n, k0, N, K, BITS, BLOCK_N, BLOCK_K)
        ds = g * lookup(codes, levels, cb_ptr, LEVELS, LUT)
        b_t = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * R + offs_r[:, None],
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if R_BF16:
            ds = ds.to(tl.bfloat16)
            b_t = b_t.to(tl.bfloat16)
        else:
            b_t = b_t.to(tl.float32)
        ga = mma(b_t, ds, ga, R_PREC)
        gb = mma(ds, a_t, None, R_PREC)
        gb_idx = offs_n[:, None].to(tl.int64) * R + offs_r[None, :]
        gb_mask = mask_n[:, None] & mask_r[None, :]
        if DET:
            tl.store(gb_ptr + pid_k.to(tl.int64) * N * R + gb_idx, gb, mask=gb_mask)
        else:
            tl.atomic_add(gb_ptr + gb_idx, gb, mask=gb_mask, sem="relaxed")
    ga_idx = offs_r[:, None] * K + offs_k[None, :]
    ga_mask = mask_r[:, None] & mask_k[None, :]
    if DET:
        # a split whose N range is empty stores zeros: every slot must be written
        tl.store(ga_ptr + pid_s.to(tl.int64) * R * K + ga_idx, ga, mask=ga_mask)
    elif SPLIT_N == 1:
        tl.store(ga_ptr + ga_idx, ga, mask=ga_mask)
    else:
        tl.atomic_add(ga_ptr + ga_idx, ga, mask=ga_mask, sem="relaxed")


def split_n_for(N: int, K: int, block_n: int, block_k: int, waves: int = 2) -> int:
    """SPLIT_N giving about `waves` programs per SM over the K tiles, at least one N tile each."""
    return split_for(triton.cdiv(K, block_k), triton.cdiv(N, block_n), waves)


def grad_scales_configs():
    if interpreting():
        # several N and K tiles, two N splits and masked edges on the test shapes
        return [_cfg(BLOCK_N=16, BLOCK_K=32, BLOCK_M=16, SPLIT_N=2, num_warps=1, num_stages=1)]
    # SPLIT_N=0: chosen from the grid size in prune_grad_scales. A program holds three fp32 tiles
    # (G / dS, the grad_A accumulator, the codebook values) at once; ptxas (sm_90a, compiled here
    # without a GPU) reports no register spills for these at r_pad 32 and 64 with 16-bit
    # activations and fp32 scales (at most 48 B with bf16 scales), where 4-warp 64x128 tiles
    # spilled ~0.5 KB. The last one is for fp32
    # activations, whose 3xTF32 operands triple the tiles (80 B of spills; others spill > 0.7 KB).
    # H100 timings: bench/peft_notes.md (bench/bench_grad_scales.py).
    return [
        _cfg(BLOCK_N=64, BLOCK_K=128, BLOCK_M=64, SPLIT_N=0, num_warps=8, num_stages=3),
        _cfg(BLOCK_N=128, BLOCK_K=64, BLOCK_M=64, SPLIT_N=0, num_warps=8, num_stages=3),
        _cfg(BLOCK_N=64, BLOCK_K=128, BLOCK_M=32, SPLIT_N=0, num_warps=8, num_stages=4),
        _cfg(BLOCK_N=64, BLOCK_K=64, BLOCK_M=32, SPLIT_N=0, num_warps=4, num_stages=2),
        _cfg(BLOCK_N=64, BLOCK_K=64, BLOCK_M=16, SPLIT_N=0, num_warps=8, num_stages=2),
    ]


def prune_grad_scales(configs, named_args, **kwargs):
    """Fill in SPLIT_N, and skip M tiles far larger than M (they would only compute padding)."""
    N, K, M = named_args["N"], named_args["K"], named_args["M"]
    cap = max(16, triton.next_power_of_2(M))
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs)
        if kw["BLOCK_M"] > cap:
            kw["BLOCK_M"] = cap
        if kw.get("SPLIT_N", 0) == 0:
            kw["SPLIT_N"] = split_n_for(N, K, kw["BLOCK_N"], kw["BLOCK_K"])
        sig = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def default_config(M: int, N: int, K: int, r_pad: int, xsz: int = 2) -> dict:
    """The fixed config (kwargs plus num_warps / num_stages) used without autotuning: under
    LORDS_TRITON_TUNE=0, the interpreter, and deterministic mode (whose partial buffers are sized
    from the config before the launch). Chosen from the spill-free configs above."""
    if interpreting():
        cfg = grad_scales_configs()[0]
        return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if xsz == 4:
        bn, bk, bm, stages = 64, 64, 16, 2
    elif r_pad <= 64:
        bn, bk, bm, stages = 64, 128, min(64, max(16, triton.next_power_of_2(M))), 3
    else:
        bn, bk, bm, stages = 64, 64, min(32, max(16, triton.next_power_of_2(M))), 2
    return {"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_M": bm, "SPLIT_N": split_n_for(N, K, bn, bk),
            "num_warps": 8, "num_stages": stages}


grad_scales_tuned = triton.autotune(**autotune_kwargs(), configs=grad_scales_configs(),
                                    key=["M_BUCKET", "N", "K", "R", "BITS", "LUT"],
                                    prune_configs_by={"early_config_prune": prune_grad_scales},
                                    reset_to_zero=["gb_ptr", "ga_ptr"])(grad_scales_kernel)
