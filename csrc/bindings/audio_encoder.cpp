// Python bindings of the audio encoder, built from the Python loader's tensor table.
#include "model/audio_encoder.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops/backend.h"

namespace py = pybind11;
using namespace pg4;

void register_audio_encoder(py::module_& m) {
  using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
  py::class_<AudioEncoder>(m, "AudioEncoder")
      .def(py::init([](const std::string& path, const std::vector<TensorEntry>& tensors, int n_mel,
                       int n_layer, int n_head, float eps, int threads) {
             if (threads < 1) throw py::value_error("threads must be at least 1");
             AudioEncoderConfig config;
             config.n_mel = n_mel;
             config.n_layer = n_layer;
             config.n_head = n_head;
             config.eps = eps;
             py::gil_scoped_release release;
             return std::make_unique<AudioEncoder>(path, tensors, config,
                                                   make_ops("cpu", threads, 0));
           }),
           py::arg("path"), py::arg("tensors"), py::arg("n_mel"), py::arg("n_layer"),
           py::arg("n_head"), py::arg("eps"), py::arg("threads"),
           "The audio encoder of an mmproj file's a.* and mm.a.* tensors, on the CPU.")
      .def_property_readonly("embedding_dim", &AudioEncoder::embedding_dim)
      .def_static("n_tokens", &AudioEncoder::n_tokens, py::arg("n_frames"),
                  "Soft tokens the encoder makes of n_frames log-mel frames.")
      .def(
          "encode",
          [](AudioEncoder& encoder, const FloatArray& features) {
            if (features.ndim() != 2 || features.shape(1) != encoder.n_mel()) {
              throw py::value_error("features must be [frames, " + std::to_string(encoder.n_mel()) +
                                    "]");
            }
            const int n_frames = static_cast<int>(features.shape(0));
            std::vector<float> out;
            {
              py::gil_scoped_release release;
              out = encoder.encode(features.data(), n_frames);
            }
            const py::ssize_t dim = encoder.embedding_dim();
            py::array_t<float> result({static_cast<py::ssize_t>(out.size()) / dim, dim});
            std::copy(out.begin(), out.end(), result.mutable_data());
            return result;
          },
          py::arg("features"), "Embeddings [tokens, embedding_dim] of log-mel frames.");
}
