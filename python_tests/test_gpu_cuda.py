"""CUDA backend (csrc/ kernels) against the reference backend, and against Triton where it runs.

Skipped without a GPU or without the built extension. Shapes: the BENCHMARKING.md matrix (Llama-3-8B
linears, M from 1 to 8192, 4-bit with the parity rank for block 64) plus odd shapes (N not a multiple
of the 256-row block, K not a multiple of the 128-wide superchunk, odd ranks, ranks past 128), every
bit width, fp16 and bf16. Every comparison is in float64 against a float32 reference computed on the
same 16-bit-rounded inputs, on fresh random data, with cached allocator memory poisoned with NaN first
so an unwritten output element cannot pass.
"""
from __future__ import annotations

import math

import pytest
import torch

from lords_ext.backends import cuda as cuda_backend
from lords_ext.backends import dispatch
from lords_ext.backends import reference
from lords_ext.formats import get_codebook, pack
from lords_ext.quantize import parity_rank

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not cuda_backend.built(), reason=f"lords_ext._C not built ({cuda_backend.LOAD_ERROR})"),
]

# bf16/fp16 W rounding alone gives ~3e-3; indexing or packing bugs give O(1).
TOL = 1e-2
LLAMA = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192]



def make(M, N, K, r, bits, dtype=torch.bfloat16, seed=0, codebook=None, scale_dtype=None):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cb = get_codebook(codebook or f"nf{bits}")[0] if not isinstance(codebook, torch.Tensor) else codebook
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen)
    qweight = pack(codes, bits).cuda()
    sd = scale_dtype or dtype
    B = ((torch.rand(N, r, generator=gen) + 0.1) / math.sqrt(r)).to("cuda", sd)
    A = ((torch.rand(r, K, generator=gen) + 0.1) * (0.2 / math.sqrt(r))).to("cuda", sd)
    x = torch.randn(M, K, generator=gen).to("cuda", dtype)
    bias = torch.randn(N, generator=gen).to("cuda", dtype)
    return x, qweight, B, A, cb.cuda(), bias


def poison(nbytes):
    torch.full((max(nbytes, 1 << 22) // 4,), float("nan"), device="cuda")


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output holds NaN/inf (an element was not written?)"
    return ((out - ref).norm() / ref.norm()).item()


def ref_matmul(x, qweight, B, A, cb, bias):
    return reference.dequant_matmul(x.float(), qweight, B.float(), A.float(), cb, None if bias is None else bias.float())


@pytest.mark.parametrize("N,K", LLAMA)
@pytest.mark.parametrize("M", MS)
def test_benchmark_matrix_4bit(N, K, M):
    r = parity_rank(N, K, 64)
    x, qweight, B, A, cb, bias = make(M, N, K, r, 4, seed=M + N)
    ref = ref_matmul(x, qweight, B, A, cb, None)
    poison(M * N * 16)
    y = cuda_backend.dequant_matmul(x, qweight, B, A, cb, None)
    assert y.shape == (M, N) and y.dtype == x.dtype
    assert rel(y, ref) < TOL
    try:
        from lords_ext.backends import triton_backend
    except ImportError:
        return
    if triton_backend.available() and triton_backend.supports("dequant_matmul", x, M) and M in (1, 16, 256):
        yt = triton_backend.dequant_matmul(x, qweight, B, A, cb, None)
        assert rel(y, yt.float()) < 2 * TOL, "CUDA and Triton disagree"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M,N,K,r",
    [
        (1, 4096, 4096, 32),
        (2, 1000, 1024, 17),  # N not a multiple of 256
        (7, 520, 1032, 1),  # K not a multiple of 128 (scalar path), r = 1
        (16, 768, 2048, 64),
        (9, 300, 392, 130),  # r > 128: two rank chunks
        (13, 257, 8200, 100),
        (40, 640, 768, 48),  # dequant + cuBLAS
    ],
)
def test_odd_shapes_all_bits(M, N, K, r, bits, dtype):
    x, qweight, B, A, cb, bias = make(M, N, K, r, bits, dtype, seed=bits * 1000 + M)
    ref = ref_matmul(x, qweight, B, A, cb, bias)
    poison(M * N * 64)
    y = cuda_backend.dequant_matmul(x, qweight, B, A, cb, bias)
    assert rel(y, ref) < TOL
    W = cuda_backend.dequant(qweight, B, A, cb)
    assert W.dtype == B.dtype and W.shape == (N, K)
    assert rel(W, reference.dequant(qweight, B.float(), A.float(), cb)) < TOL


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("superchunks", [0, 1, 2, 3, 64])
@pytest.mark.parametrize("N,K,r", [(4096, 4096, 32), (300, 1032, 49), (520, 8200, 100)])
def test_dequant_every_block_depth(bits, superchunks, N, K, r):
    """The dequant kernel's k range per block (superchunks of 128) is a tuning knob: every value,
    including ones past K and ones that leave a partial last block, writes the same W."""
    _, qweight, B, A, cb, _ = make(1, N, K, r, bits, seed=superchunks + 7 * bits)
    poison(N * K * 4)
    W = torch.ops.lords.dequant_cuda(qweight, B, A, cb, superchunks)
    assert rel(W, reference.dequant(qweight, B.float(), A.float(), cb)) < TOL
    if superchunks:
        assert torch.equal(W, torch.ops.lords.dequant_cuda(qweight, B, A, cb, 0)), "depth changed the result"


def test_dequant_rejects_bad_block_depth():
    _, qweight, B, A, cb, _ = make(1, 256, 512, 8, 4)
    for bad in (-1, 65):
        with pytest.raises(RuntimeError, match=r"superchunks: expected 0 \(automatic\) to 64, got " + str(bad)):
            torch.ops.lords.dequant_cuda(qweight, B, A, cb, bad)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "M,N,K,r",
    [
        (1, 512, 4096, 12),  # one rank chunk
        (9, 300, 4096, 49),  # two token tiles, four rank chunks, N not a multiple of the block
        (3, 256, 2944, 100),  # eight rank chunks, 23 superchunks
        (5, 260, 1000, 33),  # K not a multiple of 128: the copies without cp.async
    ],
)
def test_direct_kernel_any_split(M, N, K, r, bits):
    """The direct kernel streams A and x through a 3-slot ring of superchunks: one split (the ring
    wraps many times), uneven splits and one superchunk per split all give the reference result."""
    x, qweight, B, A, cb, bias = make(M, N, K, r, bits, seed=bits * 17 + M + r)
    ref = ref_matmul(x, qweight, B, A, cb, bias)
    k_super = -(-K // 128)
    for splits in (1, 2, 3, 7, k_super):
        poison(M * N * 64)
        y = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 0, splits)
        assert rel(y, ref) < TOL, f"splits={splits}"


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_fused_and_cublas_paths_agree(bits, M):
    x, qweight, B, A, cb, bias = make(M, 1536, 2048, 32, bits, seed=7 * M + bits)
    y0 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 0)
    y1 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 1)
    assert rel(y0, y1.float()) < TOL
    assert rel(y0, ref_matmul(x, qweight, B, A, cb, bias)) < TOL


@pytest.mark.parametrize("path", [2, 3])  # 2: the wgmma variant where it runs, 3: mma.sync only
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M,N,K,r",
    [
        (1, 4096, 4096, 32),  # 4 column tiles
        (1, 14336, 4096, 49),  # 7
        (2, 4096, 4096, 32),  # 8
        (1, 1000, 1024, 17),  # N not a multiple of 256
        (1, 777, 2048, 12),  # 2 column tiles
        (2, 640, 1024, 24),  # 6 column tiles, two tokens
        (3, 520, 1032, 5),  # K not a multiple of 128 (scalar path)
        (4, 257, 8200, 9),
        (1, 300, 392, 64),
    ],
)
def test_reassociated_path_all_bits(M, N, K, r, bits, dtype, path):
    x, qweight, B, A, cb, bias = make(M, N, K, r, bits, dtype, seed=bits * 31 + M + r)
    ref = ref_matmul(x, qweight, B, A, cb, bias)
    for splits in (0, 1, 3):
        poison(M * N * 64)
        y = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, path, splits)
        assert y.shape == (M, N) and y.dtype == dtype
        assert rel(y, ref) < TOL, f"splits={splits}"
    y0 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 0)
    assert rel(y, y0.float()) < TOL
    assert torch.equal(y, torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, path, 3))


def test_wgmma_variant_runs_on_hopper():
    # The default build (sm_90a machine code, setup.py) must run the wgmma variant on a 9.0 GPU, and the
    # two variants must agree closely (same products, different summation order inside the tensor cores).
    feats = torch.ops.lords.cuda_features()
    built = "reassoc_wgmma_built=1" in feats
    if torch.cuda.get_device_capability() == (9, 0) and built:
        assert "reassoc_wgmma_ready=1" in feats, feats
    elif not built:
        pytest.skip(f"extension built without the sm_90a variant ({feats})")
    x, qweight, B, A, cb, bias = make(1, 4096, 4096, 49, 4, seed=5)
    y2 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 2)
    y3 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 3)
    assert rel(y2, y3.float()) < 1e-2


def check_over_splits(x, qweight, B, A, cb, bias, path, splits_list):
    """Path `path` at every split count against the reference (poisoned memory first, so an element left unwritten
    shows), and bit-identical across calls at the last count; returns that result."""
    M, N = x.shape[0], B.shape[0]
    ref = ref_matmul(x, qweight, B, A, cb, bias)
    for splits in splits_list:
        poison(M * N * 64)
        y = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, path, splits)
        assert y.shape == (M, N) and y.dtype == x.dtype
        assert rel(y, ref) < TOL, f"path={path} splits={splits}"
    assert torch.equal(y, torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, path, splits_list[-1]))
    return y


def fused_gemm_ready() -> bool:
    return "fused_gemm_ready=1" in torch.ops.lords.cuda_features()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M,N,K,r",
    [
        (17, 1001, 1024, 17),  # 64-token tile, N neither a multiple of the 128-row block nor of 4
        (64, 4096, 4096, 32),
        (100, 520, 2048, 49),  # 128-token tile, four rank chunks
        (256, 4096, 4096, 32),  # 256-token tile
        (300, 777, 1024, 12),  # two token tiles (256 + 44), one rank chunk
        (129, 384, 3968, 64),  # 31 superchunks: uneven splits
        (400, 17000, 1024, 40),  # 133 row blocks: two 256-token tiles at 4 bits, three of 192 below
        (256, 8576, 1024, 49),  # 67 row blocks: one wave of 256-token tiles at 4 bits, the two-slot ring wraps
        (1, 256, 512, 1),  # one token through the 16-token tile, r = 1
        (13, 1001, 1024, 49),  # 16-token tile, four rank chunks
        (150, 4096, 4096, 49),  # 32 tiles of 192 tokens in three splits at 4 bits (fused_token_tile's cost model)
        (300, 256, 1024, 12),  # two row blocks, the second 256-token tile 44 tokens deep
        (150, 8704, 1024, 49),  # 68 row blocks: one wave of 192-token tiles
        (16, 300, 4096, 33),  # 16-token tile over 32 superchunks: the four-slot ring wraps
        (5, 2000, 4096, 64),
        (40, 1001, 2048, 49),  # 64-token tile above r = 32 (whole-superchunk scale at 4 bits), N odd
    ],
)
def test_fused_gemm_all_bits(M, N, K, r, bits, dtype):
    """Path 4, the sm_90a fused GEMM: every split count (a cluster of up to 8 blocks reduces the partials
    through distributed shared memory) gives the reference result, bit-identically on repeat."""
    if not fused_gemm_ready():
        pytest.skip(f"fused GEMM not runnable here ({torch.ops.lords.cuda_features()})")
    x, qweight, B, A, cb, bias = make(M, N, K, r, bits, dtype, seed=bits * 41 + M + r)
    y = check_over_splits(x, qweight, B, A, cb, bias, 4, (0, 1, 2, 3, 8))
    y1 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 1)
    assert rel(y, y1.float()) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "M,N,K,r",
    [
        (16, 4096, 1024, 32),  # 16-token tile: 32 tiles x 8 superchunks over 50 / 150 blocks
        (5, 1001, 2048, 49),  # N odd, rank chunks of 16 up to 64, one token tile
        (64, 2000, 1024, 17),  # 64-token tile
        (200, 1030, 1024, 64),  # 256-token tile, 200 tokens deep
        (300, 777, 1024, 12),  # two token tiles: units cross token tiles as well as row blocks
        (150, 4096, 2048, 49),  # r > 32 above 128 tokens: the 192- or 256-token tile, the ring handed over by halves
        (16, 14336, 4096, 49),  # 112 tiles of 32 superchunks on one block per SM
    ],
)
def test_fused_gemm_stream_k(M, N, K, r, dtype):
    """Path 5, the fused GEMM on the stream-K schedule (4 bits): for one block per SM (0) and block counts that cut
    tiles in two and three, against the reference and the split-K path, bit-identical on repeat; the flags are left
    lowered (each launch after the first would read stale partials otherwise). Fewer blocks than tiles are raised to
    one per tile (1 and 2 give the same bits: every shape here has more tiles)."""
    if not fused_gemm_ready():
        pytest.skip(f"fused GEMM not runnable here ({torch.ops.lords.cuda_features()})")
    x, qweight, B, A, cb, bias = make(M, N, K, r, 4, dtype, seed=M + r + 5)
    y = check_over_splits(x, qweight, B, A, cb, bias, 5, (0, 1, 3, 7, 13, 50, 150))
    y4 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 4)
    assert rel(y, y4.float()) < TOL
    assert torch.equal(torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 5, 1),
                       torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 5, 2))


@pytest.mark.parametrize("N,K,r,M,stream_k", [
    # Cases whose answer does not depend on how many clusters this GPU runs at once (their plan is one split in one
    # wave, or no split plan is close), in half superchunk steps: split-K waves x (2 x superchunks per split + 3)
    # against stream-K's 2 x superchunks per block + 5 + 2 x SMs / tiles (fused_stream_k_preferred).
    (12288, 4096, 48, 16, True),   # 96 tiles, one split: 67 against 48 + 5 + 2.75
    (12288, 4096, 48, 13, True),
    (14336, 4096, 49, 16, True),   # 112 tiles, one split: 67 against 56 + 5 + 2.36
    (4096, 4096, 32, 16, False),   # 3 or 4 splits: at most 25 against 16 + 5 + 8.25
    (2048, 8192, 25, 16, False),   # 6 splits: 25 against 16 + 5 + 16.5
])
def test_automatic_path_takes_stream_k_by_rule(N, K, r, M, stream_k):
    """Path -1 on the 16-token tile: the stream-K schedule (bit-identical to path 5 on one block per SM) where
    fused_stream_k_preferred holds, the split-K plan (bit-identical to path 4) elsewhere, on a 132-SM GPU."""
    if not fused_gemm_ready() or torch.cuda.get_device_properties(0).multi_processor_count != 132:
        pytest.skip("the fused GEMM on a 132-SM GPU (the H100 SXM)")
    x, qweight, B, A, cb, bias = make(M, N, K, r, 4, seed=N + r + M)
    y = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, -1)
    assert rel(y, ref_matmul(x, qweight, B, A, cb, bias)) < TOL
    expected = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 5 if stream_k else 4)
    assert torch.equal(y, expected)


_PDL_SWITCH_CHECK = """
import torch
import lords_ext.backends.cuda  # noqa: F401  (loads lords_ext._C, which registers the *_cuda ops)
from lords_ext.backends import reference
from lords_ext.formats import get_codebook, pack
gen = torch.Generator().manual_seed(5)
N, K, r, bits = 4096, 1024, 32, 4
q = pack(torch.randint(0, 16, (N, K), generator=gen), bits).cuda()
B = (torch.rand(N, r, generator=gen) + 0.1).div(r ** 0.5).to("cuda", torch.bfloat16)
A = (torch.rand(r, K, generator=gen) + 0.1).mul(0.2 / r ** 0.5).to("cuda", torch.bfloat16)
cb = get_codebook("nf4")[0].cuda()
x = torch.randn(16, K, generator=gen).to("cuda", torch.bfloat16)
xs = [torch.randn(16, K, generator=gen).to("cuda", torch.bfloat16) for _ in range(9)]
ys = []
for i, v in enumerate(xs):  # back to back, each call after an in-place write of x: one split, three, stream-K
    x.copy_(v)
    path, splits = [(4, 1), (4, 3), (5, 0)][i % 3]
    ys.append(torch.ops.lords.dequant_matmul_cuda(x, q, B, A, cb, None, path, splits))
torch.cuda.synchronize()
for v, y in zip(xs, ys):
    ref = reference.dequant_matmul(v.float(), q, B.float(), A.float(), cb, None)
    err = ((y.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < 1e-2, err
print("ok")
"""


@pytest.mark.parametrize("pdl", ["0", "1"])
def test_fused_gemm_pdl_switch(pdl):
    """LORDS_FUSED_PDL=0 / 1 (read once per process, hence a subprocess) turns programmatic dependent launch off /
    on for every fused GEMM launch, stream-K included: results stay right on launches back to back."""
    import os
    import subprocess
    import sys

    if not fused_gemm_ready():
        pytest.skip(f"fused GEMM not runnable here ({torch.ops.lords.cuda_features()})")
    out = subprocess.run([sys.executable, "-c", _PDL_SWITCH_CHECK], env={**os.environ, "LORDS_FUSED_PDL": pdl},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_fused_gemm_stream_k_in_a_graph_and_what_it_rejects():
    if not fused_gemm_ready():
        pytest.skip(f"fused GEMM not runnable here ({torch.ops.lords.cuda_features()})")
    x, qweight, B, A, cb, bias = make(40, 3000, 2048, 40, 4, seed=77)
    torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 5, 37)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 5, 37)
    for seed in range(3):  # replays reuse the same flags: each launch must leave them lowered
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        g.replay()
        torch.cuda.synchronize()
        assert rel(y, ref_matmul(x, qweight, B, A, cb, bias)) < TOL
    x, qweight, B, A, cb, bias = make(16, 512, 1024, 16, 3)
    with pytest.raises(RuntimeError, match="path=5"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 5)


def fused_rule(M, N, K, r, sms):
    """csrc/lords_kernels.h, fused_gemm_preferred, written out once more."""
    if not (2 <= M <= 512 and 1 <= r <= 64):  # M < 6, M > 256, r <= 32 at 4 bits only: the weights here are 4-bit
        return False
    row_blocks = -(-N // 128)
    if r > 32 and M <= 128 and row_blocks * 5 >= 4 * sms:
        return True
    ntok = dispatch.fused_token_tile(M, r, N, K, sms)
    tiles = row_blocks * -(-M // ntok)
    fills = tiles <= sms and tiles * min(K // 128, 8) * 20 >= 9 * sms
    if ntok <= 64:  # 8 splits in one wave; below 13 / 8 tokens only where every tile's 8 splits fit one wave
        return fills and (M >= (13 if r > 32 else 8) or (M >= 3 and tiles * 8 <= sms))
    if fills and tiles * 8 <= sms and M <= 256 and r <= 32:  # the 128- and 256-token tiles likewise
        return True
    if M < (13 if r > 32 else 8):
        return False
    return tiles <= sms and tiles * 8 >= sms


@pytest.mark.parametrize("M,N,r,fused", [(48, 14336, 49, True), (128, 14336, 40, True), (48, 4096, 49, True),
                                          (48, 14336, 32, True), (200, 14336, 49, True), (96, 4096, 49, True),
                                          (200, 4096, 32, True), (100, 4096, 32, True), (256, 14336, 49, True),
                                          (200, 4096, 64, True), (200, 1024, 49, False), (150, 14336, 49, True),
                                          (12, 14336, 49, True), (6, 14336, 64, True), (5, 14336, 49, True),
                                          (2, 14336, 49, True), (12, 4096, 49, False),
                                          (13, 4096, 49, True), (7, 4096, 32, False), (8, 4096, 32, True),
                                          (16, 1024, 12, True), (4, 1024, 12, True), (3, 1024, 49, True),
                                          (2, 1024, 49, False),
                                          (7, 2048, 32, True), (4, 896, 12, False), (4, 2176, 12, False),
                                          (1, 1024, 12, False), (2, 1024, 12, False),
                                          (128, 1024, 12, True), (256, 1024, 12, True), (200, 2048, 21, True),
                                          (384, 1024, 12, False), (100, 896, 12, False), (128, 1024, 49, False),
                                          (16, 4096, 49, True), (64, 1024, 49, True), (384, 4096, 49, True),
                                          (512, 4096, 32, True), (512, 1024, 12, False), (384, 14336, 49, False),
                                          (600, 4096, 32, False), (64, 4096, 32, True), (24, 4096, 16, True),
                                          (16, 4096, 32, True), (80, 4096, 32, True), (40, 1024, 12, True), (40, 896, 12, False)])
def test_fused_gemm_where_the_automatic_path_takes_it(M, N, r, fused):
    """Path -1 runs the fused GEMM exactly where csrc/lords_kernels.h's rule says (bit-identical to path 4),
    elsewhere the decode kernel up to 16 tokens (path 0) and dequantize + cuBLAS above (path 1), both
    bit-identical; the Python dispatch applies the same rule."""
    if not fused_gemm_ready():
        pytest.skip(f"fused GEMM not runnable here ({torch.ops.lords.cuda_features()})")
    x, qweight, B, A, cb, bias = make(M, N, 1024, r, 4, seed=3)
    y_auto = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, -1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    expect = fused_rule(M, N, 1024, r, sms)
    if sms == 132:  # the H100 the fourth column was written for
        assert expect == fused
    other = 0 if M <= 16 else 1
    streamed = N >= 4096 and (M == 2 and 32 < r <= 56 or M == 1 and 64 < r <= 128) and cuda_backend.reassoc_wgmma_ready(x.device)
    path = 2 if streamed else 4 if expect else other  # two tokens at 32 < r <= 56: the streamed-Z kernel first
    assert torch.equal(y_auto, torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, path))
    assert dispatch.fused_gemm_first(x.device, M, r, 1024, N) == expect
    assert rel(y_auto, ref_matmul(x, qweight, B, A, cb, bias)) < TOL


def test_fused_gemm_rejects_what_it_cannot_run():
    x, qweight, B, A, cb, bias = make(32, 256, 1032, 8, 4)  # K not a multiple of 128
    with pytest.raises(RuntimeError, match="path=4"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 4)
    x, qweight, B, A, cb, bias = make(32, 256, 1024, 65, 4)  # r > 64
    with pytest.raises(RuntimeError, match="r=65"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 4)
    # Where it cannot run, the automatic path still does (dequantize + cuBLAS).
    assert rel(torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, -1),
               ref_matmul(x, qweight, B, A, cb, bias)) < TOL


def test_reassociated_path_rejects_wide_inputs():
    x, qweight, B, A, cb, bias = make(5, 512, 1024, 8, 4)
    with pytest.raises(RuntimeError, match="path=2"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 2)
    x, qweight, B, A, cb, bias = make(3, 512, 1024, 48, 4)  # 144 columns
    with pytest.raises(RuntimeError, match="r=48"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 2)
    x, qweight, B, A, cb, bias = make(2, 512, 1024, 49, 4)  # 112 columns: path 2 (wgmma) only, not path 3
    with pytest.raises(RuntimeError, match="path=3"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 3)


def _streamed_z_ready():
    if not cuda_backend.reassoc_wgmma_ready(torch.device("cuda")):
        feats = torch.ops.lords.cuda_features()
        pytest.skip(f"the streamed-Z re-associated kernel needs the sm_90a build on a 9.0 GPU ({feats})")


@pytest.mark.parametrize("M,N,K,r", [(2, 1030, 1024, 49), (2, 300, 2048, 64), (1, 520, 1024, 65), (1, 256, 1024, 128),
                                     (3, 777, 1024, 33), (4, 512, 1024, 32), (2, 4096, 4096, 49), (4, 300, 1024, 17)])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reassociated_streamed_z(M, N, K, r, bits, dtype):
    """Above 64 columns (M * ceil(r/8)*8 up to 128) path 2 writes Z = A * x once and streams it through a ring
    of shared-memory slots: against the reference for every split count, and bit-identical across calls."""
    _streamed_z_ready()
    x, qweight, B, A, cb, bias = make(M, N, K, r, bits, dtype, seed=bits * 7 + M + r)
    check_over_splits(x, qweight, B, A, cb, bias, 2, (0, 1, 3, 8))
    y0 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, None, 0)
    y2 = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, None, 2)
    assert rel(y2, y0.float()) < TOL


@pytest.mark.parametrize("M,N,r,streamed", [(1, 4096, 72, True), (1, 4096, 128, True), (1, 1024, 96, False),
                                              (2, 4096, 49, True), (2, 4096, 64, False), (2, 2048, 49, False)])
def test_reassociated_streamed_z_where_the_automatic_path_takes_it(M, N, r, streamed):
    """Path -1 runs the streamed-Z kernel (path 2) for one token above r = 64 and two tokens at 32 < r <= 56, both
    where N >= 4096 (csrc/lords_kernels.h, reassoc_streamed_preferred); these other cases the direct decode kernel
    (path 0). Bit-identical to the path it takes, and against the reference."""
    _streamed_z_ready()
    x, qweight, B, A, cb, bias = make(M, N, 1024, r, 4, seed=M + r)
    y_auto = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, -1)
    assert rel(y_auto, ref_matmul(x, qweight, B, A, cb, bias)) < TOL
    assert torch.equal(y_auto, torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 2 if streamed else 0))


def test_dispatch_describe_names_the_cuda_op_kernels():
    text = dispatch.describe(torch.device("cuda"))
    assert "re-associated kernel: M = 1 at 16 < r <= 64" in text
    assert ("Z streamed" in text) == cuda_backend.reassoc_wgmma_ready(torch.device("cuda"))
    assert ("reassoc_wgmma_ready=1" in torch.ops.lords.cuda_features()) == cuda_backend.reassoc_wgmma_ready(
        torch.device("cuda"))


def test_reassociated_streamed_z_rejects_what_it_cannot_run():
    _streamed_z_ready()
    x, qweight, B, A, cb, bias = make(2, 4096, 1032, 49, 4)  # K not a multiple of 128
    with pytest.raises(RuntimeError, match="above 64 columns"):
        torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, 2)
    # The automatic path, which would take it for two tokens, runs another kernel there instead.
    y = torch.ops.lords.dequant_matmul_cuda(x, qweight, B, A, cb, bias, -1)
    assert rel(y, ref_matmul(x, qweight, B, A, cb, bias)) < TOL


def test_mixed_dtypes_custom_codebook():
    # fp32 scales and bias, fp16 activations, a custom fp32 codebook: converted on the way in.
    levels = torch.sort(torch.randn(16))[0]
    x, qweight, B, A, cb, bias = make(3, 700, 1024, 24, 4, torch.float16, codebook=levels, scale_dtype=torch.float32)
    bias32 = bias.float()
    ref = ref_matmul(x, qweight, B, A, cb, bias32)
    y = cuda_backend.dequant_matmul(x, qweight, B, A, cb, bias32)
    assert y.dtype == torch.float16 and rel(y, ref) < TOL
    y16 = cuda_backend.dequant_matmul(x, qweight, B, A, cb.to(torch.bfloat16), bias32)
    assert rel(y16, ref_matmul(x, qweight, B, A, cb.to(torch.bfloat16).float(), bias32)) < TOL


def test_split_k_is_deterministic_and_counters_reset():
    x, qweight, B, A, cb, bias = make(4, 4096, 4096, 32, 4, seed=11)
    ys = [cuda_backend.dequant_matmul(x, qweight, B, A, cb, bias) for _ in range(4)]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])
    x2 = torch.randn_like(x)
    y2 = cuda_backend.dequant_matmul(x2, qweight, B, A, cb, bias)
    assert rel(y2, ref_matmul(x2, qweight, B, A, cb, bias)) < TOL


def test_cuda_graph_capture_and_replay():
    x, qweight, B, A, cb, bias = make(1, 2048, 4096, 32, 4, seed=12)
    cuda_backend.dequant_matmul(x, qweight, B, A, cb, bias)  # warm up (counter buffer)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cuda_backend.dequant_matmul(x, qweight, B, A, cb, bias)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x))
        g.replay()
        torch.cuda.synchronize()
        assert rel(y, ref_matmul(x, qweight, B, A, cb, bias)) < TOL


@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("M", [1, 2, 16, 64, 256])
def test_back_to_back_calls_read_inputs_written_just_before(M, graph):
    """On a 9.0 GPU the one-token kernel and the fused GEMM (M = 16, 64, 256 here: 4 bits, r = 32) start before
    the previous kernel in the stream has ended (programmatic dependent launch): every input written by the
    kernel right before a call (x, B, A, the codes, the codebook, the bias; copy_ kernels here) and the previous
    call's workspace and counters must still be read after they are written. Back-to-back calls, each after an
    in-place write of one input, eagerly and replayed from a CUDA graph."""
    N, K, r, bits = 4096, 4096, 32, 4
    x, qweight, B, A, cb, bias = make(M, N, K, r, bits, seed=21)
    gen = torch.Generator().manual_seed(22)
    new = {
        "x": lambda: torch.randn(M, K, generator=gen).to("cuda", x.dtype),
        "B": lambda: ((torch.rand(N, r, generator=gen) + 0.1) / math.sqrt(r)).to("cuda", B.dtype),
        "A": lambda: ((torch.rand(r, K, generator=gen) + 0.1) * (0.2 / math.sqrt(r))).to("cuda", A.dtype),
        "qweight": lambda: pack(torch.randint(0, 1 << bits, (N, K), generator=gen), bits).cuda(),
        "cb": lambda: torch.sort(torch.randn(1 << bits, generator=gen))[0].to("cuda", cb.dtype),
        "bias": lambda: torch.randn(N, generator=gen).to("cuda", bias.dtype),
    }
    plan = [(name, new[name]()) for name in ("x", "B", "x", "A", "qweight", "x", "cb", "bias", "B", "x")]
    inputs = {"x": x, "B": B, "A": A, "qweight": qweight, "cb": cb, "bias": bias}

    def run():
        ys = []
        for name, value in plan:
            inputs[name].copy_(value)
            ys.append(cuda_backend.dequant_matmul(x, qweight, B, A, cb, bias))
        return ys

    run()  # warm up (counter buffer), and the state every replay starts from is the plan's last
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = run()
        g.replay()
    else:
        ys = run()
    torch.cuda.synchronize()
    state = {k: v.clone() for k, v in inputs.items()}
    for (name, value), y in zip(plan, ys):
        state[name] = value
        ref = ref_matmul(state["x"], state["qweight"], state["B"], state["A"], state["cb"], state["bias"])
        assert rel(y, ref) < TOL, f"call after writing {name}"


def test_grad_x_and_public_op(monkeypatch):
    x, qweight, B, A, cb, bias = make(6, 512, 1024, 16, 3, seed=13)
    gy = torch.randn(6, 512, device="cuda", dtype=x.dtype)
    gx = cuda_backend.grad_x(gy, qweight, B, A, cb)
    assert rel(gx, reference.grad_x(gy.float(), qweight, B.float(), A.float(), cb)) < TOL
    import lords_ext  # noqa: F401  (public ops)

    monkeypatch.setenv("LORDS_BACKEND", "cuda")
    y = torch.ops.lords.dequant_matmul(x.view(2, 3, -1), qweight, B, A, cb, bias)
    assert y.shape == (2, 3, 512)
    assert rel(y.reshape(6, 512), ref_matmul(x, qweight, B, A, cb, bias)) < TOL


def test_bad_inputs_name_the_argument():
    x, qweight, B, A, cb, bias = make(2, 256, 512, 8, 4)
    op = torch.ops.lords.dequant_matmul_cuda
    cases = [
        ((x.float(), qweight, B, A, cb, None, -1), "x: expected dtype"),
        ((x.t().contiguous().t(), qweight, B, A, cb, None, -1), "x:"),
        ((x, qweight[:, :-1].contiguous(), B, A, cb, None, -1), "qweight: expected shape"),
        ((x, qweight.to(torch.int8), B, A, cb, None, -1), "qweight: expected dtype"),
        ((x, qweight, B, A, cb[:5].contiguous(), None, -1), "codebook"),
        ((x, qweight, B[:, :4].contiguous(), A, cb, None, -1), "B, A"),
        ((x, qweight, B, A, cb, bias[:-1], -1), "bias: expected shape"),
        ((x, qweight, B, A, cb, None, 7), "path"),
        ((x, qweight, B, A, cb, None, 6), "path"),
        ((torch.randn(17, 512, device="cuda", dtype=x.dtype), qweight, B, A, cb, None, 0), "M <= 16"),
        ((x, qweight.cpu(), B, A, cb, None, -1), "qweight: expected device"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg.replace("(", r"\(")):
            op(*args)
    big_r = torch.randn(256, 129, device="cuda", dtype=x.dtype)
    with pytest.raises(RuntimeError, match=r"r\): expected 1 <= r <= 128"):
        op(x, qweight, big_r, torch.randn(129, 512, device="cuda", dtype=x.dtype), cb, None, -1)


def test_opcheck_backend_ops():
    x, qweight, B, A, cb, bias = make(3, 256, 512, 8, 4)
    torch.library.opcheck(torch.ops.lords.dequant_matmul_cuda.default, (x, qweight, B, A, cb, bias, -1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.lords.dequant_cuda.default, (qweight, B, A, cb),
                          test_utils=("test_schema", "test_faketensor"))
