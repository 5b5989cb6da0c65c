#include "bindings/kv_pool.h"

#include <string>

#include "bindings/model_config.h"
#include "ops/backend.h"

namespace py = pybind11;

namespace pg4 {

void PyKvPool::ReleaseView::operator()(Py_buffer* view) const {
  PyBuffer_Release(view);
  delete view;
}

quant::Type kv_entry_type(int type_id) {
  if (!quant::is_known_type(type_id)) {
    throw py::value_error("KV entry type id " + std::to_string(type_id) + " is no GGUF type");
  }
  return static_cast<quant::Type>(type_id);
}

PyKvPool::PyKvPool(const py::object& config, int block_size, int n_blocks, int n_ring_sets,
                   int ring_blocks, const py::object& buffer, int device,
                   const py::object& ipc_handle, int kv_type) {
  const ModelConfig model_config = to_model_config(config);
  const quant::Type entry_type = kv_entry_type(kv_type);
  KvPool::check_device_type(entry_type, device);  // before any device memory is taken
  const size_t needed = KvPool::bytes_needed(model_config, block_size, n_blocks, n_ring_sets,
                                             ring_blocks, entry_type);
  void* memory = nullptr;
  if (device >= 0) {
    if (!buffer.is_none()) throw py::value_error("a KV pool on a CUDA device takes no buffer");
    device_memory_ = ipc_handle.is_none()
                         ? device_memory(needed, device)
                         : open_device_memory(ipc_handle.cast<std::string>(), device);
    memory = device_memory_.get();
  } else if (!ipc_handle.is_none()) {
    throw py::value_error("an ipc_handle opens a pool on a CUDA device: give its device");
  } else if (!buffer.is_none()) {
    auto view = std::make_unique<Py_buffer>();
    if (PyObject_GetBuffer(buffer.ptr(), view.get(), PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS) != 0) {
      PyErr_Clear();
      throw py::value_error("the KV pool buffer must be a writable contiguous buffer");
    }
    view_.reset(view.release());
    if (static_cast<size_t>(view_->len) < needed) {
      throw py::value_error("the KV pool needs " + std::to_string(needed) +
                            " bytes; the buffer has " + std::to_string(view_->len));
    }
    if (reinterpret_cast<uintptr_t>(view_->buf) % alignof(float) != 0) {
      throw py::value_error("the KV pool buffer must be aligned for float32");
    }
    memory = view_->buf;
  }
  pool_ = std::make_unique<KvPool>(model_config, block_size, n_blocks, n_ring_sets, ring_blocks,
                                   entry_type, memory, device < 0 ? -1 : device);
}

py::bytes PyKvPool::ipc_handle() const {
  if (!device_memory_) throw py::value_error("only a pool on a CUDA device has an IPC handle");
  return py::bytes(export_device_memory(device_memory_.get(), pool_->device()));
}

}  // namespace pg4

using namespace pg4;

void register_kv_pool(py::module_& m) {
  py::class_<PyKvPool>(m, "KvPool")
      .def(py::init<const py::object&, int, int, int, int, const py::object&, int,
                    const py::object&, int>(),
           py::arg("config"), py::arg("block_size"), py::arg("n_blocks"), py::arg("n_ring_sets"),
           py::arg("ring_blocks"), py::arg("buffer") = py::none(), py::arg("device") = -1,
           py::arg("ipc_handle") = py::none(), py::arg("kv_type") = 0,
           "Paged K/V storage for a model of `config`, in `buffer` (any writable buffer of at "
           "least bytes_needed bytes, held while the pool lives) or, without one, in memory of "
           "its own: host memory, or with device >= 0 zeroed memory of that CUDA device, or "
           "with an ipc_handle too the device pool another process exported. kv_type: the GGUF "
           "type id of the entries (0 F32, 1 F16, 30 BF16, 8 Q8_0; F32 on a CUDA device).")
      .def(
          "copy_ring_set", [](PyKvPool& p, int src, int dst) { p.pool().copy_ring_set(src, dst); },
          py::arg("src"), py::arg("dst"),
          "Copy ring set src's sliding-window rows over ring set dst's (host pools only).")
      .def("ipc_handle", &PyKvPool::ipc_handle,
           "The bytes by which another process opens this CUDA pool (KvPool(..., device=d, "
           "ipc_handle=h)).")
      .def_static(
          "bytes_needed",
          [](const py::object& config, int block_size, int n_blocks, int n_ring_sets,
             int ring_blocks, int kv_type) {
            return KvPool::bytes_needed(to_model_config(config), block_size, n_blocks, n_ring_sets,
                                        ring_blocks, kv_entry_type(kv_type));
          },
          py::arg("config"), py::arg("block_size"), py::arg("n_blocks"), py::arg("n_ring_sets"),
          py::arg("ring_blocks"), py::arg("kv_type") = 0,
          "Bytes of memory a pool of these dimensions and entry type lays out.")
      .def_property_readonly("kv_type",
                             [](const PyKvPool& p) { return static_cast<int>(p.pool().kv_type()); })
      .def_property_readonly("block_size", [](const PyKvPool& p) { return p.pool().block_size(); })
      .def_property_readonly("n_blocks", [](const PyKvPool& p) { return p.pool().n_blocks(); })
      .def_property_readonly("n_ring_sets",
                             [](const PyKvPool& p) { return p.pool().n_ring_sets(); })
      .def_property_readonly("ring_blocks",
                             [](const PyKvPool& p) { return p.pool().ring_blocks(); })
      .def_property_readonly("nbytes", [](const PyKvPool& p) { return p.pool().nbytes(); })
      .def_property_readonly("device", [](const PyKvPool& p) { return p.pool().device(); });
}
