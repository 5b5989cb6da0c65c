// Python bindings of the quant row operations (for tests and tools).
#include "quant/quant.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <stdexcept>
#include <string>

namespace py = pybind11;
using namespace pg4;

namespace {

using ByteArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

quant::Type checked_type(int type_id) {
  if (!quant::is_known_type(type_id)) {
    throw py::value_error("unknown GGUF tensor type id " + std::to_string(type_id));
  }
  return static_cast<quant::Type>(type_id);
}

int64_t checked_row_length(quant::Type type, int64_t n, size_t available_bytes) {
  const auto& info = quant::type_info(type);
  if (n <= 0 || n % info.block_size != 0) {
    throw py::value_error(std::string("row length must be a positive multiple of ") +
                          std::to_string(info.block_size) + " for " + info.name);
  }
  if (quant::row_bytes(type, n) > available_bytes) {
    throw py::value_error(std::string("buffer too small for ") + std::to_string(n) + " " +
                          info.name + " values");
  }
  return n;
}

py::array_t<float> dequantize(int type_id, ByteArray data, int64_t n) {
  const auto type = checked_type(type_id);
  checked_row_length(type, n, static_cast<size_t>(data.size()));
  py::array_t<float> out(n);
  {
    py::gil_scoped_release release;
    quant::dequantize_row(type, data.data(), out.mutable_data(), n);
  }
  return out;
}

py::array_t<uint8_t> quantize_activation(int type_id, FloatArray values) {
  const auto type = checked_type(type_id);
  const int64_t n = values.size();
  const auto& info = quant::type_info(type);
  if (n == 0 || n % info.block_size != 0) {
    throw py::value_error(std::string("activation length must be a positive multiple of ") +
                          std::to_string(info.block_size) + " for " + info.name);
  }
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(quant::row_bytes(type, n)));
  quant::quantize_activation_row(type, values.data(), out.mutable_data(), n);
  return out;
}

float vec_dot(int type_id, ByteArray weight_row, ByteArray activation_row, int64_t n, bool scalar) {
  const auto type = checked_type(type_id);
  const auto& info = quant::type_info(type);
  if (!info.is_weight_type) throw py::value_error(std::string(info.name) + " is not a weight type");
  checked_row_length(type, n, static_cast<size_t>(weight_row.size()));
  checked_row_length(info.activation, n, static_cast<size_t>(activation_row.size()));
  const auto fn = scalar ? quant::vec_dot_fn_scalar(type) : quant::vec_dot_fn(type);
  return fn(n, weight_row.data(), activation_row.data());
}

// out[j] = the product of the weight row with activation row j (one row of the 2-D array each),
// through the multi-row kernel a matmul uses.
py::array_t<float> vec_dot_multi(int type_id, ByteArray weight_row, ByteArray activations,
                                 int64_t n) {
  const auto type = checked_type(type_id);
  const auto& info = quant::type_info(type);
  if (!info.is_weight_type) throw py::value_error(std::string(info.name) + " is not a weight type");
  if (activations.ndim() != 2) {
    throw py::value_error("activations must be a 2-D array, one activation row per row");
  }
  checked_row_length(type, n, static_cast<size_t>(weight_row.size()));
  checked_row_length(info.activation, n, static_cast<size_t>(activations.shape(1)));
  const auto n_acts = activations.shape(0);
  if (n_acts > std::numeric_limits<int>::max()) throw py::value_error("too many activation rows");
  py::array_t<float> out(n_acts);
  const auto fn = quant::vec_dot_multi_fn(type);
  {
    py::gil_scoped_release release;
    fn(n, weight_row.data(), activations.data(), static_cast<size_t>(activations.shape(1)),
       static_cast<int>(n_acts), out.mutable_data());
  }
  return out;
}

}  // namespace

void register_quant(py::module_& m) {
  m.def("dequantize", &dequantize, py::arg("type_id"), py::arg("data"), py::arg("n"),
        "Dequantize n values of a GGUF tensor type from raw bytes.");
  m.def("quantize_activation", &quantize_activation, py::arg("type_id"), py::arg("values"),
        "Convert float activations to an activation format (F32, F16, BF16, Q8_0, Q8_1, Q8_K).");
  m.def(
      "vec_dot", &vec_dot, py::arg("type_id"), py::arg("weight_row"), py::arg("activation_row"),
      py::arg("n"), py::arg("scalar") = false,
      "Dot product of a weight row with an activation row in the weight type's activation format.");
  m.def("vec_dot_multi", &vec_dot_multi, py::arg("type_id"), py::arg("weight_row"),
        py::arg("activations"), py::arg("n"),
        "Dot products of a weight row with each row of a 2-D array of activation rows.");
  m.def("row_bytes", [](int type_id, int64_t n) {
    const auto type = checked_type(type_id);
    checked_row_length(type, n, SIZE_MAX);
    return quant::row_bytes(type, n);
  });
}
