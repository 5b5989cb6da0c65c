#include "model/gemma4.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "quant/types.h"

namespace pg4 {

namespace {

constexpr int kLogitRowsPerChunk = 32;  // bounds the logits scratch for long prompts

std::invalid_argument error(const std::string& message) { return std::invalid_argument(message); }

}  // namespace

Gemma4Model::Gemma4Model(const std::string& path, const std::vector<TensorEntry>& tensors,
                         ModelConfig config, int n_batch, std::unique_ptr<Ops> ops)
    : config_(std::move(config)),
      n_batch_(n_batch),
      has_sliding_kv_(std::any_of(config_.layers.begin(), config_.layers.end(),
                                  [](const LayerConfig& l) { return l.has_kv && l.is_sliding; })),
      weights_(path, tensors),
      ops_(std::move(ops)) {
  if (n_batch < 1) throw error("n_batch must be at least 1");
  // The scalars the model itself multiplies by are read while the weights are host memory.
  std::vector<float> output_scales(config_.layers.size(), 1.0f);
  for (const LayerConfig& lc : config_.layers) {
    const std::string name = "blk." + std::to_string(lc.index) + ".layer_output_scale.weight";
    if (weights_.has(name)) output_scales[lc.index] = weights_.scalar(name);
  }
  // The per-layer-embedding table is gigabytes of which a step reads one row per token.
  weights_.place(*ops_, "per_layer_token_embd.weight");

  token_embd_ = weights_.get("token_embd.weight");
  output_norm_ = weights_.get("output_norm.weight");
  output_ = config_.has_output ? weights_.get("output.weight") : token_embd_;
  rope_freqs_ = weights_.get("rope_freqs.weight", false);
  if (config_.n_embd_per_layer > 0) {
    ple_token_embd_ = weights_.get("per_layer_token_embd.weight");
    ple_model_proj_ = weights_.get("per_layer_model_proj.weight");
    ple_proj_norm_ = weights_.get("per_layer_proj_norm.weight");
  }
  int max_q = 0, max_kv = 0, max_ff = config_.n_ff_expert * 2;
  for (const LayerConfig& lc : config_.layers) {
    const std::string p = "blk." + std::to_string(lc.index) + ".";
    LayerWeights lw = common_layer_weights(weights_, lc.index);
    lw.output_scale_value = output_scales[lc.index];
    if (lc.has_kv) {
      lw.wk = weights_.get(p + "attn_k.weight");
      lw.k_norm = weights_.get(p + "attn_k_norm.weight");
      lw.wv = weights_.get(p + "attn_v.weight", lc.has_v_proj);
    }
    if (lc.is_moe) {
      lw.moe_router = weights_.get(p + "ffn_gate_inp.weight");
      lw.moe_router_scale = weights_.get(p + "ffn_gate_inp.scale");
      lw.moe_gate_up = weights_.get(p + "ffn_gate_up_exps.weight");
      lw.moe_down = weights_.get(p + "ffn_down_exps.weight");
      lw.moe_down_scale = weights_.get(p + "ffn_down_exps.scale");
      lw.post_ffw_norm_1 = weights_.get(p + "post_ffw_norm_1.weight");
      lw.pre_ffw_norm_2 = weights_.get(p + "pre_ffw_norm_2.weight");
      lw.post_ffw_norm_2 = weights_.get(p + "post_ffw_norm_2.weight");
    }
    if (config_.n_embd_per_layer > 0) {
      lw.ple_gate = weights_.get(p + "inp_gate.weight");
      lw.ple_proj = weights_.get(p + "proj.weight");
      lw.ple_post_norm = weights_.get(p + "post_norm.weight");
    }
    layers_.push_back(lw);
    max_q = std::max(max_q, lc.n_head * lc.head_dim);
    max_kv = std::max(max_kv, lc.n_head_kv * lc.head_dim);
    max_ff = std::max(max_ff, lc.n_ff);
  }

  limits_.n_batch = n_batch_;
  limits_.max_cols = weights_.max_cols();
  for (const LayerConfig& lc : config_.layers) {
    limits_.max_heads = std::max(limits_.max_heads, lc.n_head);
    limits_.max_head_dim = std::max(limits_.max_head_dim, lc.head_dim);
  }
  limits_.n_expert_used = config_.n_expert_used;
  limits_.n_ff_expert = config_.n_ff_expert;
  ops_->reserve(limits_);

  const size_t n = static_cast<size_t>(n_batch_);
  LayerActivations::Sizes sizes;
  sizes.n = n;
  sizes.embd = static_cast<size_t>(config_.n_embd);
  sizes.q = static_cast<size_t>(max_q);
  sizes.kv = static_cast<size_t>(max_kv);
  sizes.ff = static_cast<size_t>(max_ff);
  sizes.n_expert = config_.n_expert;
  sizes.n_expert_used = config_.n_expert_used;
  act_ = std::make_unique<LayerActivations>(*ops_, sizes);
  const size_t ple_width = static_cast<size_t>(config_.n_embd_per_layer) * config_.n_layer;
  ple_ = ops_->alloc(std::max<size_t>(1, n * ple_width * 2));
  ple_gate_ = ops_->alloc(std::max<size_t>(1, n * config_.n_embd_per_layer));
  logits_ = ops_->alloc(static_cast<size_t>(kLogitRowsPerChunk) * config_.vocab_size);
  argmax_ = ops_->alloc_ids(n);
  logprobs_ = ops_->alloc(n);
  given_ = ops_->alloc(2 * n * config_.n_embd);
  given_rows_ = ops_->alloc_ids(n);
}

int Gemma4Model::stage_embeddings(const Batch& in) {
  const size_t n = in.tokens.size();
  const size_t m = in.embedding_rows.size();
  const size_t embd = static_cast<size_t>(config_.n_embd);
  if (in.embeddings.size() != m * embd) {
    throw error("embeddings must hold n_embd (" + std::to_string(embd) +
                ") values for each of the " + std::to_string(m) + " embedding rows");
  }
  if (m == 0) return 0;
  // Row i of the batch reads row i of the token embeddings, or row n + j of the table for the
  // j-th embedding given.
  std::vector<int32_t> rows(n);
  for (size_t i = 0; i < n; ++i) rows[i] = static_cast<int32_t>(i);
  std::vector<bool> taken(n, false);
  for (size_t j = 0; j < m; ++j) {
    const int32_t row = in.embedding_rows[j];
    if (row < 0 || static_cast<size_t>(row) >= n || taken[row]) {
      throw error("embedding row " + std::to_string(row) +
                  " is not a distinct row of the batch's " + std::to_string(n));
    }
    taken[row] = true;
    rows[row] = static_cast<int32_t>(n + j);
  }
  for (float value : in.embeddings) {
    if (!std::isfinite(value)) throw error("embeddings must be finite");
  }
  ops_->upload(given_.get() + n * embd, in.embeddings.data(), m * embd * sizeof(float));
  ops_->upload(given_rows_.get(), rows.data(), n * sizeof(int32_t));
  return static_cast<int>(m);
}

void Gemma4Model::validate_pool(const KvPool& pool) const {
  if (!pool.fits(config_)) throw error("the KV pool was laid out for another model");
  if (pool.device() != ops_->device()) {
    throw error(pool.device() < 0
                    ? "the KV pool is in host memory; this model computes on CUDA device " +
                          std::to_string(ops_->device())
                    : "the KV pool is on CUDA device " + std::to_string(pool.device()) +
                          "; this model computes " +
                          (ops_->device() < 0 ? std::string("on the CPU")
                                              : "on device " + std::to_string(ops_->device())));
  }
}

void Gemma4Model::validate_batch(const KvPool& pool, const TokenBatch& batch) const {
  validate_pool(pool);
  const int n_seq = batch.n_seq;
  if (batch.n == 0) throw error("empty batch");
  const int block_size = pool.block_size();
  // Each sequence's first and last position in this call, to check that its rows continue one
  // another and, below, that the pool holds everything they attend to.
  std::vector<int> first(n_seq, -1), last(n_seq, -1);
  for (int i = 0; i < batch.n; ++i) {
    const int32_t token = batch.tokens[i];
    if (token < 0 || token >= config_.vocab_size) {
      throw error("token id " + std::to_string(token) + " out of range [0, " +
                  std::to_string(config_.vocab_size) + ")");
    }
    const int32_t seq = batch.seqs[i];
    if (seq < 0 || seq >= n_seq) {
      throw error("row " + std::to_string(i) + " names sequence " + std::to_string(seq) +
                  ", not one of the call's " + std::to_string(n_seq));
    }
    const int32_t pos = batch.positions[i];
    if (last[seq] < 0 ? pos < 0 : pos != static_cast<int64_t>(last[seq]) + 1) {
      throw error("position " + std::to_string(pos) + " of sequence " + std::to_string(seq) +
                  " does not continue its rows (positions must be consecutive and increasing)");
    }
    if (last[seq] < 0) first[seq] = pos;
    last[seq] = pos;
  }
  for (int seq = 0; seq < n_seq; ++seq) {
    const int32_t ring_set = batch.ring_sets[seq];
    if (ring_set < 0 || ring_set >= pool.n_ring_sets()) {
      throw error("ring set " + std::to_string(ring_set) + " of sequence " + std::to_string(seq) +
                  " out of range [0, " + std::to_string(pool.n_ring_sets()) + ")");
    }
    if (last[seq] < 0) continue;
    // Full-attention layers read every position up to the last, through the table.
    const int last_block = last[seq] / block_size;
    if (last_block >= batch.table_width) {
      throw error("position " + std::to_string(last[seq]) + " of sequence " + std::to_string(seq) +
                  " has no entry in its block table (width " + std::to_string(batch.table_width) +
                  ")");
    }
    if (last_block >= pool.n_blocks()) {
      throw error("position " + std::to_string(last[seq]) + " of sequence " + std::to_string(seq) +
                  " is beyond what the pool's " + std::to_string(pool.n_blocks()) + " blocks of " +
                  std::to_string(block_size) + " positions hold");
    }
    const int32_t* table = batch.table(seq);
    for (int b = 0; b <= last_block; ++b) {
      if (table[b] < 0 || table[b] >= pool.n_blocks()) {
        throw error("block table entry " + std::to_string(b) + " of sequence " +
                    std::to_string(seq) + " is " + std::to_string(table[b]) +
                    ", not a block id in [0, " + std::to_string(pool.n_blocks()) + ")");
      }
    }
    // The blocks from the first key the earliest row attends to through the last row written
    // must all be distinct in the ring, or a write would overwrite a key still read.
    if (has_sliding_kv_) {
      const int oldest = std::max(0, first[seq] - config_.sliding_window + 1);
      if (last_block - oldest / block_size >= pool.ring_blocks()) {
        throw error("the ring of " + std::to_string(pool.ring_blocks()) +
                    " blocks cannot hold the sliding window of sequence " + std::to_string(seq) +
                    " over positions " + std::to_string(first[seq]) + ".." +
                    std::to_string(last[seq]) + ": use shorter chunks or larger rings");
      }
    }
  }
  for (int i = 0; i < batch.n_outputs; ++i) {
    if (batch.output_rows[i] < 0 || batch.output_rows[i] >= batch.n) {
      throw error("output row out of range");
    }
  }
  if (batch.span_first != nullptr) validate_spans(batch, first, last);
}

void Gemma4Model::validate_spans(const TokenBatch& batch, const std::vector<int>& first,
                                 const std::vector<int>& last) const {
  if (!ops_->attends_spans()) {
    throw error(
        "this backend's attention does not take spans of image tokens attended in both "
        "directions (the unified Gemma 4 models' images): compute them on the CPU");
  }
  // Every key a row's span makes it read must be written by this call or before it, and
  // within the ring's reach (validate_batch's check covers the call's own positions).
  for (int i = 0; i < batch.n; ++i) {
    const int seq = batch.seqs[i];
    const int32_t pos = batch.positions[i];
    const int32_t span_first = batch.span_first[i], span_last = batch.span_last[i];
    if (span_first > pos || span_last < pos) {
      throw error("the span " + std::to_string(span_first) + ".." + std::to_string(span_last) +
                  " of row " + std::to_string(i) + " does not hold its position " +
                  std::to_string(pos));
    }
    if (span_first < first[seq] || span_last > last[seq]) {
      throw error("the span " + std::to_string(span_first) + ".." + std::to_string(span_last) +
                  " of sequence " + std::to_string(seq) + " is not wholly in the call (positions " +
                  std::to_string(first[seq]) + ".." + std::to_string(last[seq]) +
                  "): an image's tokens attend to each other in one call");
    }
  }
}

void Gemma4Model::per_layer_inputs(const TokenBatch& batch) {
  // ple_ holds [n, n_layer * P] token rows, then the projection of the embeddings after them.
  const int P = config_.n_embd_per_layer;
  const size_t width = static_cast<size_t>(P) * config_.n_layer;
  float* rows = ple_.get();
  float* proj = ple_.get() + static_cast<size_t>(batch.n) * width;
  ops_->get_rows(ple_token_embd_, batch.tokens, batch.n, std::sqrt(static_cast<float>(P)), rows);
  ops_->matmul(ple_model_proj_, act_->x.get(), batch.n, proj);
  ops_->scale(proj, 1.0f / std::sqrt(static_cast<float>(config_.n_embd)), batch.n * width);
  ops_->rms_norm(proj, ple_proj_norm_.f32(), batch.n * config_.n_layer, P, config_.rms_eps, proj);
  ops_->add(rows, proj, batch.n * width);
  ops_->scale(rows, 1.0f / std::sqrt(2.0f), batch.n * width);
}

void Gemma4Model::run_layer(int il, const TokenBatch& batch, KvPool& pool) {
  const LayerConfig& lc = config_.layers[il];
  const LayerWeights& lw = layers_[il];
  const LayerActivations& a = *act_;
  const int n = batch.n;
  const int embd = config_.n_embd;
  const float eps = config_.rms_eps;
  const Rope rope = layer_rope(lc, rope_freqs_);
  float* x = a.x.get();

  // Attention block: the projections of h, as products of one input.
  ops_->rms_norm(x, lw.attn_norm.f32(), n, embd, eps, a.h.get());
  Product projections[3] = {{&lw.wq, a.q.get()}};
  int n_projections = 1;
  if (lc.has_kv) {
    projections[n_projections++] = {&lw.wk, a.k.get()};
    if (lw.wv.present()) projections[n_projections++] = {&lw.wv, a.v.get()};
  }
  ops_->matmul_shared(a.h.get(), n, projections, n_projections);
  ops_->rms_norm_rope(a.q.get(), lw.q_norm.f32(), batch.positions, n, lc.n_head, lc.head_dim, eps,
                      rope);
  if (lc.has_kv) {
    if (!lw.wv.present()) {
      // V = K before the norms.
      ops_->copy(a.v.get(), a.k.get(), static_cast<size_t>(n) * lc.n_head_kv * lc.head_dim);
    }
    ops_->store_kv(a.k.get(), a.v.get(), lw.k_norm.f32(), eps, rope, batch, lc, pool);
  }
  attention_output(*ops_, lc, lw, a, batch, lc.is_sliding ? config_.sliding_window : 0, pool, embd,
                   eps);
  feed_forward(*ops_, lc, lw, a, n, embd, eps, config_.n_expert, config_.n_expert_used);

  // Per-layer embedding: gate from the residual, times this layer's slice of the PLE input.
  if (config_.n_embd_per_layer > 0) {
    const int P = config_.n_embd_per_layer;
    ops_->matmul(lw.ple_gate, x, n, ple_gate_.get());
    ops_->gelu_mul(ple_gate_.get(), P, ple_.get() + static_cast<size_t>(il) * P,
                   P * config_.n_layer, n, P, ple_gate_.get());
    ops_->matmul(lw.ple_proj, ple_gate_.get(), n, a.o.get());
    ops_->rms_norm_add(a.o.get(), lw.ple_post_norm.f32(), n, embd, eps, x);
  }
  if (lw.output_scale.present()) {
    ops_->scale(x, lw.output_scale_value, static_cast<size_t>(n) * embd);
  }
}

Gemma4Model::Result Gemma4Model::forward(KvPool& pool, const Batch& in) {
  const size_t n_tokens = in.tokens.size();
  if (in.positions.size() != n_tokens || in.seqs.size() != n_tokens) {
    throw error("tokens, positions and seqs must have the same length");
  }
  if (in.table_width < 0 ||
      in.block_tables.size() != in.ring_sets.size() * static_cast<size_t>(in.table_width)) {
    throw error("block_tables must hold table_width ids for each sequence of ring_sets");
  }
  if (n_tokens > static_cast<size_t>(n_batch_)) {
    throw error("batch of " + std::to_string(n_tokens) + " tokens exceeds n_batch " +
                std::to_string(n_batch_));
  }
  const size_t n_logit_rows = in.logit_rows.size(), n_argmax_rows = in.argmax_rows.size();
  if (n_logit_rows + n_argmax_rows > static_cast<size_t>(n_batch_)) {
    throw error("more output rows than n_batch " + std::to_string(n_batch_));
  }
  const size_t n_hidden_rows = in.hidden_rows.size();
  if (n_hidden_rows > static_cast<size_t>(n_batch_)) {
    throw error("more hidden rows than n_batch " + std::to_string(n_batch_));
  }
  // The logit rows, the argmax rows, then the hidden rows: the backend stages one list of
  // output rows.
  std::vector<int32_t> output_rows(in.logit_rows);
  output_rows.insert(output_rows.end(), in.argmax_rows.begin(), in.argmax_rows.end());
  output_rows.insert(output_rows.end(), in.hidden_rows.begin(), in.hidden_rows.end());
  TokenBatch host;
  host.n = static_cast<int>(n_tokens);
  host.tokens = in.tokens.data();
  host.positions = in.positions.data();
  host.seqs = in.seqs.data();
  host.n_seq = static_cast<int>(in.ring_sets.size());
  host.table_width = in.table_width;
  host.block_tables = in.block_tables.data();
  host.ring_sets = in.ring_sets.data();
  host.n_outputs = static_cast<int>(output_rows.size());
  host.output_rows = output_rows.data();
  if (!in.span_first.empty() || !in.span_last.empty()) {
    if (in.span_first.size() != n_tokens || in.span_last.size() != n_tokens) {
      throw error("span_first and span_last must hold a position for each row of the batch");
    }
    host.span_first = in.span_first.data();
    host.span_last = in.span_last.data();
  }
  std::lock_guard<std::mutex> lock(forward_mutex_);
  validate_batch(pool, host);
  const int n_given = stage_embeddings(in);

  const TokenBatch batch = ops_->stage(host);
  const int embd = config_.n_embd;
  // Everything up to the last layer depends on the host only through the batch's shape.
  ops_->run_step({batch.n, batch.n_seq, batch.table_width, n_given, batch.span_first != nullptr},
                 [&] {
                   const float embd_scale = std::sqrt(static_cast<float>(embd));
                   if (n_given > 0) {
                     ops_->get_rows(token_embd_, batch.tokens, batch.n, embd_scale, given_.get());
                     ops_->copy_rows(given_.get(), given_rows_.get(), batch.n, embd, act_->x.get());
                   } else {
                     ops_->get_rows(token_embd_, batch.tokens, batch.n, embd_scale, act_->x.get());
                   }
                   if (config_.n_embd_per_layer > 0) per_layer_inputs(batch);
                   for (int il = 0; il < config_.n_layer; ++il) run_layer(il, batch, pool);
                 });

  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  Result result;
  result.logits.resize(n_logit_rows * vocab);
  float* hidden = act_->h.get();
  // The final hidden state of output rows [first, first + rows) of the staged list, into hidden.
  auto final_hidden = [&](size_t first, int rows) {
    ops_->copy_rows(act_->x.get(), batch.output_rows + first, rows, embd, hidden);
    ops_->rms_norm(hidden, output_norm_.f32(), rows, embd, config_.rms_eps, hidden);
  };
  // The head over output rows [first, first + rows) of the staged list, into logits_.
  auto head = [&](size_t first, int rows) {
    final_hidden(first, rows);
    ops_->matmul(output_, hidden, rows, logits_.get());
    if (config_.final_logit_softcap > 0.0f) {
      ops_->softcap(logits_.get(), config_.final_logit_softcap, rows * vocab);
    }
  };
  for (size_t first = 0; first < n_logit_rows; first += kLogitRowsPerChunk) {
    const int rows = static_cast<int>(std::min<size_t>(kLogitRowsPerChunk, n_logit_rows - first));
    head(first, rows);
    ops_->read(logits_.get(), rows * vocab, result.logits.data() + first * vocab);
  }
  for (size_t first = 0; first < n_argmax_rows; first += kLogitRowsPerChunk) {
    const int rows = static_cast<int>(std::min<size_t>(kLogitRowsPerChunk, n_argmax_rows - first));
    head(n_logit_rows + first, rows);
    ops_->argmax(logits_.get(), rows, config_.vocab_size, argmax_.get() + first,
                 logprobs_.get() + first);
  }
  if (n_argmax_rows > 0) {
    result.argmax.resize(n_argmax_rows);
    result.logprobs.resize(n_argmax_rows);
    ops_->read_ids(argmax_.get(), n_argmax_rows, result.argmax.data());
    ops_->read(logprobs_.get(), n_argmax_rows, result.logprobs.data());
  }
  if (n_hidden_rows > 0) {
    final_hidden(n_logit_rows + n_argmax_rows, static_cast<int>(n_hidden_rows));
    result.hidden.resize(n_hidden_rows * embd);
    ops_->read(hidden, n_hidden_rows * embd, result.hidden.data());
  }
  return result;
}

}  // namespace pg4
