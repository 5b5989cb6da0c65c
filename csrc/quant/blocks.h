// The byte layout of every GGUF block format, defined once for the CPU and the CUDA kernels. Each
// struct is exactly one block as it lies in the file (no padding, so a row is an array of them),
// and the helpers below compile for the device too. Inside a row a block is only as aligned as
// its size allows (Q6_K's 210 bytes: 2), so device code reads runs of bytes no wider than that
// (see ops/cuda/quant_units.cuh).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "common/host_device.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

namespace pg4::quant {

constexpr int kQK = 32;    // elements per block of the 32-element formats
constexpr int kQKK = 256;  // elements per super-block of the K formats
constexpr int kKScaleBytes = 12;

struct BlockQ4_0 {
  uint16_t d;           // fp16 scale
  uint8_t qs[kQK / 2];  // element j in the low nibble of qs[j], element j + 16 in the high one
};

struct BlockQ4_1 {
  uint16_t d;  // fp16 scale
  uint16_t m;  // fp16 minimum
  uint8_t qs[kQK / 2];
};

struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];  // bit j (little-endian 32-bit word) is the fifth bit of element j
  uint8_t qs[kQK / 2];
};

struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};

struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};

struct BlockQ8_1 {
  uint16_t d;
  uint16_t s;  // fp16 of d * sum(qs), so offset formats need no pass over the quants
  int8_t qs[kQK];
};

// Element 128 * h + 32 * s + l has quant (qs[32 * h + l] >> 2 * s) & 3 and scale byte
// scales[(128 * h + 32 * s + l) / 16]: the low nibble scales by d, the high one by dmin.
struct BlockQ2_K {
  uint8_t scales[kQKK / 16];
  uint8_t qs[kQKK / 4];
  uint16_t d;
  uint16_t dmin;
};

// Quant layout as Q2_K plus a third bit: bit (e / 32) of hmask[e % 32]; a clear bit means -4.
// Sixteen 6-bit signed scales (offset 32) are packed into 12 bytes (see q3_k_scales).
struct BlockQ3_K {
  uint8_t hmask[kQKK / 8];
  uint8_t qs[kQKK / 4];
  uint8_t scales[kKScaleBytes];
  uint16_t d;
};

// Eight sub-blocks of 32: sub-block 2 * c + h takes nibble h of qs[32 * c + l]. Eight 6-bit
// scales and eight 6-bit minimums are packed into 12 bytes (see k_scales_mins).
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qs[kQKK / 2];
};

// Q4_K plus a fifth bit: bit s of qh[l] belongs to element l of sub-block s.
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[kKScaleBytes];
  uint8_t qh[kQKK / 8];
  uint8_t qs[kQKK / 2];
};

// Element 128 * h + 32 * c + l (c < 4, l < 32): low four bits are nibble (c / 2) of
// ql[64 * h + 32 * (c % 2) + l], high two bits are (qh[32 * h + l] >> 2 * c) & 3; value - 32,
// scaled by scales[e / 16] * d.
struct BlockQ6_K {
  uint8_t ql[kQKK / 2];
  uint8_t qh[kQKK / 4];
  int8_t scales[kQKK / 16];
  uint16_t d;
};

struct BlockQ8_K {
  float d;
  int8_t qs[kQKK];
  int16_t bsums[kQKK / 16];  // sums of each 16 quants, for the minimum terms of the K formats
};

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ8_1) == 36);
static_assert(sizeof(BlockQ2_K) == 84);
static_assert(sizeof(BlockQ3_K) == 110);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

// The value of an fp16 field (exact, so the device's conversion gives the same float).
PG4_HOST_DEVICE inline float fp16(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  return half_to_float(h);
#endif
}

// Q5_0 / Q5_1: the fifth bits of the 32 elements as one little-endian word.
PG4_HOST_DEVICE inline uint32_t high_bits(const uint8_t qh[4]) {
  uint32_t h;
  std::memcpy(&h, qh, sizeof h);
  return h;
}

// The packed sub-block scales of the K formats, unpacked four bytes to a word: byte j of the
// result is byte_of(out, j).
PG4_HOST_DEVICE inline uint8_t byte_of(const uint32_t w[4], int j) {
  return static_cast<uint8_t>(w[j / 4] >> (8 * (j % 4)));
}

// Q4_K / Q5_K: bytes 0-7 are the 6-bit scales of the eight sub-blocks, bytes 8-15 their 6-bit
// minimums. Sub-blocks 0-3 sit in the low six bits of packed bytes j (scale) and j + 4 (minimum);
// sub-blocks 4-7 take a nibble of byte j + 4 and, as their top two bits, the top two bits of
// bytes j - 4 (scale) and j (minimum).
PG4_HOST_DEVICE inline void k_scales_mins(const uint8_t* packed, uint32_t out[4]) {
  uint32_t w[3];
  std::memcpy(w, packed, sizeof w);
  const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, low2 = 0x03030303u;
  out[0] = w[0] & low6;
  out[1] = (w[2] & low4) | (((w[0] >> 6) & low2) << 4);
  out[2] = w[1] & low6;
  out[3] = ((w[2] >> 4) & low4) | (((w[1] >> 6) & low2) << 4);
}

// Q3_K: the sixteen 6-bit scales, still offset by 32 (the signed scale is byte - 32). Scale i
// has its low nibble in nibble i / 8 of packed byte i % 8 and its top two bits at bit
// 2 * (i / 4) of byte 8 + i % 4.
PG4_HOST_DEVICE inline void q3_k_scales(const uint8_t* packed, uint32_t out[4]) {
  uint32_t w[3];
  std::memcpy(w, packed, sizeof w);
  const uint32_t low4 = 0x0f0f0f0fu, low2 = 0x03030303u;
  out[0] = (w[0] & low4) | ((w[2] & low2) << 4);
  out[1] = (w[1] & low4) | (((w[2] >> 2) & low2) << 4);
  out[2] = ((w[0] >> 4) & low4) | (((w[2] >> 4) & low2) << 4);
  out[3] = ((w[1] >> 4) & low4) | (((w[2] >> 6) & low2) << 4);
}

// The same two packings read for one sub-block at a time, byte by byte (what a device thread
// that decodes one sub-block needs). Q4_K / Q5_K: the scale and minimum of sub-block j.
PG4_HOST_DEVICE inline void k_scale_min(const uint8_t* packed, int j, int& scale, int& min) {
  if (j < 4) {
    scale = packed[j] & 63;
    min = packed[j + 4] & 63;
  } else {
    scale = (packed[j + 4] & 15) | ((packed[j - 4] >> 6) << 4);
    min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

// Q3_K: the signed scale i (offset 32 removed).
PG4_HOST_DEVICE inline int q3_k_scale(const uint8_t* packed, int i) {
  const int low = (packed[i % 8] >> (4 * (i / 8))) & 15;
  const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | high << 4) - 32;
}

}  // namespace pg4::quant
