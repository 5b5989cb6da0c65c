// Python bindings of the assistant drafter, built on a loaded target model from the Python
// loader's validated tensor table and configuration.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/kv_pool.h"
#include "bindings/model_config.h"
#include "model/gemma4_assistant.h"

namespace py = pybind11;
using namespace pg4;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

template <typename T, typename A>
std::vector<T> to_vector(const A& a) {
  return std::vector<T>(a.data(), a.data() + a.size());
}

}  // namespace

void register_assistant(py::module_& m) {
  py::class_<Gemma4Assistant>(m, "Assistant")
      .def(py::init([](Gemma4Model& target, const std::string& path,
                       const std::vector<TensorEntry>& tensors, const py::object& config,
                       int max_sequences, int max_steps) {
             AssistantConfig assistant_config;
             assistant_config.model = to_model_config(config.attr("model"));
             assistant_config.n_embd_target = config.attr("n_embd_target").cast<int>();
             const py::object head = config.attr("centroid_head");
             if (!head.is_none()) {
               assistant_config.centroid_top_k = head.attr("top_k").cast<int>();
               assistant_config.token_ordering =
                   to_vector<int32_t>(head.attr("token_ordering").cast<IntArray>());
             }
             py::gil_scoped_release release;
             return std::make_unique<Gemma4Assistant>(
                 target, path, tensors, std::move(assistant_config), max_sequences, max_steps);
           }),
           py::arg("target"), py::arg("path"), py::arg("tensors"), py::arg("config"),
           py::arg("max_sequences"), py::arg("max_steps"), py::keep_alive<1, 2>(),
           "The drafter of a validated assistant file (config: a pygemma4.config.AssistantConfig) "
           "on the target model it was checked against, computing with the target's backend, "
           "for calls of up to max_sequences sequences and max_steps tokens each.")
      .def(
          "propose",
          [](Gemma4Assistant& assistant, PyKvPool& pool, const IntArray& tokens,
             const IntArray& positions, const FloatArray& hidden, const IntArray& block_tables,
             const IntArray& ring_sets, int steps, bool with_logits) {
            if (block_tables.ndim() != 2 || hidden.ndim() != 2) {
              throw py::value_error("block_tables and hidden must be 2-D arrays");
            }
            Gemma4Assistant::Batch in;
            in.tokens = to_vector<int32_t>(tokens);
            in.positions = to_vector<int32_t>(positions);
            in.hidden = to_vector<float>(hidden);
            in.block_tables = to_vector<int32_t>(block_tables);
            in.table_width = static_cast<int>(block_tables.shape(1));
            in.ring_sets = to_vector<int32_t>(ring_sets);
            in.steps = steps;
            in.with_logits = with_logits;
            Gemma4Assistant::Result result;
            {
              py::gil_scoped_release release;
              result = assistant.propose(pool.pool(), in);
            }
            const py::ssize_t n = static_cast<py::ssize_t>(in.tokens.size());
            py::array_t<int32_t> proposals({n, static_cast<py::ssize_t>(steps)});
            std::copy(result.tokens.begin(), result.tokens.end(), proposals.mutable_data());
            if (!with_logits) return py::tuple(py::make_tuple(proposals, py::none()));
            py::array_t<float> logits(
                {n, static_cast<py::ssize_t>(steps),
                 static_cast<py::ssize_t>(assistant.config().model.vocab_size)});
            std::copy(result.logits.begin(), result.logits.end(), logits.mutable_data());
            return py::tuple(py::make_tuple(proposals, logits));
          },
          py::arg("pool"), py::arg("tokens"), py::arg("positions"), py::arg("hidden"),
          py::arg("block_tables"), py::arg("ring_sets"), py::arg("steps"),
          py::arg("with_logits") = false,
          "Propose `steps` tokens for each sequence i: newest token tokens[i] at position "
          "positions[i] (its KV length), target hidden state at the position before in "
          "hidden[i] ([n, n_embd_target]), KV in the blocks of block_tables[i] ([n, width]) and "
          "ring set ring_sets[i]. Returns (tokens int32 [n, steps], logits float32 [n, steps, "
          "vocab] or None).");
}
