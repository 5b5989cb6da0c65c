// Python bindings of the unified models' image block projector, built from the Python loader's
// tensor table.
#include "model/image_blocks.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops/backend.h"

namespace py = pybind11;
using namespace pg4;

void register_image_blocks(py::module_& m) {
  using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
  using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
  py::class_<ImageBlockProjector>(m, "ImageBlockProjector")
      .def(py::init([](const std::string& path, const std::vector<TensorEntry>& tensors, float eps,
                       int threads) {
             if (threads < 1) throw py::value_error("threads must be at least 1");
             py::gil_scoped_release release;
             return std::make_unique<ImageBlockProjector>(path, tensors, eps,
                                                          make_ops("cpu", threads, 0));
           }),
           py::arg("path"), py::arg("tensors"), py::arg("eps"), py::arg("threads"),
           "The unified models' image input: raw pixel blocks projected without an encoder.")
      .def_property_readonly("block_values", &ImageBlockProjector::block_values)
      .def_property_readonly("positions", &ImageBlockProjector::positions)
      .def_property_readonly("embedding_dim", &ImageBlockProjector::embedding_dim)
      .def(
          "embed",
          [](ImageBlockProjector& projector, const FloatArray& blocks, const IntArray& positions) {
            const int width = projector.block_values();
            if (blocks.ndim() != 2 || blocks.shape(1) != width) {
              throw py::value_error("blocks must be [rows, " + std::to_string(width) + "]");
            }
            if (positions.ndim() != 2 || positions.shape(0) != blocks.shape(0) ||
                positions.shape(1) != 2) {
              throw py::value_error("positions must be [rows, 2], one (column, row) per block");
            }
            const int n = static_cast<int>(blocks.shape(0));
            std::vector<float> out;
            {
              py::gil_scoped_release release;
              out = projector.embed(blocks.data(), positions.data(), n);
            }
            const int dim = projector.embedding_dim();
            py::array_t<float> result({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(dim)});
            std::copy(out.begin(), out.end(), result.mutable_data());
            return result;
          },
          py::arg("blocks"), py::arg("positions"),
          "Embeddings [blocks, embedding_dim] of pixel blocks at (column, row) positions.");
}
