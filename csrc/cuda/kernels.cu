// CUDA twins of the batched CPU kernels, in apex's multi_tensor_apply style.
//
// The host validates every list up front (check_spans, the same check as the CPU entry
// points), groups the tensors by dtype pair (dispatch.h: one kernel instantiation per pair,
// so the conversions in the loops are compile-time), and packs up to kMaxTensors tensors and
// kMaxBlocks (tensor, chunk) pairs into one TensorListMeta passed *by value* as the kernel
// argument: no device allocation and no H2D copy per launch. One generic kernel walks a
// chunk and calls the op's functor for the 16-byte vector path and for the scalar tail; the
// ops (scale_add, dot) only say what to do with Vec elements or one element.
//
// Arithmetic uses __fmul_rn/__fadd_rn/__dadd_rn (and the build passes --fmad=false) so no FMA
// contraction happens and the results equal the CPU kernels' bit for bit, NaN payloads aside
// (the GPU produces the canonical NaN where x86 propagates an input's payload).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "safegene/dispatch.h"
#include "safegene/errors.h"
#include "safegene/kernels.h"

namespace safegene {
namespace {

// apex's limits for two lists: the metadata stays under the 4 KiB kernel-parameter limit that
// older drivers and toolkits impose.
constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;

template <int Depth>
struct TensorListMeta {
  const void* in[Depth][kMaxTensors];  // input lists (list d, tensor slot t)
  void* out[kMaxTensors];              // the list an op writes (nullptr for ops that write none)
  int64_t numel[kMaxTensors];
  float scalar[kMaxTensors];           // per-tensor coefficient (scale_add)
  int64_t index[kMaxTensors];          // per-tensor output slot (dot: its first item in the scratch)
  uint8_t block_to_tensor[kMaxBlocks];
  int32_t block_to_chunk[kMaxBlocks];
};
static_assert(sizeof(TensorListMeta<2>) <= 4096, "kernel parameter block must stay under 4 KiB");
static_assert(kMaxTensors <= 256, "block_to_tensor is a uint8_t");

// One tensor as the host packs it.
template <int Depth>
struct TensorRef {
  const void* in[Depth];
  void* out;
  int64_t numel;
  float scalar;
  int64_t index;
};

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

// ---- element access ---------------------------------------------------------------------------

// A 16- or 8-byte word for one vector load or store, built from 32-bit pieces.
template <int Bytes>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
  static __device__ __forceinline__ uint4 pack(const uint32_t (&w)[4]) { return make_uint4(w[0], w[1], w[2], w[3]); }
};
template <>
struct Word<8> {
  using type = uint2;
  static __device__ __forceinline__ uint2 pack(const uint32_t (&w)[2]) { return make_uint2(w[0], w[1]); }
};

__device__ __forceinline__ uint32_t bits32(const float* s, int k) { return __float_as_uint(s[k]); }
__device__ __forceinline__ uint32_t bits32(const uint16_t* s, int k) {
  return static_cast<uint32_t>(s[2 * k]) | (static_cast<uint32_t>(s[2 * k + 1]) << 16);
}

template <DType T>
using Storage = typename Elem<T>::storage;

// Elements per vector step for a set of lists: the widest element type moves 16 bytes.
template <DType A, DType B>
constexpr int vec_elems() {
  return 16 / (sizeof(Storage<A>) > sizeof(Storage<B>) ? sizeof(Storage<A>) : sizeof(Storage<B>));
}

// V consecutive elements from e as float, in one load of V * sizeof(storage) bytes; the
// generic kernel calls it only where that address is aligned to the load width.
template <DType T, int V>
__device__ __forceinline__ void load_vec(const void* p, int64_t e, float (&out)[V]) {
  using S = Storage<T>;
  using W = typename Word<V * sizeof(S)>::type;
  const W w = *reinterpret_cast<const W*>(static_cast<const S*>(p) + e);
  S s[V];
  memcpy(s, &w, sizeof w);
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = Elem<T>::to_f32(s[v]);
}

template <DType T, int V>
__device__ __forceinline__ void store_vec(void* p, int64_t e, const float (&in)[V]) {
  using S = Storage<T>;
  using W = typename Word<V * sizeof(S)>::type;
  constexpr int kWords = V * static_cast<int>(sizeof(S)) / 4;
  S s[V];
#pragma unroll
  for (int v = 0; v < V; ++v) s[v] = Elem<T>::from_f32(in[v]);
  uint32_t w[kWords];
#pragma unroll
  for (int k = 0; k < kWords; ++k) w[k] = bits32(s, k);
  // __stwb is an ordinary (write-back) store; a plain assignment of the word was split into
  // scalar stores by nvcc 13.
  __stwb(reinterpret_cast<W*>(static_cast<S*>(p) + e), Word<V * sizeof(S)>::pack(w));
}

template <DType T>
__device__ __forceinline__ float load1(const void* p, int64_t e) {
  return Elem<T>::to_f32(static_cast<const Storage<T>*>(p)[e]);
}

template <DType T>
__device__ __forceinline__ void store1(void* p, int64_t e, float v) {
  static_cast<Storage<T>*>(p)[e] = Elem<T>::from_f32(v);
}

// ---- the generic kernel -------------------------------------------------------------------------
//
// An op declares: kVec (elements per vector step), kChunk (elements per thread block),
// kSegment (elements per team; kChunk / kSegment teams per block), kTeamThreads, kThreads
// (= teams * kTeamThreads), a per-thread State, and the functors
//   vector(meta, t, e, state)           elements [e, e + kVec), vector path
//   scalar(meta, t, e, v, state)        element e, the v-th of its step, tail path
//   finish(meta, t, chunk, team, q, n, state)   called once by every thread (may __syncthreads)
// Thread q of a team visits steps q, q + kTeamThreads, ... of its segment, in increasing order,
// and each step's elements in increasing order: an op that reduces sees, per thread and per
// slot v of a step, a fixed sequence of elements (dot relies on this for the CPU's lane order).
// A step takes the vector path when every list of the tensor starts 16-byte aligned and the
// whole step lies inside the segment; otherwise its elements go one by one through scalar().
template <int Depth, class Op>
__global__ void __launch_bounds__(Op::kThreads) multi_tensor_apply_kernel(const TensorListMeta<Depth> meta, Op op) {
  constexpr int V = Op::kVec;
  constexpr int kTeam = Op::kTeamThreads;
  static_assert(Op::kChunk % Op::kSegment == 0 && Op::kSegment % V == 0, "segments are whole vector steps");
  static_assert(Op::kThreads == (Op::kChunk / Op::kSegment) * kTeam, "one team per segment");

  const int t = meta.block_to_tensor[blockIdx.x];
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  const int64_t base = chunk * Op::kChunk;
  const int64_t rest = meta.numel[t] - base;
  const int64_t chunk_n = rest < Op::kChunk ? rest : Op::kChunk;
  const int team = threadIdx.x / kTeam, q = threadIdx.x % kTeam;
  const int64_t seg_start = static_cast<int64_t>(team) * Op::kSegment;
  const int64_t left = chunk_n - seg_start;
  const int64_t n = left <= 0 ? 0 : (left < Op::kSegment ? left : Op::kSegment);

  // Step starts are multiples of V elements from an aligned tensor start, so each list's load
  // of V elements (at most 16 bytes) is aligned to its own width.
  bool aligned = meta.out[t] == nullptr || reinterpret_cast<uintptr_t>(meta.out[t]) % 16 == 0;
#pragma unroll
  for (int d = 0; d < Depth; ++d) aligned = aligned && reinterpret_cast<uintptr_t>(meta.in[d][t]) % 16 == 0;

  typename Op::State state{};
  for (int64_t i = static_cast<int64_t>(q) * V; i < n; i += static_cast<int64_t>(kTeam) * V) {
    const int64_t e = base + seg_start + i;
    if (aligned && i + V <= n) {
      op.vector(meta, t, e, state);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        if (i + v < n) op.scalar(meta, t, e + v, v, state);
    }
  }
  op.finish(meta, t, chunk, team, q, n, state);
}

// ---- ops ---------------------------------------------------------------------------------------

// dst += c * src, as the CPU computes it: float32 product, float32 add, one RNE store.
template <DType TD, DType TS>
struct ScaleAddOp {
  static constexpr int kVec = vec_elems<TD, TS>();
  static constexpr int64_t kChunk = 65536;
  static constexpr int64_t kSegment = kChunk;  // elementwise: the whole block is one team
  static constexpr int kThreads = 512;
  static constexpr int kTeamThreads = kThreads;
  struct State {};

  __device__ __forceinline__ void vector(const TensorListMeta<2>& m, int t, int64_t e, State&) const {
    float d[kVec], s[kVec];
    load_vec<TD>(m.in[0][t], e, d);
    load_vec<TS>(m.in[1][t], e, s);
    const float c = m.scalar[t];
#pragma unroll
    for (int v = 0; v < kVec; ++v) d[v] = __fadd_rn(__fmul_rn(1.0f, d[v]), __fmul_rn(c, s[v]));
    store_vec<TD>(m.out[t], e, d);
  }

  __device__ __forceinline__ void scalar(const TensorListMeta<2>& m, int t, int64_t e, int, State&) const {
    const float d = load1<TD>(m.in[0][t], e), s = load1<TS>(m.in[1][t], e);
    store1<TD>(m.out[t], e, __fadd_rn(__fmul_rn(1.0f, d), __fmul_rn(m.scalar[t], s)));
  }

  __device__ __forceinline__ void finish(const TensorListMeta<2>&, int, int64_t, int, int, int64_t, State&) const {}
};

// <a, b> in dot_cpu's order (kernels.h): a thread block is one item of kDotItem elements, a
// team is one block of kDotBlock elements, and team thread q owns lanes [q*kVec, (q+1)*kVec):
// with kTeamThreads * kVec == kDotLanes, the v-th element of each of its steps is always lane
// q*kVec + v, visited in increasing order, exactly as the CPU's lane l sees elements l, l+16, ...
// The lanes are combined in the CPU's tree, the item's block partials summed in double in
// order by one thread, and the item sum written to its own slot of a scratch buffer; the host
// adds the items of a tensor in order (dot_cuda). No atomics, so no run-to-run variation.
template <DType TA, DType TB>
struct DotOp {
  static constexpr int kVec = vec_elems<TA, TB>();
  static constexpr int64_t kChunk = kDotItem;
  static constexpr int64_t kSegment = kDotBlock;
  static constexpr int kTeamThreads = kDotLanes / kVec;
  static constexpr int kTeams = static_cast<int>(kChunk / kSegment);
  static constexpr int kThreads = kTeams * kTeamThreads;
  static_assert(kTeamThreads * kVec == kDotLanes, "a team's threads own the 16 lanes between them");
  static_assert(kDotLanes == 16, "finish() combines 16 lanes");

  double* item_sums;  // one slot per item of every tensor; meta.index[t] is tensor t's first

  struct State {
    float lane[kVec];
  };

  __device__ __forceinline__ void vector(const TensorListMeta<2>& m, int t, int64_t e, State& s) const {
    float a[kVec], b[kVec];
    load_vec<TA>(m.in[0][t], e, a);
    load_vec<TB>(m.in[1][t], e, b);
#pragma unroll
    for (int v = 0; v < kVec; ++v) s.lane[v] = __fadd_rn(s.lane[v], __fmul_rn(a[v], b[v]));
  }

  __device__ __forceinline__ void scalar(const TensorListMeta<2>& m, int t, int64_t e, int v, State& s) const {
    s.lane[v] = __fadd_rn(s.lane[v], __fmul_rn(load1<TA>(m.in[0][t], e), load1<TB>(m.in[1][t], e)));
  }

  __device__ __forceinline__ void finish(const TensorListMeta<2>& m, int t, int64_t chunk, int team, int q, int64_t n,
                                         State& s) const {
    __shared__ float lanes[kTeams][kDotLanes];
    __shared__ float block_partial[kTeams];
#pragma unroll
    for (int v = 0; v < kVec; ++v) lanes[team][q * kVec + v] = s.lane[v];
    __syncthreads();
    if (q == 0 && n > 0) {
      // The CPU's combine(): t[l] = s[l] + s[l + 8], then halves of 4, 2, 1.
      float c[8];
#pragma unroll
      for (int l = 0; l < 8; ++l) c[l] = __fadd_rn(lanes[team][l], lanes[team][l + 8]);
#pragma unroll
      for (int w = 4; w >= 1; w /= 2)
#pragma unroll
        for (int l = 0; l < w; ++l) c[l] = __fadd_rn(c[l], c[l + w]);
      block_partial[team] = c[0];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int64_t rest = m.numel[t] - chunk * kChunk;
      const int64_t chunk_n = rest < kChunk ? rest : kChunk;
      const int blocks = static_cast<int>((chunk_n + kSegment - 1) / kSegment);
      double acc = 0.0;
      for (int k = 0; k < blocks; ++k) acc = __dadd_rn(acc, static_cast<double>(block_partial[k]));
      item_sums[m.index[t] + chunk] = acc;
    }
  }
};

// ---- packing and launching -------------------------------------------------------------------

// Packs tensors into metadata structs and calls launch(meta, n_blocks) for each full pack; a
// tensor whose chunks overflow one pack continues in slot 0 of the next.
template <int Depth, class Launch>
void for_each_pack(const std::vector<TensorRef<Depth>>& tensors, int64_t chunk_elems, Launch launch) {
  TensorListMeta<Depth> m;
  std::memset(&m, 0, sizeof m);
  auto put = [&m](int slot, const TensorRef<Depth>& r) {
    for (int d = 0; d < Depth; ++d) m.in[d][slot] = r.in[d];
    m.out[slot] = r.out;
    m.numel[slot] = r.numel;
    m.scalar[slot] = r.scalar;
    m.index[slot] = r.index;
  };
  int nt = 0, nb = 0;
  for (const auto& r : tensors) {
    if (r.numel == 0) continue;
    const int64_t chunks = (r.numel + chunk_elems - 1) / chunk_elems;
    if (chunks > 0x7fffffffLL) throw Error("tensor too large for the CUDA kernels");
    put(nt, r);
    for (int64_t c = 0; c < chunks; ++c) {
      m.block_to_tensor[nb] = static_cast<uint8_t>(nt);
      m.block_to_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool last_chunk = c == chunks - 1;
      if (nb == kMaxBlocks || (last_chunk && nt + 1 == kMaxTensors)) {
        launch(m, nb);
        nb = 0;
        if (last_chunk) {
          nt = -1;
        } else {
          put(0, r);
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) launch(m, nb);
}

template <int Depth, class Op>
void multi_tensor_apply(const std::vector<TensorRef<Depth>>& tensors, const Op& op, cudaStream_t stream,
                        const char* what) {
  for_each_pack<Depth>(tensors, Op::kChunk, [&](const TensorListMeta<Depth>& meta, int blocks) {
    multi_tensor_apply_kernel<Depth, Op><<<blocks, Op::kThreads, 0, stream>>>(meta, op);
    check(cudaGetLastError(), what);
  });
}

// Tensor indices grouped by (dtype of list 0, dtype of list 1): one kernel instantiation each.
template <class A>
std::map<std::pair<DType, DType>, std::vector<size_t>> by_dtype_pair(const std::vector<A>& a,
                                                                     const std::vector<ConstSpan>& b) {
  std::map<std::pair<DType, DType>, std::vector<size_t>> groups;
  for (size_t i = 0; i < a.size(); ++i) groups[{a[i].dtype, b[i].dtype}].push_back(i);
  return groups;
}

// Frees a cudaMallocAsync buffer on every exit path.
struct AsyncBuffer {
  void* ptr = nullptr;
  cudaStream_t stream;
  AsyncBuffer(size_t bytes, cudaStream_t s, const char* what) : stream(s) { check(cudaMallocAsync(&ptr, bytes, s), what); }
  ~AsyncBuffer() {
    if (ptr) cudaFreeAsync(ptr, stream);
  }
  AsyncBuffer(const AsyncBuffer&) = delete;
  AsyncBuffer& operator=(const AsyncBuffer&) = delete;
};

}  // namespace

bool cuda_built() { return true; }

bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error so later calls are unaffected
    return false;
  }
  return n > 0;
}

void scale_add_cuda(const std::vector<MutSpan>& dst, const std::vector<ConstSpan>& src,
                    const std::vector<float>& coeffs, void* stream) {
  check_spans("scale_add", dst, src, coeffs.size());
  auto cs = static_cast<cudaStream_t>(stream);
  for (const auto& [types, idx] : by_dtype_pair(dst, src)) {
    std::vector<TensorRef<2>> refs;
    refs.reserve(idx.size());
    for (size_t i : idx) refs.push_back({{dst[i].ptr, src[i].ptr}, dst[i].ptr, dst[i].numel, coeffs[i], 0});
    dispatch_float2(types.first, types.second, "scale_add", [&](auto td, auto ts) {
      multi_tensor_apply<2>(refs, ScaleAddOp<decltype(td)::value, decltype(ts)::value>{}, cs, "scale_add launch");
    });
  }
}

std::vector<double> dot_cuda(const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b, void* stream) {
  check_spans("dot", a, b);
  std::vector<double> out(a.size(), 0.0);
  std::vector<int64_t> first_item(a.size() + 1, 0);
  for (size_t i = 0; i < a.size(); ++i) first_item[i + 1] = first_item[i] + (a[i].numel + kDotItem - 1) / kDotItem;
  const int64_t n_items = first_item.back();
  if (n_items == 0) return out;
  auto cs = static_cast<cudaStream_t>(stream);
  AsyncBuffer scratch(sizeof(double) * static_cast<size_t>(n_items), cs, "dot alloc");
  auto* item_sums = static_cast<double*>(scratch.ptr);
  for (const auto& [types, idx] : by_dtype_pair(a, b)) {
    std::vector<TensorRef<2>> refs;
    refs.reserve(idx.size());
    for (size_t i : idx) refs.push_back({{a[i].ptr, b[i].ptr}, nullptr, a[i].numel, 0.f, first_item[i]});
    dispatch_float2(types.first, types.second, "dot", [&](auto ta, auto tb) {
      multi_tensor_apply<2>(refs, DotOp<decltype(ta)::value, decltype(tb)::value>{item_sums}, cs, "dot launch");
    });
  }
  std::vector<double> items(static_cast<size_t>(n_items));
  check(cudaMemcpyAsync(items.data(), item_sums, sizeof(double) * items.size(), cudaMemcpyDeviceToHost, cs), "dot copy");
  check(cudaStreamSynchronize(cs), "dot sync");
  // dot_cpu's last step, in its order: 0.0 plus the tensor's item sums, first to last.
  for (size_t i = 0; i < a.size(); ++i)
    for (int64_t k = first_item[i]; k < first_item[i + 1]; ++k) out[i] += items[static_cast<size_t>(k)];
  return out;
}

}  // namespace safegene
