// pygemma4._core.OpsCheck: single operations of a backend on numpy inputs, so that the tests can
// run each CUDA kernel and its CPU reference on the same fresh random data and compare.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "kv/kv_pool.h"
#include "ops/backend.h"
#include "quant/types.h"

namespace py = pybind11;
using namespace pg4;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IdArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

class OpsCheck {
 public:
  OpsCheck(const std::string& backend, int threads, int device)
      : ops_(make_ops(backend, threads, device)) {}

  // A weight of `type` with ne = {cols, rows, matrices} over the bytes of `data`.
  Weight weight(int type_id, const ByteArray& data, int64_t cols, int64_t rows,
                int64_t matrices = 1) {
    if (!quant::is_known_type(type_id)) throw py::value_error("unknown tensor type");
    Weight w;
    w.type = static_cast<quant::Type>(type_id);
    w.ne[0] = cols;
    w.ne[1] = rows;
    w.ne[2] = matrices;
    w.row_bytes = quant::row_bytes(w.type, cols);
    if (static_cast<size_t>(data.size()) != w.row_bytes * rows * matrices) {
      throw py::value_error("weight data has the wrong size for its type and shape");
    }
    w.data = data.data();
    ops_->place_weights({{&w, false}}, nullptr);
    return w;
  }

  std::shared_ptr<float> floats(const FloatArray& a) {
    auto memory = ops_->alloc(a.size());
    ops_->upload(memory.get(), a.data(), a.size() * sizeof(float));
    return memory;
  }

  std::shared_ptr<int32_t> ids(const IdArray& a) {
    auto memory = ops_->alloc_ids(a.size());
    ops_->upload(memory.get(), a.data(), a.size() * sizeof(int32_t));
    return memory;
  }

  FloatArray result(const std::shared_ptr<float>& memory, std::vector<py::ssize_t> shape) {
    FloatArray out(shape);
    ops_->read(memory.get(), out.size(), out.mutable_data());
    return out;
  }

  void reserve(int n_batch, int64_t cols, int n_head = 1, int head_dim = 1, int k = 0,
               int64_t n_ff_expert = 0) {
    Ops::Limits limits;
    limits.n_batch = n_batch;
    limits.max_cols = cols;
    limits.max_heads = n_head;
    limits.max_head_dim = head_dim;
    limits.n_expert_used = k;
    limits.n_ff_expert = n_ff_expert;
    ops_->reserve(limits);
  }

  Ops& ops() { return *ops_; }

 private:
  std::unique_ptr<Ops> ops_;
};

Rope rope_of(int n_rot, float base, const float* freq_factors) {
  return Rope{n_rot, base, freq_factors};
}

}  // namespace

void register_ops_check(py::module_& m) {
  py::class_<OpsCheck>(m, "OpsCheck",
                       "Single operations of one backend on numpy inputs (for the kernel tests).")
      .def(py::init<const std::string&, int, int>(), py::arg("backend"), py::arg("threads") = 1,
           py::arg("device") = 0)
      .def(
          "matmul",
          [](OpsCheck& c, int type_id, const ByteArray& weights, int64_t cols, int64_t rows,
             const FloatArray& x) {
            const int n = static_cast<int>(x.size() / cols);
            c.reserve(n, cols);
            const Weight w = c.weight(type_id, weights, cols, rows);
            auto in = c.floats(x);
            auto out = c.ops().alloc(static_cast<size_t>(n) * rows);
            c.ops().matmul(w, in.get(), n, out.get());
            return c.result(out, {n, rows});
          },
          py::arg("type_id"), py::arg("weights"), py::arg("cols"), py::arg("rows"), py::arg("x"))
      .def(
          "matmul_shared",
          [](OpsCheck& c, const std::vector<std::tuple<int, ByteArray, int64_t, int64_t>>& matrices,
             const FloatArray& x) {
            if (x.ndim() != 2) throw py::value_error("x must be a 2-D array, one token per row");
            const int n = static_cast<int>(x.shape(0));
            c.reserve(n, x.shape(1));
            std::vector<Weight> weights;
            std::vector<std::shared_ptr<float>> outputs;
            std::vector<Product> products;
            weights.reserve(matrices.size());
            for (const auto& [type_id, data, cols, rows] : matrices) {
              weights.push_back(c.weight(type_id, data, cols, rows));
              outputs.push_back(c.ops().alloc(static_cast<size_t>(n) * rows));
              products.push_back({&weights.back(), outputs.back().get()});
            }
            if (!weights.empty() && weights[0].cols() != x.shape(1)) {
              throw py::value_error("x must be as wide as the first matrix");
            }
            auto in = c.floats(x);
            c.ops().matmul_shared(in.get(), n, products.data(), static_cast<int>(products.size()));
            py::list results;
            for (size_t i = 0; i < weights.size(); ++i) {
              results.append(c.result(outputs[i], {n, weights[i].rows()}));
            }
            return results;
          },
          py::arg("matrices"), py::arg("x"),
          "The products of x with each (type_id, weights, cols, rows) matrix, as one "
          "matmul_shared.")
      .def(
          "get_rows",
          [](OpsCheck& c, int type_id, const ByteArray& table, int64_t cols, int64_t rows,
             const IdArray& ids, float scale) {
            const Weight w = c.weight(type_id, table, cols, rows);
            auto id = c.ids(ids);
            auto out = c.ops().alloc(ids.size() * cols);
            c.ops().get_rows(w, id.get(), static_cast<int>(ids.size()), scale, out.get());
            return c.result(out, {ids.size(), cols});
          },
          py::arg("type_id"), py::arg("table"), py::arg("cols"), py::arg("rows"), py::arg("ids"),
          py::arg("scale"))
      .def(
          "rms_norm",
          [](OpsCheck& c, const FloatArray& x, std::optional<FloatArray> weight, float eps,
             std::optional<FloatArray> add_to) {
            const int dim = static_cast<int>(x.shape(x.ndim() - 1));
            const int rows = static_cast<int>(x.size() / dim);
            auto in = c.floats(x);
            std::shared_ptr<float> w = weight ? c.floats(*weight) : nullptr;
            if (add_to) {
              auto target = c.floats(*add_to);
              c.ops().rms_norm_add(in.get(), w.get(), rows, dim, eps, target.get());
              return c.result(target, {rows, dim});
            }
            auto out = c.ops().alloc(x.size());
            c.ops().rms_norm(in.get(), w.get(), rows, dim, eps, out.get());
            return c.result(out, {rows, dim});
          },
          py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("add_to") = py::none())
      .def(
          "norm_rope",
          [](OpsCheck& c, const FloatArray& x, std::optional<FloatArray> weight,
             const IdArray& positions, int n_head, int head_dim, float eps, int n_rot, float base,
             std::optional<FloatArray> freq_factors) {
            const int n = static_cast<int>(positions.size());
            auto in = c.floats(x);
            auto pos = c.ids(positions);
            std::shared_ptr<float> ff = freq_factors ? c.floats(*freq_factors) : nullptr;
            const Rope rope = rope_of(n_rot, base, ff.get());
            if (weight) {
              auto w = c.floats(*weight);
              c.ops().rms_norm_rope(in.get(), w.get(), pos.get(), n, n_head, head_dim, eps, rope);
            } else {
              c.ops().rope_neox(in.get(), pos.get(), n, n_head, head_dim, rope);
            }
            return c.result(in, {n, static_cast<py::ssize_t>(n_head) * head_dim});
          },
          py::arg("x"), py::arg("weight"), py::arg("positions"), py::arg("n_head"),
          py::arg("head_dim"), py::arg("eps"), py::arg("n_rot"), py::arg("base"),
          py::arg("freq_factors") = py::none(),
          "With a weight: each head normalised then rotated; without: rotated only.")
      .def(
          "gelu_mul",
          [](OpsCheck& c, const FloatArray& gate, const FloatArray& up) {
            const int cols = static_cast<int>(gate.shape(1)),
                      rows = static_cast<int>(gate.shape(0));
            auto g = c.floats(gate), u = c.floats(up);
            auto out = c.ops().alloc(gate.size());
            c.ops().gelu_mul(g.get(), cols, u.get(), cols, rows, cols, out.get());
            return c.result(out, {rows, cols});
          },
          py::arg("gate"), py::arg("up"))
      .def(
          "elementwise",
          [](OpsCheck& c, const std::string& op, const FloatArray& x, float value,
             std::optional<FloatArray> y) {
            auto in = c.floats(x);
            if (op == "add") {
              if (!y) throw py::value_error("add needs y");
              auto other = c.floats(*y);
              c.ops().add(in.get(), other.get(), x.size());
            } else if (op == "scale") {
              c.ops().scale(in.get(), value, x.size());
            } else if (op == "softcap") {
              c.ops().softcap(in.get(), value, x.size());
            } else if (op == "silu") {
              c.ops().silu(in.get(), x.size());
            } else if (op == "relu") {
              c.ops().relu(in.get(), x.size());
            } else {
              throw py::value_error("unknown element-wise op '" + op + "'");
            }
            return c.result(in, {x.size()});
          },
          py::arg("op"), py::arg("x"), py::arg("value") = 0.0f, py::arg("y") = py::none())
      .def(
          "clamp",
          [](OpsCheck& c, const FloatArray& x, float lo, float hi) {
            auto in = c.floats(x);
            c.ops().clamp(in.get(), lo, hi, x.size());
            return c.result(in, {x.size()});
          },
          py::arg("x"), py::arg("lo"), py::arg("hi"))
      .def(
          "cols",
          [](OpsCheck& c, const std::string& op, const FloatArray& x, const FloatArray& s) {
            const int dim = static_cast<int>(s.size()), rows = static_cast<int>(x.size() / dim);
            auto in = c.floats(x), values = c.floats(s);
            if (op == "mul") {
              c.ops().mul_cols(in.get(), values.get(), rows, dim);
            } else if (op == "add") {
              c.ops().add_cols(in.get(), values.get(), rows, dim);
            } else {
              throw py::value_error("unknown column op '" + op + "'");
            }
            return c.result(in, {rows, dim});
          },
          py::arg("op"), py::arg("x"), py::arg("s"), "x [rows, len(s)] times or plus s per row.")
      .def(
          "layer_norm",
          [](OpsCheck& c, const FloatArray& x, const FloatArray& weight,
             std::optional<FloatArray> bias, float eps) {
            const int dim = static_cast<int>(x.shape(x.ndim() - 1));
            const int rows = static_cast<int>(x.size() / dim);
            auto in = c.floats(x), w = c.floats(weight);
            std::shared_ptr<float> b = bias ? c.floats(*bias) : nullptr;
            auto out = c.ops().alloc(x.size());
            c.ops().layer_norm(in.get(), w.get(), b.get(), rows, dim, eps, out.get());
            return c.result(out, {rows, dim});
          },
          py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"))
      .def(
          "conv2d_3x3_s2",
          [](OpsCheck& c, const FloatArray& x, const FloatArray& weight) {
            if (x.ndim() != 3 || weight.ndim() != 4 || weight.shape(1) != x.shape(2) ||
                weight.shape(2) != 3 || weight.shape(3) != 3) {
              throw py::value_error("x must be [height, width, in], weight [out, in, 3, 3]");
            }
            const int h = static_cast<int>(x.shape(0)), w = static_cast<int>(x.shape(1));
            const int in_ch = static_cast<int>(x.shape(2)),
                      out_ch = static_cast<int>(weight.shape(0));
            auto in = c.floats(x), wt = c.floats(weight);
            const int oh = (h + 1) / 2, ow = (w + 1) / 2;
            auto out = c.ops().alloc(static_cast<size_t>(oh) * ow * out_ch);
            c.ops().conv2d_3x3_s2(in.get(), h, w, in_ch, wt.get(), out_ch, out.get());
            return c.result(out, {oh, ow, out_ch});
          },
          py::arg("x"), py::arg("weight"))
      .def(
          "depthwise_conv_causal",
          [](OpsCheck& c, const FloatArray& x, const FloatArray& weight) {
            if (x.ndim() != 2 || weight.ndim() != 2 || weight.shape(0) != x.shape(1)) {
              throw py::value_error("x must be [n, channels], weight [channels, kernel]");
            }
            const int n = static_cast<int>(x.shape(0)), ch = static_cast<int>(x.shape(1));
            auto in = c.floats(x), wt = c.floats(weight);
            auto out = c.ops().alloc(x.size());
            c.ops().depthwise_conv_causal(in.get(), n, ch, wt.get(),
                                          static_cast<int>(weight.shape(1)), out.get());
            return c.result(out, {n, ch});
          },
          py::arg("x"), py::arg("weight"))
      .def(
          "glu",
          [](OpsCheck& c, const FloatArray& x) {
            const int rows = static_cast<int>(x.shape(0)), dim = static_cast<int>(x.shape(1) / 2);
            auto in = c.floats(x);
            auto out = c.ops().alloc(static_cast<size_t>(rows) * dim);
            c.ops().glu(in.get(), rows, dim, out.get());
            return c.result(out, {rows, dim});
          },
          py::arg("x"))
      .def(
          "local_attention",
          [](OpsCheck& c, const FloatArray& q, const FloatArray& k, const FloatArray& v,
             const FloatArray& rel, int n_head, int max_past, float cap) {
            const int n = static_cast<int>(q.shape(0)), width = static_cast<int>(q.shape(1));
            if (k.size() != q.size() || v.size() != q.size() ||
                rel.size() != static_cast<py::ssize_t>(max_past + 1) * width ||
                width % n_head != 0) {
              throw py::value_error(
                  "q, k, v must be [n, n_head * head_dim], rel [max_past + 1, same]");
            }
            auto qq = c.floats(q), kk = c.floats(k), vv = c.floats(v), rr = c.floats(rel);
            auto out = c.ops().alloc(q.size());
            c.ops().local_attention(qq.get(), kk.get(), vv.get(), rr.get(), n, n_head,
                                    width / n_head, max_past, cap, out.get());
            return c.result(out, {n, width});
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("rel"), py::arg("n_head"),
          py::arg("max_past"), py::arg("cap"))
      .def(
          "attention",
          [](OpsCheck& c, const FloatArray& q, const FloatArray& k, const FloatArray& v, int n_head,
             int n_head_kv, int head_dim, int window, const IdArray& span_first,
             const IdArray& span_last) {
            const int n = static_cast<int>(q.shape(0));
            if (q.ndim() != 2 || k.ndim() != 2 || v.ndim() != 2 || n < 1 || k.shape(0) != n ||
                v.shape(0) != n || q.shape(1) != n_head * head_dim ||
                k.shape(1) != n_head_kv * head_dim || v.shape(1) != k.shape(1) || n_head_kv < 1 ||
                n_head % n_head_kv != 0 || window < 0) {
              throw py::value_error("q [n, n_head*head_dim], k and v [n, n_head_kv*head_dim]");
            }
            const bool spans = span_first.size() > 0 || span_last.size() > 0;
            if (spans && (span_first.size() != n || span_last.size() != n)) {
              throw py::value_error("span_first and span_last: empty or one position per row");
            }
            if (c.ops().device() >= 0)
              throw py::value_error("the check keeps its pool on the host");
            // One sequence at positions 0 .. n-1 in a pool of one layer that holds all of them.
            ModelConfig config;
            config.n_layer = 1;
            config.sliding_window = window;
            LayerConfig layer;
            layer.is_sliding = window > 0;
            layer.n_head = n_head;
            layer.n_head_kv = n_head_kv;
            layer.head_dim = head_dim;
            config.layers.push_back(layer);
            constexpr int kBlock = 16;
            const int n_blocks = (n + kBlock - 1) / kBlock;
            KvPool pool(config, kBlock, n_blocks, 1, n_blocks, quant::Type::F32, nullptr);
            std::vector<int32_t> positions(n), seqs(n, 0), table(n_blocks), ring_sets{0};
            for (int i = 0; i < n; ++i) positions[i] = i;
            for (int b = 0; b < n_blocks; ++b) table[b] = b;
            TokenBatch batch;
            batch.n = n;
            batch.positions = positions.data();
            batch.seqs = seqs.data();
            batch.n_seq = 1;
            batch.table_width = n_blocks;
            batch.block_tables = table.data();
            batch.ring_sets = ring_sets.data();
            if (spans) {
              batch.span_first = span_first.data();
              batch.span_last = span_last.data();
            }
            auto qq = c.floats(q), kk = c.floats(k), vv = c.floats(v);
            auto out = c.ops().alloc(q.size());
            c.ops().write_kv(kk.get(), vv.get(), batch, 0, pool);
            c.ops().attention(qq.get(), batch, layer, window, pool, out.get());
            return c.result(out, {n, q.shape(1)});
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_head"), py::arg("n_head_kv"),
          py::arg("head_dim"), py::arg("window"), py::arg("span_first"), py::arg("span_last"),
          "Attention of one sequence's n rows at positions 0 .. n-1 over their own keys and "
          "values, as a forward call computes it: causal, the last `window` positions when "
          "window > 0, and over each row's span (span_first / span_last: empty for none).")
      .def(
          "attention_dense",
          [](OpsCheck& c, const FloatArray& q, const FloatArray& k, const FloatArray& v, int n_head,
             int n_head_kv, int head_dim, float scale) {
            const int n = static_cast<int>(q.shape(0));
            if (q.ndim() != 2 || k.ndim() != 2 || v.ndim() != 2 || k.shape(0) != n ||
                v.shape(0) != n || q.shape(1) != n_head * head_dim ||
                k.shape(1) != n_head_kv * head_dim || v.shape(1) != k.shape(1) ||
                n_head % n_head_kv != 0) {
              throw py::value_error("q [n, n_head*head_dim], k and v [n, n_head_kv*head_dim]");
            }
            auto dq = c.floats(q), dk = c.floats(k), dv = c.floats(v);
            auto out = c.ops().alloc(q.size());
            c.ops().attention_dense(dq.get(), dk.get(), dv.get(), n, n_head, n_head_kv, head_dim,
                                    scale, out.get());
            return c.result(out, {n, q.shape(1)});
          },
          py::arg("q"), py::arg("k"), py::arg("v"), py::arg("n_head"), py::arg("n_head_kv"),
          py::arg("head_dim"), py::arg("scale"))
      .def(
          "avg_pool_2d",
          [](OpsCheck& c, const FloatArray& x, int k) {
            if (x.ndim() != 3 || x.shape(0) % k != 0 || x.shape(1) % k != 0) {
              throw py::value_error(
                  "x must be [rows, cols, dim] with rows and cols multiples of k");
            }
            const int rows = static_cast<int>(x.shape(0)), cols = static_cast<int>(x.shape(1));
            const int dim = static_cast<int>(x.shape(2));
            auto in = c.floats(x);
            auto out = c.ops().alloc(x.size() / (static_cast<size_t>(k) * k));
            c.ops().avg_pool_2d(in.get(), rows, cols, dim, k, out.get());
            return c.result(out, {rows / k, cols / k, dim});
          },
          py::arg("x"), py::arg("k"))
      .def(
          "rope_2d",
          [](OpsCheck& c, const FloatArray& x, const IdArray& pos_x, const IdArray& pos_y,
             int n_head, int head_dim, float base) {
            const int n = static_cast<int>(pos_x.size());
            if (pos_y.size() != n || x.size() != static_cast<py::ssize_t>(n) * n_head * head_dim) {
              throw py::value_error("x must be [n, n_head*head_dim] with n x and y positions");
            }
            auto in = c.floats(x);
            auto px = c.ids(pos_x), py_ = c.ids(pos_y);
            c.ops().rope_2d(in.get(), px.get(), py_.get(), n, n_head, head_dim, base);
            return c.result(in, {n, static_cast<py::ssize_t>(n_head) * head_dim});
          },
          py::arg("x"), py::arg("pos_x"), py::arg("pos_y"), py::arg("n_head"), py::arg("head_dim"),
          py::arg("base"))
      .def(
          "argmax",
          [](OpsCheck& c, const FloatArray& x) {
            const int rows = static_cast<int>(x.shape(0)), cols = static_cast<int>(x.shape(1));
            auto in = c.floats(x);
            auto ids = c.ops().alloc_ids(rows);
            auto logprobs = c.ops().alloc(rows);
            c.ops().argmax(in.get(), rows, cols, ids.get(), logprobs.get());
            IdArray out_ids(rows);
            c.ops().read_ids(ids.get(), rows, out_ids.mutable_data());
            return py::make_tuple(out_ids, c.result(logprobs, {rows}));
          },
          py::arg("x"))
      .def(
          "clustered_logits",
          [](OpsCheck& c, int type_id, const ByteArray& table, int64_t cols, int64_t rows,
             const FloatArray& x, const FloatArray& scores, int top_k, const IdArray& clusters) {
            if (x.ndim() != 2 || x.shape(1) != cols || scores.ndim() != 2 ||
                scores.shape(0) != x.shape(0) || clusters.ndim() != 2 ||
                clusters.shape(0) != scores.shape(1) || top_k < 1 || top_k > scores.shape(1)) {
              throw py::value_error(
                  "x must be [n, cols], scores [n, clusters], clusters [clusters, size] and "
                  "top_k within 1..clusters");
            }
            for (py::ssize_t i = 0; i < clusters.size(); ++i) {
              if (clusters.data()[i] < 0 || clusters.data()[i] >= rows) {
                throw py::value_error("cluster token ids must be rows of the table");
              }
            }
            const int n = static_cast<int>(x.shape(0));
            c.reserve(n, cols);
            const Weight w = c.weight(type_id, table, cols, rows);
            auto in = c.floats(x);
            auto s = c.floats(scores);
            auto ids = c.ids(clusters);
            auto out = c.ops().alloc(static_cast<size_t>(n) * rows);
            c.ops().clustered_logits(w, in.get(), n, s.get(), static_cast<int>(scores.shape(1)),
                                     top_k, ids.get(), static_cast<int>(clusters.shape(1)),
                                     out.get());
            return c.result(out, {n, rows});
          },
          py::arg("type_id"), py::arg("table"), py::arg("cols"), py::arg("rows"), py::arg("x"),
          py::arg("scores"), py::arg("top_k"), py::arg("clusters"),
          "The centroid-masked head: row r of x scores the tokens of the top_k clusters of "
          "scores[r] (rows of clusters), every other token the lowest of those minus 1.")
      .def(
          "moe",
          [](OpsCheck& c, const FloatArray& router_logits, int k, int gate_up_type,
             const ByteArray& gate_up, int down_type, const ByteArray& down, int64_t n_ff,
             const FloatArray& down_scale, const FloatArray& x) {
            const int n = static_cast<int>(x.shape(0));
            const int64_t n_embd = x.shape(1);
            const int n_expert = static_cast<int>(router_logits.shape(1));
            c.reserve(n, n_embd, 1, 1, k, n_ff);
            const Weight gu = c.weight(gate_up_type, gate_up, n_embd, 2 * n_ff, n_expert);
            const Weight dn = c.weight(down_type, down, n_ff, n_embd, n_expert);
            auto logits = c.floats(router_logits);
            auto scale = c.floats(down_scale);
            auto in = c.floats(x);
            auto ids = c.ops().alloc_ids(static_cast<size_t>(n) * k);
            auto weights = c.ops().alloc(static_cast<size_t>(n) * k);
            auto out = c.ops().alloc(x.size());
            c.ops().moe_route(logits.get(), n, n_expert, k, ids.get(), weights.get());
            c.ops().moe_experts(gu, dn, scale.get(), in.get(), ids.get(), weights.get(), n, k,
                                out.get());
            IdArray out_ids({n, k});
            c.ops().read_ids(ids.get(), out_ids.size(), out_ids.mutable_data());
            return py::make_tuple(out_ids, c.result(weights, {n, k}), c.result(out, {n, n_embd}));
          },
          py::arg("router_logits"), py::arg("k"), py::arg("gate_up_type"), py::arg("gate_up"),
          py::arg("down_type"), py::arg("down"), py::arg("n_ff"), py::arg("down_scale"),
          py::arg("x"),
          "Route then run the chosen experts (gate_up and down stacked per expert, n_ff wide "
          "inside): (expert ids, their weights, output).");
}
