// CPU kernels. Inner loops are templated on the element types so the compiler sees
// straight-line conversions it can vectorise; arithmetic is float32 with
// -ffp-contract=off (set in CMake) so results do not depend on whether the host has FMA,
// and the CUDA twins use __fmul_rn/__fadd_rn to match them bit for bit.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>
#include <string>
#include <thread>

#include "safegene/dispatch.h"
#include "safegene/errors.h"
#include "safegene/kernels.h"

namespace safegene {
namespace {

constexpr int64_t kBlock = 1024;

std::atomic<int> g_threads{0};

// Always inlined into their callers (the AVX2 clone among them): the conversion helpers are then
// compiled for the clone's ISA instead of being called as baseline code, and no vector crosses a call.
#define SG_INLINE inline __attribute__((always_inline))
// The same for a lambda handed to dispatch_float (which is always inlined too).
#define SG_INLINE_LAMBDA __attribute__((always_inline))

template <DType T>
SG_INLINE void load_block(const void* p, int64_t off, float* dst, int64_t n) {
  using E = Elem<T>;
  const auto* s = static_cast<const typename E::storage*>(p) + off;
  for (int64_t j = 0; j < n; ++j) dst[j] = E::to_f32(s[j]);
}

// Callers validate dtypes before any worker starts (check_spans, the stream plan check), so
// the dispatch never throws on a worker thread.
SG_INLINE void load_any(const void* p, DType t, int64_t off, float* dst, int64_t n) {
  dispatch_float(t, "load", [&](auto tag) SG_INLINE_LAMBDA { load_block<decltype(tag)::value>(p, off, dst, n); });
}

// A float32 view of elements [off, off + n): the input itself when it is float32, else its
// conversion into buf.
SG_INLINE const float* view_or_load(const void* p, DType t, int64_t off, float* buf, int64_t n) {
  if (t == DType::F32) return static_cast<const float*>(p) + off;
  load_any(p, t, off, buf, n);
  return buf;
}

template <DType T>
SG_INLINE void store_block(void* p, int64_t off, const float* src, int64_t n) {
  using E = Elem<T>;
  auto* d = static_cast<typename E::storage*>(p) + off;
  for (int64_t j = 0; j < n; ++j) d[j] = E::from_f32(src[j]);
}

SG_INLINE void store_any(void* p, DType t, int64_t off, const float* src, int64_t n) {
  dispatch_float(t, "store", [&](auto tag) SG_INLINE_LAMBDA { store_block<decltype(tag)::value>(p, off, src, n); });
}

// Reductions keep kLanes independent partial sums (element j goes to lane j % kLanes) and
// combine them in a fixed order: the compiler can vectorise them without -ffast-math, the
// result never depends on the host's vector width or thread count, and a float32 chain no
// longer serialises on the add latency (a single accumulator made the statistics, not the
// I/O, the bottleneck of the whole stream).
constexpr int kLanes = 16;
static_assert(kLanes == kDotLanes && kBlock == kDotBlock, "dot's order is shared with the CUDA kernels (kernels.h)");

// Lanes as two 8-wide vectors (GCC/Clang vector extensions: AVX2 where the clone allows, two
// SSE halves otherwise; the same arithmetic lane by lane either way).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
#pragma GCC diagnostic ignored "-Wpsabi"

SG_INLINE v8f ld8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

SG_INLINE void st16(float* s, v8f lo, v8f hi) {
  std::memcpy(s, &lo, sizeof lo);
  std::memcpy(s + 8, &hi, sizeof hi);
}

SG_INLINE float combine(const float* s) {
  float t[kLanes / 2];
  for (int l = 0; l < kLanes / 2; ++l) t[l] = s[l] + s[l + kLanes / 2];
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) t[l] = t[l] + t[l + w];
  return t[0];
}

SG_INLINE float sum_sq(const float* x, int64_t n) {
  v8f s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const v8f a = ld8(x + j), b = ld8(x + j + 8);
    s0 += a * a;
    s1 += b * b;
  }
  float s[kLanes];
  st16(s, s0, s1);
  for (int l = 0; j < n; ++j, ++l) s[l] += x[j] * x[j];
  return combine(s);
}

SG_INLINE float dot(const float* x, const float* y, int64_t n) {
  v8f s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    s0 += ld8(x + j) * ld8(y + j);
    s1 += ld8(x + j + 8) * ld8(y + j + 8);
  }
  float s[kLanes];
  st16(s, s0, s1);
  for (int l = 0; j < n; ++j, ++l) s[l] += x[j] * y[j];
  return combine(s);
}

// sum x*x, sum y*y and sum x*y in one pass.
SG_INLINE void sum_sq_dot(const float* x, const float* y, int64_t n, float& xx, float& yy, float& xy) {
  v8f a0 = {}, a1 = {}, b0 = {}, b1 = {}, c0 = {}, c1 = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const v8f x0 = ld8(x + j), x1 = ld8(x + j + 8), y0 = ld8(y + j), y1 = ld8(y + j + 8);
    a0 += x0 * x0;
    a1 += x1 * x1;
    b0 += y0 * y0;
    b1 += y1 * y1;
    c0 += x0 * y0;
    c1 += x1 * y1;
  }
  float a[kLanes], b[kLanes], c[kLanes];
  st16(a, a0, a1);
  st16(b, b0, b1);
  st16(c, c0, c1);
  for (int l = 0; j < n; ++j, ++l) {
    a[l] += x[j] * x[j];
    b[l] += y[j] * y[j];
    c[l] += x[j] * y[j];
  }
  xx = combine(a);
  yy = combine(b);
  xy = combine(c);
}

// d*d where d is finite, else 0 (d - d is 0 exactly for finite d and NaN otherwise).
SG_INLINE v8f sq_if_finite(v8f d) {
  const v8i finite = (d - d) == 0;
  const v8f sq = d * d;
  return (v8f)((v8i)sq & finite);  // vector casts reinterpret the bits
}

// sum of squares of the finite differences back - ref (non-finite ones count as 0).
SG_INLINE float sum_sq_diff_finite(const float* back, const float* ref, int64_t n) {
  v8f s0 = {}, s1 = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    s0 += sq_if_finite(ld8(back + j) - ld8(ref + j));
    s1 += sq_if_finite(ld8(back + j + 8) - ld8(ref + j + 8));
  }
  float s[kLanes];
  st16(s, s0, s1);
  for (int l = 0; j < n; ++j, ++l) {
    const float d = back[j] - ref[j];
    s[l] += std::isfinite(d) ? d * d : 0.f;
  }
  return combine(s);
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
  float acc_buf[kBlock];
  float x_buf[kBlock];
  float x0_buf[kBlock];
  float back[kBlock];
  // float32 inputs are read in place and a float32 output is accumulated in place (unless it
  // aliases an input, as in scale_add): no staging copies on the float32 paths.
  bool out_direct = out_dtype == DType::F32;
  for (size_t q = 0; q < k; ++q) out_direct = out_direct && ins[q] != out;
  LinStats local;
  for (int64_t off = 0; off < n; off += kBlock) {
    const int64_t m = std::min(kBlock, n - off);
    const float* x0 = view_or_load(ins[0], in_dtypes[0], off, x0_buf, m);
    float* acc = out_direct ? static_cast<float*>(out) + off : acc_buf;
    const float c0 = coeffs[0];
    for (int64_t j = 0; j < m; ++j) acc[j] = c0 * x0[j];
    float in0_sq = 0.f, in1_sq = 0.f, in01 = 0.f;
    for (size_t q = 1; q < k; ++q) {
      const float* x = view_or_load(ins[q], in_dtypes[q], off, x_buf, m);
      const float c = coeffs[q];
      for (int64_t j = 0; j < m; ++j) acc[j] = acc[j] + c * x[j];
      if (stats && full && q == 1) sum_sq_dot(x0, x, m, in0_sq, in1_sq, in01);
    }
    if (!out_direct) store_any(out, out_dtype, off, acc, m);
    float* x = x_buf;
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
        local.round_sq += sum_sq_diff_finite(back, acc, m);
      }
    }
  }
  if (stats) stats->merge(local);
}

namespace {
// Eight floats: one AVX register in the avx2 clone, two SSE registers in the default one.
typedef float V8 __attribute__((vector_size(32)));

// For R consecutive rows of B (b: R x rank, row-major) and columns j < m of A (rows of lda):
// d[r * ldd + j] = sum over q, in order, of b[r * rank + q] * a[q * lda + j]. Tiles of 16 columns
// keep 2 x R accumulators in registers across the rank loop, so a tile of A is loaded once for
// all R rows and no partial sum is stored; every element is 0 + b0·a0 + b1·a1 + ... in that
// order, without contraction (the same bits as the plain loop, kept for the tail).
template <int R>
__attribute__((always_inline)) inline void lowrank_rows(float* d, int64_t ldd, const float* b, int64_t rank,
                                                       const float* a, int64_t lda, int64_t m) {
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    V8 s[R][2];
    for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = V8{0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t q = 0; q < rank; ++q) {
      V8 a0, a1;
      std::memcpy(&a0, a + q * lda + j, sizeof(V8));
      std::memcpy(&a1, a + q * lda + j + 8, sizeof(V8));
      for (int r = 0; r < R; ++r) {
        const float br = b[r * rank + q];
        s[r][0] = s[r][0] + a0 * br;
        s[r][1] = s[r][1] + a1 * br;
      }
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(d + r * ldd + j, &s[r][0], sizeof(V8));
      std::memcpy(d + r * ldd + j + 8, &s[r][1], sizeof(V8));
    }
  }
  for (; j < m; ++j) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t q = 0; q < rank; ++q) acc = acc + b[r * rank + q] * a[q * lda + j];
      d[r * ldd + j] = acc;
    }
  }
}

// A column block of A packed as 16-column strips: p[(s * rank + q) * 16 + c] = a[q * lda + 16 s + c].
// Read in place, the rank rows of a tile lie lda floats apart (32 KiB at 8192 columns): every one
// maps to the same L1 set, and the tile's 2 x rank cache lines evict each other. Packed, a strip's
// rank x 16 floats are contiguous.
inline void pack_strips(float* p, const float* a, int64_t lda, int64_t rank, int64_t strips) {
  for (int64_t s = 0; s < strips; ++s)
    for (int64_t q = 0; q < rank; ++q) std::memcpy(p + (s * rank + q) * 16, a + q * lda + s * 16, 16 * sizeof(float));
}

// lowrank_rows<R> over packed strips: the same sums in the same order (the same bits).
template <int R>
__attribute__((always_inline)) inline void lowrank_rows_packed(float* d, int64_t ldd, const float* b, int64_t rank,
                                                              const float* p, int64_t strips) {
  for (int64_t s = 0; s < strips; ++s) {
    const float* ps = p + s * rank * 16;
    V8 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V8{0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t q = 0; q < rank; ++q) {
      V8 a0, a1;
      std::memcpy(&a0, ps + q * 16, sizeof(V8));
      std::memcpy(&a1, ps + q * 16 + 8, sizeof(V8));
      for (int r = 0; r < R; ++r) {
        const float br = b[r * rank + q];
        acc[r][0] = acc[r][0] + a0 * br;
        acc[r][1] = acc[r][1] + a1 * br;
      }
    }
    for (int r = 0; r < R; ++r) {
      std::memcpy(d + r * ldd + s * 16, &acc[r][0], sizeof(V8));
      std::memcpy(d + r * ldd + s * 16 + 8, &acc[r][1], sizeof(V8));
    }
  }
}
}  // namespace

// The whole rows the chunk holds, four at a time, column block by column block: each block of A
// is packed once (pack_strips) and used for every group of four rows; the rest (a partial first
// or last row, fewer than four rows left) one row segment at a time from A in place. Each
// element: w + (B·A)·scale in float32, one rounding into x's dtype. Templated on the dtype and
// inlined into each clone of add_lowrank_range, so that the conversions are compiled for the
// clone's ISA too (through load_any / store_any they were a call to baseline code).
namespace {
template <DType T>
__attribute__((always_inline)) inline void add_lowrank_t(void* x, int64_t start, int64_t n, const LowRank& lr) {
  using E = Elem<T>;
  constexpr int kRows = 4;
  constexpr int64_t kCols = 256;  // a packed block is rank x 256 floats: 16 KiB at rank 16
  // one row segment of up to kBlock columns, or kRows rows of a kCols-column block
  float d[std::max<int64_t>(kBlock, kRows * kCols)];
  auto* xs = static_cast<typename E::storage*>(x);
  const float scale = lr.scale;
  auto add = [&](int64_t off, const float* dr, int64_t m) {
    auto* p = xs + off;
    for (int64_t j = 0; j < m; ++j) p[j] = E::from_f32(E::to_f32(p[j]) + dr[j] * scale);
  };
  auto one_segment = [&](int64_t i, int64_t end) {  // row i / cols from column i % cols, up to a block
    const int64_t row = i / lr.cols, col = i % lr.cols;
    const int64_t m = std::min<int64_t>({kBlock, lr.cols - col, end - i});
    lowrank_rows<1>(d, kBlock, lr.b + row * lr.rank, lr.rank, lr.a + col, lr.cols, m);
    add(i - start, d, m);
    return m;
  };
  const int64_t end = start + n;
  int64_t i = start;
  while (i < end && i % lr.cols != 0) i += one_segment(i, end);  // the partial first row
  const int64_t groups = (end - i) / lr.cols / kRows;
  if (groups > 0) {
    std::vector<float> packed(static_cast<size_t>(lr.rank * kCols));
    const int64_t row0 = i / lr.cols;
    for (int64_t k = 0; k < lr.cols; k += kCols) {
      const int64_t m = std::min<int64_t>(kCols, lr.cols - k), strips = m / 16;
      pack_strips(packed.data(), lr.a + k, lr.cols, lr.rank, strips);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t row = row0 + g * kRows;
        const float* b = lr.b + row * lr.rank;
        lowrank_rows_packed<kRows>(d, kCols, b, lr.rank, packed.data(), strips);
        // the block's last m % 16 columns, from A in place (fewer than a tile: lowrank_rows' plain loop)
        lowrank_rows<kRows>(d + strips * 16, kCols, b, lr.rank, lr.a + k + strips * 16, lr.cols, m - strips * 16);
        for (int r = 0; r < kRows; ++r) add(i - start + (g * kRows + r) * lr.cols + k, d + r * kCols, m);
      }
    }
    i += groups * kRows * lr.cols;
  }
  while (i < end) i += one_segment(i, end);  // fewer than four whole rows, and a partial last row
}
}  // namespace

SG_TARGET_CLONES
void add_lowrank_range(void* x, DType dtype, int64_t start, int64_t n, const LowRank& lr) {
  dispatch_float(dtype, "low-rank term",
                 [&](auto tag) SG_INLINE_LAMBDA { add_lowrank_t<decltype(tag)::value>(x, start, n, lr); });
}

namespace {
template <class A>
void check_lists(const char* what, const std::vector<A>& a, const std::vector<ConstSpan>& b, size_t n_coeff) {
  const std::string w(what);
  if (a.size() != b.size() || (n_coeff != static_cast<size_t>(-1) && n_coeff != a.size()))
    throw Error(w + ": lists of different lengths (" + std::to_string(a.size()) + ", " + std::to_string(b.size()) +
                (n_coeff != static_cast<size_t>(-1) ? ", " + std::to_string(n_coeff) + " coefficients" : "") + ")");
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string t = w + ": tensor " + std::to_string(i);
    if (a[i].numel != b[i].numel)
      throw Error(t + " has " + std::to_string(a[i].numel) + " elements against " + std::to_string(b[i].numel));
    if (a[i].numel < 0) throw Error(t + ": negative element count");
    if (a[i].numel > 0 && (a[i].ptr == nullptr || b[i].ptr == nullptr)) throw Error(t + ": null pointer");
    check_float(a[i].dtype, t.c_str());
    check_float(b[i].dtype, t.c_str());
  }
}
}  // namespace

void check_spans(const char* what, const std::vector<MutSpan>& dst, const std::vector<ConstSpan>& src, size_t n_coeffs) {
  check_lists(what, dst, src, n_coeffs);
}

void check_spans(const char* what, const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b) {
  check_lists(what, a, b, static_cast<size_t>(-1));
}

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
  check_spans("dot", a, b);
  int64_t total = 0;
  for (auto& x : a) total += x.numel;
  const auto items = make_items(a.size(), [&](size_t i) { return a[i].numel; }, kDotItem);
  std::vector<double> partial(items.size(), 0.0);
  parallel_items(static_cast<int64_t>(items.size()), total, [&](int64_t it) {
    const Item& w = items[it];
    float xa[kBlock], xb[kBlock];
    double acc = 0.0;
    for (int64_t off = 0; off < w.len; off += kBlock) {
      const int64_t m = std::min(kBlock, w.len - off);
      load_any(a[w.tensor].ptr, a[w.tensor].dtype, w.start + off, xa, m);
      load_any(b[w.tensor].ptr, b[w.tensor].dtype, w.start + off, xb, m);
      acc += dot(xa, xb, m);
    }
    partial[it] = acc;
  });
  std::vector<double> out(a.size(), 0.0);
  for (size_t it = 0; it < items.size(); ++it) out[items[it].tensor] += partial[it];  // fixed order: deterministic
  return out;
}

}  // namespace safegene
