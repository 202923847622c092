#pragma once

#include <pybind11/pybind11.h>

namespace safegene {
void register_types(pybind11::module_& m);
void register_kernels(pybind11::module_& m);
void register_stream(pybind11::module_& m);
}  // namespace safegene
