// Fused LoRDS GEMM for many tokens on Hopper (sm_90a): y[M, N] = x[M, K] @ (codebook[Q] * (B @ A)).T + bias.
//
// Above the decode range the other CUDA path is dequantize-to-bf16 + cuBLAS, which writes and re-reads W
// (33.5 MB for a 4096x4096 layer): it can never be faster than cuBLAS on a dense W, and at M = 64..256
// the dequantize pass alone costs about what cuBLAS does (bench/cuda_notes.md, session 6). Here the
// weights never leave registers:
//   1. per 16x16 weight tile and warp, the scale tile S = B[16 rows, r] @ A[r, 16 k] (at 4 bits one
//      wgmma m64n16k16 per 16 ranks for the warpgroup's 64 rows, at 2 and 3 bits mma.sync) and
//      W = codebook[Q] * S in fp32, packed to 16 bits: the decode kernel's weight fragment (lords_tile.cuh),
//      whose register layout is the A-operand layout of wgmma's register form;
//   2. y^T[64 rows, NTOK tokens] += W[64, 16] @ x^T[16, NTOK] as one wgmma.mma_async per warpgroup and
//      k-tile (m64nNTOKk16, A from registers, x from shared memory), asynchronous, so the warps build the
//      next k-tile's weights while the tensor cores run this one.
// x and A reach shared memory with cp.async, x in wgmma's K-major layout with the 128-byte swizzle; at 4 bits
// (every token tile) a producer warpgroup copies them and mbarriers hand the ring's slots to and from the two
// consumer warpgroups, at 2 and 3 bits every thread copies and a block barrier per superchunk orders the ring. At 4 bits in the natural
// k order (16-byte copies; each lane's codes are exchanged within its row's four lanes after the 16-byte
// load, natural_quads); at 2 and 3 bits in the k order of lords_tile.cuh's permutation (one 4-byte copy per
// pair of k).
//
// Work split: a block is two consumer warpgroups (128 weight rows) x NTOK tokens (16, 64, 128, 192, 256) x one K range.
// Split-K partials are reduced through distributed shared memory: the splits of a tile form one thread
// block cluster, every block parks its fp32 partial tile in its own (then idle) shared memory, and after a
// cluster barrier block c adds the tokens c, c + splits, ... of all the partials in a fixed order
// (deterministic), adds the bias and writes y with full-line stores. No workspace, no second pass; the
// last-block reduction of the decode kernels would read a 128 x 256 x splits tile through one SM.
//
// Dispatch table: dtype {fp16, bf16} x bits {2, 3, 4} x rank chunks RT {1, 2, 4} (r <= 16, 32, 64) x token
// tiles NTOK {16, 64, 128, 192, 256; 192 only above r = 32, 256 above it at 4 bits only}. The host takes this
// path only where the sm_90a image runs (wgmma_ready), K % 128 == 0 with 16-byte-aligned x, qweight and A
// (vector_path_ok) and r <= 64; path -1 only where fused_gemm_preferred holds (lords_kernels.h; measurements in
// bench/cuda_notes.md, sessions 10 to 15).
#include "lords_kernels.h"
#include "lords_tile.cuh"
#include "wgmma_rs.cuh"
#include "wgmma_scale.cuh"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace lords {
namespace {

constexpr int kThreads = 256;  // the two consumer warpgroups
constexpr int kRows = 128;     // weight rows per block: 16 per consumer warp
// At 4 bits a third warpgroup (the producer) fills the ring; at 2 and 3 bits the consumers copy their 4-byte
// pieces themselves. One producer warp was too few: its copies landed late (the consumers spent ~30 % of their
// stall samples waiting for data; 14336x4096, 64 tokens 59 -> 71 us; ncu, H100). With twelve warps, three
// share a scheduler's 16 K registers: 168 per thread at launch, and the 192- and 256-token consumers need 193-213
// (their accumulators alone are 96-128). There the producer warpgroup gives registers back (setmaxnreg) and the
// consumers take them: 128 x 56 + 256 x 224 = 384 x 168 (at 40 the producers spilled their copy addresses).
// Without a producer the 256-token consumers spent 38 % of their main-loop stall samples at the per-superchunk
// block barrier (ncu, 4096x4096, 1024 tokens, session 10).
constexpr int kProducers = 128;
__host__ __device__ constexpr bool warp_specialized(int bits) { return bits == 4; }
constexpr int kProducerRegs = 56, kConsumerRegs = 224;
static_assert(kProducers * kProducerRegs + kThreads * kConsumerRegs <= (kThreads + kProducers) * 168,
              "setmaxnreg moves registers within the block's launch allocation (168 per thread)");
__host__ __device__ constexpr int block_threads(int bits) {
  return kThreads + (warp_specialized(bits) ? kProducers : 0);
}

// x slot of one superchunk: wgmma's K-major layout with the 128-byte swizzle, two panels of 64 k (k-tiles
// 0-3, 4-7), each NTOK token rows of 128 bytes, 16-byte chunk j of token m's row at chunk j ^ (m % 8). The
// first version used the no-swizzle layout (core matrices of 8 tokens x 16 bytes): the tensor cores' reads of
// a 256-token B tile then collide in the banks, and 1024 tokens on 4096x4096 took 164 us against 86 with the
// swizzle (H100, session 10; a third layout, the two k halves 128 bytes apart, 169 us).
__host__ __device__ constexpr int x_slot_bytes(int ntok) { return ntok * 256; }
// Byte offset of the 16 bytes of positions 8 (c % 2) .. + 7 of k-tile c / 2 for token m.
template <int NTOK>
__host__ __device__ constexpr uint32_t x_chunk_offset(int c, int m) {
  return (c / 8) * NTOK * 128 + m * 128 + (((c % 8) ^ (m % 8)) * 16);
}
// A slot: x first (at a 1024-byte boundary, as the 128-byte swizzle needs), then A: at 4 bits in the scale
// wgmma's MN-major layout (4096 bytes per 16 ranks, copy_A_mn), below in the padded layout ldmatrix reads.
__host__ __device__ constexpr int a_bytes(int bits, int rt) { return bits == 4 ? rt * 4096 : a_slot_bytes(rt); }
__host__ __device__ constexpr int slot_bytes(int bits, int rt, int ntok) {
  return (a_bytes(bits, rt) + x_slot_bytes(ntok) + 1023) / 1024 * 1024;
}
constexpr size_t kSmemLimit = 227 * 1024 - 256;  // one block per SM, its static shared memory aside
// Superchunks copied ahead. The copy of superchunk sc + kAhead goes into the slot read at sc - 2, so no
// wgmma can still be reading it (a warpgroup keeps one k-tile in flight): kRing = kAhead + 2. With the
// producer warpgroup (4 bits) the mbarriers hand slots over, so any ring of two or more slots is safe: above
// 128 tokens it has two (three 256-token slots do not fit above r = 32), so that the 64 KB pair table fits
// beside them (use_pairs).
__host__ __device__ constexpr int ahead(int ntok) { return ntok <= 64 ? 2 : 1; }
__host__ __device__ constexpr int ring_slots(int bits, int ntok) { return bits == 4 && ntok > 128 ? 2 : ahead(ntok) + 2; }
// The 4-bit pair table (64 KB) wherever it fits beside the ring (every 4-bit tile). Above 128 tokens it gained
// 1-4 % (14336x4096 M = 192 90.2 -> 87.6, 4096x4096 M = 192 / 512 27.8 -> 26.7 / 43.3 -> 41.6; H100, session 15),
// except at 256 tokens above r = 32 (225 KB of shared memory in all), where it cost 40 % (94.4 -> 133.4 us at
// 14336x4096 M = 256) while the producers spilled their copy addresses; since the ring is handed over by halves
// (producers without spills) it gains there too: 80.5 -> 77.3 us (session 16, bench/h100/session16/halves_ab).
__host__ __device__ constexpr bool use_pairs(int bits, int rt, int ntok) {
  return bits == 4 &&
         (size_t)ring_slots(bits, ntok) * slot_bytes(bits, rt, ntok) + kPairTableBytes + 1024 <= kSmemLimit;
}
__host__ __device__ constexpr size_t smem_bytes(int bits, int rt, int ntok) {  // + 1 KB to align the ring
  return (size_t)ring_slots(bits, ntok) * slot_bytes(bits, rt, ntok) +
         (use_pairs(bits, rt, ntok) ? kPairTableBytes : 0) + 1024;
}
// The epilogue's fp32 partial tile [NTOK tokens][kPartStride], in the same shared memory: the stride of 132
// floats puts the four tokens a warp's accumulator store touches (2t) eight banks apart.
constexpr int kPartStride = kRows + 4;
static_assert(smem_bytes(2, 1, 256) >= (size_t)256 * kPartStride * 4 && smem_bytes(4, 4, 256) >= (size_t)256 * kPartStride * 4 &&
                  smem_bytes(2, 4, 192) >= 192 * kPartStride * 4 &&
                  smem_bytes(2, 1, 128) >= 128 * kPartStride * 4 && smem_bytes(2, 1, 64) >= 64 * kPartStride * 4 &&
                  smem_bytes(2, 1, 16) >= 16 * kPartStride * 4,
              "the partial tile fits in the ring's shared memory");
// Every 4-bit tile with the pair table, 256 tokens above r = 32 (RT = 4) included.
static_assert(use_pairs(4, 4, 256) && use_pairs(4, 4, 192) && use_pairs(4, 2, 256) && use_pairs(4, 4, 128) &&
                  use_pairs(4, 4, 64) && use_pairs(4, 4, 16),
              "the pair table fits at 4 bits");
static_assert(smem_bytes(4, 2, 256) <= kSmemLimit && smem_bytes(4, 4, 256) <= kSmemLimit &&
                  smem_bytes(2, 2, 256) <= kSmemLimit && smem_bytes(4, 4, 192) <= kSmemLimit &&
                  smem_bytes(2, 4, 192) <= kSmemLimit && smem_bytes(4, 4, 128) <= kSmemLimit,
              "one block per SM, static shared memory aside");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Register split only where the consumers need more than the launch allocation.
__device__ constexpr bool shifts_registers(int bits, int ntok) { return warp_specialized(bits) && ntok > 128; }

// Descriptor of k-tile s of an x slot: the swizzled layout's 8-row groups are 1024 bytes apart, and a k-tile
// inside a panel starts 32 bytes further per k-tile (the hardware applies the swizzle to the address bits).
// Every descriptor is a slot's base descriptor plus a byte offset (desc_plus, wgmma_scale.cuh).
__device__ __forceinline__ uint64_t x_base_desc(uint32_t xslot) { return opaque(smem_desc(xslot, 16, 1024) | (1ull << 62)); }
template <int NTOK>
__device__ __forceinline__ uint64_t x_desc(uint64_t xbase, int s) {
  return desc_plus(xbase, (s / 4) * NTOK * 128 + (s % 4) * 32);
}

// The natural k order (4 bits, see natural_quads in lords_tile.cuh): 16-byte chunk c of a token row (k 8c ..
// 8c + 7) is chunk c of the swizzled row. Thread tid of NT copies chunk tid % 16 of tokens tid / 16 + (NT / 16) j:
// a warp instruction reads two 256-byte token rows and its shared stores fill four 128-byte wavefronts. The
// swizzle of token m depends on m % 8, so four destination offsets repeat every 4 NT / 16 tokens.
template <typename T, int NTOK, int NT>
__device__ __forceinline__ void copy_x_natural(uint32_t xslot, const T* __restrict__ x, int M, int tok0, long K,
                                               long kbase, int tid) {
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  constexpr int kStep = NT / 16;
  static_assert((4 * kStep) % 8 == 0 && NTOK % kStep == 0, "x_chunk_offset is linear in steps of 8 tokens");
  const int c = tid % 16, j0 = tid / 16;
  uint32_t dst[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) dst[i] = xslot + x_chunk_offset<NTOK>(c, j0 + kStep * i);
  const uint16_t* src = x16 + (long)(tok0 + j0) * K + kbase + 8 * c;
  const int left = M - tok0 - j0;  // tokens of this thread's column that exist
  // Unrolled whole up to 16 copies; beyond, the compiler kept every source pointer live (the 192- and 256-token
  // producers spilled them at 56 registers).
  constexpr int kUnroll = NTOK / kStep > 16 ? 4 : NTOK / kStep;
#pragma unroll kUnroll
  for (int it = 0; it < NTOK / kStep; ++it) {
    const bool ok = it * kStep < left;
    cp_async16(dst[it % 4] + (it / 4) * 4 * kStep * 128, ok ? src : x16, ok ? 16 : 0);
    src += (long)kStep * K;
  }
}

// Half a superchunk (k 64 h .. 64 h + 63: k-tiles 4 h .. 4 h + 3) of x and A, for the ring of half slots. x: the
// half is panel h of the slot; thread tid of NT copies chunk 8 h + tid % 8 of tokens tid / 8 + (NT / 8) j, whose
// swizzle (m % 8) does not change from pass to pass (NT / 8 is a multiple of 8).
template <typename T, int NTOK, int NT>
__device__ __forceinline__ void copy_x_half(uint32_t xslot, const T* __restrict__ x, int M, int tok0, long K,
                                            long kbase, int tid, int h) {
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  constexpr int kStep = NT / 8;
  static_assert(kStep % 8 == 0 && NTOK % kStep == 0, "one swizzle phase per thread");
  const int c = 8 * h + tid % 8, j0 = tid / 8;
  const uint32_t dst = xslot + x_chunk_offset<NTOK>(c, j0);
  const uint16_t* src = x16 + (long)(tok0 + j0) * K + kbase + 8 * c;
  const int left = M - tok0 - j0;
#pragma unroll 4
  for (int it = 0; it < NTOK / kStep; ++it) {
    const bool ok = it * kStep < left;
    cp_async16(dst + it * kStep * 128, ok ? src : x16, ok ? 16 : 0);
    src += (long)kStep * K;
  }
}
// A: chunks 8 h .. 8 h + 7 of every rank, the 1024 bytes at h * 1024 of each 2048-byte rank group (copy_A_mn's layout).
template <typename T, int RT, int NT>
__device__ __forceinline__ void copy_A_mn_half(uint32_t slot, const T* __restrict__ A, int r, long K, long kbase,
                                               int tid, int h) {
  constexpr int kWarps = NT / 32;
  static_assert((4 * RT) % kWarps == 0, "whole (rank group, chunk quarter) units per warp");
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(A);
  const int j8 = tid % 8, cq = (tid / 8) % 4, w = tid / 32;
  const uint32_t dst = slot + cq * 128 + j8 * 16;
  const uint16_t* src = a16 + (long)j8 * K + kbase + 8 * cq;
#pragma unroll
  for (int i = 0; i < 4 * RT / kWarps; ++i) {
    const int u = w + i * kWarps, jg = u / 2, cb = 2 * h + u % 2;
    const bool ok = 8 * jg + j8 < r;
    cp_async16(dst + jg * 2048 + cb * 512, ok ? src + (long)jg * 8 * K + 32 * cb : a16, ok ? 16 : 0);
  }
}

// The permuted k order (2 and 3 bits): thread i copies pair u = i % 64 (real k 2u, 2u + 1 = 32 q + 4 s + 2 h
// + {0, 1}: k-tile s, positions 2q + 8h, so chunk 2s + h, bytes 4q ..) of tokens i / 64 + 4 j: a warp reads 128
// contiguous bytes of one token row. Tokens j and j + 4 differ in their swizzle, hence two running offsets.
template <typename T, int NTOK>
__device__ __forceinline__ void copy_x_async(uint32_t xslot, const T* __restrict__ x, int M, int tok0, long K,
                                             long kbase) {
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  constexpr int kStep = kThreads / 64;
  static_assert(kStep == 4 && NTOK % 8 == 0, "two token columns per 8-token swizzle group");
  const int u = threadIdx.x % 64, j0 = threadIdx.x / 64;
  const int c = 2 * ((u % 16) / 2) + u % 2, q = u / 16;
  const uint32_t dst[2] = {xslot + x_chunk_offset<NTOK>(c, j0) + 4 * q, xslot + x_chunk_offset<NTOK>(c, j0 + 4) + 4 * q};
  const uint16_t* src = x16 + (long)(tok0 + j0) * K + kbase + 2 * u;
  const long step = (long)kStep * K;
  const int left = M - tok0 - j0;  // tokens of this thread's column that exist
#pragma unroll 8
  for (int it = 0; it < NTOK / kStep; ++it) {
    const bool ok = it * kStep < left;
    cp_async(dst[it % 2] + (it / 2) * 1024, ok ? src : x16, 4, ok ? 4 : 0);
    src += step;
  }
}

__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t map_rank(uint32_t saddr, uint32_t rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(saddr), "r"(rank));
  return out;
}
__device__ __forceinline__ float4 ld_cluster_v4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr));
  return v;
}

// mbarriers of the 4-bit ring (CTA scope): `full` completes a phase when the producer's copies of a superchunk
// have landed, `empty` when all consumer warps are done reading the slot.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Stream-K flags: a block raises its own after parking its partial (release), the finalizing block waits for it
// (acquire) and lowers it again.
__device__ __forceinline__ void st_release_gpu(int* p, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// The consumer warpgroups alone (the producers are elsewhere): named barrier 1.
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }
#endif

template <typename T, int BITS, int RT, int NTOK, bool SK = false>
__global__ void __launch_bounds__(block_threads(BITS), 1)
    fused_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const T* __restrict__ Bm,
                      const T* __restrict__ A, const void* __restrict__ cb, int cb_kind,
                      const void* __restrict__ bias, int bias_kind, T* __restrict__ y, int M, long N, long K, int r,
                      int kc, float* __restrict__ sk_ws, int* __restrict__ sk_flags, int sk_blocks) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool PAIRS = use_pairs(BITS, RT, NTOK);
  // k order inside a superchunk: natural at 4 bits (16-byte copies, codes exchanged in registers), the
  // lords_tile.cuh permutation otherwise (4-byte copies; a lane's 2- or 3-bit codes of one k-tile are not
  // a byte of the 16-byte load there).
  constexpr bool NAT = BITS == 4;
  // The scale tile at 4 bits (NAT): one wgmma m64n16k16 per 16 ranks, B rows from registers, A read by the
  // tensor cores from its slot; it queues with the products instead of behind them. On mma.sync (2, 3 bits) the
  // scale mmas of a k-tile waited for the warpgroup's wgmmas in flight (ncu: "math" stalls on them; waiting
  // on two wgmmas instead of one changed nothing), and every warp read the same A fragments with ldmatrix.
  // H100, session 10, bench.dequant_paths: 14336x4096 r = 49, 64 tokens 65.4 -> 60.0 us, 1024 tokens 564 -> 487;
  // 4096x4096 r = 32, 1024 tokens 90.5 -> 83.9.
  //
  // The ring at 4 bits (WS): a producer warpgroup copies superchunks into free slots and two mbarriers per slot
  // hand them over (full: landed, empty: read), so a warpgroup waits only for its own data. The first
  // version had every thread copy and a block barrier per superchunk: at 1024 tokens 38 % of the main loop's
  // stall samples were that barrier (one warpgroup waiting for the other) and 36 % of the instructions the
  // copies (ncu, 4096x4096, session 10).
  constexpr bool WS = warp_specialized(BITS);
  constexpr int kAhead = ahead(NTOK), kRing = ring_slots(BITS, NTOK);
  static_assert(WS || kRing == kAhead + 2, "without the mbarrier hand-over the ring is kAhead + 2 slots");
  // Two slots handed over by halves (k-tiles 0-3, 4-7): the consumers release the first half of a superchunk
  // at its k-tile 5, so the producers run 1.5 superchunks ahead instead of one (ncu, session 15: at 256 tokens with
  // two whole slots the consumers waited on `full` for 17-23 % of their stall samples). H100, session 16: 14336x4096
  // r = 49 at 192 / 256 tokens 87.5 -> 67.4 / 94.1 -> 80.5 us, 4096x4096 r = 32 at 256 tokens 28.8 -> 27.3.
  constexpr bool kHalves = WS && kRing == 2;
  // The 16-token tile, and the 64-token tile above r = 32 (4 bits), compute a superchunk's scale tile in two wgmma
  // groups up front (below). H100, session 18, bench/h100/session18/whole_scale_ab (fused GEMM alone, us): r = 49
  // 14336x4096 at 2 / 16 / 64 tokens 49.1 / 49.4 / 54.7 -> 47.5 / 48.2 / 51.6, 4096x14336 56.8 / 56.1 / 62.3 -> 53.9 /
  // 52.8 / 57.7; at r = 32 (4096x4096) the 64-token tile got 1.5 % slower (18.9 -> 19.1), the 16-token one the same.
  constexpr bool kWholeScale = NAT && (NTOK == 16 || (NTOK == 64 && RT == 4));
  static_assert(!kWholeScale || (WS && !kHalves), "the whole-superchunk scale releases whole slots");
  constexpr int kBars = kHalves ? 2 * kRing : kRing;
  extern __shared__ uint4 smem_dyn[];
  __shared__ float lut[16];
  __shared__ uint64_t full_bar[kBars], empty_bar[kBars];
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dyn));
  const uint32_t ring_s = (smem_s + (PAIRS ? (uint32_t)kPairTableBytes : 0u) + 1023u) & ~1023u;
  const uint32_t full_s = static_cast<uint32_t>(__cvta_generic_to_shared(full_bar));
  const uint32_t empty_s = static_cast<uint32_t>(__cvta_generic_to_shared(empty_bar));

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  // Split-K (sk_blocks == 0): the block's tile is (blockIdx.x, blockIdx.y), its K range split blockIdx.z. Stream-K
  // (sk_blocks > 0, 4 bits only, a 1-D grid of sk_blocks blocks and no clusters): the work is `units` superchunks,
  // tile-major (tile = row block + token tile x row blocks), and block b takes units [b U / G, (b + 1) U / G): any
  // number of blocks fills the GPU in one wave, where split-K clusters come in whole tiles x splits (14336x4096:
  // 112 tiles on 132 SMs; 4096x4096: three splits of 32 tiles, as four-block clusters take a second wave). A block
  // runs its range as one segment per tile, the last tile first: only that one can end before its tile does (every
  // earlier tile of the range ends inside the range), so the block parks that
  // partial in the workspace (slot b) and raises its flag before it waits for anyone; a segment that ends its
  // tile adds the partials of the lower-numbered blocks that began the tile, in block order (deterministic), and
  // writes y. Lower-numbered blocks are dispatched first, and each raises its flag before its own waits: no
  // deadlock.
  // SK: a separate instantiation, so that the split-K kernels keep their registers (the segment loop took the
  // 64- and 128-token consumers to the 168-register cap, with spills).
  constexpr bool sk = SK;
  // The schedule, in 32-bit unsigned arithmetic (the host keeps units x blocks below 2^32; a 64-bit division here
  // was a subroutine call, after which ptxas kept the main loop's wgmma descriptors in vector registers), is computed
  // afresh where it is needed, from the block index read by a volatile asm, so none of it stays live across the main
  // loop (session 21: SASS and ncu, bench/cuda_notes.md).
  struct Segment {
    unsigned tiles_n, k_super, units;  // the launch: row blocks, superchunks per tile, all units
    unsigned tile, u0, u1;             // its tile; its units [u0, u1)
    int count;                         // segments of this block
    bool first, final;                 // it begins / ends its tile
  };
  auto segment = [&](int i) {
    Segment sg{0u, 0u, 0u, 0u, 0u, 0u, 1, true, true};
    if constexpr (SK) {
      unsigned b;
      asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(b));
      const unsigned tiles_n = (unsigned)((N + kRows - 1) / kRows), k_super = (unsigned)(K / kSuper);
      const unsigned units = tiles_n * (unsigned)((M + NTOK - 1) / NTOK) * k_super, G = (unsigned)sk_blocks;
      sg.tiles_n = tiles_n, sg.k_super = k_super, sg.units = units;
      const unsigned u_begin = b * units / G, u_end = (b + 1) * units / G;
      const unsigned t_last = u_end > 0 ? (u_end - 1) / k_super : 0u;
      sg.count = u_end > u_begin ? (int)(t_last - u_begin / k_super + 1) : 0;
      sg.tile = t_last - (unsigned)i;
      sg.u0 = max(u_begin, sg.tile * k_super);
      sg.u1 = min(u_end, (sg.tile + 1) * k_super);
      sg.first = sg.u0 == sg.tile * k_super;
      sg.final = sg.u1 == (sg.tile + 1) * k_super;
    }
    return sg;
  };
  const int nseg = segment(0).count;
  if constexpr (!SK) (void)sk_blocks;
  long block_row0 = (long)blockIdx.x * kRows;
  long row0 = block_row0 + warp * 16;  // warp w % 4 of warpgroup w / 4: rows 16 (w % 4) of its 64
  int tok0 = blockIdx.y * NTOK;
  long k0 = (long)blockIdx.z * kc;
  int nsc = (int)(min_l(K - k0, kc) / kSuper);  // K % 128 == 0 on this path
  // Segment i of this block (stream-K: tile t_last - i): its rows, tokens and K range.
  auto set_segment = [&](int i) {
    if constexpr (SK) {
      const Segment sg = segment(i);
      unsigned tile_m = sg.tile / sg.tiles_n, tile_n = sg.tile - tile_m * sg.tiles_n;
      // Opaque to the optimizer, which otherwise widened this remainder to a 64-bit division (a subroutine call).
      asm("" : "+r"(tile_m), "+r"(tile_n));
      block_row0 = (long)tile_n * kRows;
      row0 = block_row0 + warp * 16;
      tok0 = (int)tile_m * NTOK;
      k0 = (long)(sg.u0 - sg.tile * sg.k_super) * kSuper;
      nsc = (int)(sg.u1 - sg.u0);
    } else {
      (void)i;
    }
  };
  const long row_bytes = K * BITS / 8;
  const bool producer = WS && threadIdx.x >= kThreads;

  if constexpr (WS) {
    if (threadIdx.x == 0) {
      for (int i = 0; i < kBars; ++i) {
        mbar_init(full_s + 8 * i, kProducers);      // every producer thread, once its copies landed
        mbar_init(empty_s + 8 * i, kThreads / 32);  // every consumer warp, after its last wgmma on the slot
      }
    }
  }
  // Programmatic dependent launch (the host sets it on split-K and stream-K launches, launch() below): this grid may start while
  // the previous kernel in the stream still runs, on the SMs its blocks leave (a split-K plan of 96 blocks leaves
  // 36 of 132 idle; a tail's cluster reduction leaves more). Nothing that kernel may write (x, the weights, the
  // codebook, bias, y) is read before griddepcontrol.wait; only L2 prefetch hints for the first two superchunks
  // of this block's codes (one 128-byte line per row at 4 bits) go out first: L2 is the point of coherence, so a
  // hint for a line being written is harmless. Without the launch attribute the wait returns at once.
  if (gridDim.z > 1 && threadIdx.x < kRows) {
    const long n = block_row0 + threadIdx.x;
    if (n < N) prefetch_l2(qw + n * row_bytes + k0 * BITS / 8);
  }
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  if (threadIdx.x < (1 << BITS)) lut[threadIdx.x] = load_scalar(cb, cb_kind, threadIdx.x);
  // The barriers' initialization and lut; without producers the ring's first barrier orders lut.
  if constexpr (WS) __syncthreads();

  if (producer) {
    if constexpr (shifts_registers(BITS, NTOK)) asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    // Superchunk it goes into slot it % kRing once the consumers released that slot's previous use; each
    // thread's cp.async.mbarrier.arrive fires on `full` when its copies have landed, so the producers never
    // wait for data (the first version waited for its own copy groups before arriving, and had one warp).
    const int tid = threadIdx.x - kThreads;
    // g: superchunks handed over in earlier segments (stream-K), the ring's running index.
    for (int seg = 0, g = 0; seg < nseg; g += nsc, ++seg) {
      set_segment(seg);
      if constexpr (kHalves) {
        // Half p (superchunk p / 2, k-tiles 4 (p % 2) ..) goes into half slot p % 4: slot (p % 4) / 2, half p % 2.
        for (int pl = 0; pl < 2 * nsc; ++pl) {
          const int p = 2 * g + pl, q = p % kBars, h = q % 2;
          if (p >= kBars) mbar_wait(empty_s + 8 * q, ((p / kBars) + 1) & 1);
          const uint32_t slot = ring_s + (q / 2) * slot_bytes(BITS, RT, NTOK);
          const long kb = k0 + (long)(pl / 2) * kSuper;
          copy_A_mn_half<T, RT, kProducers>(slot + x_slot_bytes(NTOK), A, r, K, kb, tid, h);
          copy_x_half<T, NTOK, kProducers>(slot, x, M, tok0, K, kb, tid, h);
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full_s + 8 * q) : "memory");
        }
      } else {
        for (int il = 0; il < nsc; ++il) {
          const int it = g + il, sl = it % kRing;
          if (it >= kRing) mbar_wait(empty_s + 8 * sl, ((it / kRing) + 1) & 1);
          const uint32_t slot = ring_s + sl * slot_bytes(BITS, RT, NTOK);
          const long kb = k0 + (long)il * kSuper;
          copy_A_mn<T, RT, kProducers>(slot + x_slot_bytes(NTOK), A, r, K, kb, tid);
          copy_x_natural<T, NTOK, kProducers>(slot, x, M, tok0, K, kb, tid);
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(full_s + 8 * sl) : "memory");
        }
      }
    }
    cp_async_wait<0>();
    if (sk) return;  // no cluster, no shared epilogue: the consumers write y themselves
    // The producers leave here, after the epilogue's two cluster barriers: code shared with the consumers after
    // a setmaxnreg would be compiled for the producers' registers.
    cluster_sync();
    cluster_sync();
    return;
  } else {
    if constexpr (shifts_registers(BITS, NTOK)) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    auto load_codes = [&](Codes<BITS> (&c)[2], int sc) {
      const long kf = k0 + (long)sc * kSuper + 32 * t;
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const long n = row0 + g + 8 * hh;
        if (n < N)
          c[hh].load_fast(qw + n * row_bytes + kf * BITS / 8);
        else
          c[hh].clear();
      }
    };
    // Stream-K: a segment that does not end its tile parks acc in workspace slot blockIdx.x (layout [i][thread]:
    // coalesced) and raises the block's flag; one that ends it adds the parked partials of the blocks that began
    // the tile (lower-numbered), in block order, then writes y and the bias straight from the registers.
    auto stream_k_epilogue = [&](float (&acc)[NTOK / 2], int seg) {
      const int ct = threadIdx.x;  // consumer thread, 0..255
      const Segment sg = segment(seg);
      if (!sg.final) {
        float* slot = sk_ws + (long)blockIdx.x * (NTOK / 2) * kThreads;
#pragma unroll
        for (int i = 0; i < NTOK / 2; ++i) __stcg(slot + i * kThreads + ct, acc[i]);
        // One release by one thread after the barrier publishes every consumer's stores (PTX release is cumulative
        // over what the barrier ordered before it; CUTLASS's split-K semaphore is the same pattern): the other
        // threads go on to the next segment without each waiting for a gpu-scope fence of their own.
        consumer_sync();
        if (ct == 0) st_release_gpu(sk_flags + blockIdx.x, 1);
        return;
      }
      if (!sg.first) {
        // The block holding the tile's first unit (the largest b with b U / G <= u, rounded down).
        const unsigned u = sg.tile * sg.k_super;
        const int b_first = (int)(((u + 1) * (unsigned)sk_blocks - 1) / sg.units);
        if (ct == 0) {
          for (int b = b_first; b < (int)blockIdx.x; ++b) {
            while (ld_acquire_gpu(sk_flags + b) != 1) {
            }
            sk_flags[b] = 0;  // zeroed for the next launch, which reads nothing before this grid has ended
          }
          __threadfence();
        }
        consumer_sync();
#pragma unroll
        for (int i = 0; i < NTOK / 2; ++i) {
          float sum = 0.f;
          for (int b = b_first; b < (int)blockIdx.x; ++b) sum += __ldcg(sk_ws + ((long)b * (NTOK / 2) + i) * kThreads + ct);
          acc[i] = sum + acc[i];
        }
      }
      // acc[4 j + i]: weight row 16 warp + g + 8 (i / 2) of the block, token 8 j + 2 t + (i % 2) of the tile.
      float bv[2];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const long n = block_row0 + warp * 16 + g + 8 * hh;
        bv[hh] = bias != nullptr && n < N ? load_scalar(bias, bias_kind, n) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < NTOK / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const long n = block_row0 + warp * 16 + g + 8 * (i / 2);
          const int m = tok0 + 8 * j + 2 * t + (i % 2);
          if (n < N && m < M) y[(long)m * N + n] = Mma<T>::from_float(acc[4 * j + i] + bv[i / 2]);
        }
    };
    // Superchunks of codes in flight per warp. At 64 tokens a superchunk is shorter than the DRAM latency:
    // with one ahead, the code exchange of the next superchunk waited on its loads (ncu, 14336x4096, 64
    // tokens: long-scoreboard stalls on natural_quads, session 10).
    constexpr int kCodeDepth = NTOK <= 128 ? 2 : 1;
    // g0: superchunks of the earlier segments (stream-K), the mbarrier ring's running index.
    int g0 = 0;
    // One segment (split-K: the block's tile). Stream-K blocks have one or two (at least one block per tile, the
    // host's rule), run as two straight-line calls: with a loop over segments ptxas kept the main loop's wgmma
    // descriptors in vector registers (two R2UR per wgmma, ~20 % more main-loop instructions than split-K; SASS and
    // ncu of the first version, session 21).
    auto run_segment = [&](int seg) {
      set_segment(seg);
      Codes<BITS> ahead_codes[kCodeDepth][2];
#pragma unroll
      for (int d = 0; d < kCodeDepth; ++d) {
        if (d < nsc)
          load_codes(ahead_codes[d], d);
        else
          ahead_codes[d][0].clear(), ahead_codes[d][1].clear();
      }

      // Without producers (2 and 3 bits: every 4-bit tile has them) every consumer thread copies its share of a
      // superchunk, kAhead ahead.
      static_assert(WS == NAT, "the producers copy exactly the natural-order (4-bit) tiles");
      auto fill = [&](int sc) {
        if (sc < nsc) {
          const uint32_t slot = ring_s + (sc % kRing) * slot_bytes(BITS, RT, NTOK);
          const long kb = k0 + (long)sc * kSuper;
          copy_A_async<T, RT, kThreads>(slot + x_slot_bytes(NTOK), A, r, K, kb);
          copy_x_async<T, NTOK>(slot, x, M, tok0, K, kb);
        }
        cp_async_commit();  // one group per superchunk, empty past the end, so the wait count below holds
      };
      if constexpr (!WS) {
#pragma unroll
        for (int sc = 0; sc < kAhead; ++sc) fill(sc);
      }

      uint32_t bf[RT][4];
      load_B_frags<T, RT>(bf, Bm, N, r, row0, lane);
      // The pair table exists at 4 bits, where the producers copy: the consumers build it.
      static_assert(!PAIRS || WS, "the pair table is built by the consumers alone");
      if constexpr (PAIRS) {
        if (seg == 0) {
          build_pair_table(smem_dyn, lut, threadIdx.x, kThreads);
          consumer_sync();
        }
      }
      [[maybe_unused]] const uint32_t lane8 = 8u * lane;
      [[maybe_unused]] const uint32_t a_lane = a_frag_lane_offset(lane);

      float acc[NTOK / 2];
#pragma unroll
      for (int i = 0; i < NTOK / 2; ++i) acc[i] = 0.f;

      // Half (or slot) p has landed. cp.async wrote it through the generic proxy, the tensor cores read it through
      // the async one: the proxy fence after the acquiring wait orders the two for this thread's wgmmas.
      [[maybe_unused]] auto wait_full = [&](int p) {
        mbar_wait(full_s + 8 * (p % kBars), (p / kBars) & 1);
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      };
      // Codes kCodeDepth superchunks ahead, in registers: the superchunk loop is unrolled by kCodeDepth so every
      // index into ahead_codes is a constant.
      auto superchunk = [&](int sc, int d) {
        const int gs = g0 + sc;  // the ring's running index (= sc but in stream-K's later segments)
        if constexpr (WS) {
          wait_full(kHalves ? 2 * gs : gs);  // the first half (or the whole slot)
        } else {
          // Superchunk sc has landed (the kAhead - 1 newer groups may still be in flight); cp.async wrote it
          // through the generic proxy and the tensor cores read it through the async one, hence the fence.
          cp_async_wait<kAhead - 1>();
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
          __syncthreads();
          fill(sc + kAhead);
        }
        Codes<BITS> cur[2] = {ahead_codes[d][0], ahead_codes[d][1]};
        if constexpr (NAT) {  // here, kCodeDepth superchunks after the load was issued: its data is in
          natural_quads(cur[0].w, t);
          natural_quads(cur[1].w, t);
        }
        if (sc + kCodeDepth < nsc) load_codes(ahead_codes[d], sc + kCodeDepth);

        const uint32_t slot = ring_s + (gs % kRing) * slot_bytes(BITS, RT, NTOK);
        const uint64_t xbase = x_base_desc(slot);
        // 4 bits: the eight code values of k-tile s (no scale needed: they go before the wait for it) ...
        [[maybe_unused]] auto look_up = [&](float (&lv)[8], int s) {
          if constexpr (PAIRS)
            lookup_code_pairs(lv, cur[0], cur[1], smem_s, lane8, s);
          else
            lookup_codes<BITS>(lv, cur[0], cur[1], lut, s);
        };
        // ... times the scale tile's eight values sv, which a wgmma wrote behind the compiler's back: no read of them
        // may move above the wait for it.
        [[maybe_unused]] auto scaled_weights = [&](uint32_t (&wf)[4], const float (&lv)[8], float* sv) {
#pragma unroll
          for (int i = 0; i < 8; ++i) asm volatile("" : "+f"(sv[i])::"memory");
          pack_weights<T>(wf, lv, reinterpret_cast<const float(&)[4]>(sv[0]), reinterpret_cast<const float(&)[4]>(sv[4]));
        };
        if constexpr (kWholeScale) {
          // The superchunk's whole scale tile first, as two groups (k-tiles 0-3, 4-7; m64n64k16 per 16 ranks), then
          // the eight products: the warps wait for a scale group twice per superchunk instead of once per k-tile.
          // Group order: S[0], S[1], main(0), main(1), ...: at k-tile 4 `wait<2>` retires S[1] (and every main but
          // the last two), at k-tiles 5-7 it keeps two mains in flight (their W fragments stay live until retired).
          const uint64_t abase = a_mn_base_desc(slot + x_slot_bytes(NTOK));
          uint64_t sdesc[2][RT];  // before the fence (computed between wgmma.fence and a wgmma, ptxas serializes)
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int c = 0; c < RT; ++c) sdesc[h][c] = a_mn_desc(abase, 4 * h, c);
          float sw[2][32];
          wgmma_fence();
#pragma unroll
          for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int c = 0; c < RT; ++c) WgmmaRSTransB<T, 64>::run(sw[h], bf[c], sdesc[h][c], c);
            wgmma_commit();
          }
          // The look-ups run one k-tile ahead: ncu put 37 % of the 16-token tile's main-loop stall samples on the
          // pack waiting for them (short scoreboard; session 18); written in k-tile order, ptxas hoisted only half
          // of k-tile s + 1's shared loads above the wgmma of k-tile s. H100, session 23 (bench/h100/session23/
          // wip_ab), us before -> after: 16 tokens 4096x14336 stream-K 46.6 -> 45.5, 11008x4096 38.5 -> 38.1,
          // 4096x4096 16.1 -> 15.9; 64 tokens 4096x14336 57.8 -> 56.9. Not in the stream-K 64-token kernel,
          // which it took from 20 to 124 bytes of spill (64.0 -> 71.9 us at 14336x4096).
          constexpr bool kLookAhead = !(SK && NTOK == 64);
          float lv[2][8];
          if constexpr (kLookAhead) look_up(lv[0], 0);
#pragma unroll
          for (int s = 0; s < 8; ++s) {
            if constexpr (kLookAhead) {
              if (s + 1 < 8) look_up(lv[(s + 1) % 2], s + 1);
            } else {
              look_up(lv[s % 2], s);
            }
            if (s == 0) wgmma_wait<1>();  // S[0]
            if (s >= 4) wgmma_wait<2>();  // S[1] at s = 4; then main(s - 3) and older
            uint32_t wf[4];
            scaled_weights(wf, lv[s % 2], &sw[s / 4][8 * (s % 4)]);
            wgmma_fence();
            WgmmaRS<T, NTOK>::run(acc, wf, x_desc<NTOK>(xbase, s));
            wgmma_commit();
          }
          wgmma_wait<0>();
          if (lane == 0) mbar_arrive(empty_s + 8 * (gs % kRing));  // this warp is done with the slot
          return;
        }
        if constexpr (NAT) {
          const uint64_t abase = a_mn_base_desc(slot + x_slot_bytes(NTOK));
          // Group order: S(s + 1), main(s), so at k-tile s + 1 `wait<1>` leaves only main(s) in flight. The
          // look-ups need no scale and go before the wait.
          float sacc[2][8];
          auto issue_scale = [&](int s) {
#pragma unroll
            for (int c = 0; c < RT; ++c)
              WgmmaRSTransB<T, 16>::run(sacc[s % 2], bf[c], a_mn_desc(abase, s, c), c);
            wgmma_commit();
          };
          wgmma_fence();
          issue_scale(0);
#pragma unroll
          for (int s = 0; s < 8; ++s) {
            float lv[8];
            look_up(lv, s);
            if (s == 0) {
              wgmma_wait<0>();  // main(7) of the last superchunk was committed before S(0)
              // so this warp is done with the previous superchunk's slot.
              if (WS && gs > 0 && lane == 0)
                mbar_arrive(empty_s + 8 * (kHalves ? (2 * gs - 1) % kBars : (gs - 1) % kRing));
            } else {
              wgmma_wait<1>();
              // Only main(s - 1) may be in flight: every wgmma reading the first half (k-tiles 0-3) is done.
              if (kHalves && s == 5 && lane == 0) mbar_arrive(empty_s + 8 * ((2 * gs) % kBars));
            }
            uint32_t wf[4];
            scaled_weights(wf, lv, sacc[s % 2]);
            if (kHalves && s == 3) wait_full(2 * gs + 1);  // scale(4) reads A's second half, main(4) x's
            wgmma_fence();
            if (s + 1 < 8) issue_scale(s + 1);
            WgmmaRS<T, NTOK>::run(acc, wf, x_desc<NTOK>(xbase, s));
            wgmma_commit();
          }
          return;
        }
        // 2 and 3 bits: scale mmas on mma.sync, those of k-tile s + 1 written before the wgmma of k-tile s (ptxas
        // still places them after it: they reuse the registers of the wgmma operands in flight).
        float sa[2][4], sb[2][4];
        auto scale = [&](int s) {
          uint4 af[RT];
#pragma unroll
          for (int c = 0; c < RT; ++c)
            af[c] = ldsm_x4_trans(slot + x_slot_bytes(NTOK) + a_lane + (uint32_t)(c * 16 * kPosPad + 16 * s) * 2);
#pragma unroll
          for (int i = 0; i < 4; ++i) sa[s % 2][i] = sb[s % 2][i] = 0.f;
          scale_frags<T, RT>(sa[s % 2], sb[s % 2], bf, af);
        };
        scale(0);
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          uint32_t wf[4];
          if constexpr (PAIRS)
            apply_code_pairs<T>(wf, sa[s % 2], sb[s % 2], cur[0], cur[1], smem_s, lane8, s);
          else
            apply_codes<T, BITS>(wf, sa[s % 2], sb[s % 2], cur[0], cur[1], lut, s);
          if (s + 1 < 8) scale(s + 1);
          wgmma_fence();
          WgmmaRS<T, NTOK>::run(acc, wf, x_desc<NTOK>(xbase, s));
          wgmma_commit();
          wgmma_wait<1>();
        }
      };
      for (int base = 0; base < nsc; base += kCodeDepth) {
#pragma unroll
        for (int d = 0; d < kCodeDepth; ++d)
          if (base + d < nsc) superchunk(base + d, d);
      }
      wgmma_wait<0>();
      // The next kernel may launch once every block of this one is here (the producers' copies are all issued
      // by now): its blocks take the SMs that finished clusters leave, and wait for this grid to end before
      // reading anything.
      if (seg == nseg - 1) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
      // The accumulators were written behind the compiler's back: no read of them may move above the wait.
#pragma unroll
      for (int i = 0; i < NTOK / 2; ++i) asm volatile("" : "+f"(acc[i])::"memory");
      if (sk) {
        stream_k_epilogue(acc, seg);
        return;
      }
      // Every consumer warp is done with the ring (and at 4 bits the producers' copies have all landed: a
      // superchunk is handed over only then): it becomes the partial tile.
      if constexpr (WS) {
        consumer_sync();
      } else {
        cp_async_wait<0>();
        __syncthreads();
      }

      // acc[4 j + i]: weight row 16 warp + g + 8 (i / 2) of the block, token 8 j + 2 t + (i % 2) of the tile.
      float* part = reinterpret_cast<float*>(smem_dyn);
#pragma unroll
      for (int j = 0; j < NTOK / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          part[(8 * j + 2 * t + (i % 2)) * kPartStride + warp * 16 + g + 8 * (i / 2)] = acc[4 * j + i];
    };
    if (nseg > 0) run_segment(0);
    if constexpr (SK) {
      if (nseg > 1) {
        g0 = nsc;
        run_segment(1);
      }
      return;
    }
  }
  cluster_sync();  // every block of the cluster has parked its partial tile

  // Block `rank` of the cluster writes tokens rank, rank + splits, ...: lane l of consumer warp w takes rows
  // 4l .. 4l + 3.
  const uint32_t splits = gridDim.z, rank = cluster_rank();
  const long n = block_row0 + 4 * lane;
  float bv[4] = {0.f, 0.f, 0.f, 0.f};
  if (bias != nullptr)
#pragma unroll
    for (int e = 0; e < 4; ++e) bv[e] = n + e < N ? load_scalar(bias, bias_kind, n + e) : 0.f;
  const uint32_t part_s = smem_s + 4u * lane * 4u;
  for (int tl = rank + splits * warp; tl < NTOK; tl += splits * (kThreads / 32)) {
    const int m = tok0 + tl;
    if (m >= M) break;
    float4 v = make_float4(bv[0], bv[1], bv[2], bv[3]);
    for (uint32_t c = 0; c < splits; ++c) {
      const float4 p = ld_cluster_v4(map_rank(part_s + (uint32_t)(tl * kPartStride) * 4u, c));
      v.x += p.x; v.y += p.y; v.z += p.z; v.w += p.w;
    }
    T* yr = y + (long)m * N + n;
    if (n + 3 < N && (N % 4) == 0) {
      uint2 pk = make_uint2(Mma<T>::pack(v.x, v.y), Mma<T>::pack(v.z, v.w));
      *reinterpret_cast<uint2*>(yr) = pk;
    } else {
      const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (n + e < N) yr[e] = Mma<T>::from_float(vv[e]);
    }
  }
  cluster_sync();  // no block leaves while another may still read its shared memory
#else
  __trap();  // the host launches this kernel only where the sm_90a image runs (wgmma_ready)
#endif
}

// The launch configuration of a grid of `tiles_n` x `tiles_m` tiles, each a cluster of `splits` blocks.
template <typename T, int BITS, int RT, int NTOK, bool SK = false>
struct Launch {
  cudaLaunchConfig_t cfg = {};
  cudaLaunchAttribute attr[2];
  Launch(long tiles_n, long tiles_m, int splits, cudaStream_t stream, bool pdl = true) {
    auto kernel = fused_gemm_kernel<T, BITS, RT, NTOK, SK>;
    constexpr size_t smem = smem_bytes(BITS, RT, NTOK);
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) throw std::runtime_error(std::string("lords fused_gemm: ") + cudaGetErrorString(e));
    cfg.gridDim = dim3((unsigned)tiles_n, (unsigned)tiles_m, (unsigned)splits);
    cfg.blockDim = dim3(block_threads(BITS));
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 1;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = (unsigned)splits;
    // Programmatic dependent launch (see the kernel's griddepcontrol.wait).
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 2 : 1;
  }
};

// Clusters of `splits` blocks of this kernel that the current GPU runs at once. It is not SMs / splits: a
// cluster's blocks share a GPC, and the H100's GPCs do not all hold a multiple of 4 of these one-per-SM
// blocks, so the 32 clusters of 4 that 4096x14336 (r = 49, 32 row tiles, 4 splits) launches took a second wave:
// 87.7 us at 16 tokens against 60.2 with 3 splits (96 blocks; H100, session 12, bench.dequant_paths
// --fused-splits). Asked once per device and cluster size (cudaOccupancyMaxActiveClusters), 0 where the query
// fails (the plan then counts SMs / splits).
constexpr int kMaxDevices = 64;
template <typename T, int BITS, int RT, int NTOK>
int active_clusters(int splits) {
  static std::atomic<int> known[kMaxDevices][kFusedMaxSplits + 1];  // value + 1; 0: not asked yet
  int dev = 0;
  if (splits < 1 || splits > kFusedMaxSplits || cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    (void)cudaGetLastError();
    return 0;
  }
  int v = known[dev][splits].load(std::memory_order_relaxed);
  if (v > 0) return v - 1;
  Launch<T, BITS, RT, NTOK> l(1, 1, splits, nullptr, /*pdl=*/false);  // the occupancy query: clusters alone
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, fused_gemm_kernel<T, BITS, RT, NTOK>, &l.cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  known[dev][splits].store(n + 1, std::memory_order_relaxed);
  return n;
}

// LORDS_FUSED_PDL=1 / 0 puts the PDL attribute on every launch (stream-K included) / on none, read once per
// process: for A/B timing of the rule below within one build (ncu serializes kernels, which hides what PDL
// changes). Unset (or any other value): split-K and stream-K launches.
int pdl_override() {
  static const int v = [] {
    const char* e = std::getenv("LORDS_FUSED_PDL");
    return e != nullptr && (e[0] == '0' || e[0] == '1') && e[1] == '\0' ? e[0] - '0' : -1;
  }();
  return v;
}

template <typename T, int BITS, int RT, int NTOK, bool SK>
void launch(const DecodeArgs& a, cudaStream_t stream) {
  auto kernel = fused_gemm_kernel<T, BITS, RT, NTOK, SK>;
  // PDL on split-K and stream-K launches, not on one split. H100, session 20 (bench/h100/session20/fused_pdl_ab), us without -> with:
  // 4096x4096 r = 32 (3-4 splits) at 8 / 16 / 64 / 256 tokens 16.46 / 16.53 / 18.87 / 27.43 -> 16.06 / 16.14 /
  // 18.60 / 26.98, 1024x4096 r = 12 (8 splits) at 4 / 16 / 64 7.43 / 7.87 / 9.34 -> 7.01 / 7.37 / 8.91; but one split
  // (14336x4096 r = 49, 112 blocks) got slower at every tile, 4 / 16 / 64 / 256 tokens 47.59 / 47.87 / 51.65 / 76.72
  // -> 49.86 / 50.31 / 54.26 / 77.84, as the direct decode kernel's PDL did on that shape (session 15); not profiled.
  // Stream-K (SK, a.stream_k_blocks > 0, 4 bits): a 1-D grid of that many blocks, clusters of one; its flags and
  // partial tiles are touched only after griddepcontrol.wait, like y, and every block triggers its dependents only
  // after its main loop, so all of them are resident before the next grid's blocks can take an SM. H100, session 23
  // (bench/h100/session23/pdl_ab, LORDS_FUSED_PDL=0 / 1, one block per SM, 16 tokens), us: 14336x4096 50.48 -> 49.81,
  // 4096x14336 45.51 -> 44.77, 11008x4096 39.00 -> 38.28, 4096x4096 18.96 -> 17.94 (64 tokens 64.9 -> 64.1).
  constexpr bool sk = SK;
  const bool pdl = pdl_override() >= 0 ? pdl_override() == 1 : sk || a.splits > 1;
  Launch<T, BITS, RT, NTOK, SK> l(sk ? a.stream_k_blocks : (a.N + kRows - 1) / kRows, sk ? 1 : (a.M + NTOK - 1) / NTOK,
                              sk ? 1 : a.splits, stream, pdl);
  const cudaError_t e = cudaLaunchKernelEx(&l.cfg, kernel, static_cast<const T*>(a.x), a.qweight, static_cast<const T*>(a.B),
                                           static_cast<const T*>(a.A), a.codebook, a.codebook_kind, a.bias,
                                           a.bias_kind, static_cast<T*>(a.y), a.M, a.N, a.K, a.r, a.k_per_split,
                                           sk ? a.workspace : nullptr, sk ? a.counters : nullptr,
                                           sk ? a.stream_k_blocks : 0);
  if (e != cudaSuccess) throw std::runtime_error(std::string("lords fused_gemm launch: ") + cudaGetErrorString(e));
}
template <typename T, int BITS, int RT, int NTOK>
void run(const DecodeArgs& a, cudaStream_t stream) {
  if (a.stream_k_blocks > 0) {
    if constexpr (warp_specialized(BITS))
      launch<T, BITS, RT, NTOK, true>(a, stream);
    else
      throw std::runtime_error("lords fused_gemm: stream-K takes 4-bit codes only");
  } else {
    launch<T, BITS, RT, NTOK, false>(a, stream);
  }
}

using Fn = void (*)(const DecodeArgs&, cudaStream_t);
using ClustersFn = int (*)(int);
struct Entry {
  Fn run;
  ClustersFn clusters;
};
template <typename T, int BITS, int RT, int NTOK>
constexpr Entry entry() { return Entry{run<T, BITS, RT, NTOK>, active_clusters<T, BITS, RT, NTOK>}; }

template <typename T, int BITS, int NTOK>
Entry pick_rt(int r) {
  if (r <= 16) return entry<T, BITS, 1, NTOK>();
  if (r <= 32) return entry<T, BITS, 2, NTOK>();
  return entry<T, BITS, 4, NTOK>();
}
template <typename T, int BITS>
Entry pick_tok(int ntok, int r) {
  if (ntok == 16) return pick_rt<T, BITS, 16>(r);
  if (ntok == 64) return pick_rt<T, BITS, 64>(r);
  if (ntok == 192) return entry<T, BITS, 4, 192>();  // fused_token_tile gives 192 only above r = 32
  if constexpr (BITS == 4) {
    if (ntok == 256) return pick_rt<T, BITS, 256>(r);
  } else if (ntok == 256 && r <= 32) {  // fused_token_tile keeps r > 32 at 128 or 192 below 4 bits
    return r <= 16 ? entry<T, BITS, 1, 256>() : entry<T, BITS, 2, 256>();
  }
  return pick_rt<T, BITS, 128>(r);
}
template <typename T>
Entry pick_bits(int bits, int ntok, int r) {
  switch (bits) {
    case 2: return pick_tok<T, 2>(ntok, r);
    case 3: return pick_tok<T, 3>(ntok, r);
    default: return pick_tok<T, 4>(ntok, r);
  }
}
Entry pick(DType dtype, int bits, int ntok, int r) {
  return dtype == DType::kBF16 ? pick_bits<__nv_bfloat16>(bits, ntok, r) : pick_bits<__half>(bits, ntok, r);
}

}  // namespace

// Above r = 32 the tile of 128, 192 or (at 4 bits, where a producer warpgroup and a two-slot ring make it fit)
// 256 tokens with the least estimated time: waves x (superchunks per split + 1) x (tokens + kScaleTokens), over
// 1 to 3 splits (clusters of up to 3 blocks taken to fit SMs / splits at once; fused_gemm_plan then picks the
// split count with the real cluster occupancy). kScaleTokens is the per-superchunk work that does not grow with
// the tile (scale tile at a rank padded to 64, look-ups, the codes), in token units: on the H100 a block's
// superchunk took 2.06 / 2.39 us at 192 / 256 tokens (14336x4096 r = 49, one wave, no split) and 1.79 at 128 with
// two splits (4096x14336), 0.0052 us per token and ~1.05 us besides (session 16, bench/h100/session16/check_halves).
// The first rule, fewest waves without split-K, kept 4096x14336 on 128-token tiles (64 tiles, two splits: 102 us at
// M = 192, 204 at M = 512 on one split). Earlier: 192 tokens for 14336x4096 r = 49 at M = 150 / 192 (85.4 / 91.9 us
// against 159.7 for two waves of 128-token tiles, session 11); 256 at 4 bits for M = 256 (118.7 -> 94.0 us, session
// 15).
// Up to 16 tokens a 16-token tile: the scale tile costs what it costs at 64 tokens, the product a quarter. It beats
// the decode kernels from 6 tokens where the 128-row blocks fill the GPU without split-K (14336x4096 r = 49, M = 6
// / 8 / 16: 50.6 / 50.6 / 50.3 us against 51.7 / 52.5 / 59.9; at M = 5 50.4 against 51.4, at 4 50.6 against 50.4),
// not where it needs split-K (4096x14336 M = 16: 59.0 against 54.0;
// H100, session 12, bench/h100/dequant_paths_session12_desc.json); fused_gemm_preferred follows.
constexpr long kScaleTokens = 200;
// A launch of `tiles` tiles in `splits` splits of k_super superchunks, `at_once` tiles per wave: waves x
// (superchunks per split + ~1 for the prologue and the cluster reduction).
static long split_units(long tiles, long at_once, long k_super, long splits) {
  return ((tiles + at_once - 1) / at_once) * ((k_super + splits - 1) / splits + 1);
}
int fused_token_tile(int M, int r, long N, long K, int sms, int bits) {
  if (M <= 16) return 16;
  if (M <= 64) return 64;
  if (M <= 128) return 128;
  if (r <= 32) return 256;
  const long row_blocks = (N + kRows - 1) / kRows, k_super = std::max<long>(1, K / kSuper);
  int best = 0;
  long best_cost = 0;
  for (int t : {128, 192, 256}) {
    if (t == 256 && bits != 4) continue;
    const long tiles = row_blocks * ((M + t - 1) / t);
    for (long s = 1; s <= min_l(3, k_super); ++s) {
      const long cost = split_units(tiles, std::max<long>(1, sms / s), k_super, s) * (t + kScaleTokens);
      if (best == 0 || cost < best_cost) best = t, best_cost = cost;  // the smaller tile on ties
    }
  }
  return best;
}

bool fused_gemm_fits(long K, int r, const void* x, const void* qweight, const void* A) {
  const void* ptrs[] = {x, qweight, A};
  return r >= 1 && r <= kFusedMaxRank && vector_path_ok(K, ptrs, 3) && wgmma_ready();
}

DecodePlan fused_gemm_plan_with_splits(long N, long K, int want) {
  const long row_blocks = (N + kRows - 1) / kRows;
  const long k_super = K / kSuper;
  long splits = std::max<long>(1, min_l(min_l(k_super, want), kFusedMaxSplits));
  const long sc_per = (k_super + splits - 1) / splits;
  splits = (k_super + sc_per - 1) / sc_per;  // no empty split (9 superchunks, 4 wanted: 3 of 3)
  return DecodePlan{(int)splits, (int)(sc_per * kSuper), row_blocks};
}

DecodePlan fused_gemm_plan(DType dtype, int bits, long N, long K, int M, int r, int sms) {
  // The fewest split_units win, counting the clusters that run at once; fewer splits on ties. A tile is one cluster.
  const int ntok = fused_token_tile(M, r, N, K, sms, bits);
  const Entry kernel = pick(dtype, bits, ntok, r);
  const long tiles = ((N + kRows - 1) / kRows) * ((M + ntok - 1) / ntok);
  const long k_super = K / kSuper;
  long best = 1, best_cost = -1;
  // Beyond kFusedAutoSplits only at 4 bits, and only in one wave: the unit count undervalues a second wave of many
  // small splits (4096x4096 r = 32 M = 16: 3 splits 16.5 us, 8 splits 24.5; 1024x4096 r = 12, 8 tiles: 4 splits
  // 10.5, 8 splits 7.8; H100, session 18, bench/h100/session18/fused_splits). The 128- and 256-token tiles alike
  // (session 19, bench/h100/session19/large_m_splits, us at 4 / 6 / 8 splits): 1024x4096 r = 12 M = 128 14.8 / 13.4
  // / 10.9, M = 256 19.9 / 18.1 / 14.6; 2048x4096 r = 21 (16 tiles; 8 splits take two waves) M = 128 16.0 / 14.8 /
  // 22.5, M = 256 21.2 / 19.6 / 30.1.
  for (long s = 1; s <= min_l(k_super, kFusedMaxSplits); ++s) {
    const int known = s == 1 ? sms : kernel.clusters((int)s);
    const long at_once = std::max<long>(1, known > 0 ? known : sms / s);
    if (s > kFusedAutoSplits && (bits != 4 || tiles > at_once)) continue;
    const long cost = split_units(tiles, at_once, k_super, s);
    if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
  }
  return fused_gemm_plan_with_splits(N, K, (int)best);
}

void fused_gemm(const DecodeArgs& a, int sms, cudaStream_t stream) {
  const int ntok = fused_token_tile(a.M, a.r, a.N, a.K, sms, a.bits);
  pick(a.dtype, a.bits, ntok, a.r).run(a, stream);
}

long fused_stream_k_units(int M, int r, long N, long K, int sms, int bits) {
  const int ntok = fused_token_tile(M, r, N, K, sms, bits);
  return ((N + kRows - 1) / kRows) * ((M + ntok - 1) / ntok) * (K / kSuper);
}

size_t fused_stream_k_workspace_floats(int M, int r, long N, long K, int sms, int bits, int blocks) {
  return (size_t)blocks * (fused_token_tile(M, r, N, K, sms, bits) / 2) * kThreads;
}

// Path -1 runs the 16-token tile on the stream-K schedule (one block per SM) where it is estimated faster than the
// split-K plan, both counted in half superchunk steps of one block: split-K takes waves x (2 x superchunks per split
// + kSplitWaveSteps) (the prologue and the cluster reduction, once per wave), stream-K 2 x its superchunks per block
// + kStreamKFixedSteps (two segments) + kStreamKShareSteps per block sharing a tile (SMs / tiles: the finishing block
// waits for and adds the partials of every block that began its tile). The constants are the least-error fit to 18
// shapes at 16 tokens, 4 bits, parity rank: every one of them on its faster path (H100, session 23, stream-K with PDL
// and the single-release park, bench/h100/session23/release_check: `bench.dequant_paths --ms 16 --stream-k 0`), us,
// split-K plan / stream-K, half steps split-K / stream-K:
//   taken:     5120x13824 75.0 / 55.2 (111 / 77.6), 4096x14336 51.8 / 43.5, 12288x4096 42.6 / 38.7, 11008x4096
//              40.9 / 36.2, 13824x5120 72.5 / 65.6, 4096x11008 39.2 / 35.1, 5120x5120 28.3 / 25.2, 4096x8192 29.4 /
//              27.3 (47 / 45.2), 7168x7168 45.9 / 43.2 (59 / 57.7), 14336x4096 47.9 / 46.5 (67 / 63.4), 6144x4096
//              23.5 / 23.2 (35 / 34.5)
//   not taken: 2560x10240 19.9 / 25.8 (23 / 44.2), 2048x8192 14.7 / 17.4, 4096x4096 15.9 / 17.2 (25 / 29.2),
//              8192x4096 25.3 / 27.8, 8192x8192 53.8 / 53.9 (67 / 73.1), 3072x8192 22.0 / 23.6 (35 / 40),
//              3584x18944 48.7 / 49.0 (77 / 78.4)
// Session 22's rule (no sharing term, 7 superchunks fixed; fitted before stream-K had PDL and the single release)
// left 14336x4096 (3.0 %), 7168x7168 (6.1 %) and 6144x4096 (1.2 %) on split-K in these figures; a fixed cost alone
// cannot take them without also taking 3072x8192 (7.3 % slower), whose 24 tiles are shared by 5.5 blocks each. From
// 17 tokens (64-token tile) stream-K lost on three of four shapes (session 21).
constexpr long kSplitWaveSteps = 3, kStreamKFixedSteps = 5, kStreamKShareSteps = 2;
bool fused_stream_k_preferred(DType dtype, int bits, long N, long K, int M, int r, int sms, const DecodePlan& plan) {
  if (bits != 4 || fused_token_tile(M, r, N, K, sms, bits) != 16 || sms < 1) return false;
  const long tiles = (N + kRows - 1) / kRows, k_super = K / kSuper;
  // Fewer tiles than SMs (otherwise split-K fills the GPU too), and the kernel's 32-bit schedule (units x blocks).
  if (tiles >= sms || (unsigned long long)(tiles * k_super) * (unsigned long long)sms >= (1ull << 32)) return false;
  const long sk_steps = (tiles * k_super + sms - 1) / sms;
  const int known = plan.splits == 1 ? sms : pick(dtype, bits, 16, r).clusters(plan.splits);
  const long at_once = std::max<long>(1, known > 0 ? known : sms / plan.splits);
  const long waves = (tiles + at_once - 1) / at_once;
  const long split_steps = waves * (2 * (plan.k_per_split / kSuper) + kSplitWaveSteps);
  // split_steps > 2 sk_steps + kStreamKFixedSteps + kStreamKShareSteps x sms / tiles, times tiles (exact in integers).
  return tiles * (split_steps - 2 * sk_steps - kStreamKFixedSteps) > kStreamKShareSteps * (long)sms;
}

}  // namespace lords
