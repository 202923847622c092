// The typed values that cross the boundary: the dtype enum (the one definition of the codes,
// csrc/include/safegene/dtype.h), the statistics level and the per-tensor statistics.
#include <pybind11/pybind11.h>

#include <string>

#include "common.h"
#include "safegene/dtype.h"
#include "safegene/kernels.h"

namespace py = pybind11;

namespace safegene {

void register_types(py::module_& m) {
  py::enum_<DType>(m, "DType", "Element types of the core; the values are the codes of csrc/include/safegene/dtype.h.")
      .value("F32", DType::F32)
      .value("F16", DType::F16)
      .value("BF16", DType::BF16)
      .value("RAW", DType::RAW, "Opaque bytes (size 1): copied by the stream, never computed on.")
      .def_property_readonly(
          "itemsize", [](DType t) { return dtype_size(t); }, "Bytes per element (0 for a code outside the enum).")
      .def_property_readonly(
          "is_float", [](DType t) { return dtype_is_float(t); }, "True for the dtypes the kernels compute on.");

  py::enum_<StatsLevel>(m, "StatsLevel", "How much of Stats a stream computes.")
      .value("NONE", StatsLevel::None)
      .value("GUARD", StatsLevel::Guard, "only nonfinite_out (apply)")
      .value("FULL", StatsLevel::Full, "every field (extract)");

  py::class_<LinStats>(m, "Stats", "Statistics of one stream job, accumulated in float64 over its chunks.")
      .def_readonly("out_sq", &LinStats::out_sq, "sum of squares of the float32 result")
      .def_readonly("in0_sq", &LinStats::in0_sq, "sum of squares of input 0")
      .def_readonly("in1_sq", &LinStats::in1_sq, "sum of squares of input 1")
      .def_readonly("in01_dot", &LinStats::in01_dot, "<input 0, input 1>")
      .def_readonly("round_sq", &LinStats::round_sq, "sum of squares of (stored value - float32 result)")
      .def_readonly("nonfinite_out", &LinStats::nonfinite_out, "non-finite elements in the result")
      .def_readonly("nonfinite_in", &LinStats::nonfinite_in, "non-finite elements in the inputs")
      .def("__repr__", [](const LinStats& s) {
        return "Stats(out_sq=" + py::repr(py::float_(s.out_sq)).cast<std::string>() +
               ", in0_sq=" + py::repr(py::float_(s.in0_sq)).cast<std::string>() +
               ", in1_sq=" + py::repr(py::float_(s.in1_sq)).cast<std::string>() +
               ", in01_dot=" + py::repr(py::float_(s.in01_dot)).cast<std::string>() +
               ", round_sq=" + py::repr(py::float_(s.round_sq)).cast<std::string>() +
               ", nonfinite_out=" + std::to_string(s.nonfinite_out) + ", nonfinite_in=" + std::to_string(s.nonfinite_in) +
               ")";
      });
}

}  // namespace safegene
