// Python bindings of the model, built from the Python loader's validated tensor table and config.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <thread>

#include "model/gemma4.h"
#include "ops/cpu/cpu_ops.h"

namespace py = pybind11;
using namespace pg4;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

template <typename T>
T field(const py::handle& obj, const char* name) {
  return obj.attr(name).cast<T>();
}

// Reads the attributes of pygemma4.config.ModelConfig (any object with those fields).
ModelConfig to_model_config(const py::object& c) {
  ModelConfig m;
  m.n_layer = field<int>(c, "n_layer");
  m.n_embd = field<int>(c, "n_embd");
  m.vocab_size = field<int>(c, "vocab_size");
  m.n_ctx_train = field<int>(c, "n_ctx_train");
  m.rms_eps = field<float>(c, "rms_eps");
  m.final_logit_softcap = field<float>(c, "final_logit_softcap");
  m.sliding_window = field<int>(c, "sliding_window");
  m.n_embd_per_layer = field<int>(c, "n_embd_per_layer");
  m.n_expert = field<int>(c, "n_expert");
  m.n_expert_used = field<int>(c, "n_expert_used");
  m.n_ff_expert = field<int>(c, "n_ff_expert");
  m.has_output = field<bool>(c, "has_output");
  for (const py::handle& l : c.attr("layers")) {
    LayerConfig lc;
    lc.index = field<int>(l, "index");
    lc.is_sliding = field<bool>(l, "is_sliding");
    lc.n_head = field<int>(l, "n_head");
    lc.n_head_kv = field<int>(l, "n_head_kv");
    lc.head_dim = field<int>(l, "head_dim");
    lc.n_rot = field<int>(l, "n_rot");
    lc.rope_base = field<float>(l, "rope_base");
    lc.n_ff = field<int>(l, "n_ff");
    lc.has_kv = field<bool>(l, "has_kv");
    lc.kv_source = field<int>(l, "kv_source");
    lc.has_v_proj = field<bool>(l, "has_v_proj");
    lc.is_moe = field<bool>(l, "is_moe");
    m.layers.push_back(lc);
  }
  if (static_cast<int>(m.layers.size()) != m.n_layer) {
    throw py::value_error("config lists a different number of layers than n_layer");
  }
  return m;
}

std::vector<int32_t> to_vector(const IntArray& a) {
  return std::vector<int32_t>(a.data(), a.data() + a.size());
}

}  // namespace

void register_model(py::module_& m) {
  py::class_<TensorEntry>(m, "TensorEntry")
      .def(py::init([](std::string name, int type_id, std::vector<int64_t> shape, uint64_t offset,
                       uint64_t nbytes) {
             return TensorEntry{std::move(name), type_id, std::move(shape), offset, nbytes};
           }),
           py::arg("name"), py::arg("type_id"), py::arg("shape"), py::arg("offset"),
           py::arg("nbytes"));

  py::class_<Gemma4Model>(m, "Model")
      .def(py::init([](const std::string& path, const std::vector<TensorEntry>& tensors,
                       const py::object& config, int n_ctx, int n_slots, int n_batch, int threads) {
             if (threads < 1) throw py::value_error("threads must be at least 1");
             ModelOptions options;
             options.n_ctx = n_ctx;
             options.n_slots = n_slots;
             options.n_batch = n_batch;
             ModelConfig model_config = to_model_config(config);
             py::gil_scoped_release release;
             return std::make_unique<Gemma4Model>(path, tensors, std::move(model_config), options,
                                                  std::make_unique<CpuOps>(threads));
           }),
           py::arg("path"), py::arg("tensors"), py::arg("config"), py::arg("n_ctx"),
           py::arg("n_slots"), py::arg("n_batch"), py::arg("threads"))
      .def(
          "forward",
          [](Gemma4Model& model, const IntArray& tokens, const IntArray& positions,
             const IntArray& slots, const IntArray& output_rows) {
            std::vector<int32_t> t = to_vector(tokens), p = to_vector(positions),
                                 s = to_vector(slots), o = to_vector(output_rows);
            std::vector<float> logits;
            {
              py::gil_scoped_release release;
              logits = model.forward(t, p, s, o);
            }
            const py::ssize_t vocab = model.config().vocab_size;
            py::array_t<float> out({static_cast<py::ssize_t>(o.size()), vocab});
            std::copy(logits.begin(), logits.end(), out.mutable_data());
            return out;
          },
          py::arg("tokens"), py::arg("positions"), py::arg("slots"), py::arg("output_rows"),
          "Run one batch; returns logits [len(output_rows), vocab] float32.")
      .def("length", &Gemma4Model::length, py::arg("slot"))
      .def("reset", &Gemma4Model::reset, py::arg("slot"))
      .def_property_readonly("n_ctx", [](const Gemma4Model& m) { return m.options().n_ctx; })
      .def_property_readonly("n_slots", [](const Gemma4Model& m) { return m.options().n_slots; })
      .def_property_readonly("n_batch", [](const Gemma4Model& m) { return m.options().n_batch; })
      .def_property_readonly("kv_bytes", [](const Gemma4Model& m) { return m.cache().bytes(); });
}
