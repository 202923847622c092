// CUDA twins of the batched CPU kernels, in apex multi_tensor_apply style: the host
// validates all lists, packs up to kMaxTensors tensors and kMaxBlocks (tensor, chunk)
// pairs into one metadata struct passed *by value* as the kernel argument (no device
// allocation, no H2D copy per call), and launches one kernel per pack. Per-tensor scalars
// and dtypes travel in the metadata. Arithmetic uses __fmul_rn/__fadd_rn so no FMA
// contraction happens and results match the CPU kernels bit for bit.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "safegene/errors.h"
#include "safegene/kernels.h"

namespace safegene {
namespace {

constexpr int kMaxTensors = 36;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 65536;
constexpr int kThreads = 512;

struct Meta {
  void* dst[kMaxTensors];
  const void* src[kMaxTensors];
  int64_t numel[kMaxTensors];
  float coeff[kMaxTensors];
  int32_t out_index[kMaxTensors];
  int8_t dst_dtype[kMaxTensors];
  int8_t src_dtype[kMaxTensors];
  int8_t aligned[kMaxTensors];  // both base pointers 16-byte aligned: vector path
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(Meta) <= 4096, "kernel parameter block must stay under 4 KiB");

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(e));
}

// Eight consecutive elements as float, read with 16-byte loads (two for F32). Only called
// when the tensor's base pointer is 16-byte aligned; chunk starts are multiples of 8.
__device__ __forceinline__ void load8(const void* p, int64_t i, DType t, float (&v)[8]) {
  if (t == DType::F32) {
    const float4* q = reinterpret_cast<const float4*>(static_cast<const float*>(p) + i);
    const float4 a = q[0], b = q[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 r = *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(p) + i);
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint16_t lo = static_cast<uint16_t>(w[k] & 0xffffu), hi = static_cast<uint16_t>(w[k] >> 16);
      v[2 * k] = t == DType::BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
      v[2 * k + 1] = t == DType::BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
    }
  }
}

__device__ __forceinline__ void store8(void* p, int64_t i, DType t, const float (&v)[8]) {
  if (t == DType::F32) {
    float4* q = reinterpret_cast<float4*>(static_cast<float*>(p) + i);
    q[0] = make_float4(v[0], v[1], v[2], v[3]);
    q[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint16_t lo = t == DType::BF16 ? f32_to_bf16(v[2 * k]) : f32_to_f16(v[2 * k]);
      const uint16_t hi = t == DType::BF16 ? f32_to_bf16(v[2 * k + 1]) : f32_to_f16(v[2 * k + 1]);
      w[k] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
    *reinterpret_cast<uint4*>(static_cast<uint16_t*>(p) + i) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__global__ void scale_add_kernel(Meta m) {
  const int t = m.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(m.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, m.numel[t]);
  const DType dt = static_cast<DType>(m.dst_dtype[t]);
  const DType st = static_cast<DType>(m.src_dtype[t]);
  const float c = m.coeff[t];
  int64_t vec_end = start;
  if (m.aligned[t]) {
    // Memory-bound: 16-byte loads and stores move the bytes at full bandwidth.
    vec_end = start + (end - start) / 8 * 8;
    for (int64_t i = start + 8 * static_cast<int64_t>(threadIdx.x); i < vec_end; i += 8 * static_cast<int64_t>(blockDim.x)) {
      float d[8], s[8];
      load8(m.dst[t], i, dt, d);
      load8(m.src[t], i, st, s);
#pragma unroll
      for (int k = 0; k < 8; ++k) d[k] = __fadd_rn(__fmul_rn(1.0f, d[k]), __fmul_rn(c, s[k]));
      store8(m.dst[t], i, dt, d);
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < end; i += blockDim.x) {
    const float d = load_as_f32(m.dst[t], i, dt);
    const float s = load_as_f32(m.src[t], i, st);
    store_from_f32(m.dst[t], i, dt, __fadd_rn(__fmul_rn(1.0f, d), __fmul_rn(c, s)));
  }
}

__global__ void dot_kernel(Meta m, double* out) {
  __shared__ float red[kThreads];
  const int t = m.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(m.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(start + kChunk, m.numel[t]);
  const DType at = static_cast<DType>(m.dst_dtype[t]);
  const DType bt = static_cast<DType>(m.src_dtype[t]);
  float acc = 0.f;
  int64_t vec_end = start;
  if (m.aligned[t]) {
    vec_end = start + (end - start) / 8 * 8;
    for (int64_t i = start + 8 * static_cast<int64_t>(threadIdx.x); i < vec_end; i += 8 * static_cast<int64_t>(blockDim.x)) {
      float x[8], y[8];
      load8(m.dst[t], i, at, x);
      load8(m.src[t], i, bt, y);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc = __fadd_rn(acc, __fmul_rn(x[k], y[k]));
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < end; i += blockDim.x)
    acc = __fadd_rn(acc, __fmul_rn(load_as_f32(m.dst[t], i, at), load_as_f32(m.src[t], i, bt)));
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) atomicAdd(out + m.out_index[t], static_cast<double>(red[0]));
}

// Packs tensors into Meta structs and calls launch(meta, n_blocks) for each full pack.
template <class Launch>
void for_each_pack(const std::vector<void*>& dst, const std::vector<const void*>& src, const std::vector<int64_t>& numel,
                   const std::vector<float>& coeff, const std::vector<DType>& dt, const std::vector<DType>& st,
                   Launch launch) {
  Meta m;
  int nt = 0, nb = 0;
  for (size_t i = 0; i < dst.size(); ++i) {
    if (numel[i] == 0) continue;
    if ((numel[i] + kChunk - 1) / kChunk > 0x7fffffffLL) throw Error("tensor too large for the CUDA kernels");
    m.dst[nt] = dst[i];
    m.src[nt] = src[i];
    m.numel[nt] = numel[i];
    m.coeff[nt] = coeff.empty() ? 0.f : coeff[i];
    m.out_index[nt] = static_cast<int32_t>(i);
    m.dst_dtype[nt] = static_cast<int8_t>(dt[i]);
    m.src_dtype[nt] = static_cast<int8_t>(st[i]);
    m.aligned[nt] = (reinterpret_cast<uintptr_t>(dst[i]) % 16 == 0 && reinterpret_cast<uintptr_t>(src[i]) % 16 == 0) ? 1 : 0;
    const int64_t chunks = (numel[i] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      m.block_tensor[nb] = static_cast<int16_t>(nt);
      m.block_chunk[nb] = static_cast<int32_t>(c);
      ++nb;
      const bool blocks_full = nb == kMaxBlocks;
      const bool last_chunk = c == chunks - 1;
      const bool tensors_full = last_chunk && nt + 1 == kMaxTensors;
      if (blocks_full || tensors_full) {
        launch(m, nb);
        nb = 0;
        if (last_chunk) {
          nt = -1;
        } else {  // the current tensor continues in the next pack, in slot 0
          m.dst[0] = m.dst[nt];
          m.src[0] = m.src[nt];
          m.numel[0] = m.numel[nt];
          m.coeff[0] = m.coeff[nt];
          m.out_index[0] = m.out_index[nt];
          m.dst_dtype[0] = m.dst_dtype[nt];
          m.src_dtype[0] = m.src_dtype[nt];
          m.aligned[0] = m.aligned[nt];
          nt = 0;
        }
      }
    }
    ++nt;
  }
  if (nb > 0) launch(m, nb);
}

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
  std::vector<void*> d;
  std::vector<const void*> s;
  std::vector<int64_t> n, ns;
  std::vector<DType> dt, st;
  for (auto& x : dst) d.push_back(x.ptr), n.push_back(x.numel), dt.push_back(x.dtype);
  for (auto& x : src) s.push_back(x.ptr), ns.push_back(x.numel), st.push_back(x.dtype);
  std::vector<const void*> dc(d.begin(), d.end());
  check_pairs("scale_add", d.size(), s.size(), coeffs.size(), n.data(), ns.data(), dc.data(), s.data());
  auto cs = static_cast<cudaStream_t>(stream);
  for_each_pack(d, s, n, coeffs, dt, st, [&](const Meta& m, int nb) {
    scale_add_kernel<<<nb, kThreads, 0, cs>>>(m);
    check(cudaGetLastError(), "scale_add launch");
  });
}

std::vector<double> dot_cuda(const std::vector<ConstSpan>& a, const std::vector<ConstSpan>& b, void* stream) {
  std::vector<void*> d;
  std::vector<const void*> s, dc;
  std::vector<int64_t> n, ns;
  std::vector<DType> dt, st;
  for (auto& x : a) d.push_back(const_cast<void*>(x.ptr)), dc.push_back(x.ptr), n.push_back(x.numel), dt.push_back(x.dtype);
  for (auto& x : b) s.push_back(x.ptr), ns.push_back(x.numel), st.push_back(x.dtype);
  check_pairs("dot", d.size(), s.size(), static_cast<size_t>(-1), n.data(), ns.data(), dc.data(), s.data());
  std::vector<double> host(a.size(), 0.0);
  if (a.empty()) return host;
  auto cs = static_cast<cudaStream_t>(stream);
  double* out = nullptr;
  check(cudaMallocAsync(reinterpret_cast<void**>(&out), sizeof(double) * a.size(), cs), "dot alloc");
  try {
    check(cudaMemsetAsync(out, 0, sizeof(double) * a.size(), cs), "dot memset");
    for_each_pack(d, s, n, {}, dt, st, [&](const Meta& m, int nb) {
      dot_kernel<<<nb, kThreads, 0, cs>>>(m, out);
      check(cudaGetLastError(), "dot launch");
    });
    check(cudaMemcpyAsync(host.data(), out, sizeof(double) * a.size(), cudaMemcpyDeviceToHost, cs), "dot copy");
    check(cudaStreamSynchronize(cs), "dot sync");
  } catch (...) {
    cudaFreeAsync(out, cs);
    throw;
  }
  check(cudaFreeAsync(out, cs), "dot free");
  return host;
}

}  // namespace safegene
