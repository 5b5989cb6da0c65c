// Per-sequence K/V storage for every layer that owns KV (shared layers read their source's).
//
// A sequence lives in a slot. Full-attention layers keep every position up to n_ctx; sliding
// layers keep a ring of window + n_batch positions: the window a token may see, plus room for
// one batch of new tokens so writing a batch never overwrites a key an earlier token of that
// same batch still attends to.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "model/config.h"

namespace pg4 {

class KvCache {
 public:
  KvCache(const ModelConfig& config, int n_slots, int n_ctx, int n_batch);

  int n_slots() const { return n_slots_; }
  int n_ctx() const { return n_ctx_; }
  int length(int slot) const { return lengths_[slot]; }
  void set_length(int slot, int length) { lengths_[slot] = length; }

  // Ring capacity (positions) of a layer's cache; position p lives at p % capacity.
  int capacity(int layer) const { return layers_[layer].capacity; }
  int row_floats(int layer) const { return layers_[layer].row_floats; }
  float* key(int layer, int slot, int pos) { return row(layers_[layer].keys, layer, slot, pos); }
  float* value(int layer, int slot, int pos) {
    return row(layers_[layer].values, layer, slot, pos);
  }

  size_t bytes() const;

 private:
  struct LayerStore {
    int capacity = 0;
    int row_floats = 0;  // n_head_kv * head_dim
    std::vector<float> keys;
    std::vector<float> values;
  };

  float* row(std::vector<float>& store, int layer, int slot, int pos) {
    const LayerStore& l = layers_[layer];
    const size_t index = static_cast<size_t>(slot) * l.capacity + pos % l.capacity;
    return store.data() + index * l.row_floats;
  }

  int n_slots_;
  int n_ctx_;
  std::vector<LayerStore> layers_;  // indexed by layer; empty for layers without KV
  std::vector<int> lengths_;
};

}  // namespace pg4
