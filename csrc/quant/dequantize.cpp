// Dequantization, bit-identical to gguf.quants.dequantize: the same float32 operations in the
// same order as its numpy code. Each product of an fp16 scale with a sub-block scale and a quant
// needs at most 22 significant bits, so it is exact in float32 and a compiler's fused
// multiply-add gives the same bits as numpy's separate multiply and add. The inexact products
// (Q6_K's, Q8_K's) are followed by no addition and are rounded in numpy's order.
#include <cstring>
#include <stdexcept>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "quant/blocks.h"
#include "quant/quant.h"

namespace pg4::quant {

namespace {

template <typename Block>
const Block* blocks(const void* src) {
  return static_cast<const Block*>(src);
}

void dequantize_q4_0(const BlockQ4_0* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = fp16(x[i].d);
    for (int l = 0; l < kQK / 2; ++l) {
      y[l] = d * static_cast<float>((x[i].qs[l] & 0x0f) - 8);
      y[l + kQK / 2] = d * static_cast<float>((x[i].qs[l] >> 4) - 8);
    }
  }
}

void dequantize_q4_1(const BlockQ4_1* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = fp16(x[i].d);
    const float m = fp16(x[i].m);
    for (int l = 0; l < kQK / 2; ++l) {
      y[l] = d * static_cast<float>(x[i].qs[l] & 0x0f) + m;
      y[l + kQK / 2] = d * static_cast<float>(x[i].qs[l] >> 4) + m;
    }
  }
}

void dequantize_q5_0(const BlockQ5_0* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = fp16(x[i].d);
    const uint32_t h = high_bits(x[i].qh);
    for (int l = 0; l < kQK / 2; ++l) {
      const int q0 = (x[i].qs[l] & 0x0f) | (((h >> l) & 1) << 4);
      const int q1 = (x[i].qs[l] >> 4) | (((h >> (l + 16)) & 1) << 4);
      y[l] = d * static_cast<float>(q0 - 16);
      y[l + kQK / 2] = d * static_cast<float>(q1 - 16);
    }
  }
}

void dequantize_q5_1(const BlockQ5_1* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = fp16(x[i].d);
    const float m = fp16(x[i].m);
    const uint32_t h = high_bits(x[i].qh);
    for (int l = 0; l < kQK / 2; ++l) {
      const int q0 = (x[i].qs[l] & 0x0f) | (((h >> l) & 1) << 4);
      const int q1 = (x[i].qs[l] >> 4) | (((h >> (l + 16)) & 1) << 4);
      y[l] = d * static_cast<float>(q0) + m;
      y[l + kQK / 2] = d * static_cast<float>(q1) + m;
    }
  }
}

void dequantize_q8_0(const BlockQ8_0* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = fp16(x[i].d);
    for (int l = 0; l < kQK; ++l) y[l] = static_cast<float>(x[i].qs[l]) * d;
  }
}

void dequantize_q8_1(const BlockQ8_1* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQK) {
    const float d = fp16(x[i].d);
    for (int l = 0; l < kQK; ++l) y[l] = static_cast<float>(x[i].qs[l]) * d;
  }
}

void dequantize_q2_k(const BlockQ2_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const float d = fp16(x[i].d);
    const float dmin = fp16(x[i].dmin);
    for (int e = 0; e < kQKK; ++e) {
      const int h = e / 128, s = (e / 32) % 4, l = e % 32;
      const uint8_t sc = x[i].scales[e / 16];
      const float dl = d * static_cast<float>(sc & 0x0f);
      const float ml = dmin * static_cast<float>(sc >> 4);
      const int q = (x[i].qs[32 * h + l] >> (2 * s)) & 3;
      y[e] = dl * static_cast<float>(q) - ml;
    }
  }
}

void dequantize_q3_k(const BlockQ3_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const float d = fp16(x[i].d);
    uint32_t scales[4];
    q3_k_scales(x[i].scales, scales);
    for (int e = 0; e < kQKK; ++e) {
      const int h = e / 128, s = (e / 32) % 4, l = e % 32;
      const float dl = d * static_cast<float>(byte_of(scales, e / 16) - 32);
      const int low = (x[i].qs[32 * h + l] >> (2 * s)) & 3;
      const int high = (x[i].hmask[l] >> (e / 32)) & 1;
      y[e] = dl * static_cast<float>(low - (high ? 0 : 4));
    }
  }
}

void dequantize_q4_k(const BlockQ4_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = fp16(x[i].d);
    const float dmin = fp16(x[i].dmin);
    uint32_t scales_mins[4];
    k_scales_mins(x[i].scales, scales_mins);
    for (int j = 0; j < 8; ++j, y += 32) {
      const float dl = d * static_cast<float>(byte_of(scales_mins, j));
      const float ml = dmin * static_cast<float>(byte_of(scales_mins, 8 + j));
      const uint8_t* q = x[i].qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int l = 0; l < 32; ++l) y[l] = dl * static_cast<float>((q[l] >> shift) & 0x0f) - ml;
    }
  }
}

void dequantize_q5_k(const BlockQ5_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float d = fp16(x[i].d);
    const float dmin = fp16(x[i].dmin);
    uint32_t scales_mins[4];
    k_scales_mins(x[i].scales, scales_mins);
    for (int j = 0; j < 8; ++j, y += 32) {
      const float dl = d * static_cast<float>(byte_of(scales_mins, j));
      const float ml = dmin * static_cast<float>(byte_of(scales_mins, 8 + j));
      const uint8_t* q = x[i].qs + 32 * (j / 2);
      const int shift = 4 * (j % 2);
      for (int l = 0; l < 32; ++l) {
        const int v = ((q[l] >> shift) & 0x0f) | (((x[i].qh[l] >> j) & 1) << 4);
        y[l] = dl * static_cast<float>(v) - ml;
      }
    }
  }
}

void dequantize_q6_k(const BlockQ6_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    const float d = fp16(x[i].d);
    for (int e = 0; e < kQKK; ++e) {
      const int h = e / 128, c = (e / 32) % 4, l = e % 32;
      const float dl = d * static_cast<float>(x[i].scales[e / 16]);
      const int low = (x[i].ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0x0f;
      const int high = (x[i].qh[32 * h + l] >> (2 * c)) & 3;
      y[e] = dl * static_cast<float>((low | (high << 4)) - 32);
    }
  }
}

void dequantize_q8_k(const BlockQ8_K* x, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i, y += kQKK) {
    for (int l = 0; l < kQKK; ++l) y[l] = x[i].d * static_cast<float>(x[i].qs[l]);
  }
}

}  // namespace

void dequantize_row(Type type, const void* src, float* dst, int64_t n) {
  const int64_t nb = n / type_info(type).block_size;
  switch (type) {
    case Type::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case Type::F16: {
      const auto* h = static_cast<const uint16_t*>(src);
      int64_t i = 0;
#if defined(__F16C__)
      // The hardware conversion: the same float for every number as half_to_float (a
      // signalling NaN comes back quiet), and several times faster; attention converts every
      // f16 KV row it reads.
      for (; i + 8 <= n; i += 8) {
        const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(halves));
      }
#endif
      for (; i < n; ++i) dst[i] = half_to_float(h[i]);
      return;
    }
    case Type::BF16: {
      const auto* h = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(h[i]);
      return;
    }
    case Type::Q4_0:
      return dequantize_q4_0(blocks<BlockQ4_0>(src), dst, nb);
    case Type::Q4_1:
      return dequantize_q4_1(blocks<BlockQ4_1>(src), dst, nb);
    case Type::Q5_0:
      return dequantize_q5_0(blocks<BlockQ5_0>(src), dst, nb);
    case Type::Q5_1:
      return dequantize_q5_1(blocks<BlockQ5_1>(src), dst, nb);
    case Type::Q8_0:
      return dequantize_q8_0(blocks<BlockQ8_0>(src), dst, nb);
    case Type::Q8_1:
      return dequantize_q8_1(blocks<BlockQ8_1>(src), dst, nb);
    case Type::Q2_K:
      return dequantize_q2_k(blocks<BlockQ2_K>(src), dst, nb);
    case Type::Q3_K:
      return dequantize_q3_k(blocks<BlockQ3_K>(src), dst, nb);
    case Type::Q4_K:
      return dequantize_q4_k(blocks<BlockQ4_K>(src), dst, nb);
    case Type::Q5_K:
      return dequantize_q5_k(blocks<BlockQ5_K>(src), dst, nb);
    case Type::Q6_K:
      return dequantize_q6_k(blocks<BlockQ6_K>(src), dst, nb);
    case Type::Q8_K:
      return dequantize_q8_k(blocks<BlockQ8_K>(src), dst, nb);
  }
  throw std::invalid_argument("dequantize_row: unsupported type");
}

}  // namespace pg4::quant
