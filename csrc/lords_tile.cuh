// Tensor-core building blocks shared by the LoRDS kernels (decode_gemm.cu, dequant.cu).
//
// The central trick: a k-permutation that lets every thread read its codes with one wide load
// straight from the CANONICAL packing, with no shared-memory round trip and no prepacked layout.
//
// An mma.sync m16n8k16 A-operand gives lane (g = lane/4, t = lane%4) the elements at rows g, g+8 and
// k-positions {2t, 2t+1, 2t+8, 2t+9}. A sum over k does not care which real k each position stands
// for, as long as every operand uses the same map. We pick, for a "superchunk" of 128 consecutive k
// split into 8 k-tiles s = 0..7:
//
//     real_k(s, p) = 32 * ((p % 8) / 2) + 4 * s + (p % 2) + 2 * (p / 8)
//
// so lane t's four positions in k-tile s are real k = 32t + 4s + {0,1,2,3}: over the 8 k-tiles a lane
// touches exactly the 32 consecutive codes 32t .. 32t+31 of each of its two rows. Those are 16 bytes
// at 4 bits (one 16-byte load), 8 bytes at 2 bits, 12 bytes at 3 bits, read directly from the
// canonical packing. The other operands follow the same map:
//   * x (the B operand of the product mma, swap-AB: weights are the 16-row side, tokens the 8 side)
//     needs x[m, 32t + 4s .. 32t + 4s + 3]: 8 contiguous bytes per k-tile;
//   * A (the B operand of the scale mma, S = B @ A) streams through shared memory one superchunk at a
//     time in position order (the A ring below), read with one ldmatrix.trans per k-tile and 16 ranks.
//
// The scale tile S[16 n x 16 k] comes out of two scale mmas (k-positions 0..7 and 8..15) as C
// fragments whose register layout is exactly the A-operand layout of the next mma (the same fact
// FlashAttention uses for P), so W = codebook[Q] * S is formed in registers in fp32 and never
// touches memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lords {

constexpr int kSuper = 128;  // k per superchunk: 4 lanes x 32 codes
constexpr int kWarps = 8;    // warps per block of the decode kernel (decode_gemm.cu doubles it at RT = 4)

// Runtime element kinds for the small operands read once per block (codebook, bias), so their dtype
// does not multiply the number of kernel instantiations.
enum ScalarKind : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

__host__ __device__ __forceinline__ long min_l(long a, long b) { return a < b ? a : b; }

__device__ __forceinline__ float load_scalar(const void* p, int kind, long i) {
  if (kind == kF32) return static_cast<const float*>(p)[i];
  if (kind == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

template <typename T>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  // Two paired products, rounded once (HMUL2.BF16 on sm_90).
  static __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __nv_bfloat162 p = __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&p);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ uint32_t mul2(uint32_t a, uint32_t b) {
    __half2 p = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&p);
  }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// A hint that brings p's line into L2 (no register, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// Codes are read once: keep them out of L1 so x and the scale operands stay there. The loads and the
// mma are both `asm volatile`, so the compiler keeps their program order: the next superchunk's code
// loads stay issued before this superchunk's mmas (the prefetch) instead of being sunk after them.
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_stream_v2(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_stream_u32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}

// One lane's 32 codes of one row for one superchunk, as packed words (4 bits: 4 words, 3 bits: 3,
// 2 bits: 2). `fast` (K % 128 == 0, 16-byte aligned rows) uses wide loads; otherwise bytes are read
// one by one up to the row's end and the rest is zero (the matching x and A entries are zero too).
template <int BITS>
struct Codes {
  static constexpr int kWords = BITS;  // 32 codes * BITS bits / 32
  uint32_t w[kWords];

  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < kWords; ++i) w[i] = 0u;
  }

  // The lane's 32 codes starting at p (aligned, inside the row): the wide-load path alone.
  __device__ __forceinline__ void load_fast(const uint8_t* p) {
    if constexpr (BITS == 4) {
      uint4 v = ld_stream_v4(p);
      w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
    } else if constexpr (BITS == 2) {
      uint2 v = ld_stream_v2(p);
      w[0] = v.x; w[1] = v.y;
    } else {
      w[0] = ld_stream_u32(p); w[1] = ld_stream_u32(p + 4); w[2] = ld_stream_u32(p + 8);
    }
  }

  __device__ __forceinline__ void load(const uint8_t* row, long k_first, long row_bytes, bool fast) {
    const long byte0 = k_first * BITS / 8;
    if (fast) {
      load_fast(row + byte0);
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) {
        uint32_t v = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          long idx = byte0 + 4 * i + b;
          if (idx < row_bytes) v |= static_cast<uint32_t>(__ldg(row + idx)) << (8 * b);
        }
        w[i] = v;
      }
    }
  }

  // The 4 codes of k-tile s (real k = 32t + 4s + j, j = 0..3). Called with s known after unrolling,
  // so every word index below is a compile-time constant and w[] stays in registers.
  __device__ __forceinline__ void quad(int s, uint32_t (&q)[4]) const {
    const uint32_t v = raw(s);
    constexpr uint32_t mask = (1u << BITS) - 1u;
#pragma unroll
    for (int j = 0; j < 4; ++j) q[j] = (v >> (BITS * j)) & mask;
  }

  // The same quad as one unmasked word: its low 4*BITS bits are codes j = 0..3, BITS bits each.
  __device__ __forceinline__ uint32_t raw(int s) const {
    uint32_t v;
    if constexpr (BITS == 4) {
      v = w[s / 2] >> (16 * (s % 2));
    } else if constexpr (BITS == 2) {
      v = w[s / 4] >> (8 * (s % 4));
    } else {
      // 12 bits at bit 12*s of the lane's 96-bit little-endian run (24-bit groups of 8 codes); a
      // quad may straddle two words, hence the 64-bit window (a funnel shift in SASS).
      const int bit = 12 * s, wi = bit / 32;
      const uint64_t win = (static_cast<uint64_t>(w[wi + 1 < kWords ? wi + 1 : wi]) << 32) | w[wi];
      v = static_cast<uint32_t>(win >> (bit % 32));
    }
    return v;
  }
};

// The A ring (decode_gemm.cu, dequant.cu): A[:, 128 k] of one superchunk per shared-memory slot, copied
// with cp.async while the warps work on an earlier slot. A slot holds RT*16 rank rows of kPosPad 16-bit
// entries in mma position order (position 16 s + p of k-tile s, real k as in the map at the top): real
// k pairs (2i, 2i+1) stay adjacent in that order, so the copy is one 4-byte cp.async per pair, and one
// ldmatrix.x4.trans per (k-tile, 16 ranks) gives the scale mma's B fragments (ranks 2t, 2t+1 of
// position g) in the order scale_frags takes them. The 8 padding entries per row put the 8 rows an
// ldmatrix phase reads in distinct banks (row stride 272 bytes).
constexpr int kPosPad = kSuper + 8;
__host__ __device__ constexpr int a_slot_bytes(int rt) { return rt * 16 * kPosPad * 2; }

__device__ __forceinline__ void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes) {
  if (bytes == 4)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ uint4 ldsm_x4_trans(uint32_t addr) {
  uint4 v;
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}
// This lane's ldmatrix row address within a slot: matrix lane / 8 = (ranks + 8?, positions + 8?), row
// lane % 8. Fragments of k-tile s, ranks 16c .. 16c+15: ldsm_x4_trans(slot + this + (16c*kPosPad + 16s)*2).
__device__ __forceinline__ uint32_t a_frag_lane_offset(int lane) {
  return (uint32_t)((((lane / 8) % 2) * 8 + lane % 8) * kPosPad + (lane / 16) * 8) * 2;
}

// Copies superchunk `kbase .. kbase + 127` of A into a slot with cp.async (ranks >= r zero-filled); needs
// K % 128 == 0 and a 16-byte aligned A. Thread i takes pair u = i % 64 (real k = 2u, 2u + 1 = 32 q + 4 s +
// 2 h + {0, 1}) of rank rows i / 64 + NTHREADS / 64 * it: a warp reads 128 consecutive bytes of a row,
// the pair lands at position 16 s + 2 q + 8 h, and from one row to the next only the row offsets move
// (the first version recomputed every index per copy and spent more instructions on the copies than
// the main loop on its mmas: ncu, 14336x4096, M = 2).
template <typename T, int RT, int NTHREADS>
__device__ __forceinline__ void copy_A_async(uint32_t slot, const T* __restrict__ A, int r, long K, long kbase) {
  static_assert(NTHREADS % 64 == 0 && (RT * 16 * 64) % NTHREADS == 0, "whole rank rows per pass");
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(A);
  const int u = threadIdx.x % 64, j0 = threadIdx.x / 64;
  const int pos = 16 * ((u % 16) / 2) + 2 * (u / 16) + 8 * (u % 2);
  constexpr int kRowStep = NTHREADS / 64;
  // A running source pointer: written as src + it * step, the compiler kept every row offset live across
  // the main loop (255 registers at RT = 8).
  const uint16_t* src = a16 + (long)j0 * K + kbase + 2 * u;
  const long step = (long)kRowStep * K;
  const uint32_t dst = slot + (uint32_t)(j0 * kPosPad + pos) * 2;
#pragma unroll
  for (int it = 0; it < RT * 16 / kRowStep; ++it) {
    const bool ok = j0 + it * kRowStep < r;
    cp_async(dst + it * kRowStep * kPosPad * 2, ok ? src : a16, 4, ok ? 4 : 0);
    src += step;
  }
}

// 4-bit codes in the natural k order. With k-tile s = real k 16 s .. 16 s + 15 of a superchunk (no
// permutation), lane t's mma positions 2t, 2t+1 and 2t+8, 2t+9 are the code bytes 8 s + t and 8 s + 4 + t of
// the row's 64 bytes: byte t of every word. The 16-byte load still gives lane t bytes 16 t .. 16 t + 15
// (words 4t .. 4t+3), so the four lanes of a row exchange bytes: word q of lane t afterwards holds byte t
// of words 4q .. 4q + 3, which puts k-tile s's pairs at bytes 2 (s % 2) and 2 (s % 2) + 1 of word s / 2:
// the layout Codes<4>::raw and weight_frag_pairs read for the permuted order. A byte transpose inside each
// lane (8 PRMT), then a 4 x 4 word transpose across the lanes of a quad in two butterfly steps (4 SHFL, 12
// SEL): 24 instructions per row and superchunk. In the permuted order fused_gemm.cu copied x 4 bytes at a
// time: 64 copies per thread and superchunk at 256 tokens, 66 % of the executed instructions (ncu, 1024
// tokens on 4096x4096); in the natural order x and A are 16-byte copies.
__device__ __forceinline__ void natural_quads(uint32_t (&w)[4], int t) {
  const uint32_t a = __byte_perm(w[0], w[1], 0x5140), b = __byte_perm(w[2], w[3], 0x5140);
  const uint32_t c = __byte_perm(w[0], w[1], 0x7362), d = __byte_perm(w[2], w[3], 0x7362);
  // m[k] = byte k of w[0 .. 3]: what lane k of the quad needs from this lane.
  uint32_t m[4] = {__byte_perm(a, b, 0x5410), __byte_perm(a, b, 0x7632), __byte_perm(c, d, 0x5410),
                   __byte_perm(c, d, 0x7632)};
  // Step 1, lanes t and t ^ 2 swap the off-diagonal 2 x 2 blocks.
  const bool hi = t & 2;
  uint32_t r0 = __shfl_xor_sync(0xffffffffu, hi ? m[0] : m[2], 2);
  uint32_t r1 = __shfl_xor_sync(0xffffffffu, hi ? m[1] : m[3], 2);
  const uint32_t n0 = hi ? r0 : m[0], n1 = hi ? r1 : m[1], n2 = hi ? m[2] : r0, n3 = hi ? m[3] : r1;
  // Step 2, lanes t and t ^ 1 transpose inside each block.
  const bool lo = t & 1;
  r0 = __shfl_xor_sync(0xffffffffu, lo ? n0 : n1, 1);
  r1 = __shfl_xor_sync(0xffffffffu, lo ? n2 : n3, 1);
  w[0] = lo ? r0 : n0;
  w[1] = lo ? n1 : r0;
  w[2] = lo ? r1 : n2;
  w[3] = lo ? n3 : r1;
}

// The same copy off the vector path (any K, unaligned A): element loads with bounds, shared stores.
template <typename T, int RT>
__device__ __forceinline__ void copy_A_bytes(uint16_t* slot_ptr, const T* __restrict__ A, int r, long K, long kbase) {
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(A);
  for (int i = threadIdx.x; i < RT * 16 * 64; i += blockDim.x) {
    const int j = i / 64, u = i % 64;
    const int pos = 16 * ((u % 16) / 2) + 2 * (u / 16) + 8 * (u % 2);
    const long k = kbase + 2 * u;
    uint32_t v = 0;
    if (j < r) {
      if (k < K) v = a16[(long)j * K + k];
      if (k + 1 < K) v |= uint32_t(a16[(long)j * K + k + 1]) << 16;
    }
    *reinterpret_cast<uint32_t*>(slot_ptr + j * kPosPad + pos) = v;
  }
}

// A-operand fragments of B[n0 : n0+16, :] for the scale mma, one set of 4 registers per 16 ranks.
// Read once per block: rank pairs as one 4-byte load where r is even (memory order = register
// order), element by element otherwise; rows past N and ranks past r are zero.
template <typename T, int RT>
__device__ __forceinline__ void load_B_frags(uint32_t (&f)[RT][4], const T* __restrict__ Bm, long N, int r,
                                             long n0, int lane) {
  const int g = lane / 4, t = lane % 4;
  const bool pairs = (r % 2 == 0) && (reinterpret_cast<uintptr_t>(Bm) % 4 == 0);
  if (pairs) {
#pragma unroll
    for (int c = 0; c < RT; ++c)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const long n = n0 + g + 8 * (i % 2);
        const int j = 16 * c + 2 * t + 8 * (i / 2);
        f[c][i] = (n < N && j < r) ? __ldg(reinterpret_cast<const unsigned int*>(Bm + n * r + j)) : 0u;
      }
    return;
  }
  // Odd r: element loads. The 16-bit patterns are paired as they are (the same bits as converting to
  // fp32 and back), and every load is issued before the first is used: converting each element as it
  // arrived put one L2 round trip per few elements on the prologue's critical path (ncu, r = 49: the
  // conversions' long-scoreboard stalls were ~30 % of the direct kernel's prologue samples).
  const uint16_t* b16 = reinterpret_cast<const uint16_t*>(Bm);
  uint16_t v[RT][4][2];
#pragma unroll
  for (int c = 0; c < RT; ++c)
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const long n = n0 + g + 8 * (i % 2);
        const int j = 16 * c + 2 * t + 8 * (i / 2) + e;
        v[c][i][e] = (n < N && j < r) ? __ldg(b16 + n * r + j) : uint16_t(0);
      }
#pragma unroll
  for (int c = 0; c < RT; ++c)
#pragma unroll
    for (int i = 0; i < 4; ++i) f[c][i] = uint32_t(v[c][i][0]) | (uint32_t(v[c][i][1]) << 16);
}

// Adds the scale tile of one 16x16 weight tile, S_tile = B_frag @ A_stage (2*RT mmas), to s0 and s1 in
// the mma accumulator layout: s0 for k-positions 2t, 2t+1, s1 for 2t+8, 2t+9 of rows g and g+8.
template <typename T, int RT>
__device__ __forceinline__ void scale_frags(float (&s0)[4], float (&s1)[4], const uint32_t (&bf)[RT][4],
                                            const uint4 (&af)[RT]) {
#pragma unroll
  for (int c = 0; c < RT; ++c) {
    Mma<T>::mma(s0, bf[c], af[c].x, af[c].y);
    Mma<T>::mma(s1, bf[c], af[c].z, af[c].w);
  }
}

// 4-bit codes: quad s of a lane's 32 codes is the 16 bits at bit 16*(s%2) of word s/2, so its code pairs
// (0, 1) and (2, 3) are bytes 2*(s%2) and 2*(s%2) + 1. __byte_perm(word, lane_bytes, selector) with this
// selector puts pair (0, 1) in result byte 1 and lane_bytes' bytes 0 and 1 in result bytes 0 and 2, 3
// (lane_bytes < 256, so those are the lane offset and zeros): a table byte offset (pair << 8) | lane
// offset in one PRMT. Pair (2, 3): selector + 0x10.
__device__ __forceinline__ uint32_t quad_pair_selector(int s) { return 0x5504u | ((2u * (s % 2)) << 4); }

// W fragment (A-operand layout) of one 16x16 tile for k-tile s:
// S_tile = B_frag @ A_stage via 2*RT mmas, then W = codebook[code] * S_tile in fp32, packed to T.
// (The halves on their own, for callers that issue the scale mmas earlier: lookup_codes gives the levels
// of k-tile s in the order of the scale accumulators, s0[0..3] then s1[0..3], and pack_weights multiplies.)
template <int BITS>
__device__ __forceinline__ void lookup_codes(float (&lv)[8], const Codes<BITS>& lo, const Codes<BITS>& hi,
                                             const float* lut, int s) {
  uint32_t qa[4], qb[4];
  lo.quad(s, qa);
  hi.quad(s, qb);
  // positions 2t, 2t+1 -> codes 0, 1 of the quad; positions 2t+8, 2t+9 -> codes 2, 3.
  const uint32_t q[8] = {qa[0], qa[1], qb[0], qb[1], qa[2], qa[3], qb[2], qb[3]};
#pragma unroll
  for (int i = 0; i < 8; ++i) lv[i] = lut[q[i]];
}
template <typename T>
__device__ __forceinline__ void pack_weights(uint32_t (&wf)[4], const float (&lv)[8], const float (&s0)[4],
                                             const float (&s1)[4]) {
  wf[0] = Mma<T>::pack(lv[0] * s0[0], lv[1] * s0[1]);
  wf[1] = Mma<T>::pack(lv[2] * s0[2], lv[3] * s0[3]);
  wf[2] = Mma<T>::pack(lv[4] * s1[0], lv[5] * s1[1]);
  wf[3] = Mma<T>::pack(lv[6] * s1[2], lv[7] * s1[3]);
}
template <typename T, int BITS>
__device__ __forceinline__ void apply_codes(uint32_t (&wf)[4], const float (&s0)[4], const float (&s1)[4],
                                            const Codes<BITS>& lo, const Codes<BITS>& hi, const float* lut, int s) {
  float lv[8];
  lookup_codes<BITS>(lv, lo, hi, lut, s);
  pack_weights<T>(wf, lv, s0, s1);
}
template <typename T, int BITS, int RT>
__device__ __forceinline__ void weight_frag(uint32_t (&wf)[4], const uint32_t (&bf)[RT][4], const uint4 (&af)[RT],
                                            const Codes<BITS>& lo, const Codes<BITS>& hi, const float* lut, int s) {
  float s0[4] = {0.f, 0.f, 0.f, 0.f};
  float s1[4] = {0.f, 0.f, 0.f, 0.f};
  scale_frags<T, RT>(s0, s1, bf, af);
  apply_codes<T, BITS>(wf, s0, s1, lo, hi, lut, s);
}

// 4-bit W fragment from a pair table: entry p (a byte of two codes, low nibble first) holds the fp32
// levels (codebook[p & 15], codebook[p >> 4]), one 8-byte copy per lane, so lane l's copy of entry p
// sits at byte (p << 8) | (l << 3) of the table: one PRMT (code byte into bits 8..15, lane8 = 8 * lane
// in bits 0..7) and one LDS.64 per pair of weights, instead of a shift, a mask and an LDS per weight.
// Same fp32 products and rounding as weight_frag.
__device__ __forceinline__ void lookup_code_pairs(float (&lv)[8], const Codes<4>& lo, const Codes<4>& hi,
                                                  uint32_t table, uint32_t lane8, int s) {
  auto pair = [&](int i, uint32_t w, uint32_t sel) {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];"
                 : "=f"(lv[2 * i]), "=f"(lv[2 * i + 1])
                 : "r"(table + __byte_perm(w, lane8, sel)));
  };
  const uint32_t wa = lo.w[s / 2], wb = hi.w[s / 2];
  const uint32_t sel0 = quad_pair_selector(s), sel1 = sel0 + 0x10u;
  pair(0, wa, sel0);
  pair(1, wb, sel0);
  pair(2, wa, sel1);
  pair(3, wb, sel1);
}
template <typename T>
__device__ __forceinline__ void apply_code_pairs(uint32_t (&wf)[4], const float (&s0)[4], const float (&s1)[4],
                                                 const Codes<4>& lo, const Codes<4>& hi, uint32_t table,
                                                 uint32_t lane8, int s) {
  float lv[8];
  lookup_code_pairs(lv, lo, hi, table, lane8, s);
  pack_weights<T>(wf, lv, s0, s1);
}
template <typename T, int RT>
__device__ __forceinline__ void weight_frag_pairs(uint32_t (&wf)[4], const uint32_t (&bf)[RT][4],
                                                  const uint4 (&af)[RT], const Codes<4>& lo, const Codes<4>& hi,
                                                  uint32_t table, uint32_t lane8, int s) {
  float s0[4] = {0.f, 0.f, 0.f, 0.f};
  float s1[4] = {0.f, 0.f, 0.f, 0.f};
  scale_frags<T, RT>(s0, s1, bf, af);
  apply_code_pairs<T>(wf, s0, s1, lo, hi, table, lane8, s);
}

// The pair table of weight_frag_pairs (64 KB) from the 16 levels in shared memory, by threads tid = 0 ..
// nthreads - 1.
__device__ __forceinline__ void build_pair_table(uint4* table, const float* lut, int tid, int nthreads) {
  for (int w = tid; w < 256 * 16; w += nthreads) {  // entry w / 16, lanes 2 * (w % 16) and +1
    const int p = w / 16;
    const uint32_t lo = __float_as_uint(lut[p & 15]), hi = __float_as_uint(lut[p >> 4]);
    table[w] = make_uint4(lo, hi, lo, hi);
  }
}
constexpr size_t kPairTableBytes = 256 * 32 * 8;

// Split-K epilogue shared by the decode kernels. Each block has written its fp32 partials to
// ws[split][m][n]; the last block of a row range to arrive (atomic counter, then re-zeroed for the next
// call) adds them in split order, so the result does not depend on scheduling. The partial loads are
// issued 16 at a time: a serial chain of one L2 round trip per split (the first version) cost about
// 0.4 us per split, more than the whole kernel's main loop at M = 1.
// One fence per block, by the thread that arrives (the pattern of cooperative groups' grid sync): the block
// barrier orders every thread's partial stores before thread 0's fence, which is cumulative, and thread 0's
// fence after the counter read orders the last block's partial loads (after the second barrier). A fence in
// every thread (the first version) made each warp wait for its own stores: 26 % of the re-associated
// kernel's stall samples at M = 1 (ncu, session 12).
__device__ __forceinline__ bool arrive_last(int* counter, int splits) {
  __shared__ int s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const bool last = atomicAdd(counter, 1) == splits - 1;
    if (last) __threadfence();
    s_last = last;
  }
  __syncthreads();
  return s_last;
}

template <typename T>
__device__ __forceinline__ void reduce_splits(const float* __restrict__ ws, T* __restrict__ y, const void* bias,
                                              int bias_kind, int M, long N, long row0, int rows, int splits,
                                              int* counter) {
  constexpr int kBatch = 16;
  for (int idx = threadIdx.x; idx < rows * M; idx += blockDim.x) {
    const int m = idx / rows;
    const long n = row0 + idx % rows;
    float v = 0.f;
    for (int sp0 = 0; sp0 < splits; sp0 += kBatch) {
      float part[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i)
        part[i] = sp0 + i < splits ? __ldcg(ws + ((long)(sp0 + i) * M + m) * N + n) : 0.f;
#pragma unroll
      for (int i = 0; i < kBatch; ++i) v += part[i];
    }
    if (bias != nullptr) v += load_scalar(bias, bias_kind, n);
    y[(long)m * N + n] = Mma<T>::from_float(v);
  }
  if (threadIdx.x == 0) *counter = 0;
}

}  // namespace lords
