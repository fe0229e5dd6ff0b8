"""compute-sanitizer target: the CUDA backend ops on a few odd shapes of every bit width, path 2 being the
re-associated kernel (its wgmma variant on an sm_90a build), path 4 the fused wgmma GEMM where it runs (run under
`compute-sanitizer --tool memcheck python3 bench/sanitize_cuda.py`); prints the relative error per case."""
import torch, math, sys, os
sys.path.insert(0, os.getcwd())
from lords_ext.formats import pack, get_codebook
from lords_ext.backends import reference
import lords_ext.backends.cuda  # noqa  loads _C
op = torch.ops.lords.dequant_matmul_cuda
worst = 0
CASES = [(1, 520, 1024, 32, 4, 0), (5, 300, 392, 17, 3, 0), (16, 257, 1032, 64, 2, 0), (4, 600, 1024, 49, 4, 0), (3, 300, 392, 7, 4, 1), (2, 256, 4096, 100, 4, 0),
         (1, 520, 1024, 32, 4, 2), (2, 300, 2048, 24, 3, 2), (1, 700, 1024, 49, 2, 2)]
if "reassoc_wgmma_ready=1" in torch.ops.lords.cuda_features():  # Z streamed above 64 columns
    CASES += [(2, 1030, 1024, 49, 4, 2, 3), (1, 520, 2048, 65, 3, 2, 5), (4, 300, 1024, 32, 2, 2, 0)]
# K = 4096 at 4 bits: 11 superchunks per block, so the producer's ring wraps (waits on the `empty` mbarriers)
CASES += ([(40, 300, 1024, 32, 4, 4), (130, 777, 2048, 49, 3, 4), (300, 200, 1024, 17, 2, 4),
           (40, 130, 4096, 32, 4, 4), (100, 260, 4096, 49, 4, 4),
           # the producer warpgroup at 192 / 256 tokens (setmaxnreg) and the two-slot ring of 256 tokens above r = 32
           (192, 8576, 1024, 40, 4, 4), (256, 8576, 1024, 49, 4, 4), (260, 300, 1024, 20, 4, 4),
           # the 16- and 64-token tiles' whole-superchunk scale (4 bits; 64 tokens above r = 32), rings wrapping
           (12, 300, 4096, 49, 4, 4), (3, 520, 1024, 20, 4, 4), (50, 300, 4096, 49, 4, 4),
           # 6 and 8 splits of the 128- and 256-token tiles (one superchunk per split at K = 1024)
           (128, 1000, 1024, 12, 4, 4, 8), (256, 1030, 1024, 20, 4, 4, 8), (200, 2048, 1024, 21, 4, 4, 6),
           # the stream-K schedule (path 5; the last element is the block count): tiles cut in two and three
           (16, 1030, 1024, 32, 4, 5, 13), (200, 777, 2048, 49, 4, 5, 7), (64, 300, 4096, 17, 4, 5, 0)]
          if "fused_gemm_ready=1" in torch.ops.lords.cuda_features() else [])
for (M, N, K, r, bits, path, *splits) in CASES:
    g = torch.Generator().manual_seed(M)
    cb = get_codebook(f"nf{bits}")[0].cuda()
    q = pack(torch.randint(0, 1 << bits, (N, K), generator=g), bits).cuda()
    B = torch.rand(N, r, generator=g).cuda().bfloat16(); A = torch.rand(r, K, generator=g).cuda().bfloat16()
    x = torch.randn(M, K, generator=g).cuda().bfloat16()
    y = op(x, q, B, A, cb, None, path, splits[0] if splits else 3 if path == 4 else 0)  # three blocks per cluster
    W = torch.ops.lords.dequant_cuda(q, B, A, cb)
    ref = reference.dequant_matmul(x.float(), q, B.float(), A.float(), cb, None)
    e = ((y.double() - ref.double()).norm() / ref.double().norm()).item(); worst = max(worst, e)
    Wref = reference.dequant(q, B.float(), A.float(), cb).double()
    for Wd in (W, torch.ops.lords.dequant_cuda(q, B, A, cb, 3)):  # 3 superchunks per block: partial last block
        worst = max(worst, ((Wd.double() - Wref).norm() / Wref.norm()).item())
    print(M, N, K, r, bits, path, *splits, f"rel {e:.2e}")
torch.cuda.synchronize()
print("sanitize script done, worst rel", worst)
