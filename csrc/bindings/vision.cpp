// Python bindings of the vision encoder, built from the Python loader's validated tensor table.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "model/vision_encoder.h"
#include "ops/backend.h"

namespace py = pybind11;
using namespace pg4;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

VisionConfig to_vision_config(const py::object& c, int max_patches) {
  VisionConfig v;
  v.n_embd = c.attr("n_embd").cast<int>();
  v.n_ff = c.attr("n_ff").cast<int>();
  v.n_layer = c.attr("n_layer").cast<int>();
  v.n_head = c.attr("n_head").cast<int>();
  v.head_dim = c.attr("head_dim").cast<int>();
  v.patch_size = c.attr("patch_size").cast<int>();
  v.n_pos = c.attr("n_pos").cast<int>();
  v.pooling = c.attr("pooling").cast<int>();
  v.eps = c.attr("eps").cast<float>();
  v.rope_base = c.attr("rope_base").cast<float>();
  v.projection_dim = c.attr("projection_dim").cast<int>();
  v.max_patches = max_patches;
  return v;
}

}  // namespace

void register_vision(py::module_& m) {
  py::class_<VisionEncoder>(m, "VisionEncoder")
      .def(py::init([](const std::string& path, const std::vector<TensorEntry>& tensors,
                       const py::object& config, int max_patches, int threads,
                       const std::string& backend, int device) {
             if (threads < 1) throw py::value_error("threads must be at least 1");
             VisionConfig vision_config = to_vision_config(config, max_patches);
             py::gil_scoped_release release;
             return std::make_unique<VisionEncoder>(path, tensors, vision_config,
                                                    make_ops(backend, threads, device));
           }),
           py::arg("path"), py::arg("tensors"), py::arg("config"), py::arg("max_patches"),
           py::arg("threads"), py::arg("backend") = "cpu", py::arg("device") = 0,
           "The vision tower of a validated mmproj file (`config` a pygemma4.mmproj."
           "VisionConfig), for images of up to max_patches patches.")
      .def(
          "encode",
          [](VisionEncoder& encoder, const FloatArray& pixels, int grid_rows, int grid_cols) {
            std::vector<float> values(pixels.data(), pixels.data() + pixels.size());
            VisionEncoder::Output out;
            {
              py::gil_scoped_release release;
              out = encoder.encode(values, grid_rows, grid_cols);
            }
            const VisionConfig& c = encoder.config();
            const py::ssize_t n = static_cast<py::ssize_t>(out.pooled.size() / c.n_embd);
            py::array_t<float> pooled({n, static_cast<py::ssize_t>(c.n_embd)});
            py::array_t<float> embeddings({n, static_cast<py::ssize_t>(c.projection_dim)});
            std::copy(out.pooled.begin(), out.pooled.end(), pooled.mutable_data());
            std::copy(out.embeddings.begin(), out.embeddings.end(), embeddings.mutable_data());
            return py::make_tuple(pooled, embeddings);
          },
          py::arg("pixels"), py::arg("grid_rows"), py::arg("grid_cols"),
          "(pooled float32 [soft tokens, n_embd], embeddings float32 [soft tokens, "
          "projection_dim]) of the image whose patches (row-major over the grid, each in (row, "
          "column, channel) order, values in [0, 1]) are `pixels`.");
}
