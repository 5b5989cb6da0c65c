// The GGUF tensor types the engine reads, with their block geometry and the activation format
// each one is multiplied against (the same pairing llama.cpp's CPU backend uses, so quantized
// results agree with it).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pg4::quant {

enum class Type : int {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};

struct TypeInfo {
  const char* name;
  int64_t block_size;   // elements per block
  size_t block_bytes;   // bytes per block
  Type activation;      // format the other operand of a dot product is converted to
  bool is_weight_type;  // may appear as a model tensor
};

// Throws std::invalid_argument for a type id that is not one of the above.
const TypeInfo& type_info(Type type);
bool is_known_type(int type_id);

// Bytes of one row of n elements; n must be a multiple of the block size.
size_t row_bytes(Type type, int64_t n);

}  // namespace pg4::quant
