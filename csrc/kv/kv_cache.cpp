#include "kv/kv_cache.h"

#include <algorithm>

namespace pg4 {

KvCache::KvCache(const ModelConfig& config, int n_slots, int n_ctx, int n_batch)
    : n_slots_(n_slots), n_ctx_(n_ctx), layers_(config.layers.size()), lengths_(n_slots, 0) {
  for (const LayerConfig& layer : config.layers) {
    if (!layer.has_kv) continue;
    LayerStore& store = layers_[layer.index];
    store.capacity = layer.is_sliding ? std::min(n_ctx, config.sliding_window + n_batch) : n_ctx;
    store.row_floats = layer.n_head_kv * layer.head_dim;
    const size_t n = static_cast<size_t>(n_slots) * store.capacity * store.row_floats;
    store.keys.assign(n, 0.0f);
    store.values.assign(n, 0.0f);
  }
}

size_t KvCache::bytes() const {
  size_t total = 0;
  for (const LayerStore& l : layers_) total += (l.keys.size() + l.values.size()) * sizeof(float);
  return total;
}

}  // namespace pg4
