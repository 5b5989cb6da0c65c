// A read-only view of one GGUF tensor inside the mapped model file.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/types.h"

namespace pg4 {

struct Weight {
  quant::Type type = quant::Type::F32;
  const uint8_t* data = nullptr;
  int64_t ne[4] = {1, 1, 1, 1};  // GGUF order: ne[0] is the row length
  size_t row_bytes = 0;
  // The same matrix with its rows interleaved in groups of 16 (quant/interleaved.h), where the
  // backend keeps such a copy for its matrix kernels; data still holds the file's rows.
  const uint8_t* interleaved = nullptr;

  bool present() const { return data != nullptr; }
  int64_t cols() const { return ne[0]; }
  int64_t rows() const { return ne[1]; }
  int64_t count() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  const uint8_t* row(int64_t r) const { return data + static_cast<size_t>(r) * row_bytes; }
  // Values of an F32 tensor (norm weights, scales); the loader guarantees the type.
  const float* f32() const { return reinterpret_cast<const float*>(data); }

  // The 2-D matrix number `i` of a 3-D tensor (one expert of a stacked expert tensor).
  Weight matrix(int64_t i) const {
    Weight w = *this;
    const size_t offset = static_cast<size_t>(i) * static_cast<size_t>(ne[1]) * row_bytes;
    w.data = data + offset;
    if (interleaved != nullptr) w.interleaved = interleaved + offset;
    w.ne[2] = 1;
    return w;
  }
};

}  // namespace pg4
