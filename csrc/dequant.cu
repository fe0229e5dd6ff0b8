// Fused LoRDS dequantization: W[N, K] = codebook[Q] * (B @ A), written once in fp16/bf16.
//
// Serves lords::dequant_cuda and the large-M path of lords::dequant_matmul_cuda (dequantize, then one
// cuBLAS GEMM: at M >= ~64 the GEMM is compute-bound and cuBLAS is hard to beat, so writing W once
// (2 bytes per weight) is the cheap part). The scale tile is rebuilt on tensor cores exactly as in the
// decode kernel (see lords_tile.cuh: same k-permutation, same A ring, same fragments), so the two
// kernels compute bit-identical W. With that permutation a lane ends up holding 32 consecutive
// weights of each of its two rows per superchunk, 16 bytes (two k-tiles) at a time; they leave the
// block through shared memory as whole rows (FAST below).
//
// Dispatch table: dtype {fp16, bf16} x bits {2, 3, 4} x rank chunks RT {1, 2, 4, 8}.
#include "lords_kernels.h"
#include "lords_tile.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace lords {
namespace {

// Profile of the session-5 form (Nsight Compute, H100, `bash bench/ncu_profile_h100.sh "4096 4096 1 dq1"`:
// 2 row tiles per warp, 121 registers, 16-byte stores straight from the mma fragments): 60 us for
// 4096x4096, DRAM 26 %, one instruction issued per 32 cycles per warp, stalls long_sb 29 %, mio 29 %, lg 8 %,
// drain 54 % of the epilogue. Two changes came out of it, measured one after the other:
// * more warps in flight (one 16-row tile per warp: 64 registers, 4 blocks of 8 warps per SM up to
//   r = 32; the next superchunk's codes loaded while the current one is decoded): 4096x4096 47.7 ->
//   47.5 us, 14336x4096 (r = 49) 232 -> 182 us (bench/dequant_paths.py);
// * full-line stores through shared memory (FAST below): 47.7 -> 21.7 us and 195 -> 101 us (an
//   experiment build with a run-time store switch, not kept; bench/cuda_notes.md "Session 6"), against
//   12.0 / 37.5 us for a bf16 fill of W and 12.8 / 55.9 us for the kernel with its stores removed.
//   What is left at r = 49 is the scale mmas and look-ups themselves.
constexpr int kDqWarps = 8;
constexpr int kDqThreads = kDqWarps * 32;
constexpr int kDqRows = kDqWarps * 16;  // rows per block: one 16-row tile per warp
// A streams through kDqRing superchunk slots (the A ring of lords_tile.cuh), so a block's K range no longer
// sets its shared memory; two slots (the copy of sc + 1 overlaps the work on sc) keep four blocks of
// r <= 32 within an SM's shared memory beside their store tiles. Before (sessions 5-7) each block staged
// A[:, k range] up front with 2-byte shared stores, at most 4 superchunks per block. H100, session 8
// (bench.dequant_paths, automatic depth): 4096x4096 r = 32 23.3 -> 17.7 us, 14336x4096 r = 49 96.5 ->
// 68.4, 4096x14336 95.6 -> 66.0, 1024x4096 r = 12 5.9 -> 5.6.
constexpr int kDqRing = 2;

template <int RT>
constexpr int dq_blocks_per_sm() { return RT <= 2 ? 4 : RT <= 4 ? 2 : 1; }

// FAST (K % 128 == 0, 16-byte aligned rows): wide code loads, and each warp's 16 x 128 W tile of a
// superchunk goes through shared memory (16-byte chunks XOR-swizzled so that neither the fragment-order
// writes nor the row-order reads have bank conflicts) and leaves as full 128-byte lines, 2 rows per store
// instruction; stored straight from the fragments, each 16-byte store of a warp hit 32 different lines.
// Otherwise (any K) bytes are read and written one by one with bounds checks.
constexpr int kStageBytesPerWarp = 16 * kSuper * 2;
__device__ __forceinline__ int stage_chunk(int row, int c) { return c ^ ((2 * (c >> 3) + (row & 1)) & 3); }

template <typename T, int BITS, int RT, bool FAST>
__global__ void __launch_bounds__(kDqThreads, dq_blocks_per_sm<RT>())
    dequant_kernel(const uint8_t* __restrict__ qw, const T* __restrict__ Bm, const T* __restrict__ A,
                   const void* __restrict__ cb, int cb_kind, T* __restrict__ W, long N, long K, int r, int kc) {
  constexpr bool fast = FAST;
  extern __shared__ uint4 smem_dyn[];
  uint16_t* ring = reinterpret_cast<uint16_t*>(smem_dyn);
  __shared__ float lut[16];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long row0 = (long)blockIdx.x * kDqRows + (long)warp * 16;
  const long k0 = (long)blockIdx.y * kc;
  const int nsc = (int)((min_l(K - k0, kc) + kSuper - 1) / kSuper);
  const long row_bytes = K * BITS / 8;

  auto load_codes = [&](Codes<BITS> (&c)[2], int sc) {
    const long kf = k0 + (long)sc * kSuper + 32 * t;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const long n = row0 + g + 8 * hh;
      if (n < N && kf < K)
        c[hh].load(qw + n * row_bytes, kf, row_bytes, fast);
      else
        c[hh].clear();
    }
  };

  // The first codes are issued before the block's prologue so their DRAM latency overlaps it.
  uint4* wstage = reinterpret_cast<uint4*>(smem_dyn) + (size_t)kDqRing * a_slot_bytes(RT) / 16 +
                  (size_t)warp * kStageBytesPerWarp / 16;
  Codes<BITS> cur[2], nxt[2];
  load_codes(nxt, 0);
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  auto fill = [&](int sc) {
    if (sc < nsc) {
      if constexpr (FAST)
        copy_A_async<T, RT, kDqThreads>(ring_s + (sc % kDqRing) * a_slot_bytes(RT), A, r, K, k0 + (long)sc * kSuper);
      else
        copy_A_bytes<T, RT>(ring + (sc % kDqRing) * (a_slot_bytes(RT) / 2), A, r, K, k0 + (long)sc * kSuper);
    }
    cp_async_commit();
  };
  fill(0);
  if (threadIdx.x < (1 << BITS)) lut[threadIdx.x] = load_scalar(cb, cb_kind, threadIdx.x);
  uint32_t bf[RT][4];
  load_B_frags<T, RT>(bf, Bm, N, r, row0, lane);
  const uint32_t a_lane = ring_s + a_frag_lane_offset(lane);

  for (int sc = 0; sc < nsc; ++sc) {
    // Superchunk sc's A has landed, and every warp is past sc - 1, whose slot the next copy reuses.
    cp_async_wait<kDqRing - 2>();
    __syncthreads();
    fill(sc + kDqRing - 1);
    cur[0] = nxt[0];
    cur[1] = nxt[1];
    if (sc + 1 < nsc) load_codes(nxt, sc + 1);
    const uint32_t a_slot = a_lane + (sc % kDqRing) * a_slot_bytes(RT);
    const long kb = k0 + (long)sc * kSuper + 32 * t;
#pragma unroll
    for (int s = 0; s < 8; s += 2) {
      // Two k-tiles give a lane 8 consecutive weights of each of its rows: one 16-byte store per row.
      uint32_t wf[2][4];
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        uint4 af[RT];
#pragma unroll
        for (int c = 0; c < RT; ++c) af[c] = ldsm_x4_trans(a_slot + (uint32_t)(c * 16 * kPosPad + 16 * (s + u)) * 2);
        weight_frag<T, BITS, RT>(wf[u], bf, af, cur[0], cur[1], lut, s + u);
      }
      // wf[u]: {row g: k+0,1}, {row g+8: k+0,1}, {row g: k+2,3}, {row g+8: k+2,3} for k = kb + 4(s+u).
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const uint4 v = make_uint4(wf[0][hh], wf[0][hh + 2], wf[1][hh], wf[1][hh + 2]);
        if constexpr (FAST) {
          const int row = g + 8 * hh, c = 4 * t + s / 2;
          wstage[row * (kSuper / 8) + stage_chunk(row, c)] = v;
          continue;
        }
        const long n = row0 + g + 8 * hh;
        if (n >= N) continue;
        T* dst = W + n * K + kb + 4 * s;
        const uint32_t part[4] = {v.x, v.y, v.z, v.w};
        uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (kb + 4 * s + e < K) d16[e] = static_cast<uint16_t>(part[e / 2] >> (16 * (e % 2)));
      }
    }
    if constexpr (FAST) {
      __syncwarp();
      const long ksc = k0 + (long)sc * kSuper;
#pragma unroll
      for (int it = 0; it < 8; ++it) {
        const int row = 2 * it + lane / 16, c = lane % 16;
        const uint4 v = wstage[row * (kSuper / 8) + stage_chunk(row, c)];
        const long n = row0 + row;
        if (n < N) *reinterpret_cast<uint4*>(W + n * K + ksc + 8 * c) = v;
      }
      __syncwarp();
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits
}

// Superchunks per block: `requested` where given (benchmarks sweep it); otherwise the fewest blocks that
// still fill one wave of resident blocks, so the per-block set-up (B fragments, the first copy, the lut)
// is paid once per SM slot.
template <typename T, int RT>
long superchunks_per_block(long N, long k_super, int requested, int sms) {
  if (requested > 0) return min_l(k_super, requested);
  const long row_blocks = (N + kDqRows - 1) / kDqRows;
  const long wave = (long)sms * dq_blocks_per_sm<RT>();
  const long splits = std::max<long>(1, min_l(k_super, wave / row_blocks));
  return (k_super + splits - 1) / splits;
}

template <typename T, int BITS, int RT, bool FAST>
void launch(const DequantArgs& a, cudaStream_t stream, long sc_per) {
  auto kernel = dequant_kernel<T, BITS, RT, FAST>;
  const long k_super = (a.K + kSuper - 1) / kSuper;
  const int kc = (int)(sc_per * kSuper);
  const size_t smem = (size_t)kDqRing * a_slot_bytes(RT) + (FAST ? (size_t)kDqWarps * kStageBytesPerWarp : 0);
  if (smem > 47 * 1024) {  // static shared memory counts against the 48 KB default too
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) throw std::runtime_error(std::string("lords dequant: ") + cudaGetErrorString(e));
  }
  dim3 grid((unsigned)((a.N + kDqRows - 1) / kDqRows), (unsigned)((k_super + sc_per - 1) / sc_per));
  kernel<<<grid, kDqThreads, smem, stream>>>(a.qweight, static_cast<const T*>(a.B), static_cast<const T*>(a.A),
                                             a.codebook, a.codebook_kind, static_cast<T*>(a.W), a.N, a.K, a.r, kc);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("lords dequant launch: ") + cudaGetErrorString(e));
}

template <typename T, int BITS, int RT>
void run(const DequantArgs& a, cudaStream_t stream) {
  const long k_super = (a.K + kSuper - 1) / kSuper;
  const long sc_per = superchunks_per_block<T, RT>(a.N, k_super, a.superchunks, a.sms);
  const void* ptrs[] = {a.qweight, a.A, a.W};
  if (vector_path_ok(a.K, ptrs, 3))
    launch<T, BITS, RT, true>(a, stream, sc_per);
  else
    launch<T, BITS, RT, false>(a, stream, sc_per);
}

using Fn = void (*)(const DequantArgs&, cudaStream_t);

template <typename T, int BITS>
Fn pick_rt(int r) {
  if (r <= 16) return run<T, BITS, 1>;
  if (r <= 32) return run<T, BITS, 2>;
  if (r <= 64) return run<T, BITS, 4>;
  return run<T, BITS, 8>;
}

template <typename T>
Fn pick_bits(int bits, int r) {
  switch (bits) {
    case 2: return pick_rt<T, 2>(r);
    case 3: return pick_rt<T, 3>(r);
    default: return pick_rt<T, 4>(r);
  }
}

}  // namespace

void dequant(const DequantArgs& a, cudaStream_t stream) {
  Fn fn = a.dtype == DType::kBF16 ? pick_bits<__nv_bfloat16>(a.bits, a.r) : pick_bits<__half>(a.bits, a.r);
  fn(a, stream);
}

}  // namespace lords
