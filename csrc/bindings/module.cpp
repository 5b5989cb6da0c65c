// The pybind11 module pygemma4._core: the few objects Python needs.
#include <pybind11/pybind11.h>

#include "ops/cpu/memory_bandwidth.h"

namespace py = pybind11;

void register_quant(py::module_& m);
void register_kv_pool(py::module_& m);
void register_model(py::module_& m);
void register_assistant(py::module_& m);
void register_ops_check(py::module_& m);
void register_audio_encoder(py::module_& m);
void register_vision(py::module_& m);
void register_image_blocks(py::module_& m);

PYBIND11_MODULE(_core, m) {
  m.doc() = "pygemma4 C++ core";
  register_quant(m);
  register_kv_pool(m);
  register_model(m);
  register_assistant(m);
  register_ops_check(m);
  register_audio_encoder(m);
  register_vision(m);
  register_image_blocks(m);
  m.def(
      "memory_read_bandwidth",
      [](int threads, size_t bytes, int passes) {
        py::gil_scoped_release release;
        return pg4::memory_read_bandwidth(threads, bytes, passes);
      },
      py::arg("threads"), py::arg("bytes") = size_t{1} << 30, py::arg("passes") = 5,
      "Bytes per second that `threads` threads read from memory (the best of `passes` passes\n"
      "over a buffer of `bytes`), the ceiling of a decode step that reads every weight once.");
}
