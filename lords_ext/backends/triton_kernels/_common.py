"""Building blocks shared by the LoRDS Triton kernels: code unpacking, codebook look-up, the
rank-r scale tile, and the split-K epilogue.

Every kernel works on a weight tile of BLOCK_N rows (output features) by BLOCK_K columns (input
features). The codes of a tile are read as contiguous bytes of each row and unpacked with shifts
and `tl.join` (reading them byte by byte per element was 4x slower on the H100, see
BENCHMARKING.md). Columns past K are fetched as code 0; they are harmless because the kernels load
the matching columns of A (and of x) as zeros, so their scale, hence their weight, is zero.
"""
import triton
import triton.language as tl

from ._tuning import interpreting

# codebook look-up strategies (LUT constexpr); measured against each other in bench/triton_notes.md
LUT_GATHER = 0   # levels kept on chip, tl.gather (shared memory, 8 distinct words: no bank conflicts)
LUT_GLOBAL = 1   # tl.load(codebook + code), served by L1
LUT_SELECT = 2   # chain of 2**bits compare/selects on registers

# The CPU interpreter (triton 3.8) multiplies bf16 dot operands as raw bits; under it, operands are
# widened to fp32 after the same rounding, so CI still checks the kernels' arithmetic.
_WIDEN_DOTS = tl.constexpr(interpreting())


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation."""
    if _WIDEN_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _interleave2(a, b, ROWS: tl.constexpr, COLS: tl.constexpr):
    # a holds the even columns, b the odd ones; result [ROWS, 2 * COLS]
    return tl.reshape(tl.join(a, b), (ROWS, 2 * COLS))


@triton.jit
def load_codes(q_ptr, stride_q, offs_n, k0, N, K,
               BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes [BLOCK_N, BLOCK_K] of rows offs_n, columns k0 .. k0 + BLOCK_K (k0 % BLOCK_K == 0)."""
    row = q_ptr + offs_n[:, None].to(tl.int64) * stride_q
    mask_n = offs_n[:, None] < N
    if BITS == 4:
        W: tl.constexpr = BLOCK_K // 2
        offs_b = k0 // 2 + tl.arange(0, W)
        byte = tl.load(row + offs_b[None, :], mask=mask_n & (offs_b[None, :] < K // 2), other=0).to(tl.int32)
        codes = _interleave2(byte & 15, (byte >> 4) & 15, BLOCK_N, W)
    elif BITS == 2:
        W: tl.constexpr = BLOCK_K // 4
        offs_b = k0 // 4 + tl.arange(0, W)
        byte = tl.load(row + offs_b[None, :], mask=mask_n & (offs_b[None, :] < K // 4), other=0).to(tl.int32)
        # position 4j+i holds bits 2i..2i+1 of byte j: evens (0, 2) then odds (1, 3)
        ev = _interleave2(byte & 3, (byte >> 4) & 3, BLOCK_N, W)
        od = _interleave2((byte >> 2) & 3, (byte >> 6) & 3, BLOCK_N, W)
        codes = _interleave2(ev, od, BLOCK_N, 2 * W)
    else:
        # 3 bits: 8 codes per 3 bytes, one 24-bit little-endian word per group of 8
        G: tl.constexpr = BLOCK_K // 8
        offs_g = k0 // 8 + tl.arange(0, G)
        m = mask_n & (offs_g[None, :] < K // 8)
        p = row + 3 * offs_g[None, :]
        v = (tl.load(p, mask=m, other=0).to(tl.int32)
             | (tl.load(p + 1, mask=m, other=0).to(tl.int32) << 8)
             | (tl.load(p + 2, mask=m, other=0).to(tl.int32) << 16))
        # recursive even/odd interleave: position i of the group is code (v >> 3i) & 7
        e0 = _interleave2(v & 7, (v >> 12) & 7, BLOCK_N, G)            # codes 0, 4
        e1 = _interleave2((v >> 6) & 7, (v >> 18) & 7, BLOCK_N, G)     # codes 2, 6
        o0 = _interleave2((v >> 3) & 7, (v >> 15) & 7, BLOCK_N, G)     # codes 1, 5
        o1 = _interleave2((v >> 9) & 7, (v >> 21) & 7, BLOCK_N, G)     # codes 3, 7
        ev = _interleave2(e0, e1, BLOCK_N, 2 * G)                      # codes 0, 2, 4, 6
        od = _interleave2(o0, o1, BLOCK_N, 2 * G)                      # codes 1, 3, 5, 7
        codes = _interleave2(ev, od, BLOCK_N, 4 * G)
    return codes


@triton.jit
def load_levels(cb_ptr, LEVELS: tl.constexpr, BLOCK_N: tl.constexpr, LUT: tl.constexpr):
    """The codebook as a loop-invariant [BLOCK_N, LEVELS] fp32 tile (only LUT_GATHER uses it)."""
    lv = tl.load(cb_ptr + tl.arange(0, LEVELS)).to(tl.float32)
    return tl.broadcast_to(lv[None, :], (BLOCK_N, LEVELS))


@triton.jit
def lookup(codes, levels, cb_ptr, LEVELS: tl.constexpr, LUT: tl.constexpr):
    """codebook[codes] in fp32."""
    if LUT == 0:
        vals = tl.gather(levels, codes, 1)
    elif LUT == 1:
        vals = tl.load(cb_ptr + codes).to(tl.float32)
    else:
        vals = tl.zeros(codes.shape, tl.float32) + tl.load(cb_ptr).to(tl.float32)
        for i in tl.static_range(1, LEVELS):
            vals = tl.where(codes == i, tl.load(cb_ptr + i).to(tl.float32), vals)
    return vals


@triton.jit
def load_b_tile(b_ptr, offs_n, N, R, R_PAD: tl.constexpr):
    offs_r = tl.arange(0, R_PAD)
    return tl.load(b_ptr + offs_n[:, None].to(tl.int64) * R + offs_r[None, :],
                   mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)


@triton.jit
def load_a_tile(a_ptr, offs_k, K, R, R_PAD: tl.constexpr):
    """A[:, offs_k] as [R_PAD, BLOCK_K]; padded ranks and columns past K are zero."""
    offs_r = tl.arange(0, R_PAD)
    return tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                   mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)


@triton.jit
def weight_tile(q_ptr, stride_q, cb_ptr, levels, b_tile, a_ptr, offs_n, k0, N, K, R,
                BITS: tl.constexpr, LEVELS: tl.constexpr, R_PAD: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LUT: tl.constexpr, S_PREC: tl.constexpr):
    """fp32 W tile [BLOCK_N, BLOCK_K] = codebook[Q] * (B_tile @ A_tile); the scale tile comes
    from the tensor cores (a rank-R_PAD product), never from memory."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a_tile = load_a_tile(a_ptr, offs_k, K, R, R_PAD)
    s = mma(b_tile, a_tile, None, S_PREC)
    codes = load_codes(q_ptr, stride_q, offs_n, k0, N, K, BITS, BLOCK_N, BLOCK_K)
    return lookup(codes, levels, cb_ptr, LEVELS, LUT) * s


@triton.jit
def splitk_epilogue(acc, offs_n, offs_m, pid_tile, y_ptr, bias_ptr, ws_ptr, cnt_ptr, M, N,
                    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] holds y^T partial sums. With SPLIT_K > 1, partials go to the fp32
    workspace with atomics; the program that arrives last on this tile (a per-tile counter) adds
    the bias, writes y in its dtype and zeroes its part of the workspace and counter again, so one
    launch does the whole reduction and the next call needs no memset."""
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    idx = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
    if SPLIT_K == 1:
        out = acc
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + idx, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ws_ptr + idx, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's partials are issued before the counter moves
        arrived = tl.atomic_add(cnt_ptr + pid_tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            # read and re-zero in one atomic per element: a load followed by a zeroing store
            # could be split across threads of this program with no barrier between them
            bits = tl.atomic_xchg(ws_ptr.to(tl.pointer_type(tl.int32)) + idx,
                                  tl.zeros(acc.shape, tl.int32), mask=mask, sem="relaxed")
            out = bits.to(tl.float32, bitcast=True)
            tl.store(cnt_ptr + pid_tile, 0)
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptr + idx, out.to(y_ptr.dtype.element_ty), mask=mask)
