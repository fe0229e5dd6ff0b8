// Registration of the CUDA backend ops of the `lords` namespace and every input check they need.
//
// The public ops (lords::dequant, lords::dequant_matmul) are defined in Python (lords_ext/_ops.py) so
// the contract exists whether or not this extension was built; this file only adds backend ops:
//   lords::dequant_cuda(qweight, B, A, codebook, superchunks=0) -> W [N, K] in B.dtype (fp16/bf16).
//     superchunks: 128-wide k superchunks per block, 0 = the kernel's choice (for tuning).
//   lords::dequant_matmul_cuda(x, qweight, B, A, codebook, bias=None, path=-1, splits=0) -> y [M, N]
//     in x.dtype. path -1: automatic (re-associated kernel for M = 1 and 16 < r <= 64, else the fused
//     decode kernel for M <= 16, else dequantize + cuBLAS), 0: fused decode kernel
//     (M <= 16), 1: dequantize + cuBLAS, 2: re-associated kernel (M * ceil(r/8)*8 <= 64; its wgmma
//     variant where the sm_90a image runs), 3: the re-associated kernel on mma.sync only (for A/B timing),
//     4: the fused wgmma GEMM (fused_gemm.cu; sm_90a image on a 9.0 GPU, r <= 64, K % 128 == 0, 16-byte
//     aligned x, qweight and A). Automatic takes path 4 where it can run and fused_gemm_preferred holds
//     (32 < r <= 64; 6 <= M <= 128 with N filling the GPU with 128-row blocks, or 16 < M <= 256 with its
//     tiles in one wave; at r <= 32 the latter from M = 129 on, 4 bits only).
//     5: the same GEMM on a stream-K schedule (4 bits; splits = blocks, 0 = one per SM, at least one per tile).
//     splits: split-K count of the chosen kernel, 0 = its own plan (for tuning). x is [M, K] (the
//     Python layer flattens it).
// The kernels themselves live in decode_gemm.cu and dequant.cu, behind lords_kernels.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "lords_kernels.h"

#ifdef LORDS_PYTHON_MODULE
#include <Python.h>
// An empty module: importing lords_ext._C runs the static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "LoRDS CUDA backend ops (torch.ops.lords.*_cuda)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
#endif

namespace lords {
namespace {

int kind_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    default: TORCH_CHECK(false, "codebook/bias: unsupported dtype");
  }
}

DType dtype_of(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 ? DType::kBF16 : DType::kF16; }

bool is_half_type(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

// Validation never throws from inside a helper: it records the first problem here and returns false,
// and the op throws (TORCH_CHECK) in its own frame before it holds any guard or tensor copy. Messages
// are concatenated from strings and std::to_string, never through an ostream: on the device
// machine's toolchain the first message that streamed an integer (c10::str(..., int64_t, ...))
// crashed the process, while messages made of strings alone were fine.
thread_local std::string t_error;

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
inline std::string piece(I v) {
  return std::to_string(v);
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}

#define LORDS_REQUIRE(cond, ...)      \
  do {                                \
    if (!(cond)) {                    \
      t_error = cat(__VA_ARGS__);     \
      return false;                   \
    }                                 \
  } while (0)

std::string device_str(const at::Device& d) {
  if (d.is_cuda()) return "cuda:" + std::to_string((int)d.index());
  if (d.is_cpu()) return "cpu";
  return "a non-CUDA device";
}

std::string shape_str(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + "]";
}

const char* dtype_str(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return "another dtype";
  }
}

bool float_kind(at::ScalarType s) { return s == at::kFloat || s == at::kHalf || s == at::kBFloat16; }

// The quantized weight on `device`: sets *bits.
bool valid_weight(const at::Tensor& qweight, const at::Tensor& B, const at::Tensor& A, const at::Tensor& codebook,
                  const at::Device& device, int* bits) {
  const std::string dev = device_str(device);
  LORDS_REQUIRE(qweight.device() == device, "qweight: expected device ", dev, ", got ", device_str(qweight.device()));
  LORDS_REQUIRE(B.device() == device, "B: expected device ", dev, ", got ", device_str(B.device()));
  LORDS_REQUIRE(A.device() == device, "A: expected device ", dev, ", got ", device_str(A.device()));
  LORDS_REQUIRE(codebook.device() == device, "codebook: expected device ", dev, ", got ",
                device_str(codebook.device()));
  LORDS_REQUIRE(qweight.scalar_type() == at::kByte, "qweight: expected dtype uint8, got ",
                dtype_str(qweight.scalar_type()));
  LORDS_REQUIRE(qweight.dim() == 2, "qweight: expected 2-D [N, K*bits/8], got shape ", shape_str(qweight));
  LORDS_REQUIRE(qweight.is_contiguous(), "qweight: expected a contiguous tensor");
  LORDS_REQUIRE(codebook.dim() == 1, "codebook: expected 1-D, got shape ", shape_str(codebook));
  const int64_t levels = codebook.numel();
  LORDS_REQUIRE(levels == 4 || levels == 8 || levels == 16,
                "codebook: expected 4, 8 or 16 levels (2, 3 or 4 bits), got ", levels);
  LORDS_REQUIRE(float_kind(codebook.scalar_type()), "codebook: expected dtype float32, float16 or bfloat16, got ",
                dtype_str(codebook.scalar_type()));
  LORDS_REQUIRE(codebook.is_contiguous(), "codebook: expected a contiguous tensor");
  *bits = levels == 4 ? 2 : levels == 8 ? 3 : 4;
  LORDS_REQUIRE(B.dim() == 2, "B: expected 2-D [N, r], got shape ", shape_str(B));
  LORDS_REQUIRE(A.dim() == 2, "A: expected 2-D [r, K], got shape ", shape_str(A));
  LORDS_REQUIRE(B.size(1) == A.size(0), "B, A: expected B [N, r] and A [r, K] with the same r, got B ",
                shape_str(B), " and A ", shape_str(A));
  LORDS_REQUIRE(float_kind(B.scalar_type()), "B: expected dtype float32, float16 or bfloat16, got ",
                dtype_str(B.scalar_type()));
  LORDS_REQUIRE(float_kind(A.scalar_type()), "A: expected dtype float32, float16 or bfloat16, got ",
                dtype_str(A.scalar_type()));
  const int64_t N = B.size(0), r = B.size(1), K = A.size(1);
  LORDS_REQUIRE(r >= 1 && r <= kMaxRank, "B.shape[1] (r): expected 1 <= r <= ", (int)kMaxRank, ", got ", r);
  LORDS_REQUIRE(N >= 1 && N <= (int64_t)kCounterSlots * 128, "B.shape[0] (N): expected 1 <= N <= ",
                (int64_t)kCounterSlots * 128, ", got ", N);
  const int64_t group = *bits == 2 ? 4 : *bits == 3 ? 8 : 2;
  LORDS_REQUIRE(K >= 1 && K % group == 0, "A.shape[1] (K): expected a positive multiple of ", group, " for ", *bits,
                "-bit codes, got ", K);
  LORDS_REQUIRE(qweight.size(0) == N && qweight.size(1) == K * *bits / 8, "qweight: expected shape [", N, ", ",
                K * *bits / 8, "] for N=", N, ", K=", K, " at ", *bits, " bits, got ", shape_str(qweight));
  return true;
}

// What this build and GPU run (cuda_features below, and the path=4 error).
std::string cuda_features_str() {
  const std::string ready = wgmma_ready() ? "1" : "0";
  return std::string("reassoc_wgmma_built=") + (wgmma_built() ? "1" : "0") + " reassoc_wgmma_ready=" + ready +
         " fused_gemm_ready=" + ready;
}

bool valid_superchunks(int64_t superchunks) {
  LORDS_REQUIRE(superchunks >= 0 && superchunks <= 64, "superchunks: expected 0 (automatic) to 64, got ", superchunks);
  return true;
}

int sm_count(const at::Device& device) {
  static std::mutex mu;
  static std::vector<int> per_device;
  std::lock_guard<std::mutex> lock(mu);
  const int idx = device.index();
  if ((int)per_device.size() <= idx) per_device.resize(idx + 1, 0);
  if (per_device[idx] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, idx));
    per_device[idx] = n;
  }
  return per_device[idx];
}

at::Tensor& counters_for(const at::Device& device) {
  static std::mutex mu;
  static std::vector<at::Tensor> per_device;
  std::lock_guard<std::mutex> lock(mu);
  const int idx = device.index();
  if ((int)per_device.size() <= idx) per_device.resize(idx + 1);
  if (!per_device[idx].defined())
    per_device[idx] = at::zeros({kCounterSlots}, at::TensorOptions().dtype(at::kInt).device(device));
  return per_device[idx];
}

// Inputs already validated. The scale mma runs in the output's 16-bit type; B and A in another dtype are
// converted first (an extra copy).
at::Tensor dequant_impl(const at::Tensor& qweight, const at::Tensor& B_in, const at::Tensor& A_in,
                        const at::Tensor& codebook, at::ScalarType out_dtype, int bits, int superchunks = 0) {
  const at::Tensor B = B_in.to(out_dtype).contiguous();
  const at::Tensor A = A_in.to(out_dtype).contiguous();
  const int64_t N = B.size(0), K = A.size(1);
  auto W = at::empty({N, K}, B.options().dtype(out_dtype));
  DequantArgs a{dtype_of(W), bits, qweight.data_ptr<uint8_t>(), B.data_ptr(), A.data_ptr(), codebook.data_ptr(),
                kind_of(codebook), W.data_ptr(), N, K, (int)B.size(1), superchunks, sm_count(W.device())};
  dequant(a, c10::cuda::getCurrentCUDAStream());
  return W;
}

at::Tensor dequant_cuda(const at::Tensor& qweight, const at::Tensor& B, const at::Tensor& A,
                        const at::Tensor& codebook, int64_t superchunks) {
  TORCH_CHECK(valid_superchunks(superchunks), t_error.c_str());
  TORCH_CHECK(qweight.is_cuda(), "qweight: expected a CUDA tensor");
  TORCH_CHECK(is_half_type(B.scalar_type()), "B: lords::dequant_cuda returns W in B.dtype and supports float16 "
              "or bfloat16, got ", dtype_str(B.scalar_type()));
  int bits = 0;
  TORCH_CHECK(valid_weight(qweight, B, A, codebook, qweight.device(), &bits), t_error.c_str());
  c10::cuda::CUDAGuard guard(qweight.device());
  return dequant_impl(qweight, B, A, codebook, B.scalar_type(), bits, (int)superchunks);
}

bool valid_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& B, const at::Tensor& A,
                  const at::Tensor& codebook, const c10::optional<at::Tensor>& bias, int64_t path, int64_t splits) {
  LORDS_REQUIRE(x.is_cuda(), "x: expected a CUDA tensor, got device ", device_str(x.device()));
  LORDS_REQUIRE(is_half_type(x.scalar_type()), "x: expected dtype float16 or bfloat16, got ",
                dtype_str(x.scalar_type()));
  LORDS_REQUIRE(x.dim() == 2, "x: expected 2-D [M, K], got shape ", shape_str(x));
  LORDS_REQUIRE(x.is_contiguous(), "x: expected a contiguous tensor");
  LORDS_REQUIRE(splits >= 0, "splits: expected 0 (automatic) or a positive split-K count, got ", splits);
  LORDS_REQUIRE(path >= -1 && path <= 5,
                "path: expected -1 (auto), 0 (fused decode), 1 (dequant + cuBLAS), 2 (re-associated), 3 "
                "(re-associated, mma.sync only), 4 (fused wgmma GEMM) or 5 (fused wgmma GEMM, stream-K), got ", path);
  LORDS_REQUIRE(A.dim() == 2 && x.size(1) == A.size(1), "x: expected shape [M, K] with K = A.shape[1], got x ",
                shape_str(x), " and A ", shape_str(A));
  const int64_t M = x.size(0), N = B.dim() == 2 ? B.size(0) : -1;
  LORDS_REQUIRE(path != 0 || M <= kDecodeMaxM, "x: the fused decode kernel (path=0) takes M <= ", (int)kDecodeMaxM,
                " rows, got M=", M);
  LORDS_REQUIRE((path != 2 && path != 3) ||
                    (B.dim() == 2 && (reassoc_fits((int)M, (int)B.size(1)) ||
                                      (path == 2 && reassoc_streamed_fits((int)M, (int)B.size(1))))),
                "x: the re-associated kernel takes M <= ", (int)kReassocMaxM,
                " and M * ceil(r/8)*8 <= 64 (path=3), <= 128 (path=2), got M=", M, ", r=",
                B.dim() == 2 ? B.size(1) : -1, ", path=", path);
  if (bias.has_value()) {
    const auto& b = *bias;
    LORDS_REQUIRE(b.device() == x.device(), "bias: expected device ", device_str(x.device()), ", got ",
                  device_str(b.device()));
    LORDS_REQUIRE(b.dim() == 1 && b.size(0) == N, "bias: expected shape [", N, "], got ", shape_str(b));
    LORDS_REQUIRE(float_kind(b.scalar_type()), "bias: expected dtype float32, float16 or bfloat16, got ",
                  dtype_str(b.scalar_type()));
    LORDS_REQUIRE(b.is_contiguous(), "bias: expected a contiguous tensor");
  }
  return true;
}

at::Tensor dequant_matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& B_in,
                               const at::Tensor& A_in, const at::Tensor& codebook,
                               const c10::optional<at::Tensor>& bias, int64_t path, int64_t splits) {
  TORCH_CHECK(valid_matmul(x, qweight, B_in, A_in, codebook, bias, path, splits), t_error.c_str());
  int bits = 0;
  TORCH_CHECK(valid_weight(qweight, B_in, A_in, codebook, x.device(), &bits), t_error.c_str());
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), N = B_in.size(0), K = A_in.size(1);
  const bool reassoc =
      path == 2 || path == 3 ||
      (path == -1 && (reassoc_preferred((int)M, (int)B_in.size(1)) ||
                      (reassoc_streamed_preferred((int)M, (int)B_in.size(1), N) &&
                       reassoc_uses_wgmma(K, x.data_ptr(), qweight.data_ptr(), A_in.data_ptr(), true))));
  if (M == 0) return at::empty({0, N}, x.options());
  // The fused GEMM runs on x's dtype for A too: its fit is judged on the pointers it would get.
  at::Tensor A_conv;
  bool gemm = false;
  if (path == 4 || path == 5 ||
      (path == -1 && !reassoc && fused_gemm_preferred((int)M, N, K, (int)B_in.size(1), sm_count(x.device()), bits))) {
    A_conv = A_in.to(x.scalar_type()).contiguous();
    gemm = fused_gemm_fits(K, (int)B_in.size(1), x.data_ptr(), qweight.data_ptr(), A_conv.data_ptr());
    if (!gemm && path >= 4)
      t_error = cat("path: the fused wgmma GEMM (path=", path, ") needs the sm_90a build on a compute capability 9.0 "
                    "GPU, r <= ", (int)kFusedMaxRank, ", K a multiple of 128 and 16-byte aligned x, qweight and A; got r=",
                    B_in.size(1), ", K=", K, ", ", cuda_features_str());
    TORCH_CHECK(gemm || path < 4, t_error.c_str());
    if (path == 5 && bits != 4) t_error = cat("path: the stream-K fused GEMM (path=5) takes 4-bit codes, got bits=", bits);
    TORCH_CHECK(path != 5 || bits == 4, t_error.c_str());
  }
  // Where the fused GEMM was preferred but does not fit, M <= kDecodeMaxM still goes to the decode kernels.
  const bool decode = !gemm && (reassoc || path == 0 || (path == -1 && M <= kDecodeMaxM));
  if (!decode && !gemm) {
    auto W = dequant_impl(qweight, B_in, A_in, codebook, x.scalar_type(), bits);
    if (bias.has_value()) return at::addmm(bias->to(x.scalar_type()), x, W.t());
    return at::mm(x, W.t());
  }

  // The scale mma runs in x's 16-bit type; B and A in another dtype are converted (an extra copy).
  const at::Tensor B = B_in.to(x.scalar_type()).contiguous();
  const at::Tensor A = gemm ? A_conv : A_in.to(x.scalar_type()).contiguous();
  const int sms = sm_count(x.device());
  const int r = (int)B.size(1);
  const bool wg = reassoc && reassoc_uses_wgmma(K, x.data_ptr(), qweight.data_ptr(), A.data_ptr(), path != 3);
  const size_t z_bytes = reassoc ? reassoc_z_bytes((int)M, r, K) : 0;
  if (z_bytes > 0 && !wg)  // (the message through t_error as everywhere here: one C string into TORCH_CHECK)
    t_error = cat("path: the re-associated kernel above 64 columns (path=2 with M * ceil(r/8)*8 > 64) needs the sm_90a "
                  "build on a compute capability 9.0 GPU, K a multiple of 128 and 16-byte aligned x, qweight and A; "
                  "got M=", M, ", r=", r, ", K=", K, ", ", cuda_features_str());
  TORCH_CHECK(z_bytes == 0 || wg, t_error.c_str());
  const at::Tensor zbuf = z_bytes > 0 ? at::empty({(int64_t)z_bytes}, x.options().dtype(at::kByte)) : at::Tensor();
  DecodePlan plan = gemm      ? fused_gemm_plan(dtype_of(x), bits, N, K, (int)M, r, sms)
                    : reassoc ? reassoc_plan(N, K, r, (int)M, bits, sms, wg)
                              : decode_plan(N, K, r, sms);
  if (splits > 0 && path != 5)
    plan = gemm      ? fused_gemm_plan_with_splits(N, K, (int)splits)
           : reassoc ? reassoc_plan_with_splits(N, K, r, (int)M, bits, (int)splits, wg)
                     : decode_plan_with_splits(N, K, r, (int)splits);
  auto y = at::empty({M, N}, x.options());
  at::Tensor ws;
  int* counters = nullptr;
  if (plan.splits > 1 && !gemm) {
    ws = at::empty({plan.splits, M, N}, x.options().dtype(at::kFloat));
    counters = counters_for(x.device()).data_ptr<int>();
  }
  // Stream-K (path 5, or path -1 where fused_stream_k_preferred holds and no split count was asked for): `splits`
  // blocks (0: one per SM), at least one per tile (so a block spans at most two tiles, which the kernel runs as two
  // straight-line segments) and at most one per superchunk unit; one partial tile each.
  const bool stream_k = path == 5 || (path == -1 && gemm && splits == 0 &&
                                      fused_stream_k_preferred(dtype_of(x), bits, N, K, (int)M, r, sms, plan));
  int sk_blocks = 0;
  if (stream_k) {
    const long units = fused_stream_k_units((int)M, r, N, K, sms, bits);
    const long tiles = units / (K / 128);
    const long blocks = std::max<long>(tiles, std::min<long>(splits > 0 ? splits : sms, units));
    if (blocks > kCounterSlots || (unsigned long long)units * (unsigned long long)blocks >= (1ull << 32)) {
      const std::string t_error = cat("path: the stream-K fused GEMM (path=5) takes at most ", kCounterSlots,
                                      " blocks and units x blocks below 2^32, got ", tiles, " tiles of ", K / 128,
                                      " superchunks on ", blocks, " blocks");
      TORCH_CHECK(false, t_error.c_str());
    }
    sk_blocks = (int)blocks;
    plan = DecodePlan{1, (int)K, 0};
    ws = at::empty({(int64_t)fused_stream_k_workspace_floats((int)M, r, N, K, sms, bits, sk_blocks)},
                   x.options().dtype(at::kFloat));
    counters = counters_for(x.device()).data_ptr<int>();
  }
  DecodeArgs a{dtype_of(x),
               bits,
               x.data_ptr(),
               qweight.data_ptr<uint8_t>(),
               B.data_ptr(),
               A.data_ptr(),
               codebook.data_ptr(),
               kind_of(codebook),
               bias.has_value() ? bias->data_ptr() : nullptr,
               bias.has_value() ? kind_of(*bias) : 0,
               y.data_ptr(),
               ws.defined() ? ws.data_ptr<float>() : nullptr,
               counters,
               (int)M,
               N,
               K,
               r,
               plan.splits,
               plan.k_per_split,
               wg,
               zbuf.defined() ? zbuf.data_ptr() : nullptr};
  a.stream_k_blocks = sk_blocks;
  if (gemm)
    fused_gemm(a, sms, c10::cuda::getCurrentCUDAStream());
  else if (reassoc)
    reassoc_gemv(a, c10::cuda::getCurrentCUDAStream());
  else
    decode_gemm(a, c10::cuda::getCurrentCUDAStream());
  return y;
}

at::Tensor dequant_meta(const at::Tensor& qweight, const at::Tensor& B, const at::Tensor& A,
                        const at::Tensor& codebook, int64_t superchunks) {
  return at::empty({B.size(0), A.size(1)}, B.options());
}

at::Tensor dequant_matmul_meta(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& B,
                               const at::Tensor& A, const at::Tensor& codebook, const c10::optional<at::Tensor>& bias,
                               int64_t path, int64_t splits) {
  return at::empty({x.size(0), B.size(0)}, x.options());
}

// What this build and GPU run, for `lords info` and the GPU tests: "reassoc_wgmma_built=0|1
// reassoc_wgmma_ready=0|1 fused_gemm_ready=0|1" (ready: built, and the GPU is compute capability 9.0).
std::string cuda_features() { return cuda_features_str(); }

}  // namespace
}  // namespace lords

TORCH_LIBRARY_FRAGMENT(lords, m) {
  m.def("cuda_features() -> str", &lords::cuda_features);
  m.def("dequant_cuda(Tensor qweight, Tensor B, Tensor A, Tensor codebook, int superchunks=0) -> Tensor");
  m.def(
      "dequant_matmul_cuda(Tensor x, Tensor qweight, Tensor B, Tensor A, Tensor codebook, Tensor? bias=None, "
      "int path=-1, int splits=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(lords, CUDA, m) {
  m.impl("dequant_cuda", &lords::dequant_cuda);
  m.impl("dequant_matmul_cuda", &lords::dequant_matmul_cuda);
}

TORCH_LIBRARY_IMPL(lords, Meta, m) {
  m.impl("dequant_cuda", &lords::dequant_meta);
  m.impl("dequant_matmul_cuda", &lords::dequant_matmul_meta);
}
