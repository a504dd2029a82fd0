// bindings_kernels.cpp — the `_core.kernels` submodule (tests and micro-benchmarks).
#include <pybind11/pybind11.h>
namespace py = pybind11;
void bind_kernels(py::module_& m) { (void)m; }
