// The scale tile on wgmma (sm_90a), for the fused GEMM (fused_gemm.cu) and any other kernel that rebuilds it the
// same way (the dequantize kernel of bench/wip/dequant_wgmma.patch): S[64 rows, positions] = B[64 rows, 16 ranks] @ A[16 ranks, positions] per rank chunk, B rows
// from registers (load_B_frags, the A-operand layout of wgmma's register form), A[:, superchunk] in shared memory
// in the MN-major layout below, read by the tensor cores through a descriptor.
#pragma once

#include "lords_tile.cuh"
#include "wgmma_rs.cuh"

#include <cstdint>

namespace lords {

// A slot for the scale wgmma (4 bits): wgmma's MN-major no-swizzle layout for B = A[ranks, positions] (K =
// ranks, N = positions), core matrices of 8 ranks x 8 positions (16 bytes per rank, 128 contiguous bytes), core
// (rank group jg, 8-position chunk c) at jg * 2048 + c * 128: the descriptor's leading-dimension offset is the
// step along K (2048), the stride-dimension offset the step along N (128); the other reading gave wrong
// results on the H100. Thread tid copies rank 8 jg + tid % 8, chunk 4 cb
// + (tid / 8) % 4: the eight ranks of a store phase lie in distinct banks (a chunk-major lane order put the 16 chunks
// of one rank in one bank group).
template <typename T, int RT, int NT>
__device__ __forceinline__ void copy_A_mn(uint32_t slot, const T* __restrict__ A, int r, long K, long kbase, int tid) {
  constexpr int kWarps = NT / 32;
  static_assert((8 * RT) % kWarps == 0, "whole (rank group, chunk quarter) units per warp");
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(A);
  const int j8 = tid % 8, cq = (tid / 8) % 4, w = tid / 32;  // chunk 4 cb + cq of rank 8 jg + j8
  const uint32_t dst = slot + cq * 128 + j8 * 16;
  const uint16_t* src = a16 + (long)j8 * K + kbase + 8 * cq;
#pragma unroll
  for (int i = 0; i < 8 * RT / kWarps; ++i) {
    const int u = w + i * kWarps, jg = u / 4, cb = u % 4;
    const bool ok = 8 * jg + j8 < r;
    cp_async16(dst + jg * 2048 + cb * 512, ok ? src + (long)jg * 8 * K + 32 * cb : a16, ok ? 16 : 0);
  }
}
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Every descriptor is a slot's base descriptor plus (byte offset >> 4), added to the low word alone (the start
// field never carries, smem_desc): built from the address each time, a descriptor cost six uniform-datapath
// instructions (add, mask, shift, or, two moves), 35 % of the kernel's instructions at 16 tokens (ncu, H100,
// 14336x4096, session 12); with the base hoisted out of the k-tile loop, one add.
__device__ __forceinline__ uint64_t desc_plus(uint64_t base, uint32_t byte_offset) {
  return (base >> 32 << 32) | (uint32_t)((uint32_t)base + (byte_offset >> 4));
}
// The base goes through an empty asm: otherwise the compiler, knowing the bit fields of the base, re-masks the
// sum (one more instruction per wgmma).
__device__ __forceinline__ uint64_t opaque(uint64_t v) {
  asm("" : "+l"(v));
  return v;
}
__device__ __forceinline__ uint64_t a_mn_base_desc(uint32_t aslot) { return opaque(smem_desc(aslot, 2048, 128)); }
__device__ __forceinline__ uint64_t a_mn_desc(uint64_t abase, int s, int c) {
  return desc_plus(abase, c * 4096 + 2 * s * 128);
}
#endif

}  // namespace lords
