// Batched, torch-free kernels over raw memory. Every entry point takes lists of
// (pointer, element count, dtype) and validates them all before touching memory, in the
// style of apex's multi_tensor_apply: one call covers many tensors with per-tensor scalars.
#pragma once

#include <cstdint>
#include <vector>

#include "safegene/dtype.h"

namespace safegene {

struct ConstSpan {
  const void* ptr;
  int64_t numel;
  DType dtype;
};

struct MutSpan {
  void* ptr;
  int64_t numel;
  DType dtype;
};

// Per-output statistics of one linear combination, accumulated in double across chunks.
struct LinStats {
  double out_sq = 0;      // sum of squares of the exact float32 result
  double in0_sq = 0;      // sum of squares of input 0
  double in1_sq = 0;      // sum of squares of input 1
  double in01_dot = 0;    // <input 0, input 1>
  double round_sq = 0;    // sum of squares of (stored value - float32 result): storage rounding error
  int64_t nonfinite_out = 0;
  int64_t nonfinite_in = 0;
  void merge(const LinStats& o) {
    out_sq += o.out_sq;
    in0_sq += o.in0_sq;
    in1_sq += o.in1_sq;
    in01_dot += o.in01_dot;
    round_sq += o.round_sq;
    nonfinite_out += o.nonfinite_out;
    nonfinite_in += o.nonfinite_in;
  }
};

// ---- CPU (csrc/cpu/kernels.cpp) -------------------------------------------------------

// Threads used by the CPU kernels (default: hardware concurrency, at most 16).
void set_num_threads(int n);
int num_threads();

// How much of LinStats a pass computes: apply only needs the non-finite guard, extract all.
enum class StatsLevel : int32_t { None = 0, Guard = 1, Full = 2 };

// out[i] = sum_k coeffs[k] * in_k[i] for i in [0, n), float32 math (products and sums in
// input order, no contraction), one rounding into out's dtype; fills stats (when non-null)
// for this range at the given level. Single-threaded: the caller parallelises.
void lincomb_range(void* out, DType out_dtype, const std::vector<const void*>& ins,
                   const std::vector<DType>& in_dtypes, const std::vector<float>& coeffs, int64_t n,
                   LinStats* stats, StatsLevel level = StatsLevel::Full);

// A low-rank term scale * B @ A over a rows x cols matrix stored row-major: A is rank x cols
// and B is rows x rank, float32, row-major (a PEFT LoRA update oriented to the weight).
struct LowRank {
  const float* a = nullptr;
  const float* b = nullptr;
  int64_t rank = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  float scale = 0.f;
};

// x[i] = round_dtype(x[i] + scale * (B @ A)[start + i]) for i in [0, n), x holding elements
// [start, start + n) of the matrix in `dtype`: the merged weight exactly as PEFT's
// merge_and_unload stores it (float32 math, (B @ A) summed over the rank in order, then
// scaled, then added, then one rounding into the weight's own dtype).
void add_lowrank_range(void* x, DType dtype, int64_t start, int64_t n, const LowRank& lr);

// dst_i += coeffs[i] * src_i for every pair; threads split the total work.
void scale_add_cpu(const std::vector<MutSpan>& dst, const std::vector<ConstSpan>& src,
                   const std::vector<float>& coeffs);

// The summation order of dot, shared by dot_cpu and dot_cuda so that they agree bit for bit
// (and so that the result depends on neither thread count nor vector width):
//  - a tensor is cut into items of kDotItem elements from its start, an item into blocks of
//    kDotBlock elements;
//  - a block's float32 partial keeps kDotLanes lane sums: block element j is added to lane
//    j % kDotLanes, in increasing j, as a rounded product then a rounded add (no FMA), each
//    lane starting from 0.0f; the lanes are combined as t[l] = s[l] + s[l + 8] for l < 8, then
//    t[l] + t[l + 4], t[l] + t[l + 2], t[0] + t[1];
//  - an item's sum is 0.0 plus its blocks' partials (as double) in order;
//  - a tensor's total is 0.0 plus its items' sums in order.
constexpr int64_t kDotItem = 65536;
constexpr int64_t kDotBlock = 1024;
constexpr int kDotLanes = 16;

// <a_i, b_i> for every pair: float32 partial sums over blocks of 1024, double total, in the
// order above.
std::vector<double> dot_cpu(const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b);

// Validation shared by the CPU and CUDA entry points, done before any memory is touched:
// equal list lengths (and one coefficient per pair), equal element counts, no null pointer
// for a non-empty tensor, float dtypes only. Throws safegene::Error naming the tensor.
void check_spans(const char* what, const std::vector<MutSpan>& dst, const std::vector<ConstSpan>& src, size_t n_coeffs);
void check_spans(const char* what, const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b);

// ---- CUDA (csrc/cuda/kernels.cu, or no_cuda.cpp when built without CUDA) ---------------

bool cuda_built();
bool cuda_device_available();
void scale_add_cuda(const std::vector<MutSpan>& dst, const std::vector<ConstSpan>& src,
                    const std::vector<float>& coeffs, void* stream);
std::vector<double> dot_cuda(const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b, void* stream);

}  // namespace safegene
