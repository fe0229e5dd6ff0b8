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
// from the canonical packing; A for the block's K range is gathered into shared memory once, in
// fragment order, and shared by all 16 n-tiles of the block.
//
// Work split: a block owns 256 rows (8 warps x 2 n-tiles) and one K range (split-K), sized so that
// all blocks are resident at once (two per SM for r <= 32, one above). Partial sums go to an fp32 workspace; the last block of a row
// range to finish (an atomic counter per row range) adds them in a fixed order (deterministic), adds
// the bias and writes y, then re-zeroes its counter for the next call.
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

// Dynamic shared memory of a block: the A slice (RT*16 rank rows x k range) and the x operands.
size_t stage_bytes(int rt, int mt, long n_super, int dtype_bytes) {
  return (size_t)n_super * ((size_t)rt * 16 * kSuper * dtype_bytes + (size_t)mt * 8 * 32 * sizeof(uint2));
}

// Row tiles per warp, warps per block and blocks per SM. Up to r = 32 a warp takes two 16-row tiles (each
// staged A fragment serves both) and two blocks of 8 warps fit per SM. From r = 33 the B fragments and
// accumulators of two tiles need ~165 registers, which left one block of 8 warps per SM; one tile per warp
// (110-125 registers) runs 16 warps per SM instead (session 7: 82 -> 73 us at M = 1..2 on 14336x4096,
// r = 49, H100). Those 16 warps form one 256-row block rather than two of 128: every block stages
// A[:, k range] for its rows, and that staging was 55 % of the executed instructions (ncu, same shape,
// M = 2), so twice the rows per block halves it per weight (72.5 -> 69.3 us). RT = 8 (136-163 registers)
// stays at one block of 8 warps.
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

// PAIRS (4-bit only): look-ups through a 64 KB pair table in front of the staged operands
// (weight_frag_pairs in lords_tile.cuh); chosen where the table fits beside the blocks' staging.
template <typename T, int BITS, int MT, int RT, bool PAIRS>
__global__ void __launch_bounds__(threads_per_block<RT>(), blocks_per_sm<RT>())
    decode_gemm_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const T* __restrict__ Bm,
                       const T* __restrict__ A, const void* __restrict__ cb, int cb_kind,
                       const void* __restrict__ bias, int bias_kind, T* __restrict__ y, float* __restrict__ ws,
                       int* __restrict__ counters, int M, long N, long K, int r, int kc, bool fast) {
  extern __shared__ uint4 smem_dyn[];
  [[maybe_unused]] uint4* pair_table = smem_dyn;
  uint16_t* astage = reinterpret_cast<uint16_t*>(smem_dyn + (PAIRS ? kPairTableBytes / sizeof(uint4) : 0));
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

  // Codes of the first superchunk go out first: their DRAM latency overlaps the staging below.
  Codes<BITS> cur[NT][2], nxt[NT][2];
  load_codes(nxt, 0);

  if (threadIdx.x < (1 << BITS)) lut[threadIdx.x] = load_scalar(cb, cb_kind, threadIdx.x);
  uint32_t bf[NT][RT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) load_B_frags<T, RT>(bf[nt], Bm, N, r, warp_row0 + nt * 16, lane);
  stage_A<T, RT>(astage, A, r, K, k0, nsc * kSuper, fast);
  // x^T operands of the block's K range, in fragment order: entry ((sc*8 + s)*MT + mt)*32 + lane holds
  // x[mt*8 + g, k .. k+3] for k = k0 + 128 sc + 32t + 4s (zero past M or K). Staged once, so the main
  // loop reads them with conflict-free 8-byte LDS instead of an L1/L2 round trip per k-tile.
  uint2* xstage = reinterpret_cast<uint2*>(astage + (size_t)RT * 16 * nsc * kSuper);
  {
    const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
    const int total = nsc * 8 * MT * 32;
    constexpr int kU = 4;  // loads of four items in flight together (see stage_A)
    for (int e0 = threadIdx.x; e0 < total; e0 += kU * blockDim.x) {
      uint2 v[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int e = e0 + u * blockDim.x;
        const int l = e % 32, rest = e / 32;
        const int mt = rest % MT, s = (rest / MT) % 8, sc = rest / (MT * 8);
        const int m = mt * 8 + l / 4;
        const long k = k0 + (long)sc * kSuper + 32 * (l % 4) + 4 * s;
        v[u] = make_uint2(0u, 0u);
        if (e < total && m < M && fast) {
          v[u] = __ldg(reinterpret_cast<const uint2*>(x16 + (long)m * K + k));
        } else if (e < total && m < M) {
          uint16_t h[4];
#pragma unroll
          for (int j = 0; j < 4; ++j) h[j] = (k + j < K) ? x16[(long)m * K + k + j] : uint16_t(0);
          v[u] = make_uint2(h[0] | (uint32_t(h[1]) << 16), h[2] | (uint32_t(h[3]) << 16));
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u)
        if (e0 + u * (int)blockDim.x < total) xstage[e0 + u * blockDim.x] = v[u];
    }
  }
  __syncthreads();
  if constexpr (PAIRS) {
    build_pair_table(pair_table, lut);
    __syncthreads();
  }
  [[maybe_unused]] const uint32_t table = static_cast<uint32_t>(__cvta_generic_to_shared(pair_table));
  [[maybe_unused]] const uint32_t lane8 = 8u * lane;

  float acc[NT][MT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][mt][i] = 0.f;

  for (int sc = 0; sc < nsc; ++sc) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      cur[nt][0] = nxt[nt][0];
      cur[nt][1] = nxt[nt][1];
    }
    if (sc + 1 < nsc) load_codes(nxt, sc + 1);

#pragma unroll
    for (int s = 0; s < 8; ++s) {
      uint2 xb[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xb[mt] = xstage[((sc * 8 + s) * MT + mt) * 32 + lane];
      uint4 af[RT];
#pragma unroll
      for (int c = 0; c < RT; ++c)
        af[c] = *reinterpret_cast<const uint4*>(astage + ((((long)sc * 8 + s) * RT + c) * 32 + lane) * 8);
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
  const size_t stage = stage_bytes(RT, MT, a.k_per_split / kSuper, (int)sizeof(T));
  const void* ptrs[] = {a.x, a.qweight, a.A};
  const bool fast = vector_path_ok(a.K, ptrs, 3);
  if constexpr (BITS == 4) {
    // The pair table only where it leaves the planned blocks per SM resident (1 KB per block of static
    // shared memory and reserve kept aside).
    // Building the 64 KB table costs each thread 16 16-byte stores: below two superchunks per block it
    // costs about what its look-ups save (1024x4096, r = 12, M = 1: 128 k per block, 7.4 -> 7.8 us).
    const SmemLimits lim = smem_limits();
    const size_t with_table = stage + kPairTableBytes;
    // Not at RT = 4: the table fits beside its single block per SM only since session 7 and has not been
    // measured there (bench/wip/decode-w16-pairs.patch); these RT = 4 timings are without it.
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

DecodePlan decode_plan_with_splits(long N, long K, int r, int M, int dtype_bytes, int want) {
  const long n_blocks = (N + rows_for_rank(r) - 1) / rows_for_rank(r);
  const long k_super = (K + kSuper - 1) / kSuper;
  long splits = std::max<long>(1, min_l(k_super, want));
  long sc_per = (k_super + splits - 1) / splits;
  // The staged A slice and x operands stay under 64 KB of shared memory.
  const long max_sc = std::max<long>(1, (64L * 1024) / (long)stage_bytes(rank_chunks(r), token_tiles(M), 1, dtype_bytes));
  sc_per = min_l(sc_per, max_sc);
  splits = (k_super + sc_per - 1) / sc_per;
  // Even splits: the same count with the superchunks spread over them (no short last split).
  sc_per = (k_super + splits - 1) / splits;
  return DecodePlan{(int)splits, (int)(sc_per * kSuper), n_blocks};
}

DecodePlan decode_plan(long N, long K, int r, int M, int dtype_bytes, int sms) {
  // Fill the resident-block slots once rather than leave a tail wave.
  const long n_blocks = (N + rows_for_rank(r) - 1) / rows_for_rank(r);
  const long slots = (long)(rank_chunks(r) >= 4 ? 1 : 2) * sms;
  return decode_plan_with_splits(N, K, r, M, dtype_bytes, (int)std::max<long>(1, slots / n_blocks));
}

void decode_gemm(const DecodeArgs& a, cudaStream_t stream) {
  const int mt = token_tiles(a.M);
  const int rt = rank_chunks(a.r);
  Fn fn = a.dtype == DType::kBF16 ? pick_bits<__nv_bfloat16>(a.bits, mt, rt) : pick_bits<__half>(a.bits, mt, rt);
  fn(a, stream);
}

}  // namespace lords
