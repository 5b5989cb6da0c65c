#include "ops/backend.h"

#include <cstdlib>
#include <stdexcept>

#include "ops/cpu/cpu_ops.h"
#if defined(PG4_WITH_CUDA)
#include "ops/cuda/cuda_backend.h"
#endif

namespace pg4 {

namespace {
constexpr const char* kNotBuilt =
    "this build of pygemma4 has no CUDA backend (no CUDA toolkit was found when it was compiled, "
    "or it was built with PYGEMMA4_CUDA=off)";
}  // namespace

quant::Isa cpu_kernels() {
  const char* name = std::getenv(kCpuKernelsVariable);
  if (name == nullptr || *name == '\0') return quant::widest_isa();
  try {
    return quant::parse_isa(name);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(kCpuKernelsVariable) + ": " + e.what());
  }
}

bool cuda_built() {
#if defined(PG4_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

std::string cuda_unavailable_reason(int device) {
#if defined(PG4_WITH_CUDA)
  return cuda::unavailable_reason(device);
#else
  return kNotBuilt;
#endif
}

namespace {
void require_cuda(int device) {
  const std::string reason = cuda_unavailable_reason(device);
  if (!reason.empty()) throw std::runtime_error("CUDA is unavailable: " + reason);
}
}  // namespace

std::unique_ptr<Ops> make_ops(const std::string& backend, int threads, int device) {
  if (backend == "cpu") return std::make_unique<CpuOps>(threads, cpu_kernels());
  if (backend != "cuda") {
    throw std::invalid_argument("unknown backend '" + backend + "': expected 'cpu' or 'cuda'");
  }
  require_cuda(device);
#if defined(PG4_WITH_CUDA)
  return cuda::make_ops(device);
#else
  return nullptr;  // unreachable: the reason above is never empty without CUDA
#endif
}

std::shared_ptr<void> device_memory(size_t bytes, int device) {
  require_cuda(device);
#if defined(PG4_WITH_CUDA)
  return cuda::device_memory(bytes, device);
#else
  return nullptr;
#endif
}

std::string export_device_memory(const void* memory, int device) {
  require_cuda(device);
#if defined(PG4_WITH_CUDA)
  return cuda::export_memory(memory, device);
#else
  return "";
#endif
}

std::shared_ptr<void> open_device_memory(const std::string& handle, int device) {
  require_cuda(device);
#if defined(PG4_WITH_CUDA)
  return cuda::open_memory(handle, device);
#else
  return nullptr;
#endif
}

}  // namespace pg4
