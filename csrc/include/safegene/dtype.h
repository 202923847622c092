// Element types the core understands and their conversions to/from float32.
//
// Conversions are written by hand (not via compiler _Float16 / __bf16) so the same
// bit-exact rounding is used on every compiler and on both host and device: float32 ->
// 16-bit uses round-to-nearest-even, and a NaN input always produces a quiet NaN (a naive
// RNE on the raw bits could carry a NaN payload into the exponent and yield Inf).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SG_HD __host__ __device__ __forceinline__
#else
#define SG_HD inline
#endif

namespace safegene {

// The one definition of the element-type codes. Python reads them from the bound enum
// safegene._core.DType (csrc/bindings/types.cpp); never renumber: the codes are the enum's
// values on both sides of the boundary. RAW is an opaque byte (size 1) for tensors the
// kernels never do arithmetic on (integer buffers, F64, ...): the streaming pipeline may
// only copy it.
//
// Every switch over DType lists all enumerators and has no `default:`, so -Wswitch flags a
// switch that forgets a new code; values outside the enum (a code cast from an int) fall out
// of the switch and are handled after it.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2, RAW = 3 };

inline bool dtype_valid(int32_t code) {
  switch (static_cast<DType>(code)) {
    case DType::F32:
    case DType::F16:
    case DType::BF16:
    case DType::RAW: return true;
  }
  return false;
}

inline bool dtype_is_float(DType t) {
  switch (t) {
    case DType::F32:
    case DType::F16:
    case DType::BF16: return true;
    case DType::RAW: return false;
  }
  return false;
}

// Bytes per element; 0 for a code outside the enum (callers validate codes first).
inline int dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16: return 2;
    case DType::BF16: return 2;
    case DType::RAW: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::RAW: return "RAW";
  }
  return "?";
}

SG_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

SG_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

SG_HD float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

SG_HD uint16_t f32_to_bf16(float f) {
  // Branch-free so the CPU loops vectorise: RNE on the raw bits (overflow correctly rounds up
  // to Inf), then a select that turns any NaN into a quiet NaN with its sign kept.
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet = (u >> 16) | 0x0040u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

SG_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (man << 13) | (man ? 0x00400000u : 0u);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal half -> normal float
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else {
    u = sign | ((exp + (127 - 15)) << 23) | (man << 13);
  }
  return bits_f32(u);
}

SG_HD uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // quiet NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to Inf (>= 65520)
  if (a < 0x38800000u) {                                                // |f| < 2^-14: subnormal or zero half
    if (a < 0x33000000u) return sign;                                   // < 2^-25 rounds to zero
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;  // 14..24 (value = m * 2^(e-150); half ulp 2^-24)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // RNE at bit 13
  r -= 0x38000000u;                            // rebias 127 -> 15
  return static_cast<uint16_t>(sign | (r >> 13));
}

// Compile-time element types for the float dtypes: the kernels are instantiated per dtype
// (through dispatch.h), so the conversion in an inner loop is straight-line code, never a
// per-element switch. There is no Elem<DType::RAW>: arithmetic on RAW does not compile.
template <DType T>
struct Elem;

template <>
struct Elem<DType::F32> {
  using storage = float;
  static SG_HD float to_f32(float v) { return v; }
  static SG_HD float from_f32(float v) { return v; }
};

template <>
struct Elem<DType::F16> {
  using storage = uint16_t;
  static SG_HD float to_f32(uint16_t v) { return f16_to_f32(v); }
  static SG_HD uint16_t from_f32(float v) { return f32_to_f16(v); }
};

template <>
struct Elem<DType::BF16> {
  using storage = uint16_t;
  static SG_HD float to_f32(uint16_t v) { return bf16_to_f32(v); }
  static SG_HD uint16_t from_f32(float v) { return f32_to_bf16(v); }
};

}  // namespace safegene
