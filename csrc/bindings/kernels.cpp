#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "common.h"
#include "safegene/errors.h"
#include "safegene/kernels.h"

namespace py = pybind11;

namespace safegene {
namespace {

// The dtypes are validated (float only, known codes) by the core's check_spans, which names
// the offending tensor; here only the three lists must line up.
template <class Span, class Ptr>
std::vector<Span> spans(const std::vector<uintptr_t>& ptrs, const std::vector<DType>& dtypes,
                        const std::vector<int64_t>& numels, const char* what) {
  if (ptrs.size() != dtypes.size() || ptrs.size() != numels.size())
    throw Error(std::string(what) + ": pointer, dtype and size lists differ in length (" + std::to_string(ptrs.size()) +
                ", " + std::to_string(dtypes.size()) + ", " + std::to_string(numels.size()) + ")");
  std::vector<Span> out;
  out.reserve(ptrs.size());
  for (size_t i = 0; i < ptrs.size(); ++i) out.push_back(Span{reinterpret_cast<Ptr>(ptrs[i]), numels[i], dtypes[i]});
  return out;
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def(
      "scale_add",
      [](const std::vector<uintptr_t>& dst, const std::vector<DType>& dst_dtype, const std::vector<uintptr_t>& src,
         const std::vector<DType>& src_dtype, const std::vector<int64_t>& numel, const std::vector<float>& coeffs,
         bool cuda, uintptr_t stream) {
        auto d = spans<MutSpan, void*>(dst, dst_dtype, numel, "scale_add");
        auto s = spans<ConstSpan, const void*>(src, src_dtype, numel, "scale_add");
        py::gil_scoped_release nogil;
        if (cuda)
          scale_add_cuda(d, s, coeffs, reinterpret_cast<void*>(stream));
        else
          scale_add_cpu(d, s, coeffs);
      },
      py::arg("dst"), py::arg("dst_dtype"), py::arg("src"), py::arg("src_dtype"), py::arg("numel"), py::arg("coeffs"),
      py::arg("cuda") = false, py::arg("stream") = 0,
      "In place dst_i += coeffs[i] * src_i for every i (float32 math, RNE store).");
  m.def(
      "dot",
      [](const std::vector<uintptr_t>& a, const std::vector<DType>& a_dtype, const std::vector<uintptr_t>& b,
         const std::vector<DType>& b_dtype, const std::vector<int64_t>& numel, bool cuda, uintptr_t stream) {
        auto x = spans<ConstSpan, const void*>(a, a_dtype, numel, "dot");
        auto y = spans<ConstSpan, const void*>(b, b_dtype, numel, "dot");
        py::gil_scoped_release nogil;
        return cuda ? dot_cuda(x, y, reinterpret_cast<void*>(stream)) : dot_cpu(x, y);
      },
      py::arg("a"), py::arg("a_dtype"), py::arg("b"), py::arg("b_dtype"), py::arg("numel"), py::arg("cuda") = false,
      py::arg("stream") = 0, "Per-pair inner products <a_i, b_i> (float32 partial sums, float64 total).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "Threads used by the CPU kernels.");
  m.def("num_threads", &num_threads);
  m.def("cuda_built", &cuda_built, "True when the CUDA kernels were compiled in.");
  m.def(
      "has_cuda", [] { return cuda_built() && cuda_device_available(); },
      "True only when CUDA kernels were compiled in and a device answers.");
  m.def(
      "f32_to_bf16", [](float f) { return f32_to_bf16(f); }, "Scalar conversion, exposed for tests.");
  m.def(
      "f32_to_f16", [](float f) { return f32_to_f16(f); }, "Scalar conversion, exposed for tests.");
  m.def(
      "f16_to_f32", [](uint16_t h) { return f16_to_f32(h); }, "Scalar conversion, exposed for tests.");
}

}  // namespace safegene
