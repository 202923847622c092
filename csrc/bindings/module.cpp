// safegene._core: torch-free bindings. Pointers arrive as integers from
// python/safegene/engine/native.py, which keeps the owning tensors alive across each call.
#include <pybind11/pybind11.h>

#include "common.h"
#include "safegene/errors.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "safegene C++/CUDA core (torch-free): batched kernels and the streaming pipeline";
  py::register_exception<safegene::Error>(m, "CoreError", PyExc_RuntimeError);
  safegene::register_types(m);  // first: the other signatures name these types
  safegene::register_kernels(m);
  safegene::register_stream(m);
}
