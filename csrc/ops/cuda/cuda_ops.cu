#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ops/cuda/check.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/cuda_ops.h"
#include "ops/cuda/quant_units.cuh"
#include "ops/cuda/warp.cuh"

namespace pg4::cuda {

namespace {

constexpr size_t kWeightAlign = 256;
constexpr size_t kStagingBytes = 64 << 20;
constexpr int kMaxSplits = 32;

size_t aligned(size_t n) { return (n + kWeightAlign - 1) / kWeightAlign * kWeightAlign; }

size_t weight_bytes(const Weight& w) {
  return static_cast<size_t>(w.ne[1]) * w.ne[2] * w.ne[3] * w.row_bytes;
}

// Copies host bytes that lie in `file` (when given) through it, or else from memory.
void read_host(const MappedFile* file, const uint8_t* src, size_t bytes, uint8_t* dst) {
  if (file != nullptr) {
    file->read(src, bytes, dst);
  } else {
    std::memcpy(dst, src, bytes);
  }
}

// Keeps subsequent runtime calls of this thread on the ops' device.
void use_device(int device) { PG4_CUDA_CHECK(cudaSetDevice(device)); }

__global__ void probe_kernel() {}

}  // namespace

std::string unavailable_reason(int device) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear it: the module keeps working on the CPU
    return std::string("no NVIDIA driver or GPU found (the CUDA runtime says: ") +
           cudaGetErrorString(status) + ")";
  }
  if (device < 0 || device >= count) {
    return "there is no CUDA device " + std::to_string(device) + " (this machine has " +
           std::to_string(count) + ")";
  }
  // A device whose architecture the module was not compiled for has no image of its kernels.
  cudaFuncAttributes attributes;
  if (cudaSetDevice(device) != cudaSuccess ||
      cudaFuncGetAttributes(&attributes, probe_kernel) != cudaSuccess) {
    const cudaError_t error = cudaGetLastError();
    cudaDeviceProp props{};
    cudaGetDeviceProperties(&props, device);
    return "CUDA device " + std::to_string(device) + " (" + props.name + ", compute capability " +
           std::to_string(props.major) + "." + std::to_string(props.minor) +
           ") cannot run this build's kernels: " + cudaGetErrorString(error) +
           " (rebuild with CMAKE_CUDA_ARCHITECTURES including it)";
  }
  return "";
}

std::unique_ptr<Ops> make_ops(int device) { return std::make_unique<CudaOps>(device); }

std::shared_ptr<void> device_memory(size_t bytes, int device) {
  use_device(device);
  void* memory = nullptr;
  PG4_CUDA_CHECK(cudaMalloc(&memory, std::max<size_t>(bytes, 1)));
  std::shared_ptr<void> owned(memory, [device](void* p) {
    cudaSetDevice(device);
    cudaFree(p);
  });
  PG4_CUDA_CHECK(cudaMemset(memory, 0, bytes));
  return owned;
}

std::string export_memory(const void* memory, int device) {
  use_device(device);
  cudaIpcMemHandle_t handle;
  PG4_CUDA_CHECK(cudaIpcGetMemHandle(&handle, const_cast<void*>(memory)));
  return std::string(handle.reserved, sizeof handle.reserved);
}

std::shared_ptr<void> open_memory(const std::string& handle, int device) {
  cudaIpcMemHandle_t ipc;
  if (handle.size() != sizeof ipc.reserved) {
    throw std::invalid_argument("a CUDA IPC handle has " + std::to_string(sizeof ipc.reserved) +
                                " bytes, not " + std::to_string(handle.size()));
  }
  std::memcpy(ipc.reserved, handle.data(), handle.size());
  use_device(device);
  void* memory = nullptr;
  PG4_CUDA_CHECK(cudaIpcOpenMemHandle(&memory, ipc, cudaIpcMemLazyEnablePeerAccess));
  return std::shared_ptr<void>(memory, [device](void* p) {
    cudaSetDevice(device);
    cudaIpcCloseMemHandle(p);
  });
}

CudaOps::CudaOps(int device) : device_(device) {
  use_device(device_);
  PG4_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  PG4_CUDA_CHECK(cudaDeviceGetAttribute(&n_sms_, cudaDevAttrMultiProcessorCount, device_));
  const char* graphs = std::getenv("PYGEMMA4_CUDA_GRAPHS");
  use_graphs_ = graphs == nullptr || std::strcmp(graphs, "0") != 0;
}

CudaOps::~CudaOps() {
  cudaSetDevice(device_);
  cudaStreamSynchronize(stream_);
  clear_graphs();
  cudaStreamDestroy(stream_);
}

template <typename T>
std::shared_ptr<T> CudaOps::device_array(size_t n) {
  use_device(device_);
  void* memory = nullptr;
  PG4_CUDA_CHECK(cudaMalloc(&memory, std::max<size_t>(n, 1) * sizeof(T)));
  const int device = device_;
  return std::shared_ptr<T>(static_cast<T*>(memory), [device](T* p) {
    cudaSetDevice(device);
    cudaFree(p);
  });
}

void CudaOps::place_weights(const std::vector<WeightPlacement>& weights, const MappedFile* file) {
  use_device(device_);
  // Tensors that move go through a page-locked staging buffer; host-resident tables are read
  // into page-locked memory mapped for the device, where kernels gather their rows across the
  // bus. Both are read from the file (see MappedFile::read: through the mapping an E4B file
  // did not load in minutes).
  void* staging_memory = nullptr;
  PG4_CUDA_CHECK(cudaMallocHost(&staging_memory, kStagingBytes));
  std::unique_ptr<void, cudaError_t (*)(void*)> staging(staging_memory, cudaFreeHost);
  size_t total = 0;
  for (const WeightPlacement& p : weights) {
    if (!p.host_resident) total += aligned(weight_bytes(*p.weight));
  }
  uint8_t* device_copy = weights_.emplace_back(device_array<uint8_t>(total)).get();
  size_t offset = 0;
  for (const WeightPlacement& p : weights) {
    Weight& w = *p.weight;
    const size_t bytes = weight_bytes(w);
    if (p.host_resident) {
      void* pinned = nullptr;
      PG4_CUDA_CHECK(cudaHostAlloc(&pinned, bytes, cudaHostAllocMapped));
      pinned_tables_.emplace_back(static_cast<uint8_t*>(pinned),
                                  [](uint8_t* q) { cudaFreeHost(q); });
      read_host(file, w.data, bytes, static_cast<uint8_t*>(pinned));
      void* mapped = nullptr;
      PG4_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, pinned, 0));
      w.data = static_cast<const uint8_t*>(mapped);
      continue;
    }
    uint8_t* dst = device_copy + offset;
    for (size_t done = 0; done < bytes; done += kStagingBytes) {
      const size_t n = std::min(kStagingBytes, bytes - done);
      read_host(file, w.data + done, n, static_cast<uint8_t*>(staging_memory));
      PG4_CUDA_CHECK(cudaMemcpy(dst + done, staging_memory, n, cudaMemcpyHostToDevice));
    }
    w.data = dst;
    offset += aligned(bytes);
  }
}

void CudaOps::reserve(const Limits& limits) {
  const size_t n = static_cast<size_t>(limits.n_batch);
  acts_ = device_array<ActBlock>(n * (limits.max_cols / kWarp + 1));
  // attention() splits a batch's heads into at most max(heads, 4 * SMs) pieces, and a decode
  // batch's at most kDecodeBatch times the pieces of one token.
  max_partials_ =
      std::max<size_t>(n * limits.max_heads, static_cast<size_t>(kDecodeBatch) * 4 * n_sms_);
  partials_ = device_array<float>(max_partials_ * (limits.max_head_dim + 2));
  if (limits.n_expert_used > 0) {
    const size_t pairs = n * limits.n_expert_used;
    const size_t ff = static_cast<size_t>(limits.n_ff_expert);
    expert_acts_ =
        device_array<ActBlock>(pairs * (std::max<size_t>(ff, limits.max_cols) / kWarp + 1));
    expert_hidden_ = device_array<float>(pairs * 2 * ff);
    expert_activated_ = device_array<float>(pairs * ff);
    expert_out_ = device_array<float>(pairs * limits.max_cols);
  }
}

std::shared_ptr<float> CudaOps::alloc(size_t n) {
  auto memory = device_array<float>(n);
  PG4_CUDA_CHECK(cudaMemset(memory.get(), 0, std::max<size_t>(n, 1) * sizeof(float)));
  return memory;
}

std::shared_ptr<int32_t> CudaOps::alloc_ids(size_t n) {
  auto memory = device_array<int32_t>(n);
  PG4_CUDA_CHECK(cudaMemset(memory.get(), 0, std::max<size_t>(n, 1) * sizeof(int32_t)));
  return memory;
}

TokenBatch CudaOps::stage(const TokenBatch& host) {
  use_device(device_);
  const size_t n = host.n, n_seq = host.n_seq, n_out = host.n_outputs;
  const size_t table = n_seq * host.table_width;
  const size_t total = 3 * n + n_seq + n_out + table;
  if (total > staged_capacity_) {
    // Captured steps read the old arrays: they go with them.
    PG4_CUDA_CHECK(cudaStreamSynchronize(stream_));
    clear_graphs();
    const size_t capacity = std::max(total, 2 * staged_capacity_);
    staged_ = device_array<int32_t>(capacity);
    void* pinned = nullptr;
    PG4_CUDA_CHECK(cudaMallocHost(&pinned, capacity * sizeof(int32_t)));
    staging_.reset(static_cast<int32_t*>(pinned), [](int32_t* p) { cudaFreeHost(p); });
    staged_capacity_ = capacity;
  }
  // The previous step has been read back, so the host copy is free to overwrite.
  PG4_CUDA_CHECK(cudaStreamSynchronize(stream_));
  int32_t* h = staging_.get();
  int32_t* d = staged_.get();
  TokenBatch batch = host;
  size_t at = 0;
  auto put = [&](const int32_t* src, size_t count) {
    std::memcpy(h + at, src, count * sizeof(int32_t));
    const int32_t* placed = d + at;
    at += count;
    return placed;
  };
  batch.tokens = put(host.tokens, n);
  batch.positions = put(host.positions, n);
  batch.seqs = put(host.seqs, n);
  // What a captured step reads lies where the step's shape alone puts it; the output rows,
  // read after the step, come last.
  batch.ring_sets = put(host.ring_sets, n_seq);
  batch.block_tables = put(host.block_tables, table);
  batch.output_rows = put(host.output_rows, n_out);
  PG4_CUDA_CHECK(cudaMemcpyAsync(d, h, total * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  return batch;
}

void CudaOps::clear_graphs() {
  for (auto& [shape, graph] : graphs_) cudaGraphExecDestroy(graph);
  graphs_.clear();
}

void CudaOps::run_step(const std::vector<int64_t>& shape, const std::function<void()>& body) {
  wrote();  // a conversion made before the step is not part of it
  if (!use_graphs_) {
    body();
    return;
  }
  auto found = graphs_.find(shape);
  if (found == graphs_.end()) {
    PG4_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);
      if (graph != nullptr) cudaGraphDestroy(graph);
      cudaGetLastError();
      wrote();
      throw;
    }
    PG4_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
    cudaGraphExec_t exec = nullptr;
    const cudaError_t status = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    check(status, "cudaGraphInstantiate");
    found = graphs_.emplace(shape, exec).first;
  }
  wrote();
  PG4_CUDA_CHECK(cudaGraphLaunch(found->second, stream_));
}

const ActBlock* CudaOps::converted(const float* x, int n_tokens, int64_t cols) {
  if (x != converted_x_ || n_tokens != converted_n_ || cols != converted_cols_) {
    quantize_activations(x, n_tokens * cols, acts_.get(), stream_);
    converted_x_ = x;
    converted_n_ = n_tokens;
    converted_cols_ = cols;
  }
  return acts_.get();
}

void CudaOps::matmul(const Weight& w, const float* x, int n_tokens, float* y) {
  if (is_float_type(w.type)) {
    matmul_float(w, x, n_tokens, y, stream_);
  } else {
    const ActBlock* acts = converted(x, n_tokens, w.cols());
    matmul_quantized(w, acts, n_tokens, y, stream_);
  }
  // The output may overlap the converted input.
  if (y == converted_x_) wrote();
}

void CudaOps::get_rows(const Weight& table, const int32_t* ids, int n, float s, float* out) {
  wrote();
  cuda::get_rows(table, ids, n, s, out, stream_);
}

void CudaOps::rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps,
                       float* out) {
  wrote();
  cuda::rms_norm(x, weight, n_rows, dim, eps, out, nullptr, stream_);
}

void CudaOps::rms_norm_add(float* y, const float* weight, int n_rows, int dim, float eps,
                           float* x) {
  wrote();
  cuda::rms_norm(y, weight, n_rows, dim, eps, nullptr, x, stream_);
}

void CudaOps::rope_neox(float* x, const int32_t* positions, int n_tokens, int n_head, int head_dim,
                        const Rope& rope) {
  wrote();
  norm_rope(x, nullptr, false, positions, n_tokens, n_head, head_dim, 0.0f, rope, stream_);
}

void CudaOps::rms_norm_rope(float* x, const float* weight, const int32_t* positions, int n_tokens,
                            int n_head, int head_dim, float eps, const Rope& rope) {
  wrote();
  norm_rope(x, weight, true, positions, n_tokens, n_head, head_dim, eps, rope, stream_);
}

void CudaOps::gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride,
                       int n_rows, int n_cols, float* out) {
  wrote();
  cuda::gelu_mul(gate, gate_stride, up, up_stride, n_rows, n_cols, out, stream_);
}

void CudaOps::add(float* x, const float* y, size_t n) {
  wrote();
  cuda::add(x, y, n, stream_);
}

void CudaOps::scale(float* x, float s, size_t n) {
  wrote();
  cuda::scale(x, s, n, stream_);
}

void CudaOps::softcap(float* x, float cap, size_t n) {
  wrote();
  cuda::softcap(x, cap, n, stream_);
}

void CudaOps::copy(float* dst, const float* src, size_t n) {
  wrote();
  PG4_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
}

void CudaOps::upload(void* dst, const void* host_src, size_t bytes) {
  wrote();
  PG4_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  PG4_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::read(const float* src, size_t n, float* host_dst) {
  PG4_CUDA_CHECK(
      cudaMemcpyAsync(host_dst, src, n * sizeof(float), cudaMemcpyDeviceToHost, stream_));
  PG4_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::read_ids(const int32_t* src, size_t n, int32_t* host_dst) {
  PG4_CUDA_CHECK(
      cudaMemcpyAsync(host_dst, src, n * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_));
  PG4_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaOps::copy_rows(const float* src, const int32_t* rows, int n_rows, int dim, float* dst) {
  wrote();
  cuda::copy_rows(src, rows, n_rows, dim, dst, stream_);
}

void CudaOps::argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs) {
  cuda::argmax(x, n_rows, n_cols, ids, logprobs, stream_);
}

void CudaOps::write_kv(const float* k, const float* v, const TokenBatch& batch, int layer,
                       KvPool& pool) {
  const int row = pool.row_elements(layer);
  cuda::store_kv(k, v, false, nullptr, 0.0f, Rope{}, batch, 1, row, kv_view(pool, layer), stream_);
}

void CudaOps::store_kv(float* k, float* v, const float* k_weight, float eps, const Rope& rope,
                       const TokenBatch& batch, const LayerConfig& layer, KvPool& pool) {
  cuda::store_kv(k, v, true, k_weight, eps, rope, batch, layer.n_head_kv, layer.head_dim,
                 kv_view(pool, layer.index), stream_);
}

void CudaOps::attention(const float* q, const TokenBatch& batch, const LayerConfig& layer,
                        int window, const KvPool& pool, float* out) {
  wrote();
  // Enough blocks to fill the device: each head's positions are split when the batch is small.
  // Every decode-sized batch takes the split count of one token, so that a sequence's rows come
  // out the same (to the bit) whatever else shares its step.
  const size_t heads = static_cast<size_t>(batch.n) * layer.n_head;
  const size_t wanted = static_cast<size_t>(4) * n_sms_;
  const size_t sharing = batch.n <= kDecodeBatch ? static_cast<size_t>(layer.n_head) : heads;
  int splits = static_cast<int>(std::clamp<size_t>(wanted / sharing, 1, kMaxSplits));
  while (splits > 1 && heads * splits > max_partials_) --splits;
  cuda::attention(q, batch, layer.n_head, layer.n_head_kv, layer.head_dim, window,
                  kv_view(const_cast<KvPool&>(pool), layer.kv_source), splits, partials_.get(), out,
                  stream_);
}

void CudaOps::moe_route(const float* logits, int n_tokens, int n_expert, int k, int32_t* expert_ids,
                        float* expert_weights) {
  cuda::moe_route(logits, n_tokens, n_expert, k, expert_ids, expert_weights, stream_);
}

void CudaOps::moe_experts(const Weight& gate_up, const Weight& down, const float* down_scale,
                          const float* x, const int32_t* expert_ids, const float* expert_weights,
                          int n_tokens, int k, float* out) {
  wrote();
  const int64_t n_embd = gate_up.cols();
  const int n_ff = static_cast<int>(gate_up.rows() / 2);
  const int pairs = n_tokens * k;
  float* hidden = expert_hidden_.get();
  float* activated = expert_activated_.get();
  if (!is_float_type(gate_up.type)) {
    quantize_activations(x, n_tokens * n_embd, expert_acts_.get(), stream_);
  }
  matmul_experts(gate_up, expert_acts_.get(), x, k, expert_ids, pairs, hidden, stream_);
  cuda::gelu_mul(hidden, 2 * n_ff, hidden + n_ff, 2 * n_ff, pairs, n_ff, activated, stream_);
  if (!is_float_type(down.type)) {
    quantize_activations(activated, static_cast<int64_t>(pairs) * n_ff, expert_acts_.get(),
                         stream_);
  }
  matmul_experts(down, expert_acts_.get(), activated, 1, expert_ids, pairs, expert_out_.get(),
                 stream_);
  moe_combine(expert_out_.get(), expert_ids, expert_weights, down_scale, n_tokens, k,
              static_cast<int>(n_embd), out, stream_);
}

}  // namespace pg4::cuda
