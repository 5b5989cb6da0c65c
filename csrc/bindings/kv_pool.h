// The KV pool as Python holds it: pygemma4._core.KvPool.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "kv/kv_pool.h"

namespace pg4 {

// A KvPool and, when it lives in a caller's buffer (an mmap of shared memory, a bytearray, a
// numpy array), that buffer's export, held as long as the pool: while it is held the buffer can
// be neither freed nor resized (an mmap refuses to close, a bytearray to grow), so the pool never
// points into released memory.
// The entry type of GGUF type id `type_id`; ValueError for an id that is no type.
quant::Type kv_entry_type(int type_id);

class PyKvPool {
 public:
  // device >= 0: the pool on that CUDA device (no buffer then), in memory of its own or, given
  // ipc_handle, in the pool another process exported. kv_type: the GGUF type id of the entries.
  PyKvPool(const pybind11::object& config, int block_size, int n_blocks, int n_ring_sets,
           int ring_blocks, const pybind11::object& buffer, int device,
           const pybind11::object& ipc_handle, int kv_type);

  // The handle by which other processes open this pool (device pools of their own memory).
  pybind11::bytes ipc_handle() const;

  KvPool& pool() { return *pool_; }
  const KvPool& pool() const { return *pool_; }

 private:
  struct ReleaseView {
    void operator()(Py_buffer* view) const;
  };

  std::unique_ptr<Py_buffer, ReleaseView> view_;  // declared first: released after the pool
  std::shared_ptr<void> device_memory_;           // likewise
  std::unique_ptr<KvPool> pool_;
};

}  // namespace pg4
