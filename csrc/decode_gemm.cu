// Fused LoRDS decode GEMM: y[M, N] = x[M, K] @ (codebook[Q] * (B @ A)).T + bias, M <= 16.
//
// Small M is a memory-bound problem (the codes are the bytes that matter: 8 MB for a 4096x4096 layer
// at 4 bits) with an awkward amount of arithmetic: rebuilding the scale S = B @ A costs r
// multiply-adds per weight, more than CUDA cores can do under the memory floor. So both products run
// on tensor cores (mma.sync m16n8k16, fp32 accumulation):
//   1. per 16x16 weight tile, S_tile = B[16 rows, r] @ A[r, 16 cols]   (2 * ceil(r/16) mmas)
//   2. W_tile = codebook[Q] * S_tile in registers (codebook in a 16-entry shared table: distinct
//      entries sit in distinct banks, so the lookups never conflict)
//   3. y^T[16 rows, tokens] += W_tile @ x^T[16, tokens]          (swap-AB: ceil(M/8) mmas)
// The k-permutation described in lords_tile.cuh lets each lane load its codes with one 16-byte load
// from the canonical packing; A and x stream through a ring of shared-memory slots, one 128-wide
// superchunk each, copied with cp.async while the warps work on the previous one (see kRing below).
//
// Work split: a block owns 256 rows (8 warps x 2 n-tiles up to r = 32, 16 warps x 1 n-tile up to r =
// 64; 128 rows of 8 warps x 1 above) and one K range (split-K), sized so that all blocks are resident at once (two per
// SM for r <= 32, one above). Partial sums go to an fp32 workspace; the last block of a row range to
// finish (an atomic counter per row range) adds them in a fixed order (deterministic), adds the bias
// and writes y, then re-zeroes its counter for the next call.
//
// Dispatch table: dtype {fp16, bf16} x bits {2, 3, 4} x token tiles MT {1, 2} (M <= 8, 16)
// x rank chunks RT {1, 2, 4, 8} (r <= 16, 32, 64, 128; padded ranks are zero).
#include "lords_kernels.h"
#include "lords_tile.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace lords {
namespace {

int rank_chunks(int r) { return r <= 16 ? 1 : r <= 32 ? 2 : r <= 64 ? 4 : 8; }
int token_tiles(int M) { return M <= 8 ? 1 : 2; }

// A and x reach shared memory through a ring of kRing superchunk slots filled with cp.async: the block
// copies superchunk sc + kRing - 1 while its warps work on sc, so the K range a block covers no longer
// sets its shared memory and the copies' latency hides behind the main loop. Before (sessions 1-7) the
// whole A[:, k range] was staged up front in the mma fragment order with 2-byte shared stores, and a 64
// KB bound on that staging cut the r = 49 shapes into 11 splits of 3 superchunks: ncu (14336x4096, M = 2)
// put 61 % of the warps' stall samples in that prologue against 28 % in the main loop. With the ring
// (H100, session 8, bench.decode_paths): 14336x4096 r = 49 M = 2 68.7 -> 52.4 us, M = 16 81.0 -> 62.9;
// 4096x14336 M = 2 70.4 -> 46.8, M = 16 88.0 -> 57.1; 4096x4096 r = 32 and 1024x4096 r = 12 2-7 % faster.
//
// A slot holds A[:, 128 k] in the layout of lords_tile.cuh's A ring (copy_A_async, ldmatrix.trans
// fragments), then the x^T operands of the 8 k-tiles in fragment order (see the main loop), 8 bytes each.
constexpr int kRing = 3;
__host__ __device__ constexpr int slot_bytes(int rt, int mt) { return a_slot_bytes(rt) + 8 * mt * 32 * 8; }

// Copies superchunk `kbase .. kbase + 127` of A (RT*16 rank rows) and x (MT*8 tokens) into a slot with
// cp.async; ranks >= r and tokens >= M are zero-filled. Needs K % 128 == 0 and 16-byte aligned bases.
template <typename T, int RT, int MT, int NTHREADS>
__device__ __forceinline__ void fill_slot(uint32_t slot, const T* __restrict__ A, const T* __restrict__ x, int r,
                                          int M, long K, long kbase) {
  copy_A_async<T, RT, NTHREADS>(slot, A, r, K, kbase);
  // x^T operands: entry (s * MT + mt) * 32 + lane holds x[mt*8 + g, k .. k+3], k = kbase + 32 t + 4 s.
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  constexpr int kItems = 8 * MT * 32;
#pragma unroll
  for (int e0 = 0; e0 < kItems; e0 += NTHREADS) {
    const int e = e0 + threadIdx.x;
    if (kItems % NTHREADS == 0 || e < kItems) {
      const int l = e % 32, s = e / (32 * MT);
      const int m = ((e / 32) % MT) * 8 + l / 4;
      const bool ok = m < M;
      cp_async(slot + a_slot_bytes(RT) + e * 8, ok ? x16 + (long)m * K + kbase + 32 * (l % 4) + 4 * s : x16, 8,
               ok ? 8 : 0);
    }
  }
}

// The same copy for shapes off the vector path (K % 128 != 0 or unaligned bases): element loads with
// bounds, plain shared stores (these shapes go to Triton first, see dispatch.py).
template <typename T, int RT, int MT>
__device__ __forceinline__ void fill_slot_bytes(uint16_t* slot_ptr, const T* __restrict__ A, const T* __restrict__ x, int r,
                                             int M, long K, long kbase) {
  copy_A_bytes<T, RT>(slot_ptr, A, r, K, kbase);
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  uint2* xptr = reinterpret_cast<uint2*>(slot_ptr + a_slot_bytes(RT) / 2);
  for (int e = threadIdx.x; e < 8 * MT * 32; e += blockDim.x) {
    const int l = e % 32, s = e / (32 * MT);
    const int m = ((e / 32) % MT) * 8 + l / 4;
    const long k = kbase + 32 * (l % 4) + 4 * s;
    uint16_t h4[4] = {0, 0, 0, 0};
#pragma unroll
    for (int jj = 0; jj < 4; ++jj)
      if (m < M && k + jj < K) h4[jj] = x16[(long)m * K + k + jj];
    xptr[e] = make_uint2(h4[0] | (uint32_t(h4[1]) << 16), h4[2] | (uint32_t(h4[3]) << 16));
  }
}

// Row tiles per warp, warps per block and blocks per SM. Up to r = 32 a warp takes two 16-row tiles (each
// A fragment read from shared memory serves both) and two blocks of 8 warps fit per SM. From r = 33 the B fragments and
// accumulators of two tiles need ~165 registers, which left one block of 8 warps per SM; one tile per warp
// (110-125 registers) runs 16 warps per SM instead (session 7: 82 -> 73 us at M = 1..2 on 14336x4096,
// r = 49, H100). Those 16 warps form one 256-row block rather than two of 128: every block then staged
// A[:, k range] up front for its rows (before the A ring), and that staging was 55 % of the executed
// instructions (ncu, same shape, M = 2), so twice the rows per block halved it per weight (72.5 -> 69.3
// us); with the ring each block still copies A once per superchunk for all its rows. RT = 8 (136-163
// registers) stays at one block of 8 warps.
template <int RT>
__host__ __device__ constexpr int row_tiles() { return RT >= 4 ? 1 : 2; }
template <int RT>
__host__ __device__ constexpr int warps_per_block() { return RT == 4 ? 2 * kWarps : kWarps; }
template <int RT>
__host__ __device__ constexpr int threads_per_block() { return warps_per_block<RT>() * 32; }
template <int RT>
__host__ __device__ constexpr int rows_per_block() { return warps_per_block<RT>() * 16 * row_tiles<RT>(); }
template <int RT>
constexpr int blocks_per_sm() { return RT >= 4 ? 1 : 2; }
long rows_for_rank(int r) {
  switch (rank_chunks(r)) {
    case 1: return rows_per_block<1>();
    case 2: return rows_per_block<2>();
    case 4: return rows_per_block<4>();
    default: return rows_per_block<8>();
  }
}

// PAIRS (4-bit only): look-ups through a 64 KB pair table in front of the A ring (weight_frag_pairs in
// lords_tile.cuh); chosen where the table fits beside the ring.
template <typename T, int BITS, int MT, int RT, bool PAIRS>
__global__ void __launch_bounds__(threads_per_block<RT>(), blocks_per_sm<RT>())
    decode_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const T* __restrict__ Bm,
                       const T* __restrict__ A, const void* __restrict__ cb, int cb_kind,
                       const void* __restrict__ bias, int bias_kind, T* __restrict__ y, float* __restrict__ ws,
                       int* __restrict__ counters, int M, long N, long K, int r, int kc, bool fast) {
  extern __shared__ uint4 smem_dyn[];
  [[maybe_unused]] uint4* pair_table = smem_dyn;
  uint16_t* ring = reinterpret_cast<uint16_t*>(smem_dyn + (PAIRS ? kPairTableBytes / sizeof(uint4) : 0));
  __shared__ float lut[16];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  constexpr int NT = row_tiles<RT>();  // 16-row tiles per warp
  const long block_row0 = (long)blockIdx.x * rows_per_block<RT>();
  const long warp_row0 = block_row0 + (long)warp * 16 * NT;
  const int split = blockIdx.y, splits = gridDim.y;
  const long k0 = (long)split * kc;
  const int nsc = (int)((min_l(K - k0, kc) + kSuper - 1) / kSuper);
  const long row_bytes = K * BITS / 8;

  auto load_codes = [&](Codes<BITS> (&c)[NT][2], int sc) {
    const long kf = k0 + (long)sc * kSuper + 32 * t;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const long n = warp_row0 + nt * 16 + g + 8 * hh;
        if (n < N && kf < K)
          c[nt][hh].load(qw + n * row_bytes, kf, row_bytes, fast);
        else
          c[nt][hh].clear();
      }
  };

  // Codes of the first superchunk go out first: their DRAM latency overlaps the prologue below.
  Codes<BITS> cur[NT][2], nxt[NT][2];
  load_codes(nxt, 0);

  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  auto fill = [&](int sc) {
    if (sc < nsc) {
      const int slot = sc % kRing;
      if (fast)
        fill_slot<T, RT, MT, threads_per_block<RT>()>(ring_s + slot * slot_bytes(RT, MT), A, x, r, M, K,
                                                      k0 + (long)sc * kSuper);
      else
        fill_slot_bytes<T, RT, MT>(ring + slot * (slot_bytes(RT, MT) / 2), A, x, r, M, K, k0 + (long)sc * kSuper);
    }
    cp_async_commit();  // one group per superchunk, empty past the end, so the wait count below holds
  };
#pragma unroll
  for (int sc = 0; sc < kRing - 1; ++sc) fill(sc);

  if (threadIdx.x < (1 << BITS)) lut[threadIdx.x] = load_scalar(cb, cb_kind, threadIdx.x);
  uint32_t bf[NT][RT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) load_B_frags<T, RT>(bf[nt], Bm, N, r, warp_row0 + nt * 16, lane);
  if constexpr (PAIRS) {
    __syncthreads();  // lut
    build_pair_table(pair_table, lut, threadIdx.x, blockDim.x);
  }
  [[maybe_unused]] const uint32_t table = static_cast<uint32_t>(__cvta_generic_to_shared(pair_table));
  [[maybe_unused]] const uint32_t lane8 = 8u * lane;
  const uint32_t a_lane = ring_s + a_frag_lane_offset(lane);

  float acc[NT][MT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][mt][i] = 0.f;

  for (int sc = 0; sc < nsc; ++sc) {
    // Superchunk sc has landed (at most the kRing - 2 newer groups still in flight) and every warp is
    // done with the slot the next fill overwrites (it held sc - 1).
    cp_async_wait<kRing - 2>();
    __syncthreads();
    fill(sc + kRing - 1);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      cur[nt][0] = nxt[nt][0];
      cur[nt][1] = nxt[nt][1];
    }
    if (sc + 1 < nsc) load_codes(nxt, sc + 1);

    const int slot = sc % kRing;
    const uint32_t a_slot = a_lane + slot * slot_bytes(RT, MT);
    const uint2* xs = reinterpret_cast<const uint2*>(ring + (slot * slot_bytes(RT, MT) + a_slot_bytes(RT)) / 2);
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      uint2 xb[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xb[mt] = xs[(s * MT + mt) * 32 + lane];
      uint4 af[RT];
#pragma unroll
      for (int c = 0; c < RT; ++c) af[c] = ldsm_x4_trans(a_slot + (uint32_t)(c * 16 * kPosPad + 16 * s) * 2);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t wf[4];
        if constexpr (PAIRS)
          weight_frag_pairs<T, RT>(wf, bf[nt], af, cur[nt][0], cur[nt][1], table, lane8, s);
        else
          weight_frag<T, BITS, RT>(wf, bf[nt], af, cur[nt][0], cur[nt][1], lut, s);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) Mma<T>::mma(acc[nt][mt], wf, xb[mt].x, xb[mt].y);
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the block exits

  // acc[nt][mt][i]: row warp_row0 + nt*16 + g + 8*(i/2), token mt*8 + 2t + (i%2).
  if (splits == 1) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const long n = warp_row0 + nt * 16 + g + 8 * (i / 2);
          const int m = mt * 8 + 2 * t + (i % 2);
          if (n < N && m < M) {
            float v = acc[nt][mt][i];
            if (bias != nullptr) v += load_scalar(bias, bias_kind, n);
            y[(long)m * N + n] = Mma<T>::from_float(v);
          }
        }
    return;
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const long n = warp_row0 + nt * 16 + g + 8 * (i / 2);
        const int m = mt * 8 + 2 * t + (i % 2);
        if (n < N && m < M) ws[((long)split * M + m) * N + n] = acc[nt][mt][i];
      }
  if (arrive_last(&counters[blockIdx.x], splits))
    reduce_splits<T>(ws, y, bias, bias_kind, M, N, block_row0, (int)min_l(rows_per_block<RT>(), N - block_row0), splits,
                     &counters[blockIdx.x]);
}

// Shared memory per SM and the per-block opt-in of the current device (cached per device).
struct SmemLimits {
  size_t per_sm, per_block;
};
SmemLimits smem_limits() {
  static SmemLimits cached[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {100 * 1024, 99 * 1024};
  if (cached[dev].per_sm == 0) {
    int sm = 0, blk = 0;
    if (cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess) sm = 100 * 1024;
    if (cudaDeviceGetAttribute(&blk, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) blk = 99 * 1024;
    cached[dev] = {(size_t)sm, (size_t)blk};
  }
  return cached[dev];
}

template <typename T, int BITS, int MT, int RT, bool PAIRS>
void launch(const DecodeArgs& a, cudaStream_t stream, size_t smem, bool fast);

template <typename T, int BITS, int MT, int RT>
void run(const DecodeArgs& a, cudaStream_t stream) {
  const size_t stage = (size_t)kRing * slot_bytes(RT, MT);
  const void* ptrs[] = {a.x, a.qweight, a.A};
  const bool fast = vector_path_ok(a.K, ptrs, 3);
  if constexpr (BITS == 4) {
    // The pair table only where it leaves the planned blocks per SM resident (1 KB per block of static
    // shared memory and reserve kept aside).
    // Building the 64 KB table costs each thread 16 16-byte stores: below two superchunks per block it
    // costs about what its look-ups save (1024x4096, r = 12, M = 1: 128 k per block, 7.4 -> 7.8 us).
    const SmemLimits lim = smem_limits();
    const size_t with_table = stage + kPairTableBytes;
    // Not at RT = 4: measured there on top of the A ring (session 8) and rejected: within 1 % at M = 2..8,
    // 4 % slower at M = 16 on 14336x4096 (bench/cuda_notes.md).
    if (RT != 4 && a.k_per_split >= 2 * kSuper && with_table + 1024 <= lim.per_block &&
        (with_table + 2048) * blocks_per_sm<RT>() <= lim.per_sm) {
      launch<T, BITS, MT, RT, true>(a, stream, with_table, fast);
      return;
    }
  }
  launch<T, BITS, MT, RT, false>(a, stream, stage, fast);
}

template <typename T, int BITS, int MT, int RT, bool PAIRS>
void launch(const DecodeArgs& a, cudaStream_t stream, size_t smem, bool fast) {
  auto kernel = decode_gemm_kernel<T, BITS, MT, RT, PAIRS>;
  // Static shared memory (lut, s_last) counts against the same 48 KB default limit: opt in above 47 KB.
  if (smem > 47 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) throw std::runtime_error(std::string("lords decode_gemm: ") + cudaGetErrorString(e));
  }
  dim3 grid((unsigned)((a.N + rows_per_block<RT>() - 1) / rows_per_block<RT>()), (unsigned)a.splits);
  kernel<<<grid, threads_per_block<RT>(), smem, stream>>>(static_cast<const T*>(a.x), a.qweight, static_cast<const T*>(a.B),
                                           static_cast<const T*>(a.A), a.codebook, a.codebook_kind, a.bias,
                                           a.bias_kind, static_cast<T*>(a.y), a.workspace, a.counters, a.M, a.N,
                                           a.K, a.r, a.k_per_split, fast);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("lords decode_gemm launch: ") + cudaGetErrorString(e));
}

using Fn = void (*)(const DecodeArgs&, cudaStream_t);

template <typename T, int BITS, int MT>
Fn pick_rt(int rt) {
  switch (rt) {
    case 1: return run<T, BITS, MT, 1>;
    case 2: return run<T, BITS, MT, 2>;
    case 4: return run<T, BITS, MT, 4>;
    default: return run<T, BITS, MT, 8>;
  }
}

template <typename T, int BITS>
Fn pick_mt(int mt, int rt) {
  switch (mt) {
    case 1: return pick_rt<T, BITS, 1>(rt);
    default: return pick_rt<T, BITS, 2>(rt);
  }
}

template <typename T>
Fn pick_bits(int bits, int mt, int rt) {
  switch (bits) {
    case 2: return pick_mt<T, 2>(mt, rt);
    case 3: return pick_mt<T, 3>(mt, rt);
    default: return pick_mt<T, 4>(mt, rt);
  }
}


}  // namespace

bool vector_path_ok(long K, const void* const* ptrs, int n_ptrs) {
  if (K % kSuper != 0) return false;
  for (int i = 0; i < n_ptrs; ++i)
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % 16 != 0) return false;
  return true;
}

DecodePlan decode_plan_with_splits(long N, long K, int r, int want) {
  const long n_blocks = (N + rows_for_rank(r) - 1) / rows_for_rank(r);
  const long k_super = (K + kSuper - 1) / kSuper;
  const long asked = std::max<long>(1, min_l(k_super, want));
  const long sc_per = (k_super + asked - 1) / asked;
  // Recounted so that no split is left empty (9 superchunks, 4 wanted: 3 splits of 3).
  const long splits = (k_super + sc_per - 1) / sc_per;
  return DecodePlan{(int)splits, (int)(sc_per * kSuper), n_blocks};
}

DecodePlan decode_plan(long N, long K, int r, int sms) {
  // Fill the resident-block slots once rather than leave a tail wave.
  const long n_blocks = (N + rows_for_rank(r) - 1) / rows_for_rank(r);
  const long slots = (long)(rank_chunks(r) >= 4 ? 1 : 2) * sms;
  return decode_plan_with_splits(N, K, r, (int)std::max<long>(1, slots / n_blocks));
}

void decode_gemm(const DecodeArgs& a, cudaStream_t stream) {
  const int mt = token_tiles(a.M);
  const int rt = rank_chunks(a.r);
  Fn fn = a.dtype == DType::kBF16 ? pick_bits<__nv_bfloat16>(a.bits, mt, rt) : pick_bits<__half>(a.bits, mt, rt);
  fn(a, stream);
}

}  // namespace lords
