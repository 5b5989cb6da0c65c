// The pybind11 module pygemma4._core: the few objects Python needs.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_quant(py::module_& m);
void register_kv_pool(py::module_& m);
void register_model(py::module_& m);
void register_ops_check(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "pygemma4 C++ core";
  register_quant(m);
  register_kv_pool(m);
  register_model(m);
  register_ops_check(m);
}
