"""The dispatch policy, exercised without a GPU by faking the compute capability."""
import pytest
import torch

from lords_ext.backends import dispatch


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.mark.parametrize("M,r,first", [(1, 32, "cuda"), (4, 32, "cuda"), (8, 32, "cuda"), (16, 32, "triton"),
                                       (2, 12, "cuda"), (4, 12, "triton"), (16, 12, "triton"),
                                       (1, 49, "cuda"), (2, 49, "cuda"), (4, 49, "cuda"), (8, 49, "cuda"),
                                       (16, 49, "cuda"), (17, 49, "triton"),
                                       (1, 65, "cuda"), (1, 128, "cuda"), (2, 65, "triton"),
                                       (64, 16, "triton"), (65, 16, "cuda"), (4096, 32, "cuda")])
def test_policy_on_hopper(hopper, M, r, first):
    order = dispatch.candidates(torch.device("cuda"), M, r)
    assert order[0] == first and order[-1] == "reference"


@pytest.mark.parametrize("M,r", [(1, 32), (4, 32), (2, 12), (16, 32), (4096, 32), (4096, 100)])
def test_k_off_the_superchunk_puts_triton_first(hopper, M, r):
    """K = 576 (SmolLM2's hidden size) is no multiple of 128: the CUDA kernels would run their byte-wise
    paths, so Triton goes first and CUDA right after it; K = 4096 keeps the measured order."""
    full = dispatch.candidates(torch.device("cuda"), M, r, 4096)
    odd = dispatch.candidates(torch.device("cuda"), M, r, 576)
    assert odd[0] == "triton" and odd[1] == "cuda" and odd[-1] == "reference"
    assert sorted(odd) == sorted(full)
    assert full == dispatch.candidates(torch.device("cuda"), M, r)


@pytest.fixture
def fused_ready(hopper, monkeypatch):
    from lords_ext.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "fused_gemm_ready", lambda device: True)
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)


@pytest.mark.parametrize("M,r,K,N,first,fused", [
    (32, 49, 4096, 14336, "cuda", True),   # the fused GEMM's case: N fills 132 SMs with 128-row blocks
    (128, 64, 4096, 14336, "cuda", True),
    (64, 49, 4096, 1024, "cuda", True),     # 8 tiles x 8 splits in one wave (4 bits)
    (64, 49, 4096, 896, "triton", False),   # 7 tiles: less than 45 % of the SMs
    (32, 32, 4096, 14336, "cuda", True),    # r <= 32 at 4 bits: from M = 17 on
    (16, 49, 4096, 14336, "cuda", True),    # the 16-token tile where N fills the GPU: from M = 2 at 4 bits
    (6, 49, 4096, 14336, "cuda", True),
    (2, 49, 4096, 14336, "cuda", True),
    (1, 49, 4096, 14336, "cuda", False),    # the one-token kernels
    (16, 49, 14336, 4096, "cuda", True),    # split-K at 4 bits: the 16-token tile from M = 13 above r = 32
    (12, 49, 14336, 4096, "cuda", False),   # the decode kernels
    (8, 32, 14336, 4096, "cuda", True),     # ... from M = 8 at r <= 32
    (7, 32, 14336, 4096, "cuda", False),    # the decode kernels
    (32, 49, 576, 14336, "triton", False),  # K off the superchunk
    (32, 49, 4096, None, "triton", False),  # N unknown
])
def test_fused_gemm_rule(fused_ready, M, r, K, N, first, fused):
    assert dispatch.candidates(torch.device("cuda"), M, r, K, N)[0] == first
    assert dispatch.fused_gemm_first(torch.device("cuda"), M, r, K, N) == fused


@pytest.mark.parametrize("M,r,K,N,fused", [
    (128, 49, 14336, 4096, True),    # 32 tiles of 128 x 128 in one wave, split-K fills it
    (256, 49, 14336, 4096, True),
    (96, 64, 14336, 4096, True),
    (64, 49, 14336, 4096, True),     # 32 tiles in clusters of 3 (fused_gemm_plan counts the clusters that fit)
    (17, 49, 14336, 4096, True),
    (16, 49, 14336, 4096, True),     # 32 tiles of 16 tokens at 4 bits (whole-superchunk scale), split-K fills
    (13, 49, 14336, 4096, True),
    (12, 49, 14336, 4096, False),    # the decode kernels
    (256, 49, 4096, 14336, True),    # 112 tiles of 256 tokens (4 bits; 224 of 128 or 192 would take two waves)
    (192, 49, 4096, 14336, True),    # 112 tiles of 192 tokens
    (160, 64, 4096, 14336, True),
    (256, 49, 4096, 1024, False),    # 16 tiles: even 4 splits leave most SMs idle
    (257, 49, 14336, 4096, True),    # up to 512 tokens at 4 bits: 64 tiles of 192 tokens in two splits
    (512, 49, 14336, 4096, True),    # 64 tiles of 256 tokens
    (513, 49, 14336, 4096, False),
    (384, 49, 4096, 14336, False),   # 224 tiles of 192 or 256 tokens: two waves
    (256, 32, 14336, 4096, True),    # r <= 32 above 128 tokens: the 256-token tile, 32 tiles, split-K fills the GPU
    (160, 16, 4096, 14336, True),
    (128, 32, 14336, 4096, True),    # r <= 32 from 17 tokens on at 4 bits: 32 tiles, split-K fills the GPU
    (65, 32, 14336, 4096, True),
    (64, 32, 14336, 4096, True),
    (17, 12, 14336, 4096, True),
    (16, 32, 14336, 4096, True),     # the 16-token tile from 8 tokens at r <= 32
    (8, 32, 14336, 4096, True),
    (7, 32, 14336, 4096, False),     # the decode kernels
    (16, 12, 4096, 1024, True),      # 8 tiles x 8 splits, one wave: 64 blocks, 48 % of 132 SMs (4 bits, <= 64 tokens)
    (4, 12, 4096, 1024, True),       # ... below 8 tokens too, where every tile's 8 splits fit one wave
    (3, 49, 4096, 1024, True),
    (2, 49, 4096, 1024, False),      # M = 2: the decode kernels (9.03 against 9.37 us at r = 49)
    (7, 32, 4096, 2048, True),       # 16 tiles x 8 splits: 128 blocks
    (7, 32, 4096, 2176, False),      # 17 tiles: the decode kernels
    (4, 12, 1024, 1024, True),       # K = 1024: 8 superchunks
    (4, 12, 512, 1024, False),       # K = 512: 4 splits at most
    (1, 12, 4096, 1024, False),      # the one-token kernels
    (64, 12, 4096, 1024, True),
    (64, 12, 4096, 896, False),      # 7 tiles: 56 blocks
    (16, 12, 512, 1024, False),      # K = 512: 4 superchunks, 32 blocks
    (128, 12, 4096, 1024, True),     # the 128-token tile: 8 splits in one wave (r <= 32, M <= 256)
    (256, 32, 4096, 1024, True),     # 8 tiles of 256 tokens, 8 splits
    (384, 32, 4096, 1024, False),    # 16 tiles of 256 tokens: dequantize + cuBLAS
    (200, 21, 4096, 2048, True),     # 16 tiles, 6-7 splits
    (128, 49, 4096, 1024, False),    # r > 32: not measured, dequantize + cuBLAS
])
def test_fused_gemm_rule_split_k_range(fused_ready, M, r, K, N, fused):
    assert dispatch.fused_gemm_first(torch.device("cuda"), M, r, K, N) == fused
    if fused:
        assert dispatch.candidates(torch.device("cuda"), M, r, K, N)[0] == "cuda"


def test_fused_gemm_rule_reads_bits(fused_ready):
    """The 256-token tile above r = 32 and the r <= 32 clause exist at 4 bits only (a producer warpgroup)."""
    cuda = torch.device("cuda")
    assert dispatch.fused_token_tile(256, 49, 14336, 4096, 132) == 256
    assert dispatch.fused_token_tile(256, 49, 14336, 4096, 132, bits=3) == 128
    assert dispatch.fused_token_tile(512, 49, 4096, 14336, 132) == 256
    assert dispatch.fused_token_tile(512, 49, 4096, 14336, 132, bits=3) == 128
    assert dispatch.fused_gemm_first(cuda, 256, 32, 4096, 14336)
    assert not dispatch.fused_gemm_first(cuda, 256, 32, 4096, 14336, bits=2)
    assert dispatch.fused_gemm_first(cuda, 64, 32, 4096, 14336)
    assert not dispatch.fused_gemm_first(cuda, 64, 32, 4096, 14336, bits=3)
    # The op passes the code width on: 2- and 3-bit weights keep POLICY's order (Triton first up to M = 64).
    assert dispatch.candidates(cuda, 32, 32, 4096, 14336)[0] == "cuda"
    assert dispatch.candidates(cuda, 32, 32, 4096, 14336, bits=2)[0] == "triton"
    assert dispatch.candidates(cuda, 32, 49, 4096, 14336, bits=3)[0] == "cuda"  # r > 32: every width
    assert not dispatch.fused_gemm_first(cuda, 256, 49, 4096, 14336, bits=3)  # 224 tiles of 128: two waves
    assert dispatch.fused_gemm_first(cuda, 512, 49, 14336, 4096)
    assert not dispatch.fused_gemm_first(cuda, 512, 49, 14336, 4096, bits=3)  # above 256 tokens at 4 bits only
    # Below 6 tokens, and below 17 where split-K is needed, at 4 bits only (the whole-superchunk scale).
    assert dispatch.fused_gemm_first(cuda, 4, 49, 4096, 14336)
    assert not dispatch.fused_gemm_first(cuda, 4, 49, 4096, 14336, bits=3)
    assert dispatch.fused_gemm_first(cuda, 6, 49, 4096, 14336, bits=3)
    assert dispatch.fused_gemm_first(cuda, 16, 49, 14336, 4096)
    assert not dispatch.fused_gemm_first(cuda, 16, 49, 14336, 4096, bits=2)


@pytest.mark.parametrize("M,r,N,K,tile", [
    (1, 49, 14336, 4096, 16), (16, 49, 14336, 4096, 16), (17, 49, 14336, 4096, 64), (64, 12, 14336, 4096, 64),
    (65, 12, 14336, 4096, 128), (128, 64, 14336, 4096, 128), (129, 32, 14336, 4096, 256), (1024, 20, 1024, 4096, 256),
    (129, 33, 14336, 4096, 192), (192, 49, 14336, 4096, 192),
    (193, 49, 14336, 4096, 256), (256, 49, 14336, 4096, 256),  # one wave of 112 tiles (two of 128 or 192 tokens)
    (300, 49, 14336, 4096, 192),  # two waves of 192 or 256 tokens: the smaller
    # 32 row blocks, 112 superchunks: 32 tiles of 192 or 256 tokens in three splits (96 blocks, 38 superchunks
    # each) before 64 of 128 tokens in two (56 each)
    (150, 49, 4096, 14336, 192), (192, 49, 4096, 14336, 192), (256, 49, 4096, 14336, 256),
    (512, 49, 4096, 14336, 256),  # 64 tiles of 256 tokens in two splits, against 128 of 128 tokens in one
    (400, 49, 8192, 4096, 256),  # 2 x 64 tiles of 256 tokens: one wave (two of 128 or 192)
    (1024, 64, 14336, 4096, 256),  # four waves of 256 tokens against six of 192 or eight of 128
])
def test_fused_token_tile(M, r, N, K, tile):
    assert dispatch.fused_token_tile(M, r, N, K, 132) == tile


def test_fused_token_tile_cost_model():
    """The tile is the argmin of waves x (superchunks per split + 1) x (tokens + SCALE_TOKENS) over 1 to 3
    splits, written out once more on a grid of shapes."""
    for M in range(129, 1100, 37):
        for r in (33, 64):
            for N in (1024, 4096, 8704, 14336):
                for K in (1024, 4096, 14336):
                    for bits in (3, 4):
                        k_super = K // 128
                        costs = {}
                        for t in ((128, 192, 256) if bits == 4 else (128, 192)):
                            tiles = -(-N // 128) * -(-M // t)
                            costs[t] = min(-(-tiles // (132 // s)) * (-(-k_super // s) + 1) * (t + dispatch.SCALE_TOKENS)
                                           for s in range(1, 4))
                        want = min(costs, key=lambda t: (costs[t], t))
                        assert dispatch.fused_token_tile(M, r, N, K, 132, bits) == want, (M, r, N, K, bits, costs)


@pytest.mark.parametrize("M,r,N,tile", [
    (256, 49, 14336, 128), (193, 49, 14336, 128),  # two waves of 128 or 192 tokens: the 128-token tiles cost less
    (400, 49, 8192, 192), (300, 49, 14336, 192),
    (256, 32, 14336, 256),  # r <= 32: 256 tokens at every width (the consumers copy below 4 bits)
])
def test_fused_token_tile_below_4_bits(M, r, N, tile):
    """No 256-token tile above r = 32 below 4 bits: three slots do not fit and only the 4-bit kernel's
    producer warpgroup lets a two-slot ring run."""
    assert dispatch.fused_token_tile(M, r, N, 4096, 132, bits=3) == tile


def test_fused_gemm_rule_needs_the_kernel(hopper, monkeypatch):
    from lords_ext.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "fused_gemm_ready", lambda device: False)
    monkeypatch.setattr(dispatch, "_sm_count", lambda device: 132)
    assert dispatch.candidates(torch.device("cuda"), 32, 49, 4096, 14336)[0] == "triton"


def test_policy_before_ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert dispatch.candidates(torch.device("cuda"), 1, 8) == ("reference",)


def test_cpu_runs_the_reference(monkeypatch):
    monkeypatch.delenv("LORDS_BACKEND", raising=False)
    assert dispatch.candidates(torch.device("cpu"), 1, 8) == ("reference",)
    assert dispatch.choose("dequant_matmul", torch.empty(1, 8), 1, 8) == "reference"


def test_forced_backend_must_be_able_to_run(monkeypatch):
    monkeypatch.setenv("LORDS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="LORDS_BACKEND=triton"):
        dispatch.choose("dequant_matmul", torch.empty(1, 8), 1, 8)


def test_choose_is_cached_per_signature_and_env(monkeypatch):
    calls = []
    real = dispatch._choose

    def counting(op, t, M, rank, K=None, N=None, bits=4):
        calls.append((op, M, rank))
        return real(op, t, M, rank, K, N, bits)

    monkeypatch.setattr(dispatch, "_choose", counting)
    monkeypatch.delenv("LORDS_BACKEND", raising=False)
    dispatch.clear_cache()
    x = torch.empty(3, 8)
    for _ in range(3):
        assert dispatch.choose("dequant_matmul", x, 3, 8) == "reference"
    assert calls == [("dequant_matmul", 3, 8)]
    dispatch.choose("dequant_matmul", x, 5, 8)          # another M
    dispatch.choose("grad_x", x, 3, 8)                  # another op
    dispatch.choose("dequant_matmul", x.double(), 3, 8)  # another dtype
    assert len(calls) == 4
    dispatch.choose("dequant_matmul", x, 3, 8, 576)     # K off the 128-wide superchunk: decided anew
    dispatch.choose("dequant_matmul", x, 3, 8, 4096)    # a multiple of 128: the same answer as K unknown
    assert len(calls) == 5
    dispatch.choose("dequant_matmul", x, 3, 8, None, None, 2)  # another code width (the fused GEMM rule reads it)
    dispatch.choose("grad_x", x, 3, 8, None, None, 2)           # ... for dequant_matmul only
    assert len(calls) == 6
    monkeypatch.setenv("LORDS_BACKEND", "reference")    # the override is part of the key
    assert dispatch.choose("dequant_matmul", x, 3, 8) == "reference" and len(calls) == 7
    monkeypatch.setenv("LORDS_BACKEND", "triton")        # errors are raised again, never cached
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="LORDS_BACKEND=triton"):
            dispatch.choose("dequant_matmul", x, 3, 8)
    assert len(calls) == 9
    dispatch.clear_cache()


def test_public_ops_pass_k_to_the_dispatch(monkeypatch):
    """The K rule needs the weight's input features from every public op (A.shape[1], odd here), the fused
    GEMM rule the output features and the code width from dequant_matmul."""
    import lords_ext  # noqa: F401  (registers torch.ops.lords.*)
    from lords_ext.formats import get_codebook, pack

    seen = []
    real = dispatch.choose

    def spy(op, t, M, rank=None, K=None, N=None, bits=4):
        seen.append((op, M, rank, K, N, bits))
        return real(op, t, M, rank, K, N, bits)

    monkeypatch.setattr(dispatch, "choose", spy)
    monkeypatch.delenv("LORDS_BACKEND", raising=False)
    N, K, r = 24, 40, 3
    codes = torch.randint(0, 16, (N, K))
    q, cb = pack(codes, 4), get_codebook("nf4")[0]
    B = torch.rand(N, r, requires_grad=True)
    A = torch.rand(r, K, requires_grad=True)
    x = torch.randn(5, K, requires_grad=True)
    torch.ops.lords.dequant(q, B.detach(), A.detach(), cb)
    torch.ops.lords.dequant_matmul(x, q, B, A, cb, None).sum().backward()
    ops = {op: (M, rank, k) for op, M, rank, k, _, _ in seen}
    assert ops["dequant"] == (N, r, K) and ops["dequant_matmul"] == (5, r, K)
    assert [(n, b) for op, *_, n, b in seen if op == "dequant_matmul"] == [(N, 4)]  # the fused GEMM rule's N, bits
    torch.ops.lords.dequant_matmul(x.detach(), pack(codes % 4, 2), B.detach(), A.detach(), get_codebook("nf2")[0], None)
    assert [b for op, *_, b in seen if op == "dequant_matmul"] == [4, 2]
    assert ops["grad_x"][2] == K and ops["grad_scales"][2] == K
