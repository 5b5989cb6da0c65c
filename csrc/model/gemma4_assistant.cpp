#include "model/gemma4_assistant.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace pg4 {

namespace {

std::invalid_argument error(const std::string& message) { return std::invalid_argument(message); }

// The larger of each of two backends' limits: the drafter shares the target's backend, whose
// scratch must serve both.
Ops::Limits merged(const Ops::Limits& a, const Ops::Limits& b) {
  Ops::Limits m;
  m.n_batch = std::max(a.n_batch, b.n_batch);
  m.max_cols = std::max(a.max_cols, b.max_cols);
  m.max_heads = std::max(a.max_heads, b.max_heads);
  m.max_head_dim = std::max(a.max_head_dim, b.max_head_dim);
  m.n_expert_used = std::max(a.n_expert_used, b.n_expert_used);
  m.n_ff_expert = std::max(a.n_ff_expert, b.n_ff_expert);
  return m;
}

bool same_limits(const Ops::Limits& a, const Ops::Limits& b) {
  return a.n_batch == b.n_batch && a.max_cols == b.max_cols && a.max_heads == b.max_heads &&
         a.max_head_dim == b.max_head_dim && a.n_expert_used == b.n_expert_used &&
         a.n_ff_expert == b.n_ff_expert;
}

}  // namespace

Gemma4Assistant::Gemma4Assistant(Gemma4Model& target, const std::string& path,
                                 const std::vector<TensorEntry>& tensors, AssistantConfig config,
                                 int max_sequences, int max_steps)
    : target_(target),
      config_(std::move(config)),
      max_sequences_(max_sequences),
      max_steps_(max_steps),
      weights_(path, tensors),
      ops_(target.ops()) {
  if (max_sequences < 1) throw error("max_sequences must be at least 1");
  if (max_steps < 1) throw error("max_steps must be at least 1");
  check_fits_target();
  const ModelConfig& mc = config_.model;
  std::vector<float> output_scales(mc.layers.size(), 1.0f);
  for (const LayerConfig& lc : mc.layers) {
    const std::string name = "blk." + std::to_string(lc.index) + ".layer_output_scale.weight";
    if (weights_.has(name)) output_scales[lc.index] = weights_.scalar(name);
  }

  std::lock_guard<std::mutex> lock(target_.compute_mutex());
  weights_.place(ops_);
  token_embd_ = weights_.get("token_embd.weight");
  output_norm_ = weights_.get("output_norm.weight");
  rope_freqs_ = weights_.get("rope_freqs.weight", false);
  pre_projection_ = weights_.get("nextn.pre_projection.weight");
  post_projection_ = weights_.get("nextn.post_projection.weight");
  centroids_ = weights_.get("masked_embd_centroids.weight", false);
  check_centroid_head();
  int max_q = 1, max_ff = 1;
  Ops::Limits limits;
  limits.n_batch = max_sequences_;
  limits.max_cols = weights_.max_cols();
  for (const LayerConfig& lc : mc.layers) {
    LayerWeights lw = common_layer_weights(weights_, lc.index);
    lw.output_scale_value = output_scales[lc.index];
    layers_.push_back(lw);
    max_q = std::max(max_q, lc.n_head * lc.head_dim);
    max_ff = std::max(max_ff, lc.n_ff);
    limits.max_heads = std::max(limits.max_heads, lc.n_head);
    limits.max_head_dim = std::max(limits.max_head_dim, lc.head_dim);
  }
  // Reserving replaces the backend's scratch, so it happens only where the target's is short.
  const Ops::Limits both = merged(target_.limits(), limits);
  if (!same_limits(both, target_.limits())) ops_.reserve(both);

  const size_t n = static_cast<size_t>(max_sequences_);
  LayerActivations::Sizes sizes;
  sizes.n = n;
  sizes.embd = static_cast<size_t>(mc.n_embd);
  sizes.q = static_cast<size_t>(max_q);
  sizes.ff = static_cast<size_t>(max_ff);
  act_ = std::make_unique<LayerActivations>(ops_, sizes);
  const size_t target_embd = static_cast<size_t>(config_.n_embd_target);
  embedded_ = ops_.alloc(n * target_embd);
  joined_ = ops_.alloc(n * 2 * target_embd);
  hidden_ = ops_.alloc(n * target_embd);
  logits_ = ops_.alloc(n * static_cast<size_t>(mc.vocab_size));
  logprobs_ = ops_.alloc(n);
  rope_positions_ = ops_.alloc_ids(n);
  draft_ids_ = ops_.alloc_ids(n * static_cast<size_t>(max_steps_));
  if (centroids_.present()) {
    centroid_scores_ = ops_.alloc(n * static_cast<size_t>(centroids_.rows()));
    token_ordering_ = ops_.alloc_ids(config_.token_ordering.size());
    ops_.upload(token_ordering_.get(), config_.token_ordering.data(),
                config_.token_ordering.size() * sizeof(int32_t));
  }
}

void Gemma4Assistant::check_centroid_head() const {
  const int top_k = config_.centroid_top_k;
  const std::vector<int32_t>& ordering = config_.token_ordering;
  if (!centroids_.present()) {
    if (top_k != 0 || !ordering.empty()) {
      throw error("a centroid top-k and token ordering need masked_embd_centroids.weight");
    }
    return;
  }
  const ModelConfig& mc = config_.model;
  const int64_t n_centroids = centroids_.rows();
  if (centroids_.cols() != mc.n_embd || centroids_.ne[2] != 1 || mc.vocab_size % n_centroids) {
    throw error("masked_embd_centroids.weight must be [" + std::to_string(mc.n_embd) +
                ", a number of centroids dividing the vocabulary of " +
                std::to_string(mc.vocab_size) + "]");
  }
  if (top_k < 1 || top_k > n_centroids) {
    throw error("centroid top-k " + std::to_string(top_k) + " is not within 1.." +
                std::to_string(n_centroids));
  }
  std::vector<bool> seen(mc.vocab_size, false);
  bool permutation = ordering.size() == static_cast<size_t>(mc.vocab_size);
  for (size_t i = 0; permutation && i < ordering.size(); ++i) {
    permutation = ordering[i] >= 0 && ordering[i] < mc.vocab_size && !seen[ordering[i]];
    if (permutation) seen[ordering[i]] = true;
  }
  if (!permutation) {
    throw error("the token ordering is not a permutation of the " + std::to_string(mc.vocab_size) +
                " token ids");
  }
}

void Gemma4Assistant::output_logits(const float* y, int n) {
  if (!centroids_.present()) {
    ops_.matmul(token_embd_, y, n, logits_.get());
    return;
  }
  const int n_centroids = static_cast<int>(centroids_.rows());
  ops_.matmul(centroids_, y, n, centroid_scores_.get());
  ops_.clustered_logits(token_embd_, y, n, centroid_scores_.get(), n_centroids,
                        config_.centroid_top_k, token_ordering_.get(),
                        config_.model.vocab_size / n_centroids, logits_.get());
}

void Gemma4Assistant::check_fits_target() const {
  const ModelConfig& target = target_.config();
  const ModelConfig& mc = config_.model;
  if (config_.n_embd_target != target.n_embd) {
    throw error("the drafter continues from hidden states of width " +
                std::to_string(config_.n_embd_target) + ", the target's are " +
                std::to_string(target.n_embd));
  }
  if (mc.vocab_size != target.vocab_size) {
    throw error("the drafter's vocabulary has " + std::to_string(mc.vocab_size) +
                " tokens, the target's " + std::to_string(target.vocab_size));
  }
  if (mc.sliding_window != target.sliding_window) {
    throw error("the drafter's sliding window is " + std::to_string(mc.sliding_window) +
                ", the target's " + std::to_string(target.sliding_window));
  }
  for (const LayerConfig& lc : mc.layers) {
    const std::string layer = "drafter layer " + std::to_string(lc.index);
    if (lc.has_kv || lc.is_moe || lc.kv_source < 0 || lc.kv_source >= target.n_layer) {
      throw error(layer + " must read the KV of a target layer");
    }
    const LayerConfig& source = target.layers[lc.kv_source];
    if (!source.has_kv || source.is_sliding != lc.is_sliding) {
      throw error(layer + " reads target layer " + std::to_string(lc.kv_source) +
                  ", which stores no KV of its kind");
    }
    if (source.head_dim != lc.head_dim || source.n_head_kv != lc.n_head_kv ||
        lc.n_head % lc.n_head_kv != 0) {
      throw error(layer + " has " + std::to_string(lc.n_head) + " heads of " +
                  std::to_string(lc.head_dim) + " over " + std::to_string(lc.n_head_kv) +
                  " KV heads; target layer " + std::to_string(lc.kv_source) + " stores " +
                  std::to_string(source.n_head_kv) + " KV heads of " +
                  std::to_string(source.head_dim));
    }
  }
}

void Gemma4Assistant::validate(const KvPool& pool, const Batch& b) const {
  target_.validate_pool(pool);
  const size_t n = b.tokens.size();
  if (n == 0) throw error("no sequences to propose for");
  if (n > static_cast<size_t>(max_sequences_)) {
    throw error(std::to_string(n) + " sequences exceed the drafter's max_sequences " +
                std::to_string(max_sequences_));
  }
  if (b.steps < 1 || b.steps > max_steps_) {
    throw error("cannot propose " + std::to_string(b.steps) + " tokens: between 1 and " +
                std::to_string(max_steps_));
  }
  if (b.positions.size() != n || b.ring_sets.size() != n ||
      b.hidden.size() != n * static_cast<size_t>(config_.n_embd_target) || b.table_width < 0 ||
      b.block_tables.size() != n * static_cast<size_t>(b.table_width)) {
    throw error(
        "tokens, positions, ring sets, hidden rows and block tables must describe the "
        "same sequences");
  }
  const int block_size = pool.block_size();
  const int window = config_.model.sliding_window + 1;
  const bool has_sliding = std::any_of(config_.model.layers.begin(), config_.model.layers.end(),
                                       [](const LayerConfig& l) { return l.is_sliding; });
  for (size_t i = 0; i < n; ++i) {
    const std::string seq = "sequence " + std::to_string(i);
    const int32_t token = b.tokens[i], pos = b.positions[i];
    if (token < 0 || token >= config_.model.vocab_size) {
      throw error(seq + ": token id " + std::to_string(token) + " out of range [0, " +
                  std::to_string(config_.model.vocab_size) + ")");
    }
    if (pos < 1) throw error(seq + ": a proposal needs at least one position in the KV");
    if (b.ring_sets[i] < 0 || b.ring_sets[i] >= pool.n_ring_sets()) {
      throw error(seq + ": ring set " + std::to_string(b.ring_sets[i]) + " out of range [0, " +
                  std::to_string(pool.n_ring_sets()) + ")");
    }
    const int last_block = (pos - 1) / block_size;
    if (last_block >= b.table_width || last_block >= pool.n_blocks()) {
      throw error(seq + ": position " + std::to_string(pos - 1) + " has no block");
    }
    for (int k = 0; k <= last_block; ++k) {
      const int32_t id = b.block_tables[i * b.table_width + k];
      if (id < 0 || id >= pool.n_blocks()) {
        throw error(seq + ": block table entry " + std::to_string(k) + " is " + std::to_string(id) +
                    ", not a block id in [0, " + std::to_string(pool.n_blocks()) + ")");
      }
    }
    const int oldest = std::max(0, pos - window);
    if (has_sliding && last_block - oldest / block_size >= pool.ring_blocks()) {
      throw error(seq + ": the ring of " + std::to_string(pool.ring_blocks()) +
                  " blocks cannot hold positions " + std::to_string(oldest) + ".." +
                  std::to_string(pos - 1) + " the drafter's sliding layers read");
    }
  }
}

void Gemma4Assistant::run_layer(int il, const TokenBatch& attention_batch, const KvPool& pool) {
  const ModelConfig& mc = config_.model;
  const LayerConfig& lc = mc.layers[il];
  const LayerWeights& lw = layers_[il];
  const LayerActivations& a = *act_;
  const int n = attention_batch.n;
  ops_.rms_norm(a.x.get(), lw.attn_norm.f32(), n, mc.n_embd, mc.rms_eps, a.h.get());
  ops_.matmul(lw.wq, a.h.get(), n, a.q.get());
  ops_.rms_norm_rope(a.q.get(), lw.q_norm.f32(), rope_positions_.get(), n, lc.n_head, lc.head_dim,
                     mc.rms_eps, layer_rope(lc, rope_freqs_));
  // The query at P reads KV up to P - 1, so the attention batch's rows sit at P - 1: a window
  // one wider than the target's then covers the window + 1 positions the drafter sees.
  attention_output(ops_, lc, lw, a, attention_batch, lc.is_sliding ? mc.sliding_window + 1 : 0,
                   pool, mc.n_embd, mc.rms_eps);
  feed_forward(ops_, lc, lw, a, n, mc.n_embd, mc.rms_eps, 0, 0);
  if (lw.output_scale.present()) {
    ops_.scale(a.x.get(), lw.output_scale_value, static_cast<size_t>(n) * mc.n_embd);
  }
}

Gemma4Assistant::Result Gemma4Assistant::propose(const KvPool& pool, const Batch& b) {
  std::lock_guard<std::mutex> lock(target_.compute_mutex());
  validate(pool, b);
  const ModelConfig& mc = config_.model;
  const int n = static_cast<int>(b.tokens.size());
  const int target_embd = config_.n_embd_target;
  const size_t vocab = static_cast<size_t>(mc.vocab_size);

  std::vector<int32_t> kv_positions(n), seqs(n);
  for (int i = 0; i < n; ++i) {
    kv_positions[i] = b.positions[i] - 1;
    seqs[i] = i;
  }
  TokenBatch host;
  host.n = n;
  host.tokens = b.tokens.data();
  host.positions = kv_positions.data();
  host.seqs = seqs.data();
  host.n_seq = n;
  host.table_width = b.table_width;
  host.block_tables = b.block_tables.data();
  host.ring_sets = b.ring_sets.data();
  const TokenBatch attention_batch = ops_.stage(host);
  ops_.upload(rope_positions_.get(), b.positions.data(), n * sizeof(int32_t));
  ops_.upload(draft_ids_.get(), b.tokens.data(), n * sizeof(int32_t));
  ops_.upload(hidden_.get(), b.hidden.data(), b.hidden.size() * sizeof(float));

  Result result;
  if (b.with_logits) result.logits.resize(static_cast<size_t>(n) * b.steps * vocab);
  std::vector<float> step_logits(b.with_logits ? n * vocab : 0);
  float* x = act_->x.get();
  float* y = act_->h.get();
  for (int step = 0; step < b.steps; ++step) {
    // The previous token: the newest one (which step 0's proposals then replace), then each
    // step's proposal.
    const int32_t* tokens = draft_ids_.get() + static_cast<size_t>(std::max(0, step - 1)) * n;
    int32_t* proposals = draft_ids_.get() + static_cast<size_t>(step) * n;
    ops_.get_rows(target_.token_embd(), tokens, n, std::sqrt(static_cast<float>(target_embd)),
                  embedded_.get());
    ops_.concat_rows(embedded_.get(), target_embd, hidden_.get(), target_embd, n, joined_.get());
    ops_.matmul(pre_projection_, joined_.get(), n, x);
    for (int il = 0; il < mc.n_layer; ++il) run_layer(il, attention_batch, pool);
    ops_.rms_norm(x, output_norm_.f32(), n, mc.n_embd, mc.rms_eps, y);
    output_logits(y, n);
    if (b.with_logits) {
      ops_.read(logits_.get(), n * vocab, step_logits.data());
      for (int i = 0; i < n; ++i) {
        std::copy_n(step_logits.data() + i * vocab, vocab,
                    result.logits.data() + (static_cast<size_t>(i) * b.steps + step) * vocab);
      }
    }
    ops_.argmax(logits_.get(), n, mc.vocab_size, proposals, logprobs_.get());
    ops_.matmul(post_projection_, y, n, hidden_.get());
  }
  std::vector<int32_t> by_step(static_cast<size_t>(n) * b.steps);
  ops_.read_ids(draft_ids_.get(), by_step.size(), by_step.data());
  result.tokens.resize(by_step.size());
  for (int step = 0; step < b.steps; ++step) {
    for (int i = 0; i < n; ++i) result.tokens[i * b.steps + step] = by_step[step * n + i];
  }
  return result;
}

}  // namespace pg4
