// The one runtime-dtype -> compile-time-dtype dispatch, used by the CPU and the CUDA
// kernels alike. The switch names every float dtype and has no `default:` (so a new float
// dtype is a -Wswitch warning here, not a silent reuse of another dtype's code path); RAW
// and codes outside the enum throw safegene::Error. Host code only: it may throw.
#pragma once

#include <string>
#include <type_traits>
#include <utility>

#include "safegene/dtype.h"
#include "safegene/errors.h"

namespace safegene {

// Carries a float dtype as a type: fn(FloatTag<T>{}) sees T as a constant expression.
template <DType T>
struct FloatTag {
  static constexpr DType value = T;
  using elem = Elem<T>;
};

[[noreturn]] inline void throw_not_float(DType t, const char* what) {
  const std::string got = dtype_valid(static_cast<int32_t>(t))
                              ? std::string(dtype_name(t)) + " is not a float dtype"
                              : "unknown dtype code " + std::to_string(static_cast<int32_t>(t));
  throw Error(std::string(what) + ": " + got + "; the kernels take F32, F16 and BF16");
}

// Throws the same error dispatch_float would, without dispatching: for validating a whole
// list up front, before any worker thread or kernel launch starts.
inline void check_float(DType t, const char* what) {
  if (!dtype_is_float(t)) throw_not_float(t, what);
}

// Returns fn(FloatTag<T>{}) for the float dtype t; every branch must return the same type.
// Always inlined, so that a kernel compiled for several ISAs (target_clones) that dispatches
// through it with an always-inlined lambda gets each branch compiled for its own ISA.
template <class Fn>
__attribute__((always_inline)) inline decltype(auto) dispatch_float(DType t, const char* what, Fn&& fn) {
  switch (t) {
    case DType::F32: return std::forward<Fn>(fn)(FloatTag<DType::F32>{});
    case DType::F16: return std::forward<Fn>(fn)(FloatTag<DType::F16>{});
    case DType::BF16: return std::forward<Fn>(fn)(FloatTag<DType::BF16>{});
    case DType::RAW: break;
  }
  throw_not_float(t, what);
}

// Two dtypes at once (dst/src, a/b): fn(FloatTag<A>{}, FloatTag<B>{}), all nine pairs.
template <class Fn>
decltype(auto) dispatch_float2(DType a, DType b, const char* what, Fn&& fn) {
  return dispatch_float(a, what, [&](auto ta) -> decltype(auto) {
    return dispatch_float(b, what, [&](auto tb) -> decltype(auto) { return fn(ta, tb); });
  });
}

}  // namespace safegene
