// The GGUF block formats on the device, decoded 32 elements (a "unit") at a time into the one
// shape every quantized kernel works with: int8 quants q and, for each half of 16 elements, a
// multiplier m and an offset o, so that element e = m[e / 16] * q[e] + o[e / 16]. The layouts
// are those of quant/blocks.h (the CPU's definitions, which the tests compare against).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "quant/types.h"

namespace pg4::cuda {

struct Unit {
  int q[8];  // the 32 quants, four int8 to a word, element 4 * i + j in byte j of q[i]
  float m[2];
  float o[2];
};

__device__ __forceinline__ float half_at(const uint8_t* p) {
  return __half2float(*reinterpret_cast<const __half*>(p));
}
__device__ __forceinline__ uint32_t u16_at(const uint8_t* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}
// Four bytes at an address aligned for two.
__device__ __forceinline__ uint32_t u32_at2(const uint8_t* p) {
  return u16_at(p) | u16_at(p + 2) << 16;
}
__device__ __forceinline__ uint32_t u32_at(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Spreads bits 0..3 of `bits` to bit `shift` of bytes 0..3.
__device__ __forceinline__ uint32_t bits_to_bytes(uint32_t bits, int shift) {
  return ((bits & 1u) | (bits & 2u) << 7 | (bits & 4u) << 14 | (bits & 8u) << 21) << shift;
}

__device__ __forceinline__ void set_halves(Unit& u, float m0, float m1, float o0, float o1) {
  u.m[0] = m0;
  u.m[1] = m1;
  u.o[0] = o0;
  u.o[1] = o1;
}

template <quant::Type T>
struct Format;

// The 32-element formats: unit u is block u.
template <>
struct Format<quant::Type::Q4_0> {
  static constexpr int kBlockBytes = 18, kUnitsPerBlock = 1;
  __device__ static void unit(const uint8_t* b, int, Unit& u) {
    const float d = half_at(b);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at2(b + 2 + 4 * i);
      u.q[i] = __vsub4(w & 0x0f0f0f0fu, 0x08080808u);
      u.q[i + 4] = __vsub4((w >> 4) & 0x0f0f0f0fu, 0x08080808u);
    }
    set_halves(u, d, d, 0.f, 0.f);
  }
};

template <>
struct Format<quant::Type::Q4_1> {
  static constexpr int kBlockBytes = 20, kUnitsPerBlock = 1;
  __device__ static void unit(const uint8_t* b, int, Unit& u) {
    const float d = half_at(b), m = half_at(b + 2);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at(b + 4 + 4 * i);
      u.q[i] = w & 0x0f0f0f0fu;
      u.q[i + 4] = (w >> 4) & 0x0f0f0f0fu;
    }
    set_halves(u, d, d, m, m);
  }
};

template <>
struct Format<quant::Type::Q5_0> {
  static constexpr int kBlockBytes = 22, kUnitsPerBlock = 1;
  __device__ static void unit(const uint8_t* b, int, Unit& u) {
    const float d = half_at(b);
    const uint32_t qh = u32_at2(b + 2);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at2(b + 6 + 4 * i);
      u.q[i] = __vsub4((w & 0x0f0f0f0fu) | bits_to_bytes(qh >> (4 * i), 4), 0x10101010u);
      u.q[i + 4] =
          __vsub4(((w >> 4) & 0x0f0f0f0fu) | bits_to_bytes(qh >> (16 + 4 * i), 4), 0x10101010u);
    }
    set_halves(u, d, d, 0.f, 0.f);
  }
};

template <>
struct Format<quant::Type::Q5_1> {
  static constexpr int kBlockBytes = 24, kUnitsPerBlock = 1;
  __device__ static void unit(const uint8_t* b, int, Unit& u) {
    const float d = half_at(b), m = half_at(b + 2);
    const uint32_t qh = u32_at(b + 4);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at(b + 8 + 4 * i);
      u.q[i] = (w & 0x0f0f0f0fu) | bits_to_bytes(qh >> (4 * i), 4);
      u.q[i + 4] = ((w >> 4) & 0x0f0f0f0fu) | bits_to_bytes(qh >> (16 + 4 * i), 4);
    }
    set_halves(u, d, d, m, m);
  }
};

template <>
struct Format<quant::Type::Q8_0> {
  static constexpr int kBlockBytes = 34, kUnitsPerBlock = 1;
  __device__ static void unit(const uint8_t* b, int, Unit& u) {
    const float d = half_at(b);
    for (int i = 0; i < 8; ++i) u.q[i] = static_cast<int>(u32_at2(b + 2 + 4 * i));
    set_halves(u, d, d, 0.f, 0.f);
  }
};

// The K formats: 256-element super-blocks of eight units; s is the unit within the block.
template <>
struct Format<quant::Type::Q2_K> {
  static constexpr int kBlockBytes = 84, kUnitsPerBlock = 8;
  __device__ static void unit(const uint8_t* b, int s, Unit& u) {
    const float d = half_at(b + 80), dmin = half_at(b + 82);
    const uint8_t* qs = b + 16 + 32 * (s / 4);
    const int shift = 2 * (s % 4);
    for (int i = 0; i < 8; ++i) u.q[i] = (u32_at(qs + 4 * i) >> shift) & 0x03030303u;
    const uint8_t sc0 = b[2 * s], sc1 = b[2 * s + 1];
    set_halves(u, d * (sc0 & 15), d * (sc1 & 15), -dmin * (sc0 >> 4), -dmin * (sc1 >> 4));
  }
};

// The sixteen 6-bit scales of Q3_K (offset 32): scale i has its low nibble in nibble i / 8 of
// byte i % 8 and its top two bits at bit 2 * (i / 4) of byte 8 + i % 4.
__device__ __forceinline__ int q3_k_scale(const uint8_t* packed, int i) {
  const int low = (packed[i % 8] >> (4 * (i / 8))) & 15;
  const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | high << 4) - 32;
}

template <>
struct Format<quant::Type::Q3_K> {
  static constexpr int kBlockBytes = 110, kUnitsPerBlock = 8;
  __device__ static void unit(const uint8_t* b, int s, Unit& u) {
    const float d = half_at(b + 108);
    const uint8_t* qs = b + 32 + 32 * (s / 4);
    const int shift = 2 * (s % 4);
    for (int i = 0; i < 8; ++i) {
      const uint32_t low = (u32_at2(qs + 4 * i) >> shift) & 0x03030303u;
      const uint32_t clear_high = ~(u32_at2(b + 4 * i) >> s) & 0x01010101u;  // means minus 4
      u.q[i] = __vsub4(low, clear_high << 2);
    }
    set_halves(u, d * q3_k_scale(b + 96, 2 * s), d * q3_k_scale(b + 96, 2 * s + 1), 0.f, 0.f);
  }
};

// The 6-bit scale and minimum of sub-block j of Q4_K / Q5_K (see quant::k_scales_mins).
__device__ __forceinline__ void k_scale_min(const uint8_t* packed, int j, int& scale, int& min) {
  if (j < 4) {
    scale = packed[j] & 63;
    min = packed[j + 4] & 63;
  } else {
    scale = (packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4);
    min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

template <>
struct Format<quant::Type::Q4_K> {
  static constexpr int kBlockBytes = 144, kUnitsPerBlock = 8;
  __device__ static void unit(const uint8_t* b, int s, Unit& u) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint4* qs = reinterpret_cast<const uint4*>(b + 16 + 32 * (s / 2));
    const int shift = 4 * (s % 2);
    const uint4 lo = qs[0], hi = qs[1];
    const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    for (int i = 0; i < 8; ++i) u.q[i] = (w[i] >> shift) & 0x0f0f0f0fu;
    int scale, min;
    k_scale_min(b + 4, s, scale, min);
    set_halves(u, d * scale, d * scale, -dmin * min, -dmin * min);
  }
};

template <>
struct Format<quant::Type::Q5_K> {
  static constexpr int kBlockBytes = 176, kUnitsPerBlock = 8;
  __device__ static void unit(const uint8_t* b, int s, Unit& u) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48 + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int i = 0; i < 8; ++i) {
      const uint32_t high = (u32_at(qh + 4 * i) >> s) & 0x01010101u;
      u.q[i] = ((u32_at(qs + 4 * i) >> shift) & 0x0f0f0f0fu) | high << 4;
    }
    int scale, min;
    k_scale_min(b + 4, s, scale, min);
    set_halves(u, d * scale, d * scale, -dmin * min, -dmin * min);
  }
};

template <>
struct Format<quant::Type::Q6_K> {
  static constexpr int kBlockBytes = 210, kUnitsPerBlock = 8;
  __device__ static void unit(const uint8_t* b, int s, Unit& u) {
    const int h = s / 4, c = s % 4;
    const uint8_t* ql = b + 64 * h + 32 * (c % 2);
    const uint8_t* qh = b + 128 + 32 * h;
    const int low_shift = 4 * (c / 2), high_shift = 2 * c;
    for (int i = 0; i < 8; ++i) {
      const uint32_t low = (u32_at2(ql + 4 * i) >> low_shift) & 0x0f0f0f0fu;
      const uint32_t high = (u32_at2(qh + 4 * i) >> high_shift) & 0x03030303u;
      u.q[i] = __vsub4(low | high << 4, 0x20202020u);
    }
    const float d = half_at(b + 208);
    const auto* scales = reinterpret_cast<const int8_t*>(b + 192);
    set_halves(u, d * scales[2 * s], d * scales[2 * s + 1], 0.f, 0.f);
  }
};

// Unit `index` of a row of format T.
template <quant::Type T>
__device__ __forceinline__ void load_unit(const uint8_t* row, int index, Unit& u) {
  using F = Format<T>;
  Format<T>::unit(row + (index / F::kUnitsPerBlock) * F::kBlockBytes, index % F::kUnitsPerBlock, u);
}

// Element j of a row of a float format.
template <quant::Type T>
__device__ __forceinline__ float float_at(const uint8_t* row, int64_t j) {
  if constexpr (T == quant::Type::F32) {
    return reinterpret_cast<const float*>(row)[j];
  } else if constexpr (T == quant::Type::F16) {
    return __half2float(reinterpret_cast<const __half*>(row)[j]);
  } else {
    return __uint_as_float(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(row)[j]) << 16);
  }
}

// Calls fn.template operator()<T>() for the weight type at run time: one switch for every
// kernel that is instantiated per format.
template <typename Fn>
void dispatch_quantized(quant::Type type, Fn&& fn) {
  using quant::Type;
  switch (type) {
    case Type::Q4_0:
      fn.template operator()<Type::Q4_0>();
      break;
    case Type::Q4_1:
      fn.template operator()<Type::Q4_1>();
      break;
    case Type::Q5_0:
      fn.template operator()<Type::Q5_0>();
      break;
    case Type::Q5_1:
      fn.template operator()<Type::Q5_1>();
      break;
    case Type::Q8_0:
      fn.template operator()<Type::Q8_0>();
      break;
    case Type::Q2_K:
      fn.template operator()<Type::Q2_K>();
      break;
    case Type::Q3_K:
      fn.template operator()<Type::Q3_K>();
      break;
    case Type::Q4_K:
      fn.template operator()<Type::Q4_K>();
      break;
    case Type::Q5_K:
      fn.template operator()<Type::Q5_K>();
      break;
    case Type::Q6_K:
      fn.template operator()<Type::Q6_K>();
      break;
    default:
      throw std::invalid_argument("no CUDA kernel for this quantized type");
  }
}

template <typename Fn>
void dispatch_float(quant::Type type, Fn&& fn) {
  using quant::Type;
  switch (type) {
    case Type::F32:
      fn.template operator()<Type::F32>();
      break;
    case Type::F16:
      fn.template operator()<Type::F16>();
      break;
    case Type::BF16:
      fn.template operator()<Type::BF16>();
      break;
    default:
      throw std::invalid_argument("no CUDA kernel for this float type");
  }
}

inline bool is_float_type(quant::Type type) {
  return type == quant::Type::F32 || type == quant::Type::F16 || type == quant::Type::BF16;
}

}  // namespace pg4::cuda
