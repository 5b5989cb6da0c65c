// Paged K/V storage for every layer that owns KV (shared layers read their source's), in memory
// the pool allocates or in memory the caller provides, so that several processes mapping the same
// memory can share one pool. The pool knows nothing of sequences: every forward call brings each
// sequence's block table and ring set, and the pool only turns them into addresses.
//
// Positions are stored in blocks of block_size rows. A full-attention layer keeps every position:
// position p of a sequence lives in block table[p / block_size], row p % block_size, out of
// n_blocks blocks. A sliding layer needs only the last window positions, so each sequence gets a
// ring instead: ring set r owns blocks [r * ring_blocks, (r + 1) * ring_blocks) of the sliding
// stores, and position p lives in ring block (p / block_size) % ring_blocks.
//
// Entries are stored as kv_type: F32, F16, BF16 or Q8_0 (blocks of 32 with an f16 scale, so a
// head's row, head_dim a multiple of 32, is whole blocks). A pool on a CUDA device is F32.
//
// Layout (the contract between processes): for each KV-owning layer in order, a K store then a
// V store, each [blocks][block_size][row of n_head_kv * head_dim entries of kv_type] and
// starting 64-byte aligned; full layers' stores hold n_blocks blocks, sliding layers'
// n_ring_sets * ring_blocks.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "model/config.h"
#include "quant/types.h"

namespace pg4 {

class KvPool {
 public:
  // Bytes of memory a pool of these dimensions lays out; throws std::invalid_argument for a
  // dimension below 1, a size that does not fit in memory, a kv_type that is not an entry type,
  // or a Q8_0 pool for heads that are not whole blocks.
  static size_t bytes_needed(const ModelConfig& config, int block_size, int n_blocks,
                             int n_ring_sets, int ring_blocks, quant::Type kv_type);

  // Throws std::invalid_argument unless a pool on `device` (-1: host memory) can store
  // entries of kv_type: a CUDA device's pool stores F32.
  static void check_device_type(quant::Type kv_type, int device);

  // memory: at least bytes_needed bytes, aligned for float, outliving the pool, on CUDA device
  // `device` (-1: host memory); null for host memory the pool allocates (zeroed) itself. Throws
  // std::invalid_argument as check_device_type does.
  KvPool(const ModelConfig& config, int block_size, int n_blocks, int n_ring_sets, int ring_blocks,
         quant::Type kv_type, void* memory, int device = -1);

  int block_size() const { return block_size_; }
  int n_blocks() const { return n_blocks_; }
  int n_ring_sets() const { return n_ring_sets_; }
  int ring_blocks() const { return ring_blocks_; }
  quant::Type kv_type() const { return kv_type_; }
  size_t nbytes() const { return nbytes_; }
  int device() const { return device_; }  // -1: host memory

  // Whether the pool was laid out for a model of this configuration's KV shapes.
  bool fits(const ModelConfig& config) const;

  // Copies every sliding layer's rows of ring set src over those of ring set dst: a sequence
  // that continues another's prefix starts from its sliding window. Host memory only (throws
  // std::invalid_argument for a pool on a CUDA device, or a ring set out of range).
  void copy_ring_set(int src, int dst);

  // Entries (n_head_kv * head_dim) and bytes of one position's K (or V) row of a layer.
  int row_elements(int layer) const { return layers_[layer].row_elements; }
  size_t row_bytes(int layer) const { return layers_[layer].row_bytes; }
  bool sliding(int layer) const { return layers_[layer].sliding; }

  // Offset in bytes of position pos's row in a layer's K and V stores, for a sequence with this
  // block table and ring set (both already checked by the caller).
  size_t row_offset(int layer, const int32_t* table, int ring_set, int pos) const {
    const LayerStore& l = layers_[layer];
    const int block = pos / block_size_;
    const size_t stored_block =
        l.sliding ? static_cast<size_t>(ring_set) * ring_blocks_ + block % ring_blocks_
                  : static_cast<size_t>(table[block]);
    return (stored_block * block_size_ + pos % block_size_) * l.row_bytes;
  }
  uint8_t* keys(int layer) { return layers_[layer].keys; }
  uint8_t* values(int layer) { return layers_[layer].values; }
  const uint8_t* keys(int layer) const { return layers_[layer].keys; }
  const uint8_t* values(int layer) const { return layers_[layer].values; }

  // Calls fn(p, offset) for each position p in [first, last] with its row_offset, looking the
  // block up once per block rather than once per position (a division each, in attention's
  // inner loop).
  template <typename Fn>
  void for_each_row(int layer, const int32_t* table, int ring_set, int first, int last,
                    Fn&& fn) const {
    const size_t row = layers_[layer].row_bytes;
    for (int p = first; p <= last;) {
      const int block_end = std::min(last + 1, (p / block_size_ + 1) * block_size_);
      size_t offset = row_offset(layer, table, ring_set, p);
      for (; p < block_end; ++p, offset += row) fn(p, offset);
    }
  }

 private:
  struct LayerStore {
    bool present = false;  // false for layers that read another layer's KV
    bool sliding = false;
    int row_elements = 0;  // n_head_kv * head_dim
    size_t row_bytes = 0;
    uint8_t* keys = nullptr;
    uint8_t* values = nullptr;
  };
  struct Unmap {
    size_t bytes;
    void operator()(void* memory) const;
  };

  int block_size_;
  int n_blocks_;
  int n_ring_sets_;
  int ring_blocks_;
  quant::Type kv_type_;
  size_t nbytes_;
  int device_;
  std::unique_ptr<void, Unmap> owned_;  // the memory, when the pool allocated it
  std::vector<LayerStore> layers_;      // indexed by layer
};

}  // namespace pg4
