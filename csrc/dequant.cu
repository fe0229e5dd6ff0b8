// Fused LoRDS dequantization: W[N, K] = codebook[Q] * (B @ A), written once in fp16/bf16.
//
// Serves lords::dequant_cuda and the large-M path of lords::dequant_matmul_cuda (dequantize, then one
// cuBLAS GEMM: at M >= ~64 the GEMM is compute-bound and cuBLAS is hard to beat, so writing W once
// (2 bytes per weight) is the cheap part). The scale tile is rebuilt on tensor cores exactly as in the
// decode kernel (see lords_tile.cuh: same k-permutation, same staged A, same fragments), so the two
// kernels compute bit-identical W. With that permutation a lane ends up holding 32 consecutive
// weights of each of its two rows per superchunk, written 16 bytes (two k-tiles) at a time.
//
// Dispatch table: dtype {fp16, bf16} x bits {2, 3, 4} x rank chunks RT {1, 2, 4, 8}.
#include "lords_kernels.h"
#include "lords_tile.cuh"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace lords {
namespace {

template <typename T, int BITS, int RT>
__global__ void __launch_bounds__(kThreads, RT >= 4 ? 1 : 2)
    dequant_kernel(const uint8_t* __restrict__ qw, const T* __restrict__ Bm, const T* __restrict__ A,
                   const void* __restrict__ cb, int cb_kind, T* __restrict__ W, long N, long K, int r, int kc,
                   bool fast) {
  extern __shared__ uint4 smem_dyn[];
  uint16_t* astage = reinterpret_cast<uint16_t*>(smem_dyn);
  __shared__ float lut[16];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const long warp_row0 = (long)blockIdx.x * kRowsPerBlock + (long)warp * 16 * kNT;
  const long k0 = (long)blockIdx.y * kc;
  const int nsc = (int)((min_l(K - k0, kc) + kSuper - 1) / kSuper);
  const long row_bytes = K * BITS / 8;

  auto load_codes = [&](Codes<BITS> (&c)[kNT][2], int sc) {
    const long kf = k0 + (long)sc * kSuper + 32 * t;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const long n = warp_row0 + nt * 16 + g + 8 * hh;
        if (n < N && kf < K)
          c[nt][hh].load(qw + n * row_bytes, kf, row_bytes, fast);
        else
          c[nt][hh].clear();
      }
  };

  Codes<BITS> cur[kNT][2], nxt[kNT][2];
  load_codes(nxt, 0);
  if (threadIdx.x < (1 << BITS)) lut[threadIdx.x] = load_scalar(cb, cb_kind, threadIdx.x);
  uint32_t bf[kNT][RT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt) load_B_frags<T, RT>(bf[nt], Bm, N, r, warp_row0 + nt * 16, lane);
  stage_A<T, RT>(astage, A, r, K, k0, nsc * kSuper, fast);
  __syncthreads();

  for (int sc = 0; sc < nsc; ++sc) {
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      cur[nt][0] = nxt[nt][0];
      cur[nt][1] = nxt[nt][1];
    }
    if (sc + 1 < nsc) load_codes(nxt, sc + 1);
    const long kb = k0 + (long)sc * kSuper + 32 * t;

#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int s = 0; s < 8; s += 2) {
        // Two k-tiles give a lane 8 consecutive weights of each of its rows: one 16-byte store per row.
        uint32_t wf[2][4];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          uint4 af[RT];
#pragma unroll
          for (int c = 0; c < RT; ++c)
            af[c] = *reinterpret_cast<const uint4*>(astage + ((((long)sc * 8 + s + u) * RT + c) * 32 + lane) * 8);
          weight_frag<T, BITS, RT>(wf[u], bf[nt], af, cur[nt][0], cur[nt][1], lut, s + u);
        }
        // wf[u]: {row g: k+0,1}, {row g+8: k+0,1}, {row g: k+2,3}, {row g+8: k+2,3} for k = kb + 4(s+u).
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const long n = warp_row0 + nt * 16 + g + 8 * hh;
          if (n >= N) continue;
          const uint4 v = make_uint4(wf[0][hh], wf[0][hh + 2], wf[1][hh], wf[1][hh + 2]);
          T* dst = W + n * K + kb + 4 * s;
          if (fast) {
            *reinterpret_cast<uint4*>(dst) = v;
          } else {
            const uint32_t part[4] = {v.x, v.y, v.z, v.w};
            uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
            for (int e = 0; e < 8; ++e)
              if (kb + 4 * s + e < K) d16[e] = static_cast<uint16_t>(part[e / 2] >> (16 * (e % 2)));
          }
        }
      }
    }
  }
}

template <typename T, int BITS, int RT>
void run(const DequantArgs& a, cudaStream_t stream) {
  auto kernel = dequant_kernel<T, BITS, RT>;
  const long k_super = (a.K + kSuper - 1) / kSuper;
  // 4 superchunks (512 k) per block keep the staged A slice at RT * 16 KB and the grid large.
  const long sc_per = min_l(k_super, std::max(1, 4 / (RT > 4 ? 2 : 1)));
  const int kc = (int)(sc_per * kSuper);
  const size_t smem = (size_t)RT * 16 * kc * sizeof(T);
  if (smem > 47 * 1024) {  // static shared memory counts against the 48 KB default too
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) throw std::runtime_error(std::string("lords dequant: ") + cudaGetErrorString(e));
  }
  const void* ptrs[] = {a.qweight, a.A, a.W};
  const bool fast = vector_path_ok(a.K, ptrs, 3);
  dim3 grid((unsigned)((a.N + kRowsPerBlock - 1) / kRowsPerBlock), (unsigned)((k_super + sc_per - 1) / sc_per));
  kernel<<<grid, kThreads, smem, stream>>>(a.qweight, static_cast<const T*>(a.B), static_cast<const T*>(a.A),
                                           a.codebook, a.codebook_kind, static_cast<T*>(a.W), a.N, a.K, a.r, kc,
                                           fast);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("lords dequant launch: ") + cudaGetErrorString(e));
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
