// CUDA runtime errors as exceptions that name the call that failed.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pg4::cuda {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
  }
}

// After a kernel launch: a bad configuration is reported here, not at the next call.
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

}  // namespace pg4::cuda

#define PG4_CUDA_CHECK(call) ::pg4::cuda::check((call), #call)
