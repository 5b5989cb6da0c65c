// The CUDA backend as the rest of the core sees it: plain C++, no CUDA headers.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "ops/ops.h"

namespace pg4::cuda {

std::string unavailable_reason(int device);
std::unique_ptr<Ops> make_ops(int device);
std::shared_ptr<void> device_memory(size_t bytes, int device);
std::string export_memory(const void* memory, int device);
std::shared_ptr<void> open_memory(const std::string& handle, int device);

}  // namespace pg4::cuda
