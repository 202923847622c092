// CPU kernels. Inner loops are templated on the element types so the compiler sees
// straight-line conversions it can vectorise; arithmetic is float32 with
// -ffp-contract=off (set in CMake) so results do not depend on whether the host has FMA,
// and the CUDA twins use __fmul_rn/__fadd_rn to match them bit for bit.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <thread>

#include "safegene/errors.h"
#include "safegene/kernels.h"

namespace safegene {
namespace {

constexpr int64_t kBlock = 1024;

std::atomic<int> g_threads{0};

template <DType T>
inline void load_block(const void* p, int64_t off, float* dst, int64_t n) {
  if constexpr (T == DType::F32) {
    const float* s = static_cast<const float*>(p) + off;
    for (int64_t j = 0; j < n; ++j) dst[j] = s[j];
  } else if constexpr (T == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(p) + off;
    for (int64_t j = 0; j < n; ++j) dst[j] = bf16_to_f32(s[j]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(p) + off;
    for (int64_t j = 0; j < n; ++j) dst[j] = f16_to_f32(s[j]);
  }
}

inline void load_any(const void* p, DType t, int64_t off, float* dst, int64_t n) {
  switch (t) {
    case DType::F32: load_block<DType::F32>(p, off, dst, n); break;
    case DType::BF16: load_block<DType::BF16>(p, off, dst, n); break;
    default: load_block<DType::F16>(p, off, dst, n); break;
  }
}

template <DType T>
inline void store_block(void* p, int64_t off, const float* src, int64_t n) {
  if constexpr (T == DType::F32) {
    float* d = static_cast<float*>(p) + off;
    for (int64_t j = 0; j < n; ++j) d[j] = src[j];
  } else if constexpr (T == DType::BF16) {
    uint16_t* d = static_cast<uint16_t*>(p) + off;
    for (int64_t j = 0; j < n; ++j) d[j] = f32_to_bf16(src[j]);
  } else {
    uint16_t* d = static_cast<uint16_t*>(p) + off;
    for (int64_t j = 0; j < n; ++j) d[j] = f32_to_f16(src[j]);
  }
}

inline void store_any(void* p, DType t, int64_t off, const float* src, int64_t n) {
  switch (t) {
    case DType::F32: store_block<DType::F32>(p, off, src, n); break;
    case DType::BF16: store_block<DType::BF16>(p, off, src, n); break;
    default: store_block<DType::F16>(p, off, src, n); break;
  }
}

inline float sum_sq(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) s += x[j] * x[j];
  return s;
}

// Runs fn(item) for item in [0, n_items) on up to num_threads() threads.
template <class Fn>
void parallel_items(int64_t n_items, int64_t total_elems, Fn fn) {
  int nt = std::min<int64_t>(num_threads(), n_items);
  if (total_elems < (1 << 18)) nt = 1;  // thread start-up costs more than it saves
  if (nt <= 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    for (int64_t i; (i = next.fetch_add(1)) < n_items;) fn(i);
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int t = 0; t < nt - 1; ++t) pool.emplace_back(worker);
  worker();
  for (auto& th : pool) th.join();
}

struct Item {
  int32_t tensor;
  int64_t start;
  int64_t len;
};

template <class NumelOf>
std::vector<Item> make_items(size_t n, NumelOf numel_of, int64_t item_elems) {
  std::vector<Item> items;
  for (size_t i = 0; i < n; ++i) {
    const int64_t ne = numel_of(i);
    for (int64_t s = 0; s < ne; s += item_elems)
      items.push_back({static_cast<int32_t>(i), s, std::min(item_elems, ne - s)});
  }
  return items;
}

}  // namespace

void set_num_threads(int n) { g_threads.store(std::max(1, std::min(n, 64))); }

int num_threads() {
  int n = g_threads.load();
  if (n <= 0) {
    n = static_cast<int>(std::thread::hardware_concurrency());
    n = std::max(1, std::min(n, 16));
  }
  return n;
}

// On x86-64 the hot loop is also compiled for AVX2 and picked at load time (ifunc), so one
// portable build runs 8-wide where the CPU allows.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define SG_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SG_TARGET_CLONES
#endif

SG_TARGET_CLONES
void lincomb_range(void* out, DType out_dtype, const std::vector<const void*>& ins,
                   const std::vector<DType>& in_dtypes, const std::vector<float>& coeffs, int64_t n,
                   LinStats* stats, StatsLevel level) {
  if (level == StatsLevel::None) stats = nullptr;
  const bool full = level == StatsLevel::Full;
  const size_t k = ins.size();
  float acc[kBlock];
  float x[kBlock];
  float x0[kBlock];
  float back[kBlock];
  LinStats local;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t m = std::min(kBlock, n - off);
    load_any(ins[0], in_dtypes[0], off, x0, m);
    const float c0 = coeffs[0];
    for (int64_t j = 0; j < m; ++j) acc[j] = c0 * x0[j];
    float in0_sq = 0.f, in1_sq = 0.f, in01 = 0.f;
    for (size_t q = 1; q < k; ++q) {
      load_any(ins[q], in_dtypes[q], off, x, m);
      const float c = coeffs[q];
      for (int64_t j = 0; j < m; ++j) acc[j] = acc[j] + c * x[j];
      if (stats && full && q == 1) {
        for (int64_t j = 0; j < m; ++j) {
          in0_sq += x0[j] * x0[j];
          in1_sq += x[j] * x[j];
          in01 += x0[j] * x[j];
        }
      }
    }
    store_any(out, out_dtype, off, acc, m);
    if (stats && !full) {
      const float s = sum_sq(acc, m);  // finite iff every element is (and no overflow)
      if (!std::isfinite(s)) {
        int64_t nf_out = 0;
        for (int64_t j = 0; j < m; ++j) nf_out += !std::isfinite(acc[j]);
        local.nonfinite_out += nf_out;
      }
    } else if (stats) {
      if (k == 1) in0_sq = sum_sq(x0, m);
      local.in0_sq += in0_sq;
      local.in1_sq += in1_sq;
      local.in01_dot += in01;
      const float out_sq = sum_sq(acc, m);
      local.out_sq += out_sq;
      if (!std::isfinite(out_sq)) {  // a finite sum of squares means every element is finite
        int64_t nf_out = 0;
        for (int64_t j = 0; j < m; ++j) nf_out += !std::isfinite(acc[j]);
        local.nonfinite_out += nf_out;
      }
      if (!std::isfinite(in0_sq) || (k > 1 && !std::isfinite(in1_sq))) {
        int64_t nf_in = 0;
        for (int64_t j = 0; j < m; ++j) nf_in += !std::isfinite(x0[j]);
        for (size_t q = 1; q < k; ++q) {
          load_any(ins[q], in_dtypes[q], off, x, m);
          for (int64_t j = 0; j < m; ++j) nf_in += !std::isfinite(x[j]);
        }
        local.nonfinite_in += nf_in;
      }
      if (out_dtype != DType::F32) {
        load_any(out, out_dtype, off, back, m);
        float r = 0.f;
        for (int64_t j = 0; j < m; ++j) {
          const float d = back[j] - acc[j];
          if (std::isfinite(d)) r += d * d;
        }
        local.round_sq += r;
      }
    }
  }
  if (stats) stats->merge(local);
}

void check_pairs(const char* what, size_t n_dst, size_t n_src, size_t n_coeff, const int64_t* dst_numel,
                 const int64_t* src_numel, const void* const* dst_ptr, const void* const* src_ptr) {
  if (n_dst != n_src || (n_coeff != static_cast<size_t>(-1) && n_coeff != n_dst))
    throw Error(std::string(what) + ": lists of different lengths (" + std::to_string(n_dst) + ", " +
                std::to_string(n_src) + ")");
  for (size_t i = 0; i < n_dst; ++i) {
    if (dst_numel[i] != src_numel[i])
      throw Error(std::string(what) + ": tensor " + std::to_string(i) + " has " + std::to_string(dst_numel[i]) +
                  " elements against " + std::to_string(src_numel[i]));
    if (dst_numel[i] < 0) throw Error(std::string(what) + ": negative element count");
    if (dst_numel[i] > 0 && (dst_ptr[i] == nullptr || src_ptr[i] == nullptr))
      throw Error(std::string(what) + ": null pointer for tensor " + std::to_string(i));
  }
}

namespace {
template <class A, class B>
void check_spans(const char* what, const std::vector<A>& a, const std::vector<B>& b, size_t n_coeff) {
  std::vector<int64_t> na(a.size()), nb(b.size());
  std::vector<const void*> pa(a.size()), pb(b.size());
  for (size_t i = 0; i < a.size(); ++i) na[i] = a[i].numel, pa[i] = a[i].ptr;
  for (size_t i = 0; i < b.size(); ++i) nb[i] = b[i].numel, pb[i] = b[i].ptr;
  if (a.size() != b.size())
    throw Error(std::string(what) + ": lists of different lengths (" + std::to_string(a.size()) + ", " +
                std::to_string(b.size()) + ")");
  check_pairs(what, a.size(), b.size(), n_coeff, na.data(), nb.data(), pa.data(), pb.data());
}
}  // namespace

void scale_add_cpu(const std::vector<MutSpan>& dst, const std::vector<ConstSpan>& src,
                   const std::vector<float>& coeffs) {
  check_spans("scale_add", dst, src, coeffs.size());
  int64_t total = 0;
  for (auto& d : dst) total += d.numel;
  const auto items = make_items(dst.size(), [&](size_t i) { return dst[i].numel; }, int64_t{1} << 16);
  parallel_items(static_cast<int64_t>(items.size()), total, [&](int64_t it) {
    const Item& w = items[it];
    const MutSpan& d = dst[w.tensor];
    const ConstSpan& s = src[w.tensor];
    const int64_t bd = dtype_size(d.dtype), bs = dtype_size(s.dtype);
    void* dp = static_cast<char*>(d.ptr) + w.start * bd;
    const void* sp = static_cast<const char*>(s.ptr) + w.start * bs;
    lincomb_range(dp, d.dtype, {dp, sp}, {d.dtype, s.dtype}, {1.0f, coeffs[w.tensor]}, w.len, nullptr, StatsLevel::None);
  });
}

std::vector<double> dot_cpu(const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b) {
  check_spans("dot", a, b, static_cast<size_t>(-1));
  int64_t total = 0;
  for (auto& x : a) total += x.numel;
  const auto items = make_items(a.size(), [&](size_t i) { return a[i].numel; }, int64_t{1} << 16);
  std::vector<double> partial(items.size(), 0.0);
  parallel_items(static_cast<int64_t>(items.size()), total, [&](int64_t it) {
    const Item& w = items[it];
    float xa[kBlock], xb[kBlock];
    double acc = 0.0;
    for (int64_t off = 0; off < w.len; off += kBlock) {
      const int64_t m = std::min(kBlock, w.len - off);
      load_any(a[w.tensor].ptr, a[w.tensor].dtype, w.start + off, xa, m);
      load_any(b[w.tensor].ptr, b[w.tensor].dtype, w.start + off, xb, m);
      float s = 0.f;
      for (int64_t j = 0; j < m; ++j) s += xa[j] * xb[j];
      acc += s;
    }
    partial[it] = acc;
  });
  std::vector<double> out(a.size(), 0.0);
  for (size_t it = 0; it < items.size(); ++it) out[items[it].tensor] += partial[it];  // fixed order: deterministic
  return out;
}

}  // namespace safegene
