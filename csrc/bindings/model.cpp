// Python bindings of the model, built from the Python loader's validated tensor table and config.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings/kv_pool.h"
#include "bindings/model_config.h"
#include "model/gemma4.h"
#include "ops/backend.h"

namespace py = pybind11;
using namespace pg4;

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

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
                       const py::object& config, int n_batch, int threads,
                       const std::string& backend, int device) {
             if (threads < 1) throw py::value_error("threads must be at least 1");
             ModelConfig model_config = to_model_config(config);
             py::gil_scoped_release release;
             return std::make_unique<Gemma4Model>(path, tensors, std::move(model_config), n_batch,
                                                  make_ops(backend, threads, device));
           }),
           py::arg("path"), py::arg("tensors"), py::arg("config"), py::arg("n_batch"),
           py::arg("threads"), py::arg("backend") = "cpu", py::arg("device") = 0,
           "The model of a validated file computing on `backend` ('cpu' with `threads` threads, "
           "or 'cuda' on `device`), for forward calls of up to n_batch tokens.")
      .def(
          "forward",
          [](Gemma4Model& model, PyKvPool& pool, const py::object& batch) {
            const IntArray tables = batch.attr("block_tables").cast<IntArray>();
            const IntArray ring_sets = batch.attr("ring_sets").cast<IntArray>();
            if (tables.ndim() != 2) {
              throw py::value_error("block_tables must be a 2-D array [n_seq, width]");
            }
            if (ring_sets.ndim() != 1 || ring_sets.shape(0) != tables.shape(0)) {
              throw py::value_error("ring_sets must be a 1-D array of one ring set per table");
            }
            Gemma4Model::Batch in;
            in.tokens = to_vector(batch.attr("tokens").cast<IntArray>());
            in.positions = to_vector(batch.attr("positions").cast<IntArray>());
            in.seqs = to_vector(batch.attr("seqs").cast<IntArray>());
            in.block_tables = to_vector(tables);
            in.table_width = static_cast<int>(tables.shape(1));
            in.ring_sets = to_vector(ring_sets);
            in.logit_rows = to_vector(batch.attr("logit_rows").cast<IntArray>());
            in.argmax_rows = to_vector(batch.attr("argmax_rows").cast<IntArray>());
            in.hidden_rows = to_vector(batch.attr("hidden_rows").cast<IntArray>());
            in.embedding_rows = to_vector(batch.attr("embedding_rows").cast<IntArray>());
            in.span_first = to_vector(batch.attr("span_first").cast<IntArray>());
            in.span_last = to_vector(batch.attr("span_last").cast<IntArray>());
            const FloatArray embeddings = batch.attr("embeddings").cast<FloatArray>();
            in.embeddings.assign(embeddings.data(), embeddings.data() + embeddings.size());
            Gemma4Model::Result result;
            {
              py::gil_scoped_release release;
              result = model.forward(pool.pool(), in);
            }
            const py::ssize_t vocab = model.config().vocab_size;
            py::array_t<float> logits({static_cast<py::ssize_t>(in.logit_rows.size()), vocab});
            std::copy(result.logits.begin(), result.logits.end(), logits.mutable_data());
            py::array_t<int32_t> tokens(static_cast<py::ssize_t>(result.argmax.size()));
            py::array_t<float> logprobs(static_cast<py::ssize_t>(result.logprobs.size()));
            std::copy(result.argmax.begin(), result.argmax.end(), tokens.mutable_data());
            std::copy(result.logprobs.begin(), result.logprobs.end(), logprobs.mutable_data());
            py::array_t<float> hidden({static_cast<py::ssize_t>(in.hidden_rows.size()),
                                       static_cast<py::ssize_t>(model.config().n_embd)});
            std::copy(result.hidden.begin(), result.hidden.end(), hidden.mutable_data());
            return py::make_tuple(logits, tokens, logprobs, hidden);
          },
          py::arg("pool"), py::arg("batch"),
          "Run one batch against the pool. `batch` (a pygemma4.runner.ForwardBatch) gives int32 "
          "arrays: row i is tokens[i] at positions[i] of sequence seqs[i], whose full-attention "
          "KV lives in the blocks of block_tables[seqs[i]] ([n_seq, width], -1 for none) and "
          "sliding KV in ring set ring_sets[seqs[i]]; the rows in embedding_rows take the rows of "
          "embeddings (float32 [len(embedding_rows), n_embd]) in place of their tokens'; "
          "span_first "
          "and span_last (empty, or a position each row) give each row's span of positions that "
          "attend to each other in both directions (an image's soft tokens). Returns "
          "(logits float32 "
          "[len(logit_rows), vocab], tokens int32 [len(argmax_rows)], logprobs float32 "
          "[len(argmax_rows)], hidden float32 [len(hidden_rows), n_embd]): the logits of the logit "
          "rows, for each argmax row its most likely token and that token's log-probability, "
          "chosen where the model computes so that no logits cross to the host, and the final "
          "hidden state (after the output norm, before the head) of the hidden rows.")
      .def_property_readonly("n_batch", &Gemma4Model::n_batch)
      .def_property_readonly(
          "attends_spans", [](Gemma4Model& model) { return model.ops().attends_spans(); },
          "Whether the backend attends spans of image tokens in both directions (the unified "
          "models' images).");

  m.def("cuda_built", &cuda_built, "Whether this module was compiled with the CUDA backend.");
  m.def("cuda_unavailable_reason", &cuda_unavailable_reason, py::arg("device") = 0,
        "Why CUDA device `device` cannot be used, or '' when it can.");
}
