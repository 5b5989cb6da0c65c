#include "kv/kv_pool.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pg4 {

namespace {

constexpr size_t kStoreAlign = 64;  // a cache line: no store shares one with another

size_t checked_mul(size_t a, size_t b) {
  size_t product;
  if (__builtin_mul_overflow(a, b, &product)) throw std::invalid_argument("KV pool is too large");
  return product;
}

size_t checked_add(size_t a, size_t b) {
  size_t sum;
  if (__builtin_add_overflow(a, b, &sum)) throw std::invalid_argument("KV pool is too large");
  return sum;
}

// Walks the layout: place(layer, key_offset, value_offset) for each KV-owning layer, in bytes
// from the start of the pool; returns the pool's size. The one definition of the layout.
template <typename Place>
size_t lay_out(const ModelConfig& config, int block_size, int n_blocks, int n_ring_sets,
               int ring_blocks, Place&& place) {
  if (block_size < 1 || n_blocks < 1 || n_ring_sets < 1 || ring_blocks < 1) {
    throw std::invalid_argument(
        "KV pool block_size, n_blocks, n_ring_sets and ring_blocks must be at least 1");
  }
  const size_t ring_store_blocks = checked_mul(n_ring_sets, ring_blocks);
  size_t offset = 0;
  for (const LayerConfig& layer : config.layers) {
    if (!layer.has_kv) continue;
    const size_t blocks = layer.is_sliding ? ring_store_blocks : static_cast<size_t>(n_blocks);
    const size_t row_bytes = static_cast<size_t>(layer.n_head_kv) * layer.head_dim * sizeof(float);
    const size_t store = checked_mul(checked_mul(blocks, block_size), row_bytes);
    const size_t padded = checked_add(store, kStoreAlign - 1) / kStoreAlign * kStoreAlign;
    place(layer.index, offset, offset + padded);
    offset = checked_add(offset, checked_mul(padded, 2));
  }
  return offset;
}

}  // namespace

size_t KvPool::bytes_needed(const ModelConfig& config, int block_size, int n_blocks,
                            int n_ring_sets, int ring_blocks) {
  return lay_out(config, block_size, n_blocks, n_ring_sets, ring_blocks,
                 [](int, size_t, size_t) {});
}

void KvPool::Unmap::operator()(void* memory) const { ::munmap(memory, bytes); }

KvPool::KvPool(const ModelConfig& config, int block_size, int n_blocks, int n_ring_sets,
               int ring_blocks, void* memory, int device)
    : block_size_(block_size),
      n_blocks_(n_blocks),
      n_ring_sets_(n_ring_sets),
      ring_blocks_(ring_blocks),
      nbytes_(bytes_needed(config, block_size, n_blocks, n_ring_sets, ring_blocks)),
      device_(device),
      owned_(nullptr, Unmap{nbytes_}),
      layers_(config.layers.size()) {
  if (memory == nullptr && device >= 0) {
    throw std::invalid_argument("a KV pool on a CUDA device needs memory allocated there");
  }
  if (memory == nullptr && nbytes_ > 0) {
    // An anonymous mapping comes zeroed and is backed only as far as it is written, so a pool
    // sized for many long sequences costs memory only for what they use.
    memory = ::mmap(nullptr, nbytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
      throw std::runtime_error("cannot allocate a KV pool of " + std::to_string(nbytes_) +
                               " bytes: " + std::strerror(errno));
    }
    owned_.reset(memory);
  }
  auto* base = static_cast<uint8_t*>(memory);
  lay_out(config, block_size, n_blocks, n_ring_sets, ring_blocks,
          [&](int layer, size_t key_offset, size_t value_offset) {
            const LayerConfig& lc = config.layers[layer];
            LayerStore& store = layers_[layer];
            store.present = true;
            store.sliding = lc.is_sliding;
            store.row_floats = lc.n_head_kv * lc.head_dim;
            store.keys = reinterpret_cast<float*>(base + key_offset);
            store.values = reinterpret_cast<float*>(base + value_offset);
          });
}

bool KvPool::fits(const ModelConfig& config) const {
  if (config.layers.size() != layers_.size()) return false;
  for (const LayerConfig& lc : config.layers) {
    const LayerStore& store = layers_[lc.index];
    if (store.present != lc.has_kv) return false;
    if (lc.has_kv &&
        (store.sliding != lc.is_sliding || store.row_floats != lc.n_head_kv * lc.head_dim)) {
      return false;
    }
  }
  return true;
}

void KvPool::copy_ring_set(int src, int dst) {
  if (device_ >= 0) {
    throw std::invalid_argument("copying ring sets of a KV pool on a CUDA device is not supported");
  }
  for (int ring_set : {src, dst}) {
    if (ring_set < 0 || ring_set >= n_ring_sets_) {
      throw std::invalid_argument("ring set " + std::to_string(ring_set) + " out of range [0, " +
                                  std::to_string(n_ring_sets_) + ")");
    }
  }
  if (src == dst) return;
  for (LayerStore& store : layers_) {
    if (!store.present || !store.sliding) continue;
    const size_t ring_floats = static_cast<size_t>(ring_blocks_) * block_size_ * store.row_floats;
    for (float* rows : {store.keys, store.values}) {
      std::memcpy(rows + dst * ring_floats, rows + src * ring_floats, ring_floats * sizeof(float));
    }
  }
}

}  // namespace pg4
