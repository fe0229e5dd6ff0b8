"""Triton kernels of the LoRDS backend, one algorithm per module:

decode_splitk   M <= 64: fused dequant-GEMV/GEMM, split-K over the grid, one launch
decode_reassoc  M <= 2: y = sum_j B[:, j] * (codebook[Q] @ (A[j] * x)), no per-weight scale
tiled_gemm      mid M: fused tiled GEMM, scale tiles rebuilt per M tile
dequant         W = codebook[Q] * (B @ A) to memory (the dequant op; large M then runs cuBLAS)
grad_x          grad_y @ W without materializing W
grad_scales     grad_B, grad_A from dS = (grad_y^T @ x) * codebook[Q], dS never materialized
Shared pieces (unpacking, look-up, scale tile, split-K epilogue) are in _common, tuning spaces in
_tuning. Launch logic lives in lords_ext/backends/triton_backend.py.
"""
