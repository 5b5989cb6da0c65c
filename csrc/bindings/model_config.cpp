#include "bindings/model_config.h"

namespace py = pybind11;

namespace pg4 {

namespace {

template <typename T>
T field(const py::handle& obj, const char* name) {
  return obj.attr(name).cast<T>();
}

}  // namespace

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
    if (lc.index != static_cast<int>(m.layers.size())) {
      throw py::value_error("config layers must be listed by index, from 0");
    }
    m.layers.push_back(lc);
  }
  if (static_cast<int>(m.layers.size()) != m.n_layer) {
    throw py::value_error("config lists a different number of layers than n_layer");
  }
  return m;
}

}  // namespace pg4
