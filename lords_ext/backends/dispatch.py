"""Which backend runs an op: the one documented policy.

Order of decisions:
1. `LORDS_BACKEND=cuda|triton|reference` forces a backend. If it cannot run the call (not built,
   no GPU, unsupported dtype) that is an error, not a silent fallback: the user asked for it.
2. CPU tensors run on the reference backend (Triton only when forced and TRITON_INTERPRET=1).
3. CUDA tensors: the first backend in POLICY's list for the GPU's compute capability and the
   token count M that is available and supports the call; the reference backend closes every list.
   Before POLICY, dequant_matmul takes CUDA first where its fused wgmma GEMM wins (fused_gemm_first
   below: 32 < r <= 64 with 16 < M <= 128 and N filling the GPU with 128-row blocks, or 64 < M <= 256 (512
   at 4 bits; at r <= 32 from M = 17 at 4 bits) and its tiles in one wave; sm_90a build on a 9.0 GPU).
   Where K (the weight's input features) is not a multiple of 128, Triton goes before CUDA
   (CUDA_K_MULTIPLE below).

POLICY rows are (minimum compute capability, largest M, largest rank r, backends in order of
preference); None means no bound. The first row whose capability is <= the GPU's and whose bounds
hold applies. The rows follow the H100 measurements of sessions 5 to 8 (bench/cuda_notes.md; CUDA
graphs, weights rotated past L2, bf16, 4-bit NF4, parity rank). Small M, `bash bench/run_h100.sh
--quick` (bench/h100/bench_quick_session6_[ab].json), us per call, cuda vs triton:

    4096x4096 r=32   M=1: 12.0 vs 22.4 | M=2: 14.6 vs 22.2 | M=4: 15.9 vs 22.2 | M=8: 19.1 vs 22.3 | M=16: 25.9 vs 24.4
    1024x4096 r=12   M=1: 7.1 vs 8.7   | M=2: 8.3 vs 8.8   | M=4: 10.3 vs 8.7  | M=8: 14.2 vs 8.6
    14336x4096 r=49  M=1: 37.9 vs 81.5 | M=2: 82.2 vs 81.5 | M=16: 97.5 vs 78.8
    4096x14336 r=49  M=1: 35.5 vs 73.0 | M=2: 84.7 vs 74.5

Session 7 gave the direct kernel one row tile per warp from r = 33 (`bench.decode_paths`,
bench/h100/decode_paths_session7_ab_1_decode-nt1.json), CUDA now, against the Triton figures above:

    14336x4096 r=49  M=2: 72.2 vs 81.5 | M=8: 75.6 vs 81.3 | M=16: 85.7 vs 78.8
    4096x14336 r=49  M=2: 71.3 vs 74.5 | M=8: 77.7 vs 73.8 | M=16: 90.7 vs 75.2

and the session-7 suite (bench/h100/bench_quick_session7.json), cuda vs triton, both in one run:

    14336x4096 r=49  M=2: 72.2 vs 81.6 | M=4: 73.1 vs 80.2 | M=8: 75.5 vs 80.8 | M=16: 85.2 vs 78.4
    4096x14336 r=49  M=2: 70.9 vs 74.5 | M=4: 73.1 vs 73.2 | M=8: 76.9 vs 74.4 | M=16: 90.5 vs 73.5

Larger M, `python -m bench.dequant_paths` (bench/h100/dequant_paths_session6.json): CUDA's dequantize +
cuBLAS against Triton's choice (fused split-K up to M = 128, its own dequantize + cuBLAS above):

    4096x4096    M=64: 32.2 vs 27.6  | M=128: 34.9 vs 37.6  | M=256: 38.9 vs 46.4  | M=4096: 221.6 vs 229.7
    1024x4096    M=64: 13.1 vs 12.4  | M=128: 14.1 vs 16.5  | M=256: 15.6 vs 18.0  | M=4096: 59.3 vs 58.1
    14336x4096   M=64: 149.7 vs 101.2 | M=128: 151.5 vs 149.7 | M=256: 155.8 vs 160.3 | M=4096: 818.4 vs 832.4
    4096x14336   M=64: 150.5 vs 91.0 | M=128: 154.9 vs 153.2 | M=256: 165.0 vs 170.0 | M=4096: 789.1 vs 796.3

Session 8 streamed A and x through a cp.async ring in the direct kernel (`bash bench/cuda_check_h100.sh
decode_paths ...`, bench/h100/decode_paths_session8_ring.json), CUDA now, against the Triton figures of the
session-7 suite above:

    14336x4096 r=49  M=8: 56.8 vs 80.8 | M=16: 62.9 vs 78.4
    4096x14336 r=49  M=8: 50.5 vs 74.4 | M=16: 57.1 vs 73.5
    4096x4096 r=32   M=16: 25.0 vs 22.8 | 1024x4096 r=12 M=8: 14.4 vs 8.7

Session 9 gave the re-associated kernel an sm_90a wgmma variant (`bash bench/cuda_check_h100.sh decode_paths
--ms 1,2 --sweep ...`, bench/h100/decode_paths_session9_final_sweep.json), CUDA at M = 1 now:

    14336x4096 r=49  M=1: 28.0 (was 38.2) | 4096x4096 r=32 M=1: 11.6 (was 11.9); Triton 81.5 / 22.7 (suite)

(CUDA at M = 1 with 16 < r <= 64 is the re-associated kernel, csrc/reassoc_gemv.cu; above M = 16 it is
csrc/dequant.cu + cuBLAS.) So CUDA leads up to M = 2 for r <= 64, up to M = 8 for 16 < r <= 64, up to
M = 16 for 32 < r <= 64, and from M = 65 on; Triton in between, except where the fused wgmma GEMM goes first
(below: 32 < r <= 64 on Hopper from M = 6, sessions 10-12; r <= 32 at 4 bits from M = 17, session 17). GPUs
before sm_80 get no fused kernel.

One token above r = 64 goes to CUDA first as well (session 21, `python -m bench.decode_paths --ms 1 --triton`,
bench/h100/session21/stream_k_check/tr.json), us, CUDA's direct kernel (the only one on GPUs before Hopper) / the
CUDA op's automatic path (streamed-Z re-associated kernel on sm_90a where N >= 4096) / Triton:

    4096x4096 r=96   M=1: 25.2 / 18.1 / 32.9 | 14336x4096 r=96 M=1: 83.9 / 39.9 / 100.0
    1024x4096 r=96   M=1: 10.1 / 10.0 / 13.0
"""
from __future__ import annotations

import functools
import os

import torch

from . import available, get, names

ENV = "LORDS_BACKEND"

POLICY: list[tuple[tuple[int, int], int | None, int | None, tuple[str, ...]]] = [
    ((8, 0), 1, None, ("cuda", "triton", "reference")),
    ((8, 0), 2, 64, ("cuda", "triton", "reference")),
    ((8, 0), 8, 16, ("triton", "cuda", "reference")),
    ((8, 0), 8, 64, ("cuda", "triton", "reference")),
    ((8, 0), 16, 32, ("triton", "cuda", "reference")),
    ((8, 0), 16, 64, ("cuda", "triton", "reference")),
    ((8, 0), 64, None, ("triton", "cuda", "reference")),
    ((8, 0), None, None, ("cuda", "triton", "reference")),
    ((0, 0), None, None, ("reference",)),
]


def forced() -> str | None:
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in names():
        raise ValueError(f"{ENV}: expected one of {names()}, got {value!r}")
    return value


# The fused wgmma GEMM of the CUDA backend (csrc/fused_gemm.cu) goes first where it beats Triton, the decode
# kernels and the CUDA dequantize + cuBLAS path, at 32 < r <= 64 and K a multiple of 128: for 6 <= M <= 128 (2 <= M
# at 4 bits) where N is large enough that its 128-row blocks fill the GPU without split-K (ceil(N / 128) >= 0.8 x
# SMs; 16-token tiles up to M = 16), and for 16 < M <= 256 where its tiles (128 rows x 64, 128, 192 or 256 tokens)
# fit one wave and split-K fills at least half of it (the kernel's plan counts the clusters of its split-K blocks
# that fit at once), at 4 bits from FUSED_SPLIT_M4_MIN tokens on. The CUDA op's automatic path applies the same
# rule (csrc/lords_kernels.h, fused_gemm_preferred, with session 18's figures for the clauses below 17 tokens). H100,
# session 12, `python -m bench.dequant_paths --no-dequant` (bench/h100/dequant_paths_session12_desc.json), us,
# fused / Triton / dequantize + cuBLAS, and the decode kernels (op) up to M = 16:
#     14336x4096 r=49   M=6: 50.6 / 80.9 / 115.8 (decode 51.7)   M=9: 50.3 / 82.2 / 115.3 (decode 55.6)
#                       M=16: 50.3 / 77.7 / 114.8 (decode 59.9)   (M=5: 50.4 against decode 51.4, not taken)
#                       M=64: 55.2 / 101.2 / 116.7   M=128: 59.6 / 150.4 / 117.7   M=192: 87.0 / 156.8 / 120.7
#     4096x14336 r=49   M=16: 59.0 / 73.8 / 115.1 (decode 54.0: not taken)   M=32: 63.5 / 79.8 / 115.3
#                       M=64: 63.1 / 90.6 / 116.3   M=128: 66.9 / 152.4 / 120.0   M=256: 106.1 / 169.9 / 129.6
# At r <= 32 and 4 bits from M = 17 on (every 4-bit tile has a producer warpgroup since session 15; session 17,
# bench/h100/session17/fused_r32_small_m_ab): 4096x4096 r=32 M=24: 18.2 / - / 27.0 (op before, Triton first: 23.7)
# M=48: 18.6 / - / 27.0 (26.7)   M=64: 19.0 / - / 27.3 (27.5)   M=96: 21.4 / - / 27.5   M=128: 21.8 / - / 31.3; not
# 1024x4096 r=12 with at most 4 splits (8 tiles: M=64 12.7 against 12.3 for the op; 8 splits since session 19).
# Above 128 tokens the 256-token tile (session 15, bench/h100/session15/fused_ab): 4096x4096 r=32 M=160: 27.1 / - /
# 32.2   M=256: 29.0 / - / 36.2. (Until session 17 the rule took r <= 32 from M = 129 only, after session 11's
# 4096x4096 M=128: 32.6 / 37.9 / 31.7, before producers.)
# 14336x4096 at M = 256 takes 256-token tiles at 4 bits (112 tiles, one wave): 94.0 us against 124.1 for dequantize
# + cuBLAS (two waves of 128-token tiles: 118.7).
# Up to M = 512 at 4 bits (session 16, bench/h100/session16, after the ring handed over by halves and the token tile
# chosen by estimated time): 4096x4096 r=32 M=384: 37.0 / - / 37.8   M=512: 39.3 / - / 43.0; 4096x14336 r=49
# M=384: 118.2 / - / 149.5   M=512: 135.8 / - / 152.1; not taken where the tiles need two waves (14336x4096 M=512:
# 152-157 against 165-174 for dequantize + cuBLAS, a loss at M=1024: 320 against 257).
FUSED_M = (6, 256)
# At 4 bits the 16-token tile computes a superchunk's whole scale tile up front (session 18) and goes first from
# 2 tokens where N fills the GPU (14336x4096 r=49 M=2 / 4: 47.5 / 48.2 us against 49.3 / 49.9 for the decode
# kernels; 49.5 / 49.2 for both in a later run: at most a few per cent) and, split along K, from 8 tokens at
# r <= 32 (4096x4096 M=8 / 10: 16.4 / 16.4 against 17.6 / 25.1; M=6 16.3 against 16.0) and from 13 above
# (4096x14336 r=49 M=12 / 16: 52.3 / 52.2 against 51.8 / 54.2); bench/h100/session18/check_merged. Where N gives
# at most 16 tiles, the 16- and 64-token tiles take up to 8 splits in one wave (session 19) and go first from 3
# tokens where tiles x splits reach 45 % of the SMs (1024x4096 r=12 M=3 / 4 / 8 / 64: 7.3 / 7.3 / 7.4 / 9.4 against
# 8.5 / 9.5 / 13.6 / 12.5 before; bench/h100/session19/rule_small_n, eight_splits_ab), and at r <= 32 the 128- and
# 256-token tiles up to M = 256 (1024x4096 M=96 / 128 / 256: 10.8 / 11.0 / 14.7 against 13.9 / 13.6 / 15.5;
# bench/h100/session19/check_large_m).
FUSED_M4_MIN = 2  # csrc/lords_kernels.h, kFusedMinM4
FUSED_SPLIT_M4_MIN = (8, 13)  # csrc/lords_kernels.h, kFusedSplitMinM4: r <= 32, r > 32
FUSED_WIDE_SPLIT_M4_MIN = 3  # csrc/lords_kernels.h, kFusedWideSplitMinM4: at most 16 tiles, 6-8 splits each
FUSED_M4_MAX = 512  # csrc/lords_kernels.h, kFusedMaxM4
CUDA_DECODE_MAX_M = 16  # csrc/lords_kernels.h, kDecodeMaxM: the decode kernels' range
FUSED_RANK = (33, 64)
FUSED_AUTO_SPLITS = 4  # csrc/lords_kernels.h, kFusedAutoSplits
FUSED_MAX_SPLITS = 8  # csrc/lords_kernels.h, kFusedMaxSplits (every tile at 4 bits where all fit one wave)


@functools.lru_cache(maxsize=None)
def _sm_count_at(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_at(device.index if device.index is not None else torch.cuda.current_device())


def fused_gemm_first(device: torch.device, M: int, rank: int | None, K: int | None, N: int | None,
                     bits: int = 4) -> bool:
    """csrc/lords_kernels.h, fused_gemm_preferred, for codes of `bits` bits (the clauses at r <= 32, below 6
    and 17 tokens and above M = 256 hold at 4 bits only: the 2- and 3-bit fused tiles have no producer warpgroup
    and no whole-superchunk scale)."""
    if device.type != "cuda" or N is None or K is None or rank is None:
        return False
    four = bits == 4
    if not ((FUSED_M4_MIN if four else FUSED_M[0]) <= M <= (FUSED_M4_MAX if four else FUSED_M[1])
            and 1 <= rank <= FUSED_RANK[1]):
        return False
    if rank < FUSED_RANK[0] and not four:
        return False
    if K % CUDA_K_MULTIPLE:
        return False
    from . import cuda as cuda_backend

    if not cuda_backend.fused_gemm_ready(device):
        return False
    sms, row_blocks = _sm_count(device), -(-N // 128)
    if rank >= FUSED_RANK[0] and M <= 128 and row_blocks * 5 >= 4 * sms:
        return True
    ntok = fused_token_tile(M, rank, N, K, sms, bits)
    tiles = row_blocks * -(-M // ntok)
    if tiles > sms:
        return False
    # up to FUSED_MAX_SPLITS splits in one wave at 4 bits: from 45 % of the GPU (1024x4096, session 19)
    fills = tiles * min(K // CUDA_K_MULTIPLE, FUSED_MAX_SPLITS) * 20 >= 9 * sms
    few_tiles = tiles * FUSED_MAX_SPLITS <= sms  # at most 16 tiles: 6-8 splits each in one wave
    if four and ntok <= 64:
        return fills and (M >= FUSED_SPLIT_M4_MIN[rank >= FUSED_RANK[0]]
                          or (M >= FUSED_WIDE_SPLIT_M4_MIN and few_tiles))
    if four and rank <= 32 and few_tiles and fills and M <= FUSED_M[1]:  # 128 / 256-token tiles likewise (r <= 32)
        return True
    if M < (FUSED_SPLIT_M4_MIN[rank >= FUSED_RANK[0]] if four else CUDA_DECODE_MAX_M + 1):
        return False
    return tiles * FUSED_AUTO_SPLITS * 2 >= sms


SCALE_TOKENS = 200  # csrc/fused_gemm.cu, kScaleTokens


def fused_token_tile(M: int, rank: int, N: int, K: int, sms: int, bits: int = 4) -> int:
    """Tokens per block of the fused GEMM (csrc/fused_gemm.cu, fused_token_tile, with the measurements): above
    r = 32 the tile with the least estimated time, waves x (superchunks per split + 1) x (tokens + SCALE_TOKENS)
    over 1 to 3 splits."""
    if M <= 16:
        return 16
    if M <= 64:
        return 64
    if M <= 128:
        return 128
    if rank <= 32:
        return 256
    row_blocks, k_super = -(-N // 128), max(1, K // 128)
    best, best_cost = 0, 0
    for t in (128, 192, 256):
        if t == 256 and bits != 4:
            continue
        tiles = row_blocks * -(-M // t)
        for s in range(1, min(3, k_super) + 1):
            at_once = max(1, sms // s)
            cost = -(-tiles // at_once) * (-(-k_super // s) + 1) * (t + SCALE_TOKENS)
            if best == 0 or cost < best_cost:
                best, best_cost = t, cost
    return best


# The CUDA kernels' fast paths (16-byte code loads, full-line stores of the dequant tiles) need K to be a
# multiple of the 128-wide superchunk (csrc/lords_tile.cuh, vector_path_ok); other K run byte-wise paths
# that the SASS shows to be most of the main loop, and those POLICY rows were measured with K % 128 == 0
# only. Where K is not a multiple, Triton (masked vector loads) goes before CUDA.
CUDA_K_MULTIPLE = 128


def candidates(device: torch.device, M: int, rank: int | None = None, K: int | None = None,
               N: int | None = None, bits: int = 4) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("reference",)
    if fused_gemm_first(device, M, rank, K, N, bits):
        return ("cuda", "triton", "reference")
    cc = torch.cuda.get_device_capability(device)
    for min_cc, max_m, max_r, order in POLICY:
        if cc >= min_cc and (max_m is None or M <= max_m) and (max_r is None or (rank or 0) <= max_r):
            if K is not None and K % CUDA_K_MULTIPLE and "cuda" in order and "triton" in order:
                rest = [n for n in order if n != "cuda"]
                rest.insert(rest.index("triton") + 1, "cuda")
                order = tuple(rest)
            return order
    return ("reference",)


_chosen: dict = {}


def choose(op: str, t: torch.Tensor, M: int, rank: int | None = None, K: int | None = None,
           N: int | None = None, bits: int = 4) -> str:
    """Name of the backend that runs `op` for tensor `t` (x, grad_y or qweight) with M rows, scale
    rank `rank`, K input features (the weight's columns), and N output features and the code width `bits`
    (dequant_matmul only: the fused GEMM rule above).

    Answers are cached per (op, device, dtype, M, rank, K % 128 == 0, N and bits for dequant_matmul, LORDS_BACKEND,
    TRITON_INTERPRET; K itself moves only the fused GEMM's token tile above 128 tokens, where CUDA goes first
    whatever the tile): the
    decision reads the GPU's properties several times, which cost ~60 us of host time per op call
    on the H100 machine (bench/host_overhead.py), as much as a small layer's kernels. Errors are
    not cached. `clear_cache()` forgets the answers (after changing POLICY at run time)."""
    env = os.environ
    k_full = K is None or K % CUDA_K_MULTIPLE == 0
    n, b = (N, bits) if op == "dequant_matmul" else (None, 4)  # only the fused GEMM rule reads N and bits
    key = (op, t.device, t.dtype, M, rank, k_full, n, b, env.get(ENV), env.get("TRITON_INTERPRET"))
    name = _chosen.get(key)
    if name is None:
        name = _choose(op, t, M, rank, K, n, b)
        if len(_chosen) > 4096:  # many distinct token counts (generation with growing batches)
            _chosen.clear()
        _chosen[key] = name
    return name


def clear_cache() -> None:
    _chosen.clear()


def _choose(op: str, t: torch.Tensor, M: int, rank: int | None, K: int | None = None, N: int | None = None,
            bits: int = 4) -> str:
    name = forced()
    if name is not None:
        mod = get(name)
        if mod is None or not mod.available():
            raise RuntimeError(f"{ENV}={name}: that backend is not available on this machine")
        if not hasattr(mod, op) or not mod.supports(op, t, M):
            raise RuntimeError(
                f"{ENV}={name}: that backend does not support {op} for a {t.dtype} tensor on {t.device} (M={M})"
            )
        return name
    for name in candidates(t.device, M, rank, K, N, bits):
        mod = get(name)
        if mod is not None and hasattr(mod, op) and mod.available() and mod.supports(op, t, M):
            return name
    return "reference"


def describe(device: torch.device | None = None) -> str:
    """The dispatch table for this machine as text (used by `lords selftest` and `lords info`)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lines = [f"device: {device}" + (f" (sm_{''.join(map(str, torch.cuda.get_device_capability(device)))})"
                                    if device.type == "cuda" else "")]
    lines.append("backends available: " + ", ".join(n for n in names() if available(n)))
    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    for r in (32, 64):
        for M in (1, 2, 4, 8, 16, 32, 64, 256, 1024, 4096):
            lines.append(f"  dequant_matmul r={r:<3d} M={M:<5d} -> {choose('dequant_matmul', probe, M, r)}")
    lines.append(f"  (K a multiple of {CUDA_K_MULTIPLE}; otherwise Triton before CUDA)")
    if device.type == "cuda":
        from . import cuda as cuda_backend

        if cuda_backend.fused_gemm_ready(device):
            n_min = -(-4 * _sm_count(device) // 5) * 128
            lines.append(f"  fused wgmma GEMM (CUDA) first: {FUSED_RANK[0]} <= r <= {FUSED_RANK[1]} with "
                         f"{FUSED_M[0]} <= M <= 128 ({FUSED_M4_MIN} at 4 bits) and N >= {n_min}; "
                         f"{CUDA_DECODE_MAX_M + 1} <= M <= {FUSED_M[1]} where its tiles fit one wave; at 4 bits "
                         f"for every r <= {FUSED_RANK[1]}, up to M = {FUSED_M4_MAX} and from M = "
                         f"{FUSED_SPLIT_M4_MIN[0]} (r <= 32) / {FUSED_SPLIT_M4_MIN[1]} (r > 32), or from M = "
                         f"{FUSED_WIDE_SPLIT_M4_MIN} where at most {_sm_count(device) // FUSED_MAX_SPLITS} tiles take "
                         f"up to {FUSED_MAX_SPLITS} splits each in one wave")
        else:
            lines.append("  fused wgmma GEMM: not runnable here (needs the sm_90a build on a 9.0 GPU)")
        streamed = ("; with Z streamed (sm_90a) also M = 2 at 32 < r <= 56 and M = 1 at 64 < r <= 128, N >= 4096"
                    if cuda_backend.reassoc_wgmma_ready(device) else "")
        lines.append(f"  CUDA op, re-associated kernel: M = 1 at 16 < r <= 64{streamed}")
    if forced():
        lines.append(f"(forced by {ENV}={forced()})")
    return "\n".join(lines)
