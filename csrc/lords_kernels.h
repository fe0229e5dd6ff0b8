// Host-side entry points of the CUDA kernels, free of torch headers so the .cu files compile fast and
// ops.cpp (the torch side) owns every input check.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lords {

enum class DType : int { kF16 = 0, kBF16 = 1 };

// y[M, N] = x[M, K] @ (codebook[Q] * (B @ A)).T + bias, for M <= kDecodeMaxM (fused decode kernel).
struct DecodeArgs {
  DType dtype;              // of x, B, A and y
  int bits;                 // 2, 3, 4
  const void* x;            // [M, K]
  const uint8_t* qweight;   // [N, K*bits/8] canonical packing
  const void* B;            // [N, r]
  const void* A;            // [r, K]
  const void* codebook;     // [2**bits]
  int codebook_kind;        // ScalarKind
  const void* bias;         // [N] or nullptr
  int bias_kind;            // ScalarKind
  void* y;                  // [M, N]
  float* workspace;         // [splits, M, N] fp32 when splits > 1
  int* counters;            // >= n_blocks zeroed ints when splits > 1; left zeroed
  int M;
  long N, K;
  int r;
  int splits;               // from decode_plan
  int k_per_split;          // from decode_plan
  bool wgmma = false;       // reassoc_gemv: run the sm_90a wgmma variant (reassoc_uses_wgmma, which the plan used too)
};

constexpr int kDecodeMaxM = 16;
constexpr int kMaxRank = 128;
constexpr int kCounterSlots = 1 << 16;

// Split-K plan for a decode launch on a GPU with `sms` multiprocessors.
struct DecodePlan {
  int splits;
  int k_per_split;
  long n_blocks;
};
DecodePlan decode_plan(long N, long K, int r, int sms);
// The same with a requested split count (rounded to whole 128-wide superchunks).
DecodePlan decode_plan_with_splits(long N, long K, int r, int splits);
void decode_gemm(const DecodeArgs& a, cudaStream_t stream);

// The re-associated kernel (reassoc_gemv.cu) for small M * r: same arguments, its own split plan.
constexpr int kReassocMaxM = 4;
bool reassoc_fits(int M, int r);  // M <= kReassocMaxM and M * ceil(r/8)*8 <= 64
// Where path -1 takes it: one token and 16 < r <= 64 (H100, bench/cuda_notes.md, session 9 with the wgmma
// variant: 4096x4096 r=32 11.6 vs 13.6 us for the direct kernel, 14336x4096 r=49 28.0 vs 50.0 us; at r=12
// (7.8 vs 6.7) and at M=2 (4096x4096: 14.4 vs 14.0) the direct one wins).
inline bool reassoc_preferred(int M, int r) { return M == 1 && r > 16 && r <= 64; }
// wg: the launch takes the wgmma variant (reassoc_uses_wgmma), whose blocks cover 512 rows.
DecodePlan reassoc_plan(long N, long K, int r, int M, int bits, int sms, bool wg);
DecodePlan reassoc_plan_with_splits(long N, long K, int r, int M, int bits, int splits, bool wg);
void reassoc_gemv(const DecodeArgs& a, cudaStream_t stream);
// The sm_90a wgmma kernels (the re-associated kernel's WG variant, fused_gemm.cu):
bool wgmma_built();  // compiled in (LORDS_SM90A)
bool wgmma_ready();  // ... and the current GPU runs them (compute capability 9.0)
// Whether a launch on these inputs can take the wgmma variant: ready, allowed by the caller and the
// 16-byte load path (vector_path_ok). Decided once per call: the split plan and DecodeArgs::wgmma use it.
bool reassoc_uses_wgmma(long K, const void* x, const void* qweight, const void* A, bool allow);

// The fused GEMM (fused_gemm.cu, sm_90a wgmma) for many tokens: same arguments (workspace and counters
// unused: split-K partials are reduced inside a thread block cluster), its own plan. Takes r <=
// kFusedMaxRank on the 16-byte load path where wgmma_ready (fused_gemm_fits).
constexpr int kFusedMaxRank = 64;
constexpr int kFusedMaxSplits = 8;   // the splits of a tile form one cluster: the portable cluster size
constexpr int kFusedAutoSplits = 4;  // the automatic plan's bound
constexpr int kFusedMinM = 6;        // fewest tokens the automatic path gives the fused GEMM (fused_gemm_preferred)
bool fused_gemm_fits(long K, int r, const void* x, const void* qweight, const void* A);
// Tokens per block: 16, 64, 128, 192 (r > 32) or 256 (r <= 32, or at 4 bits).
int fused_token_tile(int M, int r, long N, long K, int sms, int bits);
DecodePlan fused_gemm_plan(DType dtype, int bits, long N, long K, int M, int r, int sms);
DecodePlan fused_gemm_plan_with_splits(long N, long K, int splits);
void fused_gemm(const DecodeArgs& a, int sms, cudaStream_t stream);
// Where path -1 takes it (where it fits), 32 < r <= 64: kFusedMinM <= M <= 128 where N is large enough that the
// 128-row blocks fill the GPU without split-K (ceil(N / 128) >= 0.8 x SMs; from 6 tokens on with the 16-token
// tile, which beats the decode kernels there); and 16 < M <= 256 where the tiles (128 rows x fused_token_tile
// tokens) fit one wave and split-K (at most kFusedAutoSplits, clusters counted as they fit, fused_gemm_plan)
// fills at least half of it, up to M = 512 at 4 bits (kFusedMaxM4), where the 192- and 256-token tiles have a
// producer warpgroup and their ring is handed over by halves. At r <= 32 that second clause alone, at 4 bits,
// from M = 17 on (4096x4096 r = 32, M = 24 / 48 / 64 / 96 / 128: 18.2 / 18.6 / 19.0 / 21.4 / 21.8 us against
// 27.0 / 27.0 / 27.3 / 27.5 / 31.3 for dequantize + cuBLAS and 23.7 / 26.7 / 27.5 / 27.6 / 31.2 for the automatic op
// before, H100, session 17, bench/h100/session17/fused_r32_small_m_ab; since session 15 every 4-bit tile has a
// producer warpgroup), above 128 tokens the 256-token tile (4096x4096 r = 32, M = 160 / 192 / 256: 27.1 / 27.6 /
// 29.0 us against 32.2 / 33.3 / 36.2 for dequantize + cuBLAS; H100, session 15; until session 17 the rule kept r <= 32
// at M <= 128 on dequantize + cuBLAS after session 11's 32.6 against 31.5 at M = 128, before the producers).
// M = 384 / 512 (session 16, bench/h100/session16): 4096x4096 r = 32 37.0 / 39.3 us against 37.8 / 43.0,
// 4096x14336 r = 49 118.2 / 135.8 against 149.5 / 152.1; not where the tiles take two waves
// (14336x4096: 135-157 against 141-174, left to dequantize + cuBLAS) or split-K fills less than half the GPU
// (1024x4096 r = 12: 20.1 against 14.9 / 16.2). The Python dispatch applies the same rule
// (lords_ext/backends/dispatch.py, fused_gemm_first, with the measurements). Elsewhere the decode kernels up to
// kDecodeMaxM, then dequantize + cuBLAS.
constexpr int kFusedMaxM = 256, kFusedMaxM4 = 512;
inline bool fused_gemm_preferred(int M, long N, long K, int r, int sms, int bits) {
  if (M < kFusedMinM || M > (bits == 4 ? kFusedMaxM4 : kFusedMaxM) || r > kFusedMaxRank) return false;
  if (r <= 32 && bits != 4) return false;
  const long row_blocks = (N + 127) / 128;
  if (r > 32 && M <= 128 && row_blocks * 5 >= 4L * sms) return true;
  if (M <= kDecodeMaxM) return false;
  const int ntok = fused_token_tile(M, r, N, K, sms, bits);
  const long tiles = row_blocks * ((M + ntok - 1) / ntok);
  return tiles <= sms && tiles * kFusedAutoSplits * 2 >= sms;
}

// W[N, K] = codebook[Q] * (B @ A) in dtype.
struct DequantArgs {
  DType dtype;
  int bits;
  const uint8_t* qweight;
  const void* B;
  const void* A;
  const void* codebook;
  int codebook_kind;
  void* W;
  long N, K;
  int r;
  int superchunks;  // k superchunks (128) per block; 0: the kernel's choice
  int sms;          // the device's SM count (the automatic block depth keeps one full wave)
};
void dequant(const DequantArgs& a, cudaStream_t stream);

// True when the inputs allow the 16-byte load paths (K % 128 == 0 and 16-byte aligned bases).
bool vector_path_ok(long K, const void* const* ptrs, int n_ptrs);

}  // namespace lords
