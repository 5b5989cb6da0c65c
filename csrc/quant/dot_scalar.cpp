// Portable dot products, one weight row with one converted activation row. They are the reference
// the SIMD kernels are checked against: integer products are summed exactly in int32 per block,
// then combined with the block scales in float, in the plainest order.
#include "quant/blocks.h"
#include "quant/dot.h"

namespace pg4::quant::detail {

namespace {

template <typename Block>
const Block* as(const void* p) {
  return static_cast<const Block*>(p);
}

// Float formats: products of fp16 or bf16 values are exact in float, and a double sum keeps the
// reference free of accumulation error.
float dot_f32(int64_t n, const void* w, const void* a) {
  const auto* x = as<float>(w);
  const auto* y = as<float>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * y[i];
  return static_cast<float>(sum);
}

float dot_f16(int64_t n, const void* w, const void* a) {
  const auto* x = as<uint16_t>(w);
  const auto* y = as<uint16_t>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += half_to_float(x[i]) * half_to_float(y[i]);
  return static_cast<float>(sum);
}

float dot_bf16(int64_t n, const void* w, const void* a) {
  const auto* x = as<uint16_t>(w);
  const auto* y = as<uint16_t>(a);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += bf16_to_float(x[i]) * bf16_to_float(y[i]);
  return static_cast<float>(sum);
}

float dot_q4_0(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ4_0>(w);
  const auto* y = as<BlockQ8_0>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    int isum = 0;
    for (int l = 0; l < kQK / 2; ++l) {
      isum += ((x[i].qs[l] & 0x0f) - 8) * y[i].qs[l];
      isum += ((x[i].qs[l] >> 4) - 8) * y[i].qs[l + kQK / 2];
    }
    sum += fp16(x[i].d) * fp16(y[i].d) * static_cast<float>(isum);
  }
  return sum;
}

// Offset formats: x = d * q + m, so x . y = d * dy * sum(q * qy) + m * (dy * sum(qy)), the last
// factor being the activation block's stored s.
float dot_q4_1(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ4_1>(w);
  const auto* y = as<BlockQ8_1>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    int isum = 0;
    for (int l = 0; l < kQK / 2; ++l) {
      isum += (x[i].qs[l] & 0x0f) * y[i].qs[l];
      isum += (x[i].qs[l] >> 4) * y[i].qs[l + kQK / 2];
    }
    sum += fp16(x[i].d) * fp16(y[i].d) * static_cast<float>(isum) + fp16(x[i].m) * fp16(y[i].s);
  }
  return sum;
}

float dot_q5_0(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ5_0>(w);
  const auto* y = as<BlockQ8_0>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    const uint32_t h = high_bits(x[i].qh);
    int isum = 0;
    for (int l = 0; l < kQK / 2; ++l) {
      const int q0 = ((x[i].qs[l] & 0x0f) | (((h >> l) & 1) << 4)) - 16;
      const int q1 = ((x[i].qs[l] >> 4) | (((h >> (l + 16)) & 1) << 4)) - 16;
      isum += q0 * y[i].qs[l] + q1 * y[i].qs[l + kQK / 2];
    }
    sum += fp16(x[i].d) * fp16(y[i].d) * static_cast<float>(isum);
  }
  return sum;
}

float dot_q5_1(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ5_1>(w);
  const auto* y = as<BlockQ8_1>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    const uint32_t h = high_bits(x[i].qh);
    int isum = 0;
    for (int l = 0; l < kQK / 2; ++l) {
      const int q0 = (x[i].qs[l] & 0x0f) | (((h >> l) & 1) << 4);
      const int q1 = (x[i].qs[l] >> 4) | (((h >> (l + 16)) & 1) << 4);
      isum += q0 * y[i].qs[l] + q1 * y[i].qs[l + kQK / 2];
    }
    sum += fp16(x[i].d) * fp16(y[i].d) * static_cast<float>(isum) + fp16(x[i].m) * fp16(y[i].s);
  }
  return sum;
}

float dot_q8_0(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ8_0>(w);
  const auto* y = as<BlockQ8_0>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    int isum = 0;
    for (int l = 0; l < kQK; ++l) isum += x[i].qs[l] * y[i].qs[l];
    sum += fp16(x[i].d) * fp16(y[i].d) * static_cast<float>(isum);
  }
  return sum;
}

// K formats with a minimum: x = d * sc * q - dmin * m, so the minimum term needs only the
// activation's sums of 16 (bsums).
float dot_q2_k(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ2_K>(w);
  const auto* y = as<BlockQ8_K>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQKK; ++i) {
    int isum = 0, msum = 0;
    for (int g = 0; g < kQKK / 16; ++g) {
      int gsum = 0;
      for (int e = 16 * g; e < 16 * g + 16; ++e) {
        const int q = (x[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        gsum += q * y[i].qs[e];
      }
      isum += (x[i].scales[g] & 0x0f) * gsum;
      msum += (x[i].scales[g] >> 4) * y[i].bsums[g];
    }
    sum += y[i].d * fp16(x[i].d) * static_cast<float>(isum) -
           y[i].d * fp16(x[i].dmin) * static_cast<float>(msum);
  }
  return sum;
}

float dot_q3_k(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ3_K>(w);
  const auto* y = as<BlockQ8_K>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQKK; ++i) {
    uint32_t scales[4];
    q3_k_scales(x[i].scales, scales);
    int isum = 0;
    for (int g = 0; g < kQKK / 16; ++g) {
      int gsum = 0;
      for (int e = 16 * g; e < 16 * g + 16; ++e) {
        const int low = (x[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
        const int high = (x[i].hmask[e % 32] >> (e / 32)) & 1;
        gsum += (low - (high ? 0 : 4)) * y[i].qs[e];
      }
      isum += (byte_of(scales, g) - 32) * gsum;
    }
    sum += fp16(x[i].d) * y[i].d * static_cast<float>(isum);
  }
  return sum;
}

template <bool kFifthBit, typename Block>
float dot_q45_k(int64_t n, const Block* x, const BlockQ8_K* y) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQKK; ++i) {
    uint32_t scales_mins[4];
    k_scales_mins(x[i].scales, scales_mins);
    int isum = 0, msum = 0;
    for (int j = 0; j < 8; ++j) {
      int jsum = 0;
      for (int l = 0; l < 32; ++l) {
        int q = (x[i].qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0x0f;
        if constexpr (kFifthBit) q |= ((x[i].qh[l] >> j) & 1) << 4;
        jsum += q * y[i].qs[32 * j + l];
      }
      isum += byte_of(scales_mins, j) * jsum;
      msum += byte_of(scales_mins, 8 + j) * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
    }
    sum += y[i].d * fp16(x[i].d) * static_cast<float>(isum) -
           y[i].d * fp16(x[i].dmin) * static_cast<float>(msum);
  }
  return sum;
}

float dot_q4_k(int64_t n, const void* w, const void* a) {
  return dot_q45_k<false>(n, as<BlockQ4_K>(w), as<BlockQ8_K>(a));
}

float dot_q5_k(int64_t n, const void* w, const void* a) {
  return dot_q45_k<true>(n, as<BlockQ5_K>(w), as<BlockQ8_K>(a));
}

float dot_q6_k(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ6_K>(w);
  const auto* y = as<BlockQ8_K>(a);
  float sum = 0.0f;
  for (int64_t i = 0; i < n / kQKK; ++i) {
    int isum = 0;
    for (int g = 0; g < kQKK / 16; ++g) {
      int gsum = 0;
      for (int e = 16 * g; e < 16 * g + 16; ++e) {
        const int h = e / 128, c = (e / 32) % 4, l = e % 32;
        const int low = (x[i].ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0x0f;
        const int high = (x[i].qh[32 * h + l] >> (2 * c)) & 3;
        gsum += ((low | (high << 4)) - 32) * y[i].qs[e];
      }
      isum += x[i].scales[g] * gsum;
    }
    sum += fp16(x[i].d) * y[i].d * static_cast<float>(isum);
  }
  return sum;
}

}  // namespace

Kernels scalar_kernels(Type weight_type) {
  switch (weight_type) {
    case Type::F32:
      return single_row_kernels<dot_f32>();
    case Type::F16:
      return single_row_kernels<dot_f16>();
    case Type::BF16:
      return single_row_kernels<dot_bf16>();
    case Type::Q4_0:
      return single_row_kernels<dot_q4_0>();
    case Type::Q4_1:
      return single_row_kernels<dot_q4_1>();
    case Type::Q5_0:
      return single_row_kernels<dot_q5_0>();
    case Type::Q5_1:
      return single_row_kernels<dot_q5_1>();
    case Type::Q8_0:
      return single_row_kernels<dot_q8_0>();
    case Type::Q2_K:
      return single_row_kernels<dot_q2_k>();
    case Type::Q3_K:
      return single_row_kernels<dot_q3_k>();
    case Type::Q4_K:
      return single_row_kernels<dot_q4_k>();
    case Type::Q5_K:
      return single_row_kernels<dot_q5_k>();
    case Type::Q6_K:
      return single_row_kernels<dot_q6_k>();
    default:
      return {};
  }
}

}  // namespace pg4::quant::detail
