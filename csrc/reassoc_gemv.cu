// Re-associated LoRDS decode GEMM for one to a few tokens (M * ceil(r/8)*8 <= 64).
//
//   y[m, n] = sum_k codebook[Q[n,k]] * (sum_j B[n,j] A[j,k]) * x[m,k]
//           = sum_j B[n,j] * T[n, (m,j)],   T = C @ Z^T,   C[n,k] = codebook[Q[n,k]],   Z[(m,j),k] = A[j,k] x[m,k]
//
// The direct kernel (decode_gemm.cu) rebuilds the scale tile B @ A per 16x16 weight tile and then
// multiplies every weight by its scale on the CUDA cores (fp32 multiply, conversion, packing: ~5.5
// instructions per weight, which made it issue-bound at 3x the memory floor). Re-associated, the
// scale never meets the weight: per weight only the codebook look-up is left, the r-wide product
// runs on the tensor cores as T = C @ Z^T with the M*r columns of Z as the narrow (n = 8) mma side,
// and B is applied once per output row in the epilogue. The tensor-core work grows with M*r (2*M*r
// FLOPs per weight), so this kernel serves only small M*r; the direct kernel takes the rest.
//
// Per weight the look-up is one LDS per pair of codes: a pair of codes (2*BITS bits) indexes a table
// of packed 16-bit value pairs in the mma operand layout (256 / 64 / 16 entries at 4 / 3 / 2 bits).
// Random indices from 32 lanes would collide in the 32 shared-memory banks (~3.5-way on average), so
// the table is replicated once per lane with lane l's copy entirely in bank l: word p*32 + l (at 4 bits
// each entry is padded to 64 words, see entry_words). That costs 64 KB at 4 bits and makes every
// look-up conflict-free.
//
// Layout and loads follow lords_tile.cuh: the k-permutation gives each lane 32 consecutive codes of
// each of its rows per 128-wide superchunk (one 16-byte load at 4 bits), and Z is staged once per
// block in the matching fragment order (one 8-byte LDS per 8-column tile and k-tile; the WG variant's
// own layout below). A block is 16 warps x 2 16-row tiles = 512 rows (on mma.sync 8 warps x 2 at NJ = 6,
// 7; 16 warps x 1 at NJ = 8: 256 rows) over
// one K range; split-K partials are reduced deterministically by the last block of each row range (same
// scheme and counters as decode_gemm.cu).
//
// Dispatch table: dtype {fp16, bf16} x bits {2, 3, 4} x column tiles NJ {2, 4, 6, 7, 8} (M*r8 <= 16, 32, 48,
// 56, 64) x {mma.sync, wgmma (WG, sm_90a)}: on mma.sync the main loop at r = 49 is bound by shared-memory
// traffic, most of it Z fragments (one LDS.64 per column tile), so r8 = 56 runs 7 tiles rather than 8; the
// WG variant (below) leaves Z to the tensor cores and takes 16-byte-aligned, K % 128 == 0 launches on a 9.0
// GPU when the build has sm_90a code alone (LORDS_SM90A). WG launches use programmatic dependent launch
// (see the kernel's griddepcontrol.wait): H100, session 14, 4096x4096 r = 32 M = 1 11.49 -> 10.38 us,
// 14336x4096 r = 49 27.36 -> 26.80 (bench/cuda_notes.md).
#include "lords_kernels.h"
#include "lords_tile.cuh"
#include "wgmma_rs.cuh"

#include <algorithm>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace lords {
namespace {

constexpr int kDepth = 2;  // superchunks of codes in flight per warp (registers: kDepth * row tiles * 2 * BITS words)

// Words per table entry: 32 lane copies; at 4 bits each entry is padded to 64 words (256 bytes) so that
// an entry's byte offset is (pair << 8) and a look-up address is one PRMT away from the code word.
__host__ __device__ constexpr int entry_words(int bits) { return bits == 4 ? 64 : 32; }
__host__ __device__ constexpr int lut_words(int bits) { return (1 << (2 * bits)) * entry_words(bits); }

// One 32-bit shared-memory load from a shared-window address (volatile: never moved above the
// __syncthreads that publishes the table).
__device__ __forceinline__ uint32_t lds_u32(uint32_t saddr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(saddr));
  return v;
}

// Hopper (sm_90a) variant, template flag WG: the product T = C @ Z^T runs as one wgmma per 16-row tile
// and k-tile for the whole warpgroup (m64nNk16, N = 8 NJ): C from registers exactly as for mma.sync
// (the A layout of wgmma's register operand is that of m16n8k16, warp w of the warpgroup holding rows
// 16w .. 16w+15, which may be any rows), Z read by the tensor cores straight from shared memory through a
// descriptor. That removes the NJ Z-fragment LDS.64 per k-tile from every warp (the MIO traffic that bound
// the r = 49 launch) and the NJ mma.sync of each tile become one asynchronous instruction, so a warp
// looks up the next k-tile's codes while the current product runs.
// Z layout for WG, per (superchunk, k-tile) tile of 8 NJ columns x 16 k-positions: wgmma's K-major
// no-swizzle canonical form, 8x8 core matrices of 128 contiguous bytes (8 columns x 8 positions), core
// (jt, kh) (columns 8 jt .., positions 8 kh ..) at byte (2 jt + kh) * 128 of the tile. Same bytes per tile
// as the mma.sync fragment order (NJ * 256).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (the other device passes would flag it as unused)
__device__ __forceinline__ uint64_t z_desc(uint32_t saddr) { return smem_desc(saddr, 128, 256); }
#endif

int column_tiles(int M, int r) {
  const int cols = M * ((r + 7) / 8) * 8;
  return cols <= 16 ? 2 : cols <= 32 ? 4 : cols <= 48 ? 6 : cols <= 56 ? 7 : cols <= 64 ? 8 : cols <= 112 ? 14 : 16;
}
size_t z_bytes(int nj, long n_super) { return (size_t)n_super * 8 * nj * 32 * sizeof(uint2); }
// Streamed Z (column tiles above 8, WG only): Z = A * x for the whole K is written to global memory by
// reassoc_z_kernel in the staged layout, and each block copies one superchunk of it at a time into a ring
// of kZSlots slots. Staging the 2 r columns of two tokens whole capped a split at 6 superchunks (the 64 KB
// pair table beside it) and took 2.5 waves on 14336x4096 (61.9 us at M = 2, session 9).
constexpr int kZSlots = 3;
__host__ __device__ constexpr bool z_streamed(int nj) { return nj > 8; }
size_t smem_bytes(int bits, int nj, long n_super) {
  return lut_words(bits) * 4 + z_bytes(nj, z_streamed(nj) ? kZSlots : n_super);
}
// One block per SM (the table build, the Z staging and the epilogue are per-block costs; the first
// profile, ncu 4096x4096 M = 1 with 8-warp blocks, showed them at about twice the main loop's
// instructions, so a block covers as many rows as the register file allows). Below 8 column tiles every
// warp takes two 16-row tiles, which share each staged Z fragment. Up to 4 column tiles that fits 128
// registers, so 16 warps; at 6 and 7 column tiles the accumulators (2 x NJ x 4) need more, so 8 warps of
// up to 255 registers. The session-5 profile had r = 49 (then 16 warps of one row tile) throttled by
// shared-memory traffic, 8 of its ~10 bytes per weight Z fragments: two row tiles per fragment halve those
// (H100, session 6: 14336x4096 r = 49 M = 1, 39.5 -> 37.4 us). At 8 column tiles the same layout measured
// slower (1024x4096 r = 12 M = 4: 11.4 -> 13.9 us; 4096x4096 r = 32 M = 2: 16.6 -> 17.1 us), so NJ = 8
// keeps 16 warps of one row tile.
// The WG variant holds no Z fragments in registers, so below 8 column tiles it runs 16 warps x 2 row
// tiles = 512 rows: the Z staging, a per-block cost, is then shared by twice the rows of the 8-warp layout
// at NJ = 6, 7 (H100, session 9, 14336x4096 r = 49 M = 1: 8 warps x 2 row tiles with wgmma 40.4 us, 16
// warps x 2 28.0, mma.sync 38.2). At 8 tiles one row tile per warp (4096x4096 r = 32 M = 2: 14.5 us with
// one, 17.8 with two). A wider WG variant (10-16 column tiles, M * r8 up to 128) was built and measured
// slower than the direct kernel (14336x4096 r = 49 M = 2: 61.9 against 48.7 us; 4096x4096 r = 32 M = 4:
// 21.3 against 15.6), so 64 columns stay the bound.
template <int NJ, bool WG = false>
__host__ __device__ constexpr int re_warps() { return !WG && (NJ == 6 || NJ == 7) ? 8 : 16; }
template <int NJ, bool WG = false>
__host__ __device__ constexpr int re_threads() { return re_warps<NJ, WG>() * 32; }
// 224 KB: the 64 KB pair table must not shrink the superchunks a split may stage (at 160 KB the
// r = 49 shapes went from 4 to 6 splits: 336 blocks, 2.5 waves, +6 % at M = 1 on the H100).
constexpr size_t kReassocSmemCap = 224 * 1024;

// The shared memory a block may opt in to on the current GPU (227 KB on sm_90, 163 KB on sm_80, 99 KB
// on sm_86/89), less 1 KB for static shared memory, capped at kReassocSmemCap; cached per device.
size_t smem_cap() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 96 * 1024;
  if (cached[dev] == 0) {
    int optin = 0;
    if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) optin = 97 * 1024;
    cached[dev] = (int)std::min<size_t>(kReassocSmemCap, (size_t)optin - 1024);
  }
  return (size_t)cached[dev];
}

template <int NJ, bool WG = false>
__host__ __device__ constexpr int row_tiles() { return NJ >= 8 ? 1 : 2; }
template <int NJ, bool WG = false>
__host__ __device__ constexpr int rows_per_block() { return re_warps<NJ, WG>() * 16 * row_tiles<NJ, WG>(); }

// FAST: K % 128 == 0 and 16-byte aligned x, qweight, A (vector_path_ok): no bounds checks or byte-wise
// paths in the kernel at all, which the SASS of the generic version showed to be most of its main loop.
// MAXM: the largest token count the epilogue handles (1 for the one-token launch: no per-token
// selection, one shuffle pair per row).
template <typename T, int BITS, int NJ, bool FAST, int MAXM, bool WG>
__global__ void __launch_bounds__(re_threads<NJ, WG>(), 1)
    reassoc_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qw, const T* __restrict__ Bm,
                   const T* __restrict__ A, const void* __restrict__ cb, int cb_kind, const void* __restrict__ bias,
                   int bias_kind, T* __restrict__ y, float* __restrict__ ws, int* __restrict__ counters, int M,
                   long N, long K, int r, int kc, const uint2* __restrict__ zg) {
  constexpr bool fast = FAST;
  constexpr bool ZR = z_streamed(NJ);
  static_assert(!ZR || (WG && FAST), "streamed Z: the wgmma variant on whole 16-byte-aligned superchunks only");
  constexpr int NT = row_tiles<NJ, WG>();
  constexpr int kRows = rows_per_block<NJ, WG>();
  extern __shared__ uint4 smem_dyn[];
  uint32_t* lut = reinterpret_cast<uint32_t*>(smem_dyn);
  uint2* zst = reinterpret_cast<uint2*>(lut + lut_words(BITS));
  __shared__ float levels[1 << BITS];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long block_row0 = (long)blockIdx.x * kRows;
  const long warp_row0 = block_row0 + (long)warp * 16 * NT;
  const int split = blockIdx.y, splits = gridDim.y;
  const long k0 = (long)split * kc;
  const int nsc = (int)((min_l(K - k0, kc) + kSuper - 1) / kSuper);
  const long row_bytes = K * BITS / 8;
  const int r8 = (r + 7) / 8 * 8;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Programmatic dependent launch (the host sets it on sm_90a launches, `pdl` in run()): this grid may start
  // while the previous kernel in the stream still runs. Nothing that kernel may write is read before
  // griddepcontrol.wait; only L2 prefetch hints for this block's codes and A slice go out first (L2 is the
  // point of coherence, so a hint for a line being written is harmless), and the DRAM transfer of the codes,
  // most of a one-token launch, overlaps the previous kernel's tail (its split-K reduction, in which most
  // SMs are idle). Without the launch attribute the wait returns at once.
  if constexpr (FAST && WG) {
    const long row_span = (long)nsc * kSuper * BITS / 8;  // this split's code bytes per row
    const int lines = (int)(row_span / 128) + 1;            // the span may straddle one more line
    for (int i = threadIdx.x; i < kRows * lines; i += blockDim.x) {
      const uint8_t* start = qw + min_l(block_row0 + i / lines, N - 1) * row_bytes + k0 * BITS / 8;
      const uint8_t* line = reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(start) & ~uintptr_t(127)) +
                            (long)(i % lines) * 128;
      if (line < start + row_span) prefetch_l2(line);
    }
    if constexpr (!ZR) {  // streamed Z reads Z, not A
      const int alines = nsc * kSuper * (int)sizeof(T) / 128;  // whole lines: k0 and the span are 128-aligned
      for (int i = threadIdx.x; i < r * alines; i += blockDim.x)
        prefetch_l2(A + (long)(i / alines) * K + k0 + (long)(i % alines) * (128 / sizeof(T)));
    }
  }
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif

  // FAST: one pointer per row, advanced by a superchunk's bytes; rows past N read row N-1 (their
  // results are never stored), and the K range is whole superchunks, so no load needs a check.
  const uint8_t* rowp[NT][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      rowp[nt][hh] = qw + min_l(warp_row0 + nt * 16 + g + 8 * hh, N - 1) * row_bytes + (k0 + 32 * t) * BITS / 8;
  auto load_codes = [&](Codes<BITS> (&c)[NT][2], int sc) {
    const long kf = k0 + (long)sc * kSuper + 32 * t;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const long n = warp_row0 + nt * 16 + g + 8 * hh;
        if constexpr (FAST)
          c[nt][hh].load_fast(rowp[nt][hh] + sc * (kSuper * BITS / 8));
        else if (n < N && kf < K)
          c[nt][hh].load(qw + n * row_bytes, kf, row_bytes, false);
        else
          c[nt][hh].clear();
      }
  };

  // The prologue is latency, not work: every global load below is issued before its first use, so the
  // block pays about one DRAM round trip (the codes) with the L2 round trips of the codebook and of
  // A and x hidden under it.
  // Z item idx (the mma.sync fragment-order index of its first k-tile, see the general staging below)
  // from lane l: the pairs (p0, p1) of k-tile 2 sp and (p2, p3) of k-tile 2 sp + 1. For WG the same
  // values go to the core-matrix layout: the k-tile's tile starts at word 2 (idx - l) - 64 jt, column
  // jt*8 + l/4 is row l/4 of core (jt, kh), positions 2t, 2t+1 (kh = 0: p0) and 8+2t, 9+2t (kh = 1: p1),
  // i.e. words 2 idx - l and 2 idx - l + 32; the next k-tile's tile follows NJ*64 words later.
  auto store_z = [&](int idx, int l, uint32_t p0, uint32_t p1, uint32_t p2, uint32_t p3) {
    if constexpr (WG) {
      uint32_t* zw = reinterpret_cast<uint32_t*>(zst) + (2 * idx - l);
      zw[0] = p0;
      zw[32] = p1;
      zw[NJ * 64] = p2;
      zw[NJ * 64 + 32] = p3;
    } else {
      zst[idx] = make_uint2(p0, p1);
      zst[idx + NJ * 32] = make_uint2(p2, p3);
    }
  };

  Codes<BITS> ring[kDepth][NT][2];
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
    if (d < nsc) load_codes(ring[d], d);
  if (threadIdx.x < (1 << BITS)) levels[threadIdx.x] = load_scalar(cb, cb_kind, threadIdx.x);

  // Streamed Z: superchunk sc of this split (global superchunk k0 / kSuper + sc) into slot sc % kZSlots.
  constexpr int kSlotBytes = 8 * NJ * 32 * (int)sizeof(uint2);
  const uint32_t zst_s = static_cast<uint32_t>(__cvta_generic_to_shared(zst));
  auto copy_z = [&](int sc) {
    const uint8_t* src = reinterpret_cast<const uint8_t*>(zg) + (k0 / kSuper + sc) * (long)kSlotBytes;
    const uint32_t dst = zst_s + (uint32_t)((sc % kZSlots) * kSlotBytes);
    for (int i = threadIdx.x; i < kSlotBytes / 16; i += blockDim.x) cp_async16(dst + 16 * i, src + 16 * i, 16);
    cp_async_commit();
  };
  if constexpr (ZR) {
    copy_z(0);
  } else if constexpr (MAXM == 1 && FAST) {
    // One token, whole 16-byte-aligned superchunks: col = j, no token index, no bounds checks on k,
    // and the 8 products of an item as 4 paired 16-bit multiplies (the product of two 16-bit floats is
    // exact in fp32, so rounding it once here gives the same bits as the fp32 path below). The general
    // staging below spent ~600 instructions per warp here (SASS), more than the main loop.
    const int total = nsc * 4 * NJ * 32;
    constexpr int kU = 2;
    for (int e0 = threadIdx.x; e0 < total; e0 += kU * blockDim.x) {
      uint4 av[kU], xv[kU];
      int idx[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const unsigned e = e0 + u * blockDim.x;  // unsigned: the divisions by powers of two are shifts
        const unsigned l = e % 32, rest = e / 32;
        const unsigned jt = rest % NJ, sp = (rest / NJ) % 4, sc = rest / (NJ * 4);
        const int j = (int)(jt * 8 + l / 4);
        const long k = k0 + (long)(sc * kSuper + 32 * (l % 4) + 8 * sp);
        idx[u] = e < (unsigned)total ? (int)(((sc * 8 + 2 * sp) * NJ + jt) * 32 + l) : -1;
        av[u] = make_uint4(0u, 0u, 0u, 0u);
        xv[u] = make_uint4(0u, 0u, 0u, 0u);
        if (idx[u] >= 0 && j < r) {
          av[u] = __ldg(reinterpret_cast<const uint4*>(A + (long)j * K + k));
          xv[u] = __ldg(reinterpret_cast<const uint4*>(x + k));
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (idx[u] < 0) break;
        store_z(idx[u], lane, Mma<T>::mul2(av[u].x, xv[u].x), Mma<T>::mul2(av[u].y, xv[u].y),
                Mma<T>::mul2(av[u].z, xv[u].z), Mma<T>::mul2(av[u].w, xv[u].w));
      }
    }
  } else
  // Z in fragment order: entry ((sc*8 + s)*NJ + jt)*32 + lane holds Z[col jt*8 + g, k .. k+3] for
  // k = k0 + 128 sc + 32 t + 4 s; col = m*r8 + j. Item e takes lane e % 32 (a warp's 8-byte stores
  // then cover one contiguous 256-byte row: conflict-free) and the k-tile pair (s, s+1), i.e. 8
  // consecutive k; four items per thread have their loads in flight together.
  {
    const int total = nsc * 4 * NJ * 32;
    constexpr int kU = 4;
    for (int e0 = threadIdx.x; e0 < total; e0 += kU * blockDim.x) {
      union V8 {
        uint4 u;
        T h[8];
      } av[kU], xv[kU];
      int idx[kU];
      bool live[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int e = e0 + u * blockDim.x;
        const int l = e % 32, rest = e / 32;
        const int jt = rest % NJ, sp = (rest / NJ) % 4, sc = rest / (NJ * 4);
        int m = 0, j = jt * 8 + l / 4;  // col = m*r8 + j, without an integer division (M <= 4)
        while (j >= r8) j -= r8, ++m;
        const long k = k0 + (long)sc * kSuper + 32 * (l % 4) + 8 * sp;
        idx[u] = ((sc * 8 + 2 * sp) * NJ + jt) * 32 + l;
        live[u] = e < total && m < M && j < r;
        av[u].u = make_uint4(0u, 0u, 0u, 0u);
        xv[u].u = make_uint4(0u, 0u, 0u, 0u);
        if (live[u] && fast) {
          av[u].u = __ldg(reinterpret_cast<const uint4*>(A + (long)j * K + k));
          xv[u].u = __ldg(reinterpret_cast<const uint4*>(x + (long)m * K + k));
        } else if (live[u]) {
#pragma unroll
          for (int i = 0; i < 8; ++i)
            if (k + i < K) {
              av[u].h[i] = A[(long)j * K + k + i];
              xv[u].h[i] = x[(long)m * K + k + i];
            }
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (e0 + u * (int)blockDim.x >= total) break;
        float z[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) z[i] = Mma<T>::to_float(av[u].h[i]) * Mma<T>::to_float(xv[u].h[i]);
        store_z(idx[u], lane, Mma<T>::pack(z[0], z[1]), Mma<T>::pack(z[2], z[3]),
                Mma<T>::pack(z[4], z[5]), Mma<T>::pack(z[6], z[7]));
      }
    }
  }
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // Z written by ordinary stores is read next by the tensor cores (the async proxy).
  if constexpr (WG) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
  __syncthreads();  // levels[], Z

  // Pair table: entry p holds (codebook[p & mask], codebook[p >> BITS]) as the two 16-bit halves the
  // mma operand wants (low half = lower k). One item per (entry, 4-lane group): 16-byte stores.
  {
    constexpr uint32_t mask = (1u << BITS) - 1u;
    for (int w = threadIdx.x; w < (1 << (2 * BITS)) * 8; w += blockDim.x) {
      const int p = w / 8;
      const uint32_t v = Mma<T>::pack(levels[p & mask], levels[p >> BITS]);
      reinterpret_cast<uint4*>(lut)[p * (entry_words(BITS) / 4) + w % 8] = make_uint4(v, v, v, v);
    }
  }
  __syncthreads();

  float acc[NT][NJ][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int jt = 0; jt < NJ; ++jt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][jt][i] = 0.f;

  constexpr int kPairBits = 2 * BITS;
  constexpr uint32_t kPairMask = (1u << kPairBits) - 1u;
  const uint32_t* my_lut = lut + lane;
  // 4-bit codes: a pair of codes is one byte of a loaded word. PRMT builds the look-up's byte offset
  // in one instruction, (pair << 8) | (lane * 4), from the code word and a register holding lane * 4
  // (byte 1 of that register is zero), and the LDS adds the table's shared address. The plain C++
  // form compiled to SHF + IMAD.SHL + LOP3 + LEA per look-up (SASS of the v4 kernel).
  const uint32_t lut_base = static_cast<uint32_t>(__cvta_generic_to_shared(lut));
  const uint32_t lane4 = 4u * lane;
  // a0/a2: row g, k-positions (2t, 2t+1) / (2t+8, 2t+9) = codes (0, 1) / (2, 3) of the quad; a1/a3: row g+8.
  auto lookup = [&](uint32_t (&a)[4], const Codes<BITS> (&c)[2], int s) {
    if constexpr (BITS == 4) {
      const uint32_t wa = c[0].w[s / 2], wb = c[1].w[s / 2];
      const uint32_t sel0 = quad_pair_selector(s), sel1 = sel0 + 0x10u;
      a[0] = lds_u32(lut_base + __byte_perm(wa, lane4, sel0));
      a[1] = lds_u32(lut_base + __byte_perm(wb, lane4, sel0));
      a[2] = lds_u32(lut_base + __byte_perm(wa, lane4, sel1));
      a[3] = lds_u32(lut_base + __byte_perm(wb, lane4, sel1));
    } else {
      const uint32_t va = c[0].raw(s), vb = c[1].raw(s);
      a[0] = my_lut[(va & kPairMask) * 32];
      a[1] = my_lut[(vb & kPairMask) * 32];
      a[2] = my_lut[((va >> kPairBits) & kPairMask) * 32];
      a[3] = my_lut[((vb >> kPairBits) & kPairMask) * 32];
    }
  };
  if constexpr (WG) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    // One commit group per k-tile, at most two in flight: the look-ups of k-tile s+1 overlap the
    // wgmmas of k-tile s, whose operand registers stay untouched until the wait below releases them.
    const uint64_t desc0 = z_desc(static_cast<uint32_t>(__cvta_generic_to_shared(zst)));
    for (int base = 0; base < nsc; base += kDepth) {
#pragma unroll
      for (int d = 0; d < kDepth; ++d) {
        const int sc = base + d;
        if (sc >= nsc) break;
        if constexpr (ZR) {
          // Slot sc arrived (each thread's copies, made visible to the tensor cores, then the block's).
          // Slot (sc + 1) % 3 was last read in superchunk sc - 2, whose wgmmas every warp waited for
          // (wait<1> in superchunk sc - 1) before this barrier.
          cp_async_wait<0>();
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
          __syncthreads();
          if (sc + 1 < nsc) copy_z(sc + 1);
        }
        const int zt = ZR ? (sc % kZSlots) * 8 : sc * 8;  // the superchunk's first k-tile in shared memory
#pragma unroll
        for (int s = 0; s < 8; ++s) {
          uint32_t a[NT][4];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) lookup(a[nt], ring[d][nt], s);
          const uint64_t desc = desc0 + (uint64_t)((zt + s) * NJ * 16);  // tile bytes NJ*256, >> 4
          wgmma_fence();
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            WgmmaRS<T, NJ * 8>::run(reinterpret_cast<float (&)[NJ * 4]>(acc[nt]), a[nt], desc);
          wgmma_commit();
          wgmma_wait<1>();
        }
        if (sc + kDepth < nsc) load_codes(ring[d], sc + kDepth);
      }
    }
    wgmma_wait<0>();
    // The accumulators were written behind the compiler's back: no read of them may move above the wait.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int jt = 0; jt < NJ; ++jt)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(acc[nt][jt][i])::"memory");
#else
    __trap();  // the host launches WG kernels only where the sm_90a image runs (wgmma_ready)
#endif
  } else
  for (int base = 0; base < nsc; base += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      const int sc = base + d;
      if (sc >= nsc) break;
      const uint2* zsc = zst + sc * (8 * NJ * 32) + lane;  // constant offsets below
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        uint2 zb[NJ];
#pragma unroll
        for (int jt = 0; jt < NJ; ++jt) zb[jt] = zsc[(s * NJ + jt) * 32];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          uint32_t a[4];
          lookup(a, ring[d][nt], s);
#pragma unroll
          for (int jt = 0; jt < NJ; ++jt) Mma<T>::mma(acc[nt][jt], a, zb[jt].x, zb[jt].y);
        }
      }
      if (sc + kDepth < nsc) load_codes(ring[d], sc + kDepth);
    }
  }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The next kernel may launch once every block of this one is here: its blocks take the SMs that blocks
  // finishing before the split-K reduction leave idle.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  // Epilogue: acc[nt][jt][i] is T[row warp_row0 + nt*16 + g + 8*(i/2), col jt*8 + 2t + (i%2)].
  // Lane t == 0 of a row's quad ends with the row's sum for token m: one split writes y (+ bias),
  // several write their slice of the workspace.
  auto store_row = [&](long n, int m, float v) {
    if (splits == 1)
      y[(long)m * N + n] = Mma<T>::from_float(v + (bias != nullptr ? load_scalar(bias, bias_kind, n) : 0.f));
    else
      ws[((long)split * M + m) * N + n] = v;
  };
  if constexpr (MAXM == 1) {
    // One token: column j is rank j (no token index), one pointer per row computed once; the general
    // version below re-derived 64-bit B addresses and the token of every column per tile (SASS).
    float part1[NT][2];
    // Two straight-line versions (B read as 32-bit rank pairs, or element by element) chosen once,
    // with predicated loads inside: a branch per tile was most of this epilogue's SASS.
    auto rows_times_b = [&](auto pair_loads) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const T* brow = Bm + min_l(warp_row0 + nt * 16 + g + 8 * h, N - 1) * r;
          float sum = 0.f;
#pragma unroll
          for (int jt = 0; jt < NJ; ++jt) {
            const int j0 = jt * 8 + 2 * t;
            float b0, b1;
            if constexpr (decltype(pair_loads)::value) {
              // j0 even and r even: the pair is wholly inside the rank or wholly past it
              const uint32_t w = j0 < r ? __ldg(reinterpret_cast<const unsigned int*>(brow + j0)) : 0u;
              b0 = Mma<T>::to_float(reinterpret_cast<const T*>(&w)[0]);
              b1 = Mma<T>::to_float(reinterpret_cast<const T*>(&w)[1]);
            } else {
              b0 = j0 < r ? Mma<T>::to_float(brow[j0]) : 0.f;
              b1 = j0 + 1 < r ? Mma<T>::to_float(brow[j0 + 1]) : 0.f;
            }
            sum += acc[nt][jt][2 * h] * b0 + acc[nt][jt][2 * h + 1] * b1;
          }
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          part1[nt][h] = sum;
        }
    };
    if (r % 2 == 0 && reinterpret_cast<uintptr_t>(Bm) % 4 == 0)
      rows_times_b(std::true_type{});
    else
      rows_times_b(std::false_type{});
    if (t == 0) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const long n = warp_row0 + nt * 16 + g + 8 * h;
          if (n < N) store_row(n, 0, part1[nt][h]);
        }
    }
  } else {
  // Multiply by B[row, j], sum over this lane's columns per token, then over the 4 lanes of a row.
  const bool pairs = r % 2 == 0 && reinterpret_cast<uintptr_t>(Bm) % 4 == 0;
  float part[NT][2][MAXM];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int m = 0; m < MAXM; ++m) part[nt][h][m] = 0.f;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int jt = 0; jt < NJ; ++jt) {
      int m = 0, j0 = jt * 8 + 2 * t;
      while (j0 >= r8) j0 -= r8, ++m;
      // B[row, j0 .. j0+1] as one 32-bit load where r is even (j0 is even, so the pair is aligned and
      // either wholly inside the rank or wholly past it); rows past N read row N-1 (never stored).
      float bv[4];
      if (pairs) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const long n = min_l(warp_row0 + nt * 16 + g + 8 * h, N - 1);
          uint32_t w = 0u;
          if (j0 < r && m < M) w = __ldg(reinterpret_cast<const unsigned int*>(Bm + n * r + j0));
          bv[2 * h] = Mma<T>::to_float(reinterpret_cast<const T*>(&w)[0]);
          bv[2 * h + 1] = Mma<T>::to_float(reinterpret_cast<const T*>(&w)[1]);
        }
      } else {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int j = j0 + (i % 2);
          const long n = warp_row0 + nt * 16 + g + 8 * (i / 2);
          bv[i] = (n < N && j < r && m < M) ? Mma<T>::to_float(Bm[n * r + j]) : 0.f;
        }
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float v = acc[nt][jt][i] * bv[i];
#pragma unroll
        for (int mm = 0; mm < MAXM; ++mm)
          if (mm == m) part[nt][i / 2][mm] += v;
      }
    }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int m = 0; m < MAXM; ++m) {
        part[nt][h][m] += __shfl_xor_sync(0xffffffffu, part[nt][h][m], 1);
        part[nt][h][m] += __shfl_xor_sync(0xffffffffu, part[nt][h][m], 2);
      }

  if (t == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const long n = warp_row0 + nt * 16 + g + 8 * h;
#pragma unroll
        for (int m = 0; m < MAXM; ++m)
          if (n < N && m < M) store_row(n, m, part[nt][h][m]);
      }
  }
  }
  if (splits == 1) return;
  if (arrive_last(&counters[blockIdx.x], splits))
    reduce_splits<T>(ws, y, bias, bias_kind, M, N, block_row0, (int)min_l(kRows, N - block_row0), splits,
                     &counters[blockIdx.x]);
}

// Z = A * x for the streamed-Z launches, over the whole K in the WG kernels' staged layout (store_z with the
// superchunk index global): item e is lane l = e % 32 of column tile jt, k-tile pair sp, superchunk sc, and holds
// Z[col jt*8 + l/4, k .. k+7] for k = 128 sc + 32 (l % 4) + 8 sp, col = m*r8 + j (zero past r and M). The
// products round once from the exact 16-bit product, as in the one-token staging.
template <typename T, int NJ>
__global__ void __launch_bounds__(256) reassoc_z_kernel(const T* __restrict__ x, const T* __restrict__ A,
                                                        uint32_t* __restrict__ zg, int M, long K, int r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // The GEMV launch that follows (PDL) may start its code prefetches now; it reads Z after griddepcontrol.wait,
  // which waits for this whole grid and its stores.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const int r8 = (r + 7) / 8 * 8;
  const long total = K / kSuper * 4 * NJ * 32;
  for (long e = (long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
    const int l = (int)(e % 32);
    const long rest = e / 32;
    const int jt = (int)(rest % NJ), sp = (int)((rest / NJ) % 4);
    const long sc = rest / (NJ * 4);
    int m = 0, j = jt * 8 + l / 4;
    while (j >= r8) j -= r8, ++m;
    const long k = sc * kSuper + 32 * (l % 4) + 8 * sp;
    uint4 av = make_uint4(0u, 0u, 0u, 0u), xv = make_uint4(0u, 0u, 0u, 0u);
    if (m < M && j < r) {
      av = __ldg(reinterpret_cast<const uint4*>(A + (long)j * K + k));
      xv = __ldg(reinterpret_cast<const uint4*>(x + (long)m * K + k));
    }
    uint32_t* zw = zg + (2 * (((sc * 8 + 2 * sp) * NJ + jt) * 32 + l) - l);
    zw[0] = Mma<T>::mul2(av.x, xv.x);
    zw[32] = Mma<T>::mul2(av.y, xv.y);
    zw[NJ * 64] = Mma<T>::mul2(av.z, xv.z);
    zw[NJ * 64 + 32] = Mma<T>::mul2(av.w, xv.w);
  }
}

// Opt in once per device to the plan's cap (smem_cap): dynamic + static shared memory over 48 KB needs it, and a
// launch that exceeds the opt-in fails with "invalid argument". `done` is the caller's flag per device for its set
// of kernels; throws where `smem` is over the cap.
template <typename T>
using ReassocKernel = decltype(&reassoc_kernel<T, 4, 8, true, 1, true>);  // every instantiation's signature for T
template <typename T>
void opt_in_shared_memory(bool (&done)[64], std::initializer_list<ReassocKernel<T>> kernels, size_t smem) {
  int dev = 0;
  cudaGetDevice(&dev);
  const size_t cap = smem_cap();
  if (dev < 0 || dev >= 64 || !done[dev]) {
    for (auto k : kernels) {
      cudaError_t e = cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)cap);
      if (e != cudaSuccess) throw std::runtime_error(std::string("lords reassoc_gemv: ") + cudaGetErrorString(e));
    }
    if (dev >= 0 && dev < 64) done[dev] = true;
  }
  if (smem > cap) throw std::runtime_error("lords reassoc_gemv: shared memory plan over the device's limit");
}

// cudaLaunchKernelEx with programmatic dependent launch where `pdl` (see the kernel's griddepcontrol.wait).
template <typename T, typename Kernel>
void launch_reassoc(Kernel kernel, const DecodeArgs& a, dim3 grid, int threads, size_t smem, bool pdl,
                    cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3((unsigned)threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, static_cast<const T*>(a.x), a.qweight, static_cast<const T*>(a.B),
                                     static_cast<const T*>(a.A), a.codebook, a.codebook_kind, a.bias, a.bias_kind,
                                     static_cast<T*>(a.y), a.workspace, a.counters, a.M, a.N, a.K, a.r, a.k_per_split,
                                     static_cast<const uint2*>(a.zbuf));
  if (e == cudaSuccess) e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("lords reassoc_gemv launch: ") + cudaGetErrorString(e));
}

// More than 8 column tiles: Z written by reassoc_z_kernel, then the WG kernel streaming it (z_streamed).
template <typename T, int BITS, int NJ>
void run_streamed(const DecodeArgs& a, cudaStream_t stream) {
  if (!a.wgmma || a.zbuf == nullptr || a.K % kSuper != 0)
    throw std::runtime_error("lords reassoc_gemv: more than 64 columns need the sm_90a wgmma variant, K % 128 == 0 "
                             "and a Z buffer (reassoc_z_bytes)");
  auto kernel = a.M == 1 ? reassoc_kernel<T, BITS, NJ, true, 1, true> : reassoc_kernel<T, BITS, NJ, true, kReassocMaxM, true>;
  const size_t smem = smem_bytes(BITS, NJ, 0);
  static bool opted_in[64] = {false};
  opt_in_shared_memory<T>(opted_in, {reassoc_kernel<T, BITS, NJ, true, 1, true>,
                                  reassoc_kernel<T, BITS, NJ, true, kReassocMaxM, true>}, smem);
  const long items = a.K / kSuper * 4 * NJ * 32;
  reassoc_z_kernel<T, NJ><<<(unsigned)std::min<long>((items + 255) / 256, 4096), 256, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.A), static_cast<uint32_t*>(const_cast<void*>(a.zbuf)), a.M,
      a.K, a.r);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("lords reassoc_gemv Z launch: ") + cudaGetErrorString(e));
  const int rows = rows_per_block<NJ, true>();
  launch_reassoc<T>(kernel, a, dim3((unsigned)((a.N + rows - 1) / rows), (unsigned)a.splits), re_threads<NJ, true>(),
                    smem, true, stream);
}

// Up to 8 column tiles: Z staged by each block (the one-token path or the general one), no Z buffer.
template <typename T, int BITS, int NJ>
void run_staged(const DecodeArgs& a, cudaStream_t stream) {
  const void* ptrs[] = {a.x, a.qweight, a.A};
  const bool fast = vector_path_ok(a.K, ptrs, 3);
  const bool wg = a.wgmma && fast;  // the caller decided with reassoc_uses_wgmma, which implies fast
  auto kernel = !fast ? reassoc_kernel<T, BITS, NJ, false, kReassocMaxM, false>
                : a.M == 1 ? (wg ? reassoc_kernel<T, BITS, NJ, true, 1, true> : reassoc_kernel<T, BITS, NJ, true, 1, false>)
                           : (wg ? reassoc_kernel<T, BITS, NJ, true, kReassocMaxM, true>
                                 : reassoc_kernel<T, BITS, NJ, true, kReassocMaxM, false>);
  const size_t smem = smem_bytes(BITS, NJ, a.k_per_split / kSuper);
  static bool opted_in[64] = {false};
  opt_in_shared_memory<T>(opted_in, {reassoc_kernel<T, BITS, NJ, true, 1, false>, reassoc_kernel<T, BITS, NJ, true, kReassocMaxM, false>,
                                  reassoc_kernel<T, BITS, NJ, false, kReassocMaxM, false>, reassoc_kernel<T, BITS, NJ, true, 1, true>,
                                  reassoc_kernel<T, BITS, NJ, true, kReassocMaxM, true>}, smem);
  const int rows = wg ? rows_per_block<NJ, true>() : rows_per_block<NJ, false>();
  // Programmatic dependent launch where the sm_90a image runs (see the kernel's griddepcontrol.wait).
  launch_reassoc<T>(kernel, a, dim3((unsigned)((a.N + rows - 1) / rows), (unsigned)a.splits),
                    wg ? re_threads<NJ, true>() : re_threads<NJ, false>(), smem, wg, stream);
}

template <typename T, int BITS, int NJ>
void run(const DecodeArgs& a, cudaStream_t stream) {
  if constexpr (z_streamed(NJ))
    run_streamed<T, BITS, NJ>(a, stream);
  else
    run_staged<T, BITS, NJ>(a, stream);
}

using Fn = void (*)(const DecodeArgs&, cudaStream_t);

template <typename T, int BITS>
Fn pick_nj(int nj) {
  switch (nj) {
    case 2: return run<T, BITS, 2>;
    case 4: return run<T, BITS, 4>;
    case 6: return run<T, BITS, 6>;
    case 7: return run<T, BITS, 7>;
    case 8: return run<T, BITS, 8>;
    case 14: return run<T, BITS, 14>;
    default: return run<T, BITS, 16>;
  }
}

template <typename T>
Fn pick_bits(int bits, int nj) {
  switch (bits) {
    case 2: return pick_nj<T, 2>(nj);
    case 3: return pick_nj<T, 3>(nj);
    default: return pick_nj<T, 4>(nj);
  }
}

}  // namespace

bool wgmma_built() {
#if defined(LORDS_SM90A)
  return true;
#else
  return false;
#endif
}
// The WG kernels run only where the loaded image is the sm_90a one: setup.py defines LORDS_SM90A when it
// builds sm_90a machine code and no plain sm_90 code (so a compute-capability-9.0 GPU cannot pick the
// latter), and the GPU must be exactly 9.0 (sm_90a code runs nowhere else). Cached per device.
bool wgmma_ready() {
#if defined(LORDS_SM90A)
  static int cached[64] = {0};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    cached[dev] = ok && major == 9 && minor == 0 ? 1 : 2;
  }
  return cached[dev] == 1;
#else
  return false;
#endif
}
bool reassoc_uses_wgmma(long K, const void* x, const void* qweight, const void* A, bool allow) {
  const void* ptrs[] = {x, qweight, A};
  return allow && vector_path_ok(K, ptrs, 3) && wgmma_ready();
}

bool reassoc_fits(int M, int r) { return M >= 1 && M <= kReassocMaxM && M * ((r + 7) / 8) * 8 <= 64; }
bool reassoc_streamed_fits(int M, int r) {
  const int cols = M * ((r + 7) / 8) * 8;
  return M >= 1 && M <= kReassocMaxM && cols > 64 && cols <= 128;
}
size_t reassoc_z_bytes(int M, int r, long K) {
  const int nj = column_tiles(M, r);
  return z_streamed(nj) ? z_bytes(nj, K / kSuper) : 0;
}

static int block_rows(int nj, bool wg) {
  if (wg) return nj >= 8 ? rows_per_block<8, true>() : rows_per_block<4, true>();
  return nj >= 6 ? rows_per_block<8>() : rows_per_block<4>();
}
static_assert(rows_per_block<6>() == rows_per_block<8>() && rows_per_block<7>() == rows_per_block<8>() &&
              rows_per_block<2>() == rows_per_block<4>());
static_assert(rows_per_block<2, true>() == 512 && rows_per_block<6, true>() == 512 && rows_per_block<7, true>() == 512 &&
              rows_per_block<8, true>() == 256);

// The most superchunks one split may stage: table + staged Z under the device's cap (one block per SM).
static long max_superchunks(int M, int r, int bits) {
  if (z_streamed(column_tiles(M, r))) return 1L << 30;  // a ring of kZSlots whatever the split
  return std::max<long>(1, ((long)smem_cap() - lut_words(bits) * 4) / (long)z_bytes(column_tiles(M, r), 1));
}

static long row_blocks(long N, int M, int r, bool wg) {
  const int rows = block_rows(column_tiles(M, r), wg);
  return (N + rows - 1) / rows;
}

DecodePlan reassoc_plan_with_splits(long N, long K, int r, int M, int bits, int want, bool wg) {
  const long n_blocks = row_blocks(N, M, r, wg);
  const long k_super = (K + kSuper - 1) / kSuper;
  long splits = std::max<long>(1, min_l(k_super, want));
  long sc_per = (k_super + splits - 1) / splits;
  sc_per = min_l(sc_per, max_superchunks(M, r, bits));
  splits = (k_super + sc_per - 1) / sc_per;
  // Even splits: the same count with the superchunks spread over them (no short last split).
  sc_per = (k_super + splits - 1) / splits;
  return DecodePlan{(int)splits, (int)(sc_per * kSuper), n_blocks};
}

DecodePlan reassoc_plan(long N, long K, int r, int M, int bits, int sms, bool wg) {
  // One block per SM is resident, so a launch takes ceil(blocks / SMs) waves, each as long as a block:
  // a fixed part (table build, Z staging set-up, split-K arrival; ~1 superchunk) plus its superchunks.
  // Pick the split count with the fewest such units, fewer splits on ties (less reduction traffic).
  // The first version asked for ceil(SMs / row blocks) splits, which left 4096x14336 (r = 49) at 2 waves
  // of 10 superchunks where 2 waves of 7 fit (H100: 52 us at M = 1).
  const long n_blocks = row_blocks(N, M, r, wg);
  const long k_super = (K + kSuper - 1) / kSuper;
  const long max_sc = max_superchunks(M, r, bits);
  long best = 1, best_cost = -1;
  for (long s = 1; s <= k_super; ++s) {
    const long sc = (k_super + s - 1) / s;
    if (sc > max_sc) continue;
    const long cost = ((n_blocks * s + sms - 1) / std::max(1, sms)) * (1 + sc);
    if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
  }
  return reassoc_plan_with_splits(N, K, r, M, bits, (int)best, wg);
}

void reassoc_gemv(const DecodeArgs& a, cudaStream_t stream) {
  const int nj = column_tiles(a.M, a.r);
  Fn fn = a.dtype == DType::kBF16 ? pick_bits<__nv_bfloat16>(a.bits, nj) : pick_bits<__half>(a.bits, nj);
  fn(a, stream);
}

}  // namespace lords
