"""Launches the CUDA decode kernels a few times on one shape, for Nsight Compute (ncu) to profile.
PATH is a dequant_matmul_cuda path (0 direct, 1 dequant + cuBLAS, 2 re-associated) or dq<S>: the dequant
kernel alone with S superchunks per block (0 = its own choice).

    ncu --kernel-name regex:'reassoc|decode_gemm' --launch-skip 2 --launch-count 2 \
        --section SpeedOfLight --section WarpStateStats --section Occupancy python3 bench/ncu_decode.py 4096 4096 1
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.getcwd())

import lords_ext.backends.cuda  # noqa: E402,F401  (registers torch.ops.lords.*_cuda)
from lords_ext.formats import get_codebook  # noqa: E402
from lords_ext.quantize import parity_rank  # noqa: E402

N, K, M = (int(v) for v in sys.argv[1:4])
paths = (sys.argv[4] if len(sys.argv) > 4 else "2,0").split(",")
r = parity_rank(N, K, 64)
dev = torch.device("cuda")
q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
B = ((torch.rand(N, r, device=dev) + 0.5) / math.sqrt(r)).bfloat16()
A = ((torch.rand(r, K, device=dev) + 0.5) / math.sqrt(r)).bfloat16()
x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
cb = get_codebook("nf4")[0].to(dev)
for path in paths:
    for _ in range(4):
        if path.startswith("dq"):
            torch.ops.lords.dequant_cuda(q, B, A, cb, int(path[2:]))
        else:
            torch.ops.lords.dequant_matmul_cuda(x, q, B, A, cb, None, int(path), 0)
torch.cuda.synchronize()
print("done", N, K, M, r, paths)
