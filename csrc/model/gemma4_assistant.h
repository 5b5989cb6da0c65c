// The Gemma 4 "assistant" drafter: a few decoder layers that read the target model's KV instead
// of keeping their own, proposing the next tokens of many sequences at once for speculative
// decoding. It computes with the target's backend and its token embedding table, so it is built
// on a target Gemma4Model that must outlive it.
//
// One proposal for a sequence whose KV holds positions 0..P-1, whose newest token s[P] has not
// been run yet, and whose target hidden state (after the output norm) at P-1 is h: each step
// embeds the token with the target's table, joins it with h, projects, runs the layers with the
// queries at position P (every step: the KV is never extended) attending to the target's shared
// KV (full layers: positions 0..P-1; sliding layers: the last window + 1 of them), normalises to
// y, takes the most likely token of y · token_embd^T (or, with the centroid head, of the
// clusters y's centroid scores choose: Ops::clustered_logits) and continues from
// h = post_projection(y).
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include "kv/kv_pool.h"
#include "model/config.h"
#include "model/decoder_layer.h"
#include "model/gemma4.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

struct AssistantConfig {
  // The drafter's own layers, width and vocabulary; a layer's kv_source is the target layer
  // whose KV it reads, has_kv is false for all.
  ModelConfig model;
  int n_embd_target = 0;  // the width of the target's hidden state and embeddings
  // The centroid head, where the file has masked_embd_centroids.weight ([n_embd, n_centroids]):
  // the top centroid_top_k clusters are scored, cluster c being the tokens in row c of
  // token_ordering (a permutation of the vocabulary, n_centroids rows). 0 and empty without.
  int centroid_top_k = 0;
  std::vector<int32_t> token_ordering;
};

class Gemma4Assistant {
 public:
  // max_sequences: the most sequences one call proposes for; max_steps: the most tokens each.
  // std::invalid_argument when the file does not fit the target.
  Gemma4Assistant(Gemma4Model& target, const std::string& path,
                  const std::vector<TensorEntry>& tensors, AssistantConfig config,
                  int max_sequences, int max_steps);

  const AssistantConfig& config() const { return config_; }

  // Sequence i of a call: newest token tokens[i] at position positions[i] (its KV length), the
  // target's final hidden state at the position before in row i of hidden ([n, n_embd_target]),
  // its full-attention KV in the blocks of its row of block_tables (table_width ids) and its
  // sliding KV in ring set ring_sets[i].
  struct Batch {
    std::vector<int32_t> tokens, positions;
    std::vector<float> hidden;
    std::vector<int32_t> block_tables;
    int table_width = 0;
    std::vector<int32_t> ring_sets;
    int steps = 1;
    bool with_logits = false;
  };
  struct Result {
    std::vector<int32_t> tokens;  // [n, steps]: the proposals
    std::vector<float> logits;    // [n, steps, vocab] when asked for
  };

  // Proposes `steps` tokens for every sequence, reading (never writing) the pool.
  Result propose(const KvPool& pool, const Batch& batch);

 private:
  void check_fits_target() const;
  void check_centroid_head() const;
  // logits_ of the n rows of y, by the file's head.
  void output_logits(const float* y, int n);
  void validate(const KvPool& pool, const Batch& batch) const;
  void run_layer(int il, const TokenBatch& attention_batch, const KvPool& pool);

  Gemma4Model& target_;
  AssistantConfig config_;
  int max_sequences_, max_steps_;
  WeightTable weights_;
  Ops& ops_;

  Weight token_embd_, output_norm_, rope_freqs_, pre_projection_, post_projection_, centroids_;
  std::vector<LayerWeights> layers_;

  std::unique_ptr<LayerActivations> act_;
  std::shared_ptr<float> embedded_, joined_, hidden_, logits_, logprobs_, centroid_scores_;
  std::shared_ptr<int32_t> rope_positions_, draft_ids_, token_ordering_;
};

}  // namespace pg4
