#include "quant/types.h"

#include <stdexcept>
#include <string>

#include "quant/blocks.h"

namespace pg4::quant {

namespace {

struct Entry {
  Type type;
  TypeInfo info;
};

// Activation formats follow llama.cpp's CPU backend (its vec_dot_type), so that rounding of the
// activations, and therefore the logits, agree with it.
constexpr Entry kTypes[] = {
    {Type::F32, {"F32", 1, sizeof(float), Type::F32, true}},
    {Type::F16, {"F16", 1, sizeof(uint16_t), Type::F16, true}},
    {Type::BF16, {"BF16", 1, sizeof(uint16_t), Type::BF16, true}},
    {Type::Q4_0, {"Q4_0", kQK, sizeof(BlockQ4_0), Type::Q8_0, true}},
    {Type::Q4_1, {"Q4_1", kQK, sizeof(BlockQ4_1), Type::Q8_1, true}},
    {Type::Q5_0, {"Q5_0", kQK, sizeof(BlockQ5_0), Type::Q8_0, true}},
    {Type::Q5_1, {"Q5_1", kQK, sizeof(BlockQ5_1), Type::Q8_1, true}},
    {Type::Q8_0, {"Q8_0", kQK, sizeof(BlockQ8_0), Type::Q8_0, true}},
    {Type::Q8_1, {"Q8_1", kQK, sizeof(BlockQ8_1), Type::Q8_1, false}},
    {Type::Q2_K, {"Q2_K", kQKK, sizeof(BlockQ2_K), Type::Q8_K, true}},
    {Type::Q3_K, {"Q3_K", kQKK, sizeof(BlockQ3_K), Type::Q8_K, true}},
    {Type::Q4_K, {"Q4_K", kQKK, sizeof(BlockQ4_K), Type::Q8_K, true}},
    {Type::Q5_K, {"Q5_K", kQKK, sizeof(BlockQ5_K), Type::Q8_K, true}},
    {Type::Q6_K, {"Q6_K", kQKK, sizeof(BlockQ6_K), Type::Q8_K, true}},
    {Type::Q8_K, {"Q8_K", kQKK, sizeof(BlockQ8_K), Type::Q8_K, false}},
};

const Entry* find(int type_id) {
  for (const Entry& e : kTypes) {
    if (static_cast<int>(e.type) == type_id) return &e;
  }
  return nullptr;
}

}  // namespace

const TypeInfo& type_info(Type type) {
  const Entry* e = find(static_cast<int>(type));
  if (e == nullptr) {
    throw std::invalid_argument("unknown GGUF tensor type id " +
                                std::to_string(static_cast<int>(type)));
  }
  return e->info;
}

bool is_known_type(int type_id) { return find(type_id) != nullptr; }

size_t row_bytes(Type type, int64_t n) {
  const TypeInfo& info = type_info(type);
  if (n < 0 || n % info.block_size != 0) {
    throw std::invalid_argument("row length " + std::to_string(n) + " is not a multiple of " +
                                std::to_string(info.block_size) + " for " + info.name);
  }
  return static_cast<size_t>(n / info.block_size) * info.block_bytes;
}

}  // namespace pg4::quant
