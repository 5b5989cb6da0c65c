// AVX2 dot products for every weight type (with 256-bit VNNI where the target has it). Integer
// products stay exact in int32 lanes; only the order of the float sums differs from the scalar
// reference. The Q8_0 family and Q4_K / Q5_K / Q6_K have fused kernels (see fused_kernels in
// dot.h) that apply each unpacked weight block to several tokens.
#include "quant/dot.h"

#if defined(PG4_QUANT_AVX2)

#include "quant/blocks.h"
#include "quant/simd_x86.h"

namespace pg4::quant::detail {

namespace {

template <typename Block>
const Block* as(const void* p) {
  return static_cast<const Block*>(p);
}

// Float formats: 32 elements per step in four independent accumulators, then 8 at a time, then
// the remainder (these rows need not be a multiple of anything).
template <typename Load, typename Scalar>
float dot_float(int64_t n, Load load, Scalar scalar) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 x, y;
    load(i, x, y);
    acc0 = _mm256_fmadd_ps(x, y, acc0);
    load(i + 8, x, y);
    acc1 = _mm256_fmadd_ps(x, y, acc1);
    load(i + 16, x, y);
    acc2 = _mm256_fmadd_ps(x, y, acc2);
    load(i + 24, x, y);
    acc3 = _mm256_fmadd_ps(x, y, acc3);
  }
  for (; i + 8 <= n; i += 8) {
    __m256 x, y;
    load(i, x, y);
    acc0 = _mm256_fmadd_ps(x, y, acc0);
  }
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += scalar(i);
  return sum;
}

float dot_f32(int64_t n, const void* w, const void* a) {
  const auto* x = as<float>(w);
  const auto* y = as<float>(a);
  return dot_float(
      n,
      [&](int64_t i, __m256& vx, __m256& vy) {
        vx = _mm256_loadu_ps(x + i);
        vy = _mm256_loadu_ps(y + i);
      },
      [&](int64_t i) { return x[i] * y[i]; });
}

inline __m256 load_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

float dot_f16(int64_t n, const void* w, const void* a) {
  const auto* x = as<uint16_t>(w);
  const auto* y = as<uint16_t>(a);
  return dot_float(
      n,
      [&](int64_t i, __m256& vx, __m256& vy) {
        vx = load_f16(x + i);
        vy = load_f16(y + i);
      },
      [&](int64_t i) { return fp16_fast(x[i]) * fp16_fast(y[i]); });
}

inline __m256 load_bf16(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

float dot_bf16(int64_t n, const void* w, const void* a) {
  const auto* x = as<uint16_t>(w);
  const auto* y = as<uint16_t>(a);
  return dot_float(
      n,
      [&](int64_t i, __m256& vx, __m256& vy) {
        vx = load_bf16(x + i);
        vy = load_bf16(y + i);
      },
      [&](int64_t i) { return bf16_to_float(x[i]) * bf16_to_float(y[i]); });
}

// The signed quants of one block.
inline __m256i signed_quants(const BlockQ8_0& b) { return load256(b.qs); }

inline __m256i signed_quants(const BlockQ4_0& b) {
  return _mm256_sub_epi8(nibbles_32(b.qs), _mm256_set1_epi8(8));
}

// Q5_0 quants are nibble + 16 * bit - 16: where the bit is clear that is the nibble with the
// top four bits set, read as a signed byte.
inline __m256i signed_quants(const BlockQ5_0& b) {
  const __m256i clear_high = _mm256_andnot_si256(bits_32(b.qh), _mm256_set1_epi8(-16));
  return _mm256_or_si256(nibbles_32(b.qs), clear_high);
}

// The 32-element formats against Q8_0: per block one int32 vector of products, scaled by
// d_x * d_y, blocks alternating between two accumulators to hide the FMA latency. The weight
// quants x enter the unsigned-by-signed product as |x|, their signs moved onto the activations.
template <typename Block>
struct DotQ8_0Blocks {
  static constexpr int kRows = 8;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    const auto* x = as<Block>(w);
    const BlockQ8_0* y[R];
    __m256 acc0[R], acc1[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<BlockQ8_0>(acts + j * stride);
      acc0[j] = _mm256_setzero_ps();
      acc1[j] = _mm256_setzero_ps();
    }
    auto block = [&](int64_t i, __m256(&acc)[R]) {
      const __m256i xq = signed_quants(x[i]);
      const __m256i magnitude = _mm256_sign_epi8(xq, xq);
      const float dx = fp16_fast(x[i].d);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_0& b = y[j][i];
        const __m256i p =
            dot_u8s8(_mm256_setzero_si256(), magnitude, _mm256_sign_epi8(load256(b.qs), xq));
        acc[j] =
            _mm256_fmadd_ps(_mm256_set1_ps(dx * fp16_fast(b.d)), _mm256_cvtepi32_ps(p), acc[j]);
      }
    };
    const int64_t nb = n / kQK;
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) {
      block(i, acc0);
      block(i + 1, acc1);
    }
    if (i < nb) block(i, acc0);
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) out[j] = hsum(_mm256_add_ps(acc0[j], acc1[j]));
  }
};

// The offset formats against Q8_1: unsigned quants, plus m_x * s_y per block.
template <typename Block, typename Quants>
float dot_q8_1_blocks(int64_t n, const Block* x, const BlockQ8_1* y, Quants quants) {
  __m256 acc = _mm256_setzero_ps();
  float offsets = 0.0f;
  for (int64_t i = 0; i < n / kQK; ++i) {
    const __m256i p = dot_u8s8(_mm256_setzero_si256(), quants(x[i]), load256(y[i].qs));
    const __m256 d = _mm256_set1_ps(fp16_fast(x[i].d) * fp16_fast(y[i].d));
    acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    offsets += fp16_fast(x[i].m) * fp16_fast(y[i].s);
  }
  return hsum(acc) + offsets;
}

float dot_q4_1(int64_t n, const void* w, const void* a) {
  return dot_q8_1_blocks(n, as<BlockQ4_1>(w), as<BlockQ8_1>(a),
                         [](const BlockQ4_1& b) { return nibbles_32(b.qs); });
}

float dot_q5_1(int64_t n, const void* w, const void* a) {
  return dot_q8_1_blocks(n, as<BlockQ5_1>(w), as<BlockQ8_1>(a), [](const BlockQ5_1& b) {
    const __m256i high = _mm256_and_si256(bits_32(b.qh), _mm256_set1_epi8(0x10));
    return _mm256_or_si256(nibbles_32(b.qs), high);
  });
}

// Unsigned byte j of each 128-bit half of v, in every int16 lane (a shuffle index with the top
// bit set yields zero).
inline __m256i widen_byte(__m256i v, int j) {
  return _mm256_shuffle_epi8(v, _mm256_set1_epi16(static_cast<int16_t>(0x8000 | j)));
}

// 32 products of unsigned quants q with activation bytes y, each half of 16 weighted by its own
// int16 scale (lanes of `scales`), summed in int32 lanes.
inline __m256i scaled_products(__m256i q, __m256i y, __m256i scales) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scales);
}

// The minimum terms of Q2_K / Q4_K / Q5_K: sum over groups of 16 of m * bsums, in int32 lanes.
inline __m256i min_products(__m256i mins16, const BlockQ8_K& y) {
  return _mm256_madd_epi16(mins16, load256(y.bsums));
}

float dot_q2_k(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ2_K>(w);
  const auto* y = as<BlockQ8_K>(a);
  __m256 acc = _mm256_setzero_ps(), acc_min = _mm256_setzero_ps();
  const __m256i three = _mm256_set1_epi8(3);
  for (int64_t i = 0; i < n / kQKK; ++i) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
    const __m128i scales = _mm_and_si128(packed, _mm_set1_epi8(0x0f));
    const __m256i mins16 =
        _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0f)));
    __m256i sum = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      __m256i bits = load256(x[i].qs + 32 * h);
      for (int s = 0; s < 4; ++s) {
        const int c = 4 * h + s;
        const __m256i q = _mm256_and_si256(bits, three);
        sum = _mm256_add_epi32(
            sum, scaled_products(q, load256(y[i].qs + 32 * c), scale_pair(scales, c)));
        bits = _mm256_srli_epi16(bits, 2);
      }
    }
    const float dall = y[i].d * fp16_fast(x[i].d);
    const float dmin = y[i].d * fp16_fast(x[i].dmin);
    acc = _mm256_fmadd_ps(_mm256_set1_ps(dall), _mm256_cvtepi32_ps(sum), acc);
    acc_min = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(min_products(mins16, y[i])),
                              acc_min);
  }
  return hsum(acc) - hsum(acc_min);
}

// Q3_K quants are (2 low bits) - 4 * (high bit clear); both parts go through unsigned products.
float dot_q3_k(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ3_K>(w);
  const auto* y = as<BlockQ8_K>(a);
  __m256 acc = _mm256_setzero_ps();
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i one = _mm256_set1_epi8(1);
  for (int64_t i = 0; i < n / kQKK; ++i) {
    uint32_t packed[4];
    q3_k_scales(x[i].scales, packed);
    const __m128i scales = _mm_sub_epi8(packed_bytes(packed), _mm_set1_epi8(32));
    // The inverted high bits: bit c of each byte is set where chunk c subtracts 4.
    __m256i clear = _mm256_andnot_si256(load256(x[i].hmask), _mm256_set1_epi8(-1));
    __m256i sum = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      __m256i bits = load256(x[i].qs + 32 * h);
      for (int s = 0; s < 4; ++s) {
        const int c = 4 * h + s;
        const __m256i yq = load256(y[i].qs + 32 * c);
        const __m256i low = _mm256_and_si256(bits, three);
        const __m256i four = _mm256_slli_epi16(_mm256_and_si256(clear, one), 2);
        const __m256i p =
            _mm256_sub_epi16(_mm256_maddubs_epi16(low, yq), _mm256_maddubs_epi16(four, yq));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, scale_pair(scales, c)));
        bits = _mm256_srli_epi16(bits, 2);
        clear = _mm256_srli_epi16(clear, 1);
      }
    }
    const float d = fp16_fast(x[i].d) * y[i].d;
    acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sum), acc);
  }
  return hsum(acc);
}

// Q4_K / Q5_K: eight sub-blocks of 32 with 6-bit scales and minimums. With 16 vector registers
// the K-format kernels unpack a block one chunk at a time and apply each chunk to every row,
// keeping int32 sums per row (spilled to L1 where registers run out) rather than holding the
// whole unpacked block: 8 rows at a time still measured fastest.
template <bool kFifthBit, typename Block>
struct DotQ45K {
  static constexpr int kRows = 8;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    const auto* x = as<Block>(w);
    const BlockQ8_K* y[R];
    __m256 acc[R], acc_min[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<BlockQ8_K>(acts + j * stride);
      acc[j] = _mm256_setzero_ps();
      acc_min[j] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (int64_t i = 0; i < n / kQKK; ++i) {
      uint32_t packed[4];
      k_scales_mins(x[i].scales, packed);
      const __m128i scales_mins = packed_bytes(packed);
      // Each minimum twice, to pair with the two bsums of its sub-block.
      const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(
          scales_mins, _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8)));
      const __m256i scales = _mm256_broadcastsi128_si256(scales_mins);
      __m256i high = _mm256_setzero_si256();
      if constexpr (kFifthBit) high = load256(x[i].qh);
      __m256i sum[R];
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) sum[j] = _mm256_setzero_si256();
      for (int c = 0; c < 4; ++c) {
        const __m256i bits = load256(x[i].qs + 32 * c);
        __m256i q0 = _mm256_and_si256(bits, low4);
        __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
        if constexpr (kFifthBit) {
          const __m256i one = _mm256_set1_epi8(1);
          q0 = _mm256_or_si256(q0, _mm256_slli_epi16(_mm256_and_si256(high, one), 4));
          q1 = _mm256_or_si256(
              q1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 1), one), 4));
          high = _mm256_srli_epi16(high, 2);
        }
        const __m256i s0 = widen_byte(scales, 2 * c), s1 = widen_byte(scales, 2 * c + 1);
#pragma GCC unroll 16
        for (int j = 0; j < R; ++j) {
          const __m256i p0 = scaled_products(q0, load256(y[j][i].qs + 64 * c), s0);
          const __m256i p1 = scaled_products(q1, load256(y[j][i].qs + 64 * c + 32), s1);
          sum[j] = _mm256_add_epi32(sum[j], _mm256_add_epi32(p0, p1));
        }
      }
      const float dx = fp16_fast(x[i].d);
      const float dmin = fp16_fast(x[i].dmin);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_K& b = y[j][i];
        acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(b.d * dx), _mm256_cvtepi32_ps(sum[j]), acc[j]);
        acc_min[j] = _mm256_fmadd_ps(_mm256_set1_ps(b.d * dmin),
                                     _mm256_cvtepi32_ps(min_products(mins16, b)), acc_min[j]);
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) out[j] = hsum(acc[j]) - hsum(acc_min[j]);
  }
};

// Q6_K quants are u - 32 with u in 0..63: sum(u * y) - 32 * sum(y), the latter from bsums.
struct DotQ6K {
  static constexpr int kRows = 8;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    const auto* x = as<BlockQ6_K>(w);
    const BlockQ8_K* y[R];
    __m256 acc[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<BlockQ8_K>(acts + j * stride);
      acc[j] = _mm256_setzero_ps();
    }
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i three = _mm256_set1_epi8(3);
    for (int64_t i = 0; i < n / kQKK; ++i) {
      const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
      const __m256i scales16 = _mm256_cvtepi8_epi16(scales);
      __m256i sum[R];
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) sum[j] = _mm256_setzero_si256();
      for (int h = 0; h < 2; ++h) {
        const __m256i ql0 = load256(x[i].ql + 64 * h);
        const __m256i ql1 = load256(x[i].ql + 64 * h + 32);
        __m256i qh = load256(x[i].qh + 32 * h);
        for (int c = 0; c < 4; ++c) {
          const __m256i ql = c % 2 == 0 ? ql0 : ql1;
          const __m256i low =
              c < 2 ? _mm256_and_si256(ql, low4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), low4);
          const __m256i u = _mm256_or_si256(low, _mm256_slli_epi16(_mm256_and_si256(qh, three), 4));
          qh = _mm256_srli_epi16(qh, 2);
          const __m256i scale = scale_pair(scales, 4 * h + c);
#pragma GCC unroll 16
          for (int j = 0; j < R; ++j) {
            sum[j] = _mm256_add_epi32(
                sum[j], scaled_products(u, load256(y[j][i].qs + 128 * h + 32 * c), scale));
          }
        }
      }
      const float dx = fp16_fast(x[i].d);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_K& b = y[j][i];
        const __m256i offset = _mm256_madd_epi16(scales16, load256(b.bsums));
        const __m256i total = _mm256_sub_epi32(sum[j], _mm256_slli_epi32(offset, 5));
        acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dx * b.d), _mm256_cvtepi32_ps(total), acc[j]);
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) out[j] = hsum(acc[j]);
  }
};

}  // namespace

Kernels avx2_kernels(Type weight_type) {
  switch (weight_type) {
    case Type::F32:
      return single_row_kernels<dot_f32>();
    case Type::F16:
      return single_row_kernels<dot_f16>();
    case Type::BF16:
      return single_row_kernels<dot_bf16>();
    case Type::Q4_0:
      return fused_kernels<DotQ8_0Blocks<BlockQ4_0>>();
    case Type::Q4_1:
      return single_row_kernels<dot_q4_1>();
    case Type::Q5_0:
      return fused_kernels<DotQ8_0Blocks<BlockQ5_0>>();
    case Type::Q5_1:
      return single_row_kernels<dot_q5_1>();
    case Type::Q8_0:
      return fused_kernels<DotQ8_0Blocks<BlockQ8_0>>();
    case Type::Q2_K:
      return single_row_kernels<dot_q2_k>();
    case Type::Q3_K:
      return single_row_kernels<dot_q3_k>();
    case Type::Q4_K:
      return fused_kernels<DotQ45K<false, BlockQ4_K>>();
    case Type::Q5_K:
      return fused_kernels<DotQ45K<true, BlockQ5_K>>();
    case Type::Q6_K:
      return fused_kernels<DotQ6K>();
    default:
      return {};
  }
}

}  // namespace pg4::quant::detail

#endif  // PG4_QUANT_AVX2
