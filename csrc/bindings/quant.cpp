// Python bindings of the quant row operations (for tests and tools).
#include "quant/quant.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <limits>
#include <stdexcept>
#include <string>

#include "quant/interleaved.h"

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

quant::Isa isa_or_widest(const std::string& name) {
  try {
    return name.empty() ? quant::widest_isa() : quant::parse_isa(name);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

const quant::TypeInfo& weight_type_info(quant::Type type) {
  const auto& info = quant::type_info(type);
  if (!info.is_weight_type) throw py::value_error(std::string(info.name) + " is not a weight type");
  return info;
}

float vec_dot(int type_id, ByteArray weight_row, ByteArray activation_row, int64_t n,
              const std::string& isa) {
  const auto type = checked_type(type_id);
  const auto& info = weight_type_info(type);
  checked_row_length(type, n, static_cast<size_t>(weight_row.size()));
  checked_row_length(info.activation, n, static_cast<size_t>(activation_row.size()));
  const auto fn = quant::vec_dot_fn(type, isa_or_widest(isa));
  return fn(n, weight_row.data(), activation_row.data());
}

// out[j] = the product of the weight row with activation row j (one row of the 2-D array each),
// through the multi-row kernel a matmul uses.
py::array_t<float> vec_dot_multi(int type_id, ByteArray weight_row, ByteArray activations,
                                 int64_t n, const std::string& isa) {
  const auto type = checked_type(type_id);
  const auto& info = weight_type_info(type);
  if (activations.ndim() != 2) {
    throw py::value_error("activations must be a 2-D array, one activation row per row");
  }
  checked_row_length(type, n, static_cast<size_t>(weight_row.size()));
  checked_row_length(info.activation, n, static_cast<size_t>(activations.shape(1)));
  const auto n_acts = activations.shape(0);
  if (n_acts > std::numeric_limits<int>::max()) throw py::value_error("too many activation rows");
  py::array_t<float> out(n_acts);
  const auto fn = quant::vec_dot_multi_fn(type, isa_or_widest(isa));
  {
    py::gil_scoped_release release;
    fn(n, weight_row.data(), activations.data(), static_cast<size_t>(activations.shape(1)),
       static_cast<int>(n_acts), out.mutable_data());
  }
  return out;
}

quant::Type interleaved_type(int type_id) {
  const auto type = checked_type(type_id);
  if (!quant::has_interleaved_layout(type)) {
    throw py::value_error(std::string(quant::type_info(type).name) + " has no interleaved layout");
  }
  return type;
}

// The 16 rows of a 2-D array (the file's layout), as one interleaved group.
py::array_t<uint8_t> interleave_rows(int type_id, ByteArray rows, int64_t n) {
  const auto type = interleaved_type(type_id);
  if (rows.ndim() != 2 || rows.shape(0) != quant::kInterleavedRows) {
    throw py::value_error("rows must be a 2-D array of 16 rows");
  }
  checked_row_length(type, n, static_cast<size_t>(rows.shape(1)));
  const size_t row_bytes = static_cast<size_t>(rows.shape(1));
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(quant::kInterleavedRows * row_bytes));
  quant::interleave_rows(type, rows.data(), row_bytes, n, out.mutable_data());
  return out;
}

void check_group_bytes(quant::Type type, int64_t n, size_t available_bytes) {
  checked_row_length(type, n, SIZE_MAX);
  if (quant::kInterleavedRows * quant::row_bytes(type, n) > available_bytes) {
    throw py::value_error("buffer too small for a group of 16 rows");
  }
}

py::array_t<uint8_t> deinterleave_row(int type_id, ByteArray group, int row, int64_t n) {
  const auto type = interleaved_type(type_id);
  check_group_bytes(type, n, static_cast<size_t>(group.size()));
  if (row < 0 || row >= quant::kInterleavedRows) throw py::value_error("row must be in 0..15");
  py::array_t<uint8_t> out(static_cast<py::ssize_t>(quant::row_bytes(type, n)));
  quant::deinterleave_row(type, group.data(), row, n, out.mutable_data());
  return out;
}

// [n_acts, 16]: the products of an interleaved group with each activation row (Q8_K), by the
// SIMD kernel or by its reference.
py::array_t<float> interleaved_dot(int type_id, ByteArray group, ByteArray activations, int64_t n,
                                   bool reference) {
  const auto type = interleaved_type(type_id);
  check_group_bytes(type, n, static_cast<size_t>(group.size()));
  if (activations.ndim() != 2) {
    throw py::value_error("activations must be a 2-D array, one activation row per row");
  }
  checked_row_length(quant::Type::Q8_K, n, static_cast<size_t>(activations.shape(1)));
  const auto n_acts = activations.shape(0);
  if (n_acts < 1 || n_acts > quant::kInterleavedTile) {
    throw py::value_error("between 1 and 8 activation rows at a time");
  }
  const auto fn =
      reference ? quant::interleaved_dot_reference(type) : quant::interleaved_dot_fn(type);
  if (fn == nullptr) throw py::value_error("this build has no interleaved kernel");
  py::array_t<float> out({n_acts, static_cast<py::ssize_t>(quant::kInterleavedRows)});
  fn(n, group.data(), activations.data(), static_cast<size_t>(activations.shape(1)),
     static_cast<int>(n_acts), out.mutable_data(), quant::kInterleavedRows);
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
      py::arg("n"), py::arg("isa") = "",
      "Dot product of a weight row with an activation row in the weight type's activation format,\n"
      "by the kernel of `isa` (default: the widest built).");
  m.def("vec_dot_multi", &vec_dot_multi, py::arg("type_id"), py::arg("weight_row"),
        py::arg("activations"), py::arg("n"), py::arg("isa") = "",
        "Dot products of a weight row with each row of a 2-D array of activation rows.");
  m.def(
      "cpu_isas",
      [] {
        std::vector<std::string> names;
        for (quant::Isa isa : quant::built_isas()) names.push_back(quant::isa_name(isa));
        return names;
      },
      "The CPU kernel sets this build has, narrowest first.");
  m.def(
      "interleaved_kernel_built",
      [](int type_id) { return quant::interleaved_dot_fn(interleaved_type(type_id)) != nullptr; },
      "Whether this build has the SIMD kernel of the type's interleaved layout.");
  m.def("interleave_rows", &interleave_rows, py::arg("type_id"), py::arg("rows"), py::arg("n"),
        "16 rows of n values (a 2-D array in the file's layout) as one interleaved group.");
  m.def("deinterleave_row", &deinterleave_row, py::arg("type_id"), py::arg("group"), py::arg("row"),
        py::arg("n"), "Row `row` of an interleaved group, in the file's layout.");
  m.def("interleaved_dot", &interleaved_dot, py::arg("type_id"), py::arg("group"),
        py::arg("activations"), py::arg("n"), py::arg("reference") = false,
        "[rows of activations, 16]: the products of an interleaved group with 1-8 Q8_K rows.");
  m.def(
      "block_geometry",
      [](int type_id) {
        const auto& info = quant::type_info(checked_type(type_id));
        return py::make_tuple(info.block_size, info.block_bytes);
      },
      py::arg("type_id"), "(elements, bytes) of one block of a GGUF tensor type.");
  m.def("row_bytes", [](int type_id, int64_t n) {
    const auto type = checked_type(type_id);
    checked_row_length(type, n, SIZE_MAX);
    return quant::row_bytes(type, n);
  });
}
