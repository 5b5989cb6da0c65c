// Conversion of float activations into the format a weight type is multiplied against, rounded
// exactly as llama.cpp's x86 CPU backend rounds them (its AVX2 quantize_row_q8_0 / q8_1 and the
// reference quantize_row_q8_K), so that quantized logits agree with it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "quant/blocks.h"
#include "quant/quant.h"

namespace pg4::quant {

namespace {

// std::nearbyint rounds half to even in the default rounding mode, as llama.cpp's
// _mm256_round_ps(_MM_ROUND_NEAREST) and its nearest_int (the 1.5 * 2^23 trick) both do. The
// clamp saturates like its int8 packing and keeps a NaN (from a non-finite activation) defined.
inline int round_even(float v) {
  const float r = std::nearbyint(v);
  return r > 127.0f ? 127 : (r >= -128.0f ? static_cast<int>(r) : -128);
}

// One 32-element block: scale d = amax / 127 and quants round(x * 127 / amax). Returns d
// (unrounded) and the sum of the quants, which Q8_1 stores.
inline float quantize_block_q8(const float* x, int8_t* qs, int& sum) {
  float amax = 0.0f;
  for (int l = 0; l < kQK; ++l) amax = std::max(amax, std::fabs(x[l]));
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  int s = 0;
  for (int l = 0; l < kQK; ++l) {
    const int q = round_even(x[l] * id);
    qs[l] = static_cast<int8_t>(q);
    s += q;
  }
  sum = s;
  return amax / 127.0f;
}

void quantize_q8_0(const float* x, BlockQ8_0* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += kQK) {
    int sum;
    y[i].d = float_to_half(quantize_block_q8(x, y[i].qs, sum));
  }
}

void quantize_q8_1(const float* x, BlockQ8_1* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += kQK) {
    int sum;
    const float d = quantize_block_q8(x, y[i].qs, sum);
    y[i].d = float_to_half(d);
    y[i].s = float_to_half(d * static_cast<float>(sum));
  }
}

// Q8_K scales by the signed value of largest magnitude (the first one, on ties), mapping it to
// -127, and stores the float reciprocal of that factor.
void quantize_q8_k(const float* x, BlockQ8_K* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, x += kQKK) {
    float amax = 0.0f, max = 0.0f;
    for (int l = 0; l < kQKK; ++l) {
      const float ax = std::fabs(x[l]);
      if (ax > amax) {
        amax = ax;
        max = x[l];
      }
    }
    if (amax == 0.0f) {
      std::memset(&y[i], 0, sizeof y[i]);
      continue;
    }
    const float iscale = -127.0f / max;
    for (int l = 0; l < kQKK; ++l) {
      y[i].qs[l] = static_cast<int8_t>(round_even(iscale * x[l]));
    }
    for (int g = 0; g < kQKK / 16; ++g) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += y[i].qs[16 * g + l];
      y[i].bsums[g] = static_cast<int16_t>(sum);
    }
    y[i].d = 1.0f / iscale;
  }
}

}  // namespace

void quantize_activation_row(Type activation_type, const float* src, void* dst, int64_t n) {
  const int64_t nb = n / type_info(activation_type).block_size;
  switch (activation_type) {
    case Type::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case Type::F16: {
      auto* h = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = float_to_half(src[i]);
      return;
    }
    case Type::BF16: {
      auto* h = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) h[i] = float_to_bf16(src[i]);
      return;
    }
    case Type::Q8_0:
      return quantize_q8_0(src, static_cast<BlockQ8_0*>(dst), nb);
    case Type::Q8_1:
      return quantize_q8_1(src, static_cast<BlockQ8_1*>(dst), nb);
    case Type::Q8_K:
      return quantize_q8_k(src, static_cast<BlockQ8_K*>(dst), nb);
    default:
      break;
  }
  throw std::invalid_argument(std::string(type_info(activation_type).name) +
                              " is not an activation format");
}

}  // namespace pg4::quant
