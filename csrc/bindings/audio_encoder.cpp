// Python bindings of the audio encoders (Gemma 4's Conformer and the unified models' frame
// projector), built from the Python loader's tensor table.
#include "model/audio_encoder.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "model/audio_frames.h"
#include "ops/backend.h"

namespace py = pybind11;
using namespace pg4;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

// rows [n][width] of a 2-D array through `compute`, as a [n][dim] array.
template <typename Compute>
py::array_t<float> rows_through(const FloatArray& in, int width, int dim, const char* what,
                                Compute compute) {
  if (in.ndim() != 2 || in.shape(1) != width) {
    throw py::value_error(std::string(what) + " must be [rows, " + std::to_string(width) + "]");
  }
  const int n = static_cast<int>(in.shape(0));
  std::vector<float> out;
  {
    py::gil_scoped_release release;
    out = compute(in.data(), n);
  }
  py::array_t<float> result(
      {static_cast<py::ssize_t>(out.size()) / dim, static_cast<py::ssize_t>(dim)});
  std::copy(out.begin(), out.end(), result.mutable_data());
  return result;
}

}  // namespace

void register_audio_encoder(py::module_& m) {
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
            return rows_through(features, encoder.n_mel(), encoder.embedding_dim(), "features",
                                [&](const float* x, int n) { return encoder.encode(x, n); });
          },
          py::arg("features"), "Embeddings [tokens, embedding_dim] of log-mel frames.");

  py::class_<AudioFrameProjector>(m, "AudioFrameProjector")
      .def(py::init([](const std::string& path, const std::vector<TensorEntry>& tensors, float eps,
                       int threads) {
             if (threads < 1) throw py::value_error("threads must be at least 1");
             py::gil_scoped_release release;
             return std::make_unique<AudioFrameProjector>(path, tensors, eps,
                                                          make_ops("cpu", threads, 0));
           }),
           py::arg("path"), py::arg("tensors"), py::arg("eps"), py::arg("threads"),
           "The unified models' audio input: raw frames projected by mm.a.input_projection.")
      .def_property_readonly("frame_samples", &AudioFrameProjector::frame_samples)
      .def_property_readonly("embedding_dim", &AudioFrameProjector::embedding_dim)
      .def(
          "embed",
          [](AudioFrameProjector& projector, const FloatArray& frames) {
            return rows_through(frames, projector.frame_samples(), projector.embedding_dim(),
                                "frames",
                                [&](const float* x, int n) { return projector.embed(x, n); });
          },
          py::arg("frames"), "Embeddings [frames, embedding_dim] of raw sample frames.");
}
