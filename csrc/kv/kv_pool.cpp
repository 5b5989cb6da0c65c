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

// The row of a layer's K or V in bytes, checking that kv_type is an entry type and, for a block
// format, that a head's row is whole blocks (attention reads one head at a time).
size_t entry_row_bytes(const LayerConfig& layer, quant::Type kv_type) {
  using quant::Type;
  if (kv_type != Type::F32 && kv_type != Type::F16 && kv_type != Type::BF16 &&
      kv_type != Type::Q8_0) {
    throw std::invalid_argument(std::string("KV entries can be F32, F16, BF16 or Q8_0, not ") +
                                quant::type_info(kv_type).name);
  }
  const int64_t block = quant::type_info(kv_type).block_size;
  if (layer.head_dim % block != 0) {
    throw std::invalid_argument(std::string("KV entries of ") + quant::type_info(kv_type).name +
                                " need a head_dim that is a multiple of " + std::to_string(block) +
                                "; layer " + std::to_string(layer.index) + " has " +
                                std::to_string(layer.head_dim));
  }
  return quant::row_bytes(kv_type, static_cast<int64_t>(layer.n_head_kv) * layer.head_dim);
}

// Walks the layout: place(layer, key_offset, value_offset) for each KV-owning layer, in bytes
// from the start of the pool; returns the pool's size. The one definition of the layout.
template <typename Place>
size_t lay_out(const ModelConfig& config, int block_size, int n_blocks, int n_ring_sets,
               int ring_blocks, quant::Type kv_type, Place&& place) {
  if (block_size < 1 || n_blocks < 1 || n_ring_sets < 1 || ring_blocks < 1) {
    throw std::invalid_argument(
        "KV pool block_size, n_blocks, n_ring_sets and ring_blocks must be at least 1");
  }
  const size_t ring_store_blocks = checked_mul(n_ring_sets, ring_blocks);
  size_t offset = 0;
  for (const LayerConfig& layer : config.layers) {
    if (!layer.has_kv) continue;
    const size_t blocks = layer.is_sliding ? ring_store_blocks : static_cast<size_t>(n_blocks);
    const size_t row_bytes = entry_row_bytes(layer, kv_type);
    const size_t store = checked_mul(checked_mul(blocks, block_size), row_bytes);
    const size_t padded = checked_add(store, kStoreAlign - 1) / kStoreAlign * kStoreAlign;
    place(layer.index, offset, offset + padded);
    offset = checked_add(offset, checked_mul(padded, 2));
  }
  return offset;
}

}  // namespace

size_t KvPool::bytes_needed(const ModelConfig& config, int block_size, int n_blocks,
                            int n_ring_sets, int ring_blocks, quant::Type kv_type) {
  return lay_out(config, block_size, n_blocks, n_ring_sets, ring_blocks, kv_type,
                 [](int, size_t, size_t) {});
}

void KvPool::check_device_type(quant::Type kv_type, int device) {
  if (device >= 0 && kv_type != quant::Type::F32) {
    throw std::invalid_argument(std::string("a KV pool on a CUDA device stores F32 entries, not ") +
                                quant::type_info(kv_type).name);
  }
}

void KvPool::Unmap::operator()(void* memory) const { ::munmap(memory, bytes); }

KvPool::KvPool(const ModelConfig& config, int block_size, int n_blocks, int n_ring_sets,
               int ring_blocks, quant::Type kv_type, void* memory, int device)
    : block_size_(block_size),
      n_blocks_(n_blocks),
      n_ring_sets_(n_ring_sets),
      ring_blocks_(ring_blocks),
      kv_type_(kv_type),
      nbytes_(bytes_needed(config, block_size, n_blocks, n_ring_sets, ring_blocks, kv_type)),
      device_(device),
      owned_(nullptr, Unmap{nbytes_}),
      layers_(config.layers.size()) {
  if (memory == nullptr && device >= 0) {
    throw std::invalid_argument("a KV pool on a CUDA device needs memory allocated there");
  }
  check_device_type(kv_type, device);
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
  lay_out(config, block_size, n_blocks, n_ring_sets, ring_blocks, kv_type,
          [&](int layer, size_t key_offset, size_t value_offset) {
            const LayerConfig& lc = config.layers[layer];
            LayerStore& store = layers_[layer];
            store.present = true;
            store.sliding = lc.is_sliding;
            store.row_elements = lc.n_head_kv * lc.head_dim;
            store.row_bytes = entry_row_bytes(lc, kv_type);
            store.keys = base + key_offset;
            store.values = base + value_offset;
          });
}

bool KvPool::fits(const ModelConfig& config) const {
  if (config.layers.size() != layers_.size()) return false;
  for (const LayerConfig& lc : config.layers) {
    const LayerStore& store = layers_[lc.index];
    if (store.present != lc.has_kv) return false;
    if (lc.has_kv &&
        (store.sliding != lc.is_sliding || store.row_elements != lc.n_head_kv * lc.head_dim)) {
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
    const size_t ring_bytes = static_cast<size_t>(ring_blocks_) * block_size_ * store.row_bytes;
    for (uint8_t* rows : {store.keys, store.values}) {
      std::memcpy(rows + dst * ring_bytes, rows + src * ring_bytes, ring_bytes);
    }
  }
}

}  // namespace pg4
