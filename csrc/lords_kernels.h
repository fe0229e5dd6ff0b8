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
  const void* zbuf = nullptr;  // reassoc_gemv above 64 columns: reassoc_z_bytes(M, r, K) bytes for Z = A * x
  // fused_gemm: > 0 runs the stream-K schedule on that many blocks (at most fused_stream_k_units), with workspace
  // (fused_stream_k_workspace_floats) and counters (that many zeroed ints; left zeroed); 4 bits only.
  int stream_k_blocks = 0;
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
// 64 < M * ceil(r/8)*8 <= 128, M <= kReassocMaxM: the WG variant with Z streamed from a buffer of
// reassoc_z_bytes (0 where Z is staged whole), sm_90a and K % 128 == 0 only.
bool reassoc_streamed_fits(int M, int r);
size_t reassoc_z_bytes(int M, int r, long K);
// Where path -1 takes it: one token and 16 < r <= 64 (H100, bench/cuda_notes.md, session 9 with the wgmma
// variant: 4096x4096 r=32 11.6 vs 13.6 us for the direct kernel, 14336x4096 r=49 28.0 vs 50.0 us; at r=12
// (7.8 vs 6.7) and at M=2 (4096x4096: 14.4 vs 14.0) the direct one wins).
inline bool reassoc_preferred(int M, int r) { return M == 1 && r > 16 && r <= 64; }
// Two tokens at 32 < r <= 56 (112 columns, Z streamed; the sm_90a variant only, which the caller checks): H100,
// session 19, us, automatic path before (the 16-token fused GEMM or the direct decode kernel) -> streamed Z:
// 14336x4096 r = 49 47.6 -> 42.1, 4096x14336 r = 49 43.9 -> 39.4 (bench/h100/session19/streamed_z). Measured there
// only, hence N >= 4096; not at 128 columns (4096x4096 r = 32 M = 3 / 4: 19.9 / 21.4 against 13.6 / 14.4 direct).
// One token above r = 64 (72..128 columns), likewise streamed, us, direct kernel -> streamed Z (H100, session 20,
// bench/h100/session20/streamed_z_check and fused_pdl_ab): 4096x4096 r = 72 / 96 24.7 / 24.6 -> 17.1 / 17.8,
// 14336x4096 r = 96 82.8 -> 40.3, 4096x14336 r = 128 77.3 -> 40.7; not at 1024x4096 r = 96 (path 2 11.4 against
// 10.0), hence N >= 4096 again.
inline bool reassoc_streamed_preferred(int M, int r, long N) {
  return N >= 4096 && ((M == 2 && r > 32 && r <= 56) || (M == 1 && r > 64 && r <= 128));
}
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
constexpr int kFusedAutoSplits = 4;  // the plan's bound (at 4 bits kFusedMaxSplits where all tiles fit one wave)
constexpr int kFusedMinM = 6;        // fewest tokens the automatic path gives the fused GEMM at 2 and 3 bits
constexpr int kFusedMinM4 = 2;       // ... at 4 bits (fused_gemm_preferred)
bool fused_gemm_fits(long K, int r, const void* x, const void* qweight, const void* A);
// Tokens per block: 16, 64, 128, 192 (r > 32) or 256 (r <= 32, or at 4 bits).
int fused_token_tile(int M, int r, long N, long K, int sms, int bits);
DecodePlan fused_gemm_plan(DType dtype, int bits, long N, long K, int M, int r, int sms);
DecodePlan fused_gemm_plan_with_splits(long N, long K, int splits);
void fused_gemm(const DecodeArgs& a, int sms, cudaStream_t stream);
// Stream-K (path 5, 4 bits): the superchunk units a launch divides among its blocks, and the fp32 workspace
// for `blocks` blocks (one partial tile each).
long fused_stream_k_units(int M, int r, long N, long K, int sms, int bits);
size_t fused_stream_k_workspace_floats(int M, int r, long N, long K, int sms, int bits, int blocks);
// Whether path -1 runs the fused GEMM's 16-token tile on the stream-K schedule (one block per SM) instead of `plan`,
// the split-K plan fused_gemm_plan gave it (fused_gemm.cu has the rule and its measurements).
bool fused_stream_k_preferred(DType dtype, int bits, long N, long K, int M, int r, int sms, const DecodePlan& plan);
// Where path -1 takes it (where it fits), 32 < r <= 64: from kFusedMinM (kFusedMinM4 at 4 bits) to 128 tokens where
// N is large enough that the 128-row blocks fill the GPU without split-K (ceil(N / 128) >= 0.8 x SMs); and where
// the tiles (128 rows x fused_token_tile tokens) fit one wave and split-K (at most kFusedAutoSplits, clusters
// counted as they fit, fused_gemm_plan) fills at least half of it: from 17 to 256 tokens, to 512 at 4 bits
// (kFusedMaxM4: the 192- and 256-token tiles have a producer warpgroup and their ring is handed over by halves),
// and at 4 bits from kFusedSplitMinM4 tokens on (the 16-token tile with the whole-superchunk scale). At r <= 32
// that second clause alone, at 4 bits. Elsewhere the decode kernels up to kDecodeMaxM, then dequantize + cuBLAS.
// H100, us, automatic op before -> fused GEMM (bench/h100/session18/check_merged, whole_scale_ab):
//   14336x4096 r = 49, M = 2 / 4: 49.3 / 49.9 -> 47.5 / 48.2 (the first clause from 2 tokens at 4 bits; a later
//     run had 49.5 / 49.2 for both paths: at most a few per cent; M = 1 has the one-token kernels at 26.9)
//   4096x4096 r = 32, M = 6 / 8 / 10 / 16: 16.0 / 17.6 / 25.1 / 24.7 against 16.3 / 16.4 / 16.4 / 16.5 (from 8)
//   4096x14336 r = 49, M = 10 / 12 / 16: 50.5 / 51.8 / 54.2 against 52.3 / 52.3 / 52.2 (from 13)
//   1024x4096 r = 12 (8 row blocks, 4 splits fill less than half the GPU): 8.6-9.1 against 10.3-10.6 (session 18);
//     taken with 8 splits in one wave since session 19 (below)
//   4096x4096 r = 32, M = 24 / 64 / 128 (session 17): 23.7 / 27.5 / 31.2 -> 18.2 / 19.0 / 21.8
//   4096x4096 r = 32, M = 384 / 512 (session 16): 37.8 / 43.0 -> 37.0 / 39.3; 4096x14336 r = 49 149.5 / 152.1 ->
//     118.2 / 135.8; not where the tiles take two waves (14336x4096: 135-157 against 141-174 for dequantize +
//     cuBLAS) or split-K fills less than half the GPU (1024x4096 r = 12: 20.1 against 14.9 / 16.2).
// The Python dispatch applies the same rule (lords_ext/backends/dispatch.py, fused_gemm_first).
constexpr int kFusedMaxM = 256, kFusedMaxM4 = 512;
constexpr int kFusedSplitMinM4[2] = {8, 13};  // r <= 32, r > 32
constexpr int kFusedWideSplitMinM4 = 3;  // ... where at most 16 tiles take 6-8 splits each
inline bool fused_gemm_preferred(int M, long N, long K, int r, int sms, int bits) {
  const bool four = bits == 4;
  if (M < (four ? kFusedMinM4 : kFusedMinM) || M > (four ? kFusedMaxM4 : kFusedMaxM) || r > kFusedMaxRank)
    return false;
  if (r <= 32 && !four) return false;
  const long row_blocks = (N + 127) / 128;
  if (r > 32 && M <= 128 && row_blocks * 5 >= 4L * sms) return true;
  const int ntok = fused_token_tile(M, r, N, K, sms, bits);
  const long tiles = row_blocks * ((M + ntok - 1) / ntok);
  if (tiles > sms) return false;
  // The 16- and 64-token tiles at 4 bits take up to kFusedMaxSplits splits where they fit one wave
  // (fused_gemm_plan): from 45 % of the GPU on (1024x4096 r = 12, 8 tiles x 8 splits, M = 8 / 16 / 32 / 64:
  // 8.96 / 8.97 / 10.06 / 12.51 -> 7.44 / 7.80 / 8.94 / 9.36 us; H100, session 19,
  // bench/h100/session19/eight_splits_ab). Below kFusedSplitMinM4 from kFusedWideSplitMinM4 tokens, where at most
  // 16 tiles leave room for 6 to 8 splits each in one wave (decode kernels against the fused GEMM, us, M = 2 / 3 /
  // 4 / 8 / 12; bench/h100/session19/rule_small_n):
  //   1024x4096 r = 12: 7.44 / 8.49 / 9.48 / 13.58 / 17.77 against 7.35 / 7.28 / 7.30 / 7.36 / 7.61
  //   1024x4096 r = 49: 9.03 / 10.11 / 10.53 / 13.30 / 16.08 against 9.37 / 9.37 / 9.38 / 9.44 / 9.65
  //   2048x4096 r = 21 (16 tiles, the plan's 6-7 splits): 10.48 / 11.62 / 12.75 / 17.42 / 21.60 against 10.19 /
  //     10.18 / 10.20 / 10.41 / 10.47
  const bool fills = tiles * std::min<long>(K / 128, kFusedMaxSplits) * 20 >= 9L * sms;
  const bool few_tiles = tiles * kFusedMaxSplits <= sms;
  if (four && ntok <= 64) return fills && (M >= kFusedSplitMinM4[r > 32] || (M >= kFusedWideSplitMinM4 && few_tiles));
  // The 128- and 256-token tiles where up to kFusedMaxSplits splits of each fit one wave, up to kFusedMaxM tokens
  // (dequantize + cuBLAS against the fused GEMM, us; bench/h100/session19/large_m_splits): 1024x4096 r = 12
  // M = 96 / 128 / 192 / 256: 13.9 / 13.6 / 13.6 / 15.5 against 10.7 / 10.9 / 14.0 / 14.6 (8 splits); 2048x4096
  // r = 21: 21.3 / 19.7 / 24.6 / 22.4 against 14.5 / 14.8 / 18.6 / 19.6 (6 splits); not at 1024x4096 M = 384 / 512
  // (16 tiles of 256 tokens: 15.1 / 15.8 against 18.2 / 18.6). Measured at r <= 32 only (above it the scale work
  // per weight doubles, the dequantize pass's barely moves).
  if (four && r <= 32 && few_tiles && fills && M <= kFusedMaxM) return true;
  if (M < (four ? kFusedSplitMinM4[r > 32] : kDecodeMaxM + 1)) return false;
  return tiles * kFusedAutoSplits * 2 >= sms;
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
