// Choosing a backend: the ops of the CPU or of a CUDA device, and why CUDA cannot be had.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "ops/ops.h"
#include "quant/quant.h"

namespace pg4 {

// The environment variable that limits the CPU backend to a narrower kernel set ("scalar",
// "avx2", "avx512"), to run and check the model on each path the build has.
constexpr const char* kCpuKernelsVariable = "PYGEMMA4_CPU_KERNELS";

// The kernel set the CPU backend uses: the widest built unless kCpuKernelsVariable names one;
// throws std::invalid_argument for a name that is not a set this build has.
quant::Isa cpu_kernels();

// Whether this module was compiled with the CUDA backend.
bool cuda_built();

// Empty when CUDA device `device` can be used; otherwise why not (not built with CUDA, no
// driver, no such device, ...).
std::string cuda_unavailable_reason(int device);

// The ops of backend "cpu" (computing with `threads` threads) or "cuda" (on `device`); throws
// std::invalid_argument for another name and std::runtime_error saying why CUDA is unavailable.
std::unique_ptr<Ops> make_ops(const std::string& backend, int threads, int device);

// `bytes` of zeroed memory on CUDA device `device`, freed with the last reference.
std::shared_ptr<void> device_memory(size_t bytes, int device);

// The handle by which other processes open the device_memory allocation at `memory`, and the
// allocation another process exported, open in this one until the last reference goes.
std::string export_device_memory(const void* memory, int device);
std::shared_ptr<void> open_device_memory(const std::string& handle, int device);

}  // namespace pg4
