// The GGUF block formats on the device, decoded 32 elements (a "unit") at a time into the one
// shape every quantized kernel works with: int8 quants q and, for each half of 16 elements, a
// multiplier m and an offset o, so that element e = m[e / 16] * q[e] + o[e / 16]. The blocks are
// the structs of quant/blocks.h, which the CPU reads too (and the tests compare against).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "quant/blocks.h"
#include "quant/types.h"

namespace pg4::cuda {

struct Unit {
  int q[8];  // the 32 quants, four int8 to a word, element 4 * i + j in byte j of q[i]
  float m[2];
  float o[2];
};

// Loads of byte runs inside a block, no wider than the address allows.
__device__ __forceinline__ uint32_t u16_at(const void* p) {
  return *static_cast<const uint16_t*>(p);
}
// Four bytes at an address aligned for two.
__device__ __forceinline__ uint32_t u32_at2(const void* p) {
  const auto* b = static_cast<const uint8_t*>(p);
  return u16_at(b) | u16_at(b + 2) << 16;
}
__device__ __forceinline__ uint32_t u32_at(const void* p) {
  return *static_cast<const uint32_t*>(p);
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

// The decoder of each block format: Block, its struct in quant/blocks.h, and unit(x, s, u), which
// decodes unit s of block x. Blocks whose size is a multiple of 4 (16 for Q4_K) are read in words
// of 4 (16) bytes, the others (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K) in words of 2.
template <quant::Type T>
struct Format;

// The 32-element formats: unit u is block u.
template <>
struct Format<quant::Type::Q4_0> {
  using Block = quant::BlockQ4_0;
  static constexpr int kUnitsPerBlock = 1;
  __device__ static void unit(const Block& x, int, Unit& u) {
    const float d = quant::fp16(x.d);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at2(x.qs + 4 * i);
      u.q[i] = __vsub4(w & 0x0f0f0f0fu, 0x08080808u);
      u.q[i + 4] = __vsub4((w >> 4) & 0x0f0f0f0fu, 0x08080808u);
    }
    set_halves(u, d, d, 0.f, 0.f);
  }
};

template <>
struct Format<quant::Type::Q4_1> {
  using Block = quant::BlockQ4_1;
  static constexpr int kUnitsPerBlock = 1;
  __device__ static void unit(const Block& x, int, Unit& u) {
    const float d = quant::fp16(x.d), m = quant::fp16(x.m);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at(x.qs + 4 * i);
      u.q[i] = w & 0x0f0f0f0fu;
      u.q[i + 4] = (w >> 4) & 0x0f0f0f0fu;
    }
    set_halves(u, d, d, m, m);
  }
};

template <>
struct Format<quant::Type::Q5_0> {
  using Block = quant::BlockQ5_0;
  static constexpr int kUnitsPerBlock = 1;
  __device__ static void unit(const Block& x, int, Unit& u) {
    const float d = quant::fp16(x.d);
    const uint32_t qh = u32_at2(x.qh);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at2(x.qs + 4 * i);
      u.q[i] = __vsub4((w & 0x0f0f0f0fu) | bits_to_bytes(qh >> (4 * i), 4), 0x10101010u);
      u.q[i + 4] =
          __vsub4(((w >> 4) & 0x0f0f0f0fu) | bits_to_bytes(qh >> (16 + 4 * i), 4), 0x10101010u);
    }
    set_halves(u, d, d, 0.f, 0.f);
  }
};

template <>
struct Format<quant::Type::Q5_1> {
  using Block = quant::BlockQ5_1;
  static constexpr int kUnitsPerBlock = 1;
  __device__ static void unit(const Block& x, int, Unit& u) {
    const float d = quant::fp16(x.d), m = quant::fp16(x.m);
    const uint32_t qh = u32_at(x.qh);
    for (int i = 0; i < 4; ++i) {
      const uint32_t w = u32_at(x.qs + 4 * i);
      u.q[i] = (w & 0x0f0f0f0fu) | bits_to_bytes(qh >> (4 * i), 4);
      u.q[i + 4] = ((w >> 4) & 0x0f0f0f0fu) | bits_to_bytes(qh >> (16 + 4 * i), 4);
    }
    set_halves(u, d, d, m, m);
  }
};

template <>
struct Format<quant::Type::Q8_0> {
  using Block = quant::BlockQ8_0;
  static constexpr int kUnitsPerBlock = 1;
  __device__ static void unit(const Block& x, int, Unit& u) {
    const float d = quant::fp16(x.d);
    for (int i = 0; i < 8; ++i) u.q[i] = static_cast<int>(u32_at2(x.qs + 4 * i));
    set_halves(u, d, d, 0.f, 0.f);
  }
};

// The K formats: 256-element super-blocks of eight units; s is the unit within the block.
template <>
struct Format<quant::Type::Q2_K> {
  using Block = quant::BlockQ2_K;
  static constexpr int kUnitsPerBlock = 8;
  __device__ static void unit(const Block& x, int s, Unit& u) {
    const float d = quant::fp16(x.d), dmin = quant::fp16(x.dmin);
    const uint8_t* qs = x.qs + 32 * (s / 4);
    const int shift = 2 * (s % 4);
    for (int i = 0; i < 8; ++i) u.q[i] = (u32_at(qs + 4 * i) >> shift) & 0x03030303u;
    const uint8_t sc0 = x.scales[2 * s], sc1 = x.scales[2 * s + 1];
    set_halves(u, d * (sc0 & 15), d * (sc1 & 15), -dmin * (sc0 >> 4), -dmin * (sc1 >> 4));
  }
};

template <>
struct Format<quant::Type::Q3_K> {
  using Block = quant::BlockQ3_K;
  static constexpr int kUnitsPerBlock = 8;
  __device__ static void unit(const Block& x, int s, Unit& u) {
    const float d = quant::fp16(x.d);
    const uint8_t* qs = x.qs + 32 * (s / 4);
    const int shift = 2 * (s % 4);
    for (int i = 0; i < 8; ++i) {
      const uint32_t low = (u32_at2(qs + 4 * i) >> shift) & 0x03030303u;
      const uint32_t clear_high = ~(u32_at2(x.hmask + 4 * i) >> s) & 0x01010101u;  // means minus 4
      u.q[i] = __vsub4(low, clear_high << 2);
    }
    set_halves(u, d * quant::q3_k_scale(x.scales, 2 * s),
               d * quant::q3_k_scale(x.scales, 2 * s + 1), 0.f, 0.f);
  }
};

template <>
struct Format<quant::Type::Q4_K> {
  using Block = quant::BlockQ4_K;
  static constexpr int kUnitsPerBlock = 8;
  __device__ static void unit(const Block& x, int s, Unit& u) {
    const float d = quant::fp16(x.d), dmin = quant::fp16(x.dmin);
    const uint4* qs = reinterpret_cast<const uint4*>(x.qs + 32 * (s / 2));
    const int shift = 4 * (s % 2);
    const uint4 lo = qs[0], hi = qs[1];
    const uint32_t w[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    for (int i = 0; i < 8; ++i) u.q[i] = (w[i] >> shift) & 0x0f0f0f0fu;
    int scale, min;
    quant::k_scale_min(x.scales, s, scale, min);
    set_halves(u, d * scale, d * scale, -dmin * min, -dmin * min);
  }
};

template <>
struct Format<quant::Type::Q5_K> {
  using Block = quant::BlockQ5_K;
  static constexpr int kUnitsPerBlock = 8;
  __device__ static void unit(const Block& x, int s, Unit& u) {
    const float d = quant::fp16(x.d), dmin = quant::fp16(x.dmin);
    const uint8_t* qs = x.qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int i = 0; i < 8; ++i) {
      const uint32_t high = (u32_at(x.qh + 4 * i) >> s) & 0x01010101u;
      u.q[i] = ((u32_at(qs + 4 * i) >> shift) & 0x0f0f0f0fu) | high << 4;
    }
    int scale, min;
    quant::k_scale_min(x.scales, s, scale, min);
    set_halves(u, d * scale, d * scale, -dmin * min, -dmin * min);
  }
};

template <>
struct Format<quant::Type::Q6_K> {
  using Block = quant::BlockQ6_K;
  static constexpr int kUnitsPerBlock = 8;
  __device__ static void unit(const Block& x, int s, Unit& u) {
    const int h = s / 4, c = s % 4;
    const uint8_t* ql = x.ql + 64 * h + 32 * (c % 2);
    const uint8_t* qh = x.qh + 32 * h;
    const int low_shift = 4 * (c / 2), high_shift = 2 * c;
    for (int i = 0; i < 8; ++i) {
      const uint32_t low = (u32_at2(ql + 4 * i) >> low_shift) & 0x0f0f0f0fu;
      const uint32_t high = (u32_at2(qh + 4 * i) >> high_shift) & 0x03030303u;
      u.q[i] = __vsub4(low | high << 4, 0x20202020u);
    }
    const float d = quant::fp16(x.d);
    set_halves(u, d * x.scales[2 * s], d * x.scales[2 * s + 1], 0.f, 0.f);
  }
};

// Unit `index` of a row of format T.
template <quant::Type T>
__device__ __forceinline__ void load_unit(const uint8_t* row, int index, Unit& u) {
  using F = Format<T>;
  const auto* blocks = reinterpret_cast<const typename F::Block*>(row);
  F::unit(blocks[index / F::kUnitsPerBlock], index % F::kUnitsPerBlock, u);
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
