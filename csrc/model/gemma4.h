// The Gemma 4 text model: weights bound to the mapped GGUF, and one forward pass for any batch
// of (sequence, position, token), so prefill and decode are the same call. The model holds no
// sequence state: the KV pool and where each sequence lives in it come with every call.
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kv/kv_pool.h"
#include "model/config.h"
#include "model/decoder_layer.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

class Gemma4Model {
 public:
  // n_batch: the most tokens one forward call takes (the scratch activations are sized by it).
  Gemma4Model(const std::string& path, const std::vector<TensorEntry>& tensors, ModelConfig config,
              int n_batch, std::unique_ptr<Ops> ops);

  const ModelConfig& config() const { return config_; }
  int n_batch() const { return n_batch_; }

  // One forward call, as the host describes it: row i is tokens[i] at positions[i] of the call's
  // sequence seqs[i]; sequence s keeps its full-attention KV in the blocks of its row of
  // block_tables (table_width ids each, -1 for none) and its sliding KV in ring set ring_sets[s].
  // The logits of the rows in logit_rows come back whole; of the rows in argmax_rows only the
  // most likely token and its log-probability, chosen where the model computes; of the rows in
  // hidden_rows the final hidden state (after the output norm, before the head: what a drafter
  // continues from).
  // Rows listed in embedding_rows take the matching rows of `embeddings` ([rows, n_embd], as
  // they are, unscaled) in place of their tokens' embeddings (an image's soft tokens); their
  // per-layer embeddings are computed from their token ids (the padding id, for media) and the
  // embeddings given.
  struct Batch {
    std::vector<int32_t> tokens, positions, seqs;
    std::vector<int32_t> embedding_rows;
    std::vector<float> embeddings;
    std::vector<int32_t> block_tables;
    int table_width = 0;
    std::vector<int32_t> ring_sets;
    std::vector<int32_t> logit_rows, argmax_rows, hidden_rows;
    // Empty, or for every row its span's first and last position (see TokenBatch).
    std::vector<int32_t> span_first, span_last;
  };
  struct Result {
    std::vector<float> logits;    // [logit_rows, vocab]
    std::vector<int32_t> argmax;  // [argmax_rows]: the id of each row's largest logit
    std::vector<float> logprobs;  // [argmax_rows]: its log-probability
    std::vector<float> hidden;    // [hidden_rows, n_embd]
  };

  // Runs one batch. Each sequence's rows must be consecutive positions in order, and every
  // position before them must already be in the pool. Stores the batch's keys and values in the
  // pool and returns the outputs the batch asks for. Everything the caller passes (block ids
  // included: they may come from another process) is checked before anything is written:
  // std::invalid_argument says what is wrong.
  Result forward(KvPool& pool, const Batch& batch);

  // What a drafter built on this model computes with: the same backend (one computation at a
  // time, under compute_mutex) and the target's token embedding table, read where it lies.
  Ops& ops() { return *ops_; }
  std::mutex& compute_mutex() { return forward_mutex_; }
  const Weight& token_embd() const { return token_embd_; }
  const Ops::Limits& limits() const { return limits_; }
  // Checks that the pool lives where this model computes and was laid out for it.
  void validate_pool(const KvPool& pool) const;

 private:
  void validate_batch(const KvPool& pool, const TokenBatch& batch) const;
  // Checks that the backend attends spans and that each row's span holds it and lies in the
  // call (its sequence's positions first[seq] .. last[seq]).
  void validate_spans(const TokenBatch& batch, const std::vector<int>& first,
                      const std::vector<int>& last) const;
  void run_layer(int il, const TokenBatch& batch, KvPool& pool);
  void per_layer_inputs(const TokenBatch& batch);
  // Stages the embeddings that replace rows of the batch; returns how many there are.
  int stage_embeddings(const Batch& in);

  ModelConfig config_;
  int n_batch_;
  bool has_sliding_kv_;  // whether any layer stores KV in the pool's rings
  WeightTable weights_;
  std::unique_ptr<Ops> ops_;
  Ops::Limits limits_;
  std::mutex forward_mutex_;  // one forward at a time: the scratch buffers are shared

  Weight token_embd_, output_, output_norm_, rope_freqs_;
  Weight ple_token_embd_, ple_model_proj_, ple_proj_norm_;
  std::vector<LayerWeights> layers_;

  // Scratch activations, sized for n_batch tokens.
  std::unique_ptr<LayerActivations> act_;
  std::shared_ptr<float> ple_, ple_gate_, logits_, logprobs_;
  std::shared_ptr<int32_t> argmax_;
  // The batch's token embeddings followed by the embeddings given, and for each row of the
  // batch the row of that table it takes (Batch::embedding_rows).
  std::shared_ptr<float> given_;
  std::shared_ptr<int32_t> given_rows_;
};

}  // namespace pg4
