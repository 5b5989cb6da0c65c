// AVX-512 dot products for the types that dominate real models (float formats, the Q8_0-family
// and Q4_K / Q5_K / Q6_K): twice the work per instruction of the AVX2 kernels, which still serve
// the other types. Integer products stay exact in int32 lanes. Every format here has a fused
// kernel (see fused_kernels in dot.h) that applies each unpacked weight block to several tokens.
#include "quant/dot.h"

#if defined(PG4_QUANT_AVX512)

#include "quant/blocks.h"
#include "quant/simd_x86.h"

namespace pg4::quant::detail {

namespace {

template <typename Block>
const Block* as(const void* p) {
  return static_cast<const Block*>(p);
}

// acc + pairs of int16 products of a and b, in int32 lanes.
inline __m512i dot_i16(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

inline __m512i join256(__m256i low, __m256i high) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}

// The float formats' elements: 16 widened to floats at once, and one.
struct F32Elements {
  using Element = float;
  static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
  static float one(float v) { return v; }
};

struct F16Elements {
  using Element = uint16_t;
  static __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(load256(p)); }
  static float one(uint16_t v) { return fp16_fast(v); }
};

struct BF16Elements {
  using Element = uint16_t;
  static __m512 load16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16));
  }
  static float one(uint16_t v) { return bf16_to_float(v); }
};

// Float formats (activations in the weights' format): each row's sum in four accumulators over
// 64-element steps, then 16 at a time into the first, the remainder one by one. Each 16 weights
// are widened once for the R activation rows (the per-layer projection of a five-token call
// cost four times one token's when every row widened them again).
template <typename Format>
struct DotFloat {
  static constexpr int kRows = 4;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    using Element = typename Format::Element;
    const auto* x = as<Element>(w);
    const Element* y[R];
    __m512 acc[R][4];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<Element>(acts + j * stride);
      for (int k = 0; k < 4; ++k) acc[j][k] = _mm512_setzero_ps();
    }
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
      __m512 wx[4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) wx[k] = Format::load16(x + i + 16 * k);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          acc[j][k] = _mm512_fmadd_ps(wx[k], Format::load16(y[j] + i + 16 * k), acc[j][k]);
        }
      }
    }
    for (; i + 16 <= n; i += 16) {
      const __m512 wx = Format::load16(x + i);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        acc[j][0] = _mm512_fmadd_ps(wx, Format::load16(y[j] + i), acc[j][0]);
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      float sum = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(acc[j][0], acc[j][1]), _mm512_add_ps(acc[j][2], acc[j][3])));
      for (int64_t l = i; l < n; ++l) sum += Format::one(x[l]) * Format::one(y[j][l]);
      out[j] = sum;
    }
  }
};

#if defined(__AVX512VNNI__)
// The 16 quant bytes of two nibble blocks a and b as 64 bytes in element order: the low nibbles
// of a, its high nibbles, then the same for b.
inline __m512i nibbles_64(const uint8_t* a, const uint8_t* b) {
  const __m256i ab = _mm256_set_m128i(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)),
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
  const __m512i w = join256(ab, _mm256_srli_epi16(ab, 4));  // 128-bit lanes: a, b, a>>4, b>>4
  return _mm512_and_si512(_mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0)),
                          _mm512_set1_epi8(0x0f));
}

inline uint64_t high_bits_64(const uint8_t* a, const uint8_t* b) {
  uint32_t ha, hb;
  std::memcpy(&ha, a, sizeof ha);
  std::memcpy(&hb, b, sizeof hb);
  return ha | static_cast<uint64_t>(hb) << 32;
}

// The signed quants of two blocks, 64 bytes.
inline __m512i signed_quants(const BlockQ4_0& p, const BlockQ4_0& q) {
  return _mm512_sub_epi8(nibbles_64(p.qs, q.qs), _mm512_set1_epi8(8));
}

inline __m512i signed_quants(const BlockQ5_0& p, const BlockQ5_0& q) {
  const __m512i low = nibbles_64(p.qs, q.qs);
  return _mm512_sub_epi8(
      _mm512_mask_add_epi8(low, high_bits_64(p.qh, q.qh), low, _mm512_set1_epi8(16)),
      _mm512_set1_epi8(16));
}

inline __m512i signed_quants(const BlockQ8_0& p, const BlockQ8_0& q) {
  return join256(load256(p.qs), load256(q.qs));
}

// Four fp16 scales as floats in lanes 0-3.
inline __m128 fp16_x4(uint16_t a, uint16_t b, uint16_t c, uint16_t d) {
  const uint64_t bits = a | static_cast<uint64_t>(b) << 16 | static_cast<uint64_t>(c) << 32 |
                        static_cast<uint64_t>(d) << 48;
  return _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<int64_t>(bits)));
}

// The 32-element formats against Q8_0, two blocks to a vector (int32 lanes 0-7 the first block,
// 8-15 the second). The weight quants x enter VNNI's unsigned-by-signed product as |x|, their
// signs moved onto the activations (which quantize_activation_row keeps within -127..127, so
// negating one cannot overflow): that costs one masked subtraction per activation row, against a
// second product for an offset of unsigned quants. (Without VNNI these targets keep the AVX2
// kernels.)
template <typename Block>
struct DotQ8_0Pairs {
  static constexpr int kRows = 8;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    const auto* x = as<Block>(w);
    // The products of a weight pair (magnitudes, and a mask of the negative ones) with the
    // blocks a and b of one activation row, as floats.
    auto products = [](__m512i magnitude, __mmask64 negative, const BlockQ8_0& a,
                       const BlockQ8_0& b) {
      const __m512i yq = join256(load256(a.qs), load256(b.qs));
      const __m512i signed_y = _mm512_mask_sub_epi8(yq, negative, _mm512_setzero_si512(), yq);
      return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, signed_y));
    };
    const BlockQ8_0* y[R];
    __m512 acc0[R], acc1[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<BlockQ8_0>(acts + j * stride);
      acc0[j] = _mm512_setzero_ps();
      acc1[j] = _mm512_setzero_ps();
    }
    // Per-block scales d_x * d_y, four blocks at a time, spread over the lanes of each pair.
    const __m512i first_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i second_pair = _mm512_add_epi32(first_pair, _mm512_set1_epi32(2));
    const int64_t nb = n / kQK;
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4) {
      const __m512i x01 = signed_quants(x[i], x[i + 1]);
      const __m512i x23 = signed_quants(x[i + 2], x[i + 3]);
      const __m512i abs01 = _mm512_abs_epi8(x01), abs23 = _mm512_abs_epi8(x23);
      const __mmask64 neg01 = _mm512_movepi8_mask(x01), neg23 = _mm512_movepi8_mask(x23);
      const __m128 dx = fp16_x4(x[i].d, x[i + 1].d, x[i + 2].d, x[i + 3].d);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_0* b = y[j] + i;
        const __m512 d =
            _mm512_castps128_ps512(_mm_mul_ps(dx, fp16_x4(b[0].d, b[1].d, b[2].d, b[3].d)));
        acc0[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(first_pair, d),
                                  products(abs01, neg01, b[0], b[1]), acc0[j]);
        acc1[j] = _mm512_fmadd_ps(_mm512_permutexvar_ps(second_pair, d),
                                  products(abs23, neg23, b[2], b[3]), acc1[j]);
      }
    }
    for (; i < nb; ++i) {
      // A lone block goes in both halves, the second one weighted zero.
      const __m512i xq = signed_quants(x[i], x[i]);
      const __m512i magnitude = _mm512_abs_epi8(xq);
      const __mmask64 negative = _mm512_movepi8_mask(xq);
      const float dx = fp16_fast(x[i].d);
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_0& b = y[j][i];
        const __m512 scale = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(dx * fp16_fast(b.d)));
        acc0[j] = _mm512_fmadd_ps(scale, products(magnitude, negative, b, b), acc0[j]);
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) out[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[j], acc1[j]));
  }
};

#endif  // __AVX512VNNI__

// Q4_K / Q5_K: 64 quants (two sub-blocks) per vector; int16 pair sums from maddubs are weighted
// by the sub-block scale, int16 lanes 0-15 the first sub-block, 16-31 the second. Each block adds
// one float vector per activation row: int32 lanes 0-7 carry the quant sums (the two halves of the
// 16 lanes folded together) and lanes 8-15 the minimum terms, scaled by d and -dmin. One
// conversion and one multiply-add for both terms, rather than one each, made the batched kernel
// 8% faster.
template <bool kFifthBit, typename Block>
struct DotQ45K {
  static constexpr int kRows = 8;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    const auto* x = as<Block>(w);
    const BlockQ8_K* y[R];
    __m512 acc[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<BlockQ8_K>(acts + j * stride);
      acc[j] = _mm512_setzero_ps();
    }
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    for (int64_t i = 0; i < n / kQKK; ++i) {
      uint32_t packed[4];
      k_scales_mins(x[i].scales, packed);
      const __m128i scales_mins = packed_bytes(packed);
      // Each minimum twice, to pair with the two bsums of its sub-block, in both 256-bit halves.
      const __m512i mins16 = _mm512_broadcast_i64x4(_mm256_cvtepu8_epi16(_mm_shuffle_epi8(
          scales_mins, _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8))));
      // int16 scale of sub-block j in every lane: scales16 lanes 0-7 hold the eight scales.
      const __m512i scales16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(scales_mins));
      __m512i high = _mm512_setzero_si512();
      if constexpr (kFifthBit) {
        // Bit 2c of the first half, 2c+1 of the second.
        const __m256i qh = load256(x[i].qh);
        high = join256(qh, _mm256_srli_epi16(qh, 1));
      }
      __m512i q[4], scale[4];
      for (int c = 0; c < 4; ++c) {
        const __m256i bits = load256(x[i].qs + 32 * c);
        q[c] = _mm512_and_si512(join256(bits, _mm256_srli_epi16(bits, 4)), low4);
        if constexpr (kFifthBit) {
          q[c] = _mm512_or_si512(q[c],
                                 _mm512_slli_epi16(_mm512_and_si512(high, _mm512_set1_epi8(1)), 4));
          high = _mm512_srli_epi16(high, 2);
        }
        const __m512i idx =
            _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * c)),
                               _mm256_set1_epi16(static_cast<int16_t>(2 * c + 1)), 1);
        scale[c] = _mm512_permutexvar_epi16(idx, scales16);
      }
      const __m512 d = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(fp16_fast(x[i].d)),
                                            _mm512_set1_ps(-fp16_fast(x[i].dmin)));
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_K& b = y[j][i];
        __m512i sum = _mm512_setzero_si512();
        for (int c = 0; c < 4; ++c) {
          sum = dot_i16(sum, _mm512_maddubs_epi16(q[c], load512(b.qs + 64 * c)), scale[c]);
        }
        const __m512i mins = _mm512_madd_epi16(mins16, _mm512_broadcast_i64x4(load256(b.bsums)));
        const __m512i both = _mm512_mask_add_epi32(
            mins, 0x00ff, sum, _mm512_shuffle_i64x2(sum, sum, _MM_SHUFFLE(1, 0, 3, 2)));
        acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(b.d), d), _mm512_cvtepi32_ps(both),
                                 acc[j]);
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
  }
};

// Q6_K: quants u - 32 with u in 0..63; sum(u * y) per group of 16 weighted by its int8 scale,
// minus 32 * sum(scale * bsums).
struct DotQ6K {
  static constexpr int kRows = 8;

  template <int R>
  static void rows(int64_t n, const void* w, const uint8_t* acts, size_t stride, float* out) {
    const auto* x = as<BlockQ6_K>(w);
    const BlockQ8_K* y[R];
    __m512 acc[R];
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) {
      y[j] = as<BlockQ8_K>(acts + j * stride);
      acc[j] = _mm512_setzero_ps();
    }
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i three = _mm512_set1_epi8(3);
    // int16 lane l of the products of 64 quants belongs to group l / 8 of those 64: the number of
    // its 128-bit lane.
    constexpr int64_t kOnes = 0x0001000100010001;
    const __m512i group =
        _mm512_set_epi64(3 * kOnes, 3 * kOnes, 2 * kOnes, 2 * kOnes, kOnes, kOnes, 0, 0);
    for (int64_t i = 0; i < n / kQKK; ++i) {
      const __m128i scales8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[i].scales));
      const __m256i scales16 = _mm256_cvtepi8_epi16(scales8);
      // -32 * scale of each group of 16, against the bsums in int16 lanes 0-15 (the rest zero):
      // the offset of the quants lands in int32 lanes 0-7 of the sum.
      const __m512i offset_scales = _mm512_zextsi256_si512(
          _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(scales16, 5)));
      const __m512i scales = _mm512_castsi256_si512(scales16);
      __m512i u[4], scale[4];
      for (int h = 0; h < 2; ++h) {
        const __m512i ql = load512(x[i].ql + 64 * h);  // chunks 0 and 1 (low), 2 and 3 (high)
        const __m256i qh = load256(x[i].qh + 32 * h);
        const __m512i qh01 = join256(qh, _mm256_srli_epi16(qh, 2));  // chunk c's bits at bit 0..1
        for (int k = 0; k < 2; ++k) {
          const __m512i low = k == 0 ? _mm512_and_si512(ql, low4)
                                     : _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4);
          const __m512i top = _mm512_and_si512(k == 0 ? qh01 : _mm512_srli_epi16(qh01, 4), three);
          u[2 * h + k] = _mm512_or_si512(low, _mm512_slli_epi16(top, 4));
          const __m512i idx =
              _mm512_add_epi16(group, _mm512_set1_epi16(static_cast<int16_t>(8 * h + 4 * k)));
          scale[2 * h + k] = _mm512_permutexvar_epi16(idx, scales);
        }
      }
      const __m512 dx = _mm512_set1_ps(fp16_fast(x[i].d));
#pragma GCC unroll 16
      for (int j = 0; j < R; ++j) {
        const BlockQ8_K& b = y[j][i];
        __m512i sum = dot_i16(_mm512_setzero_si512(), _mm512_zextsi256_si512(load256(b.bsums)),
                              offset_scales);
        for (int k = 0; k < 4; ++k) {
          sum = dot_i16(sum, _mm512_maddubs_epi16(u[k], load512(b.qs + 64 * k)), scale[k]);
        }
        acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(dx, _mm512_set1_ps(b.d)), _mm512_cvtepi32_ps(sum),
                                 acc[j]);
      }
    }
#pragma GCC unroll 16
    for (int j = 0; j < R; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
  }
};

}  // namespace

Kernels avx512_kernels(Type weight_type) {
  switch (weight_type) {
    case Type::F32:
      return fused_kernels<DotFloat<F32Elements>>();
    case Type::F16:
      return fused_kernels<DotFloat<F16Elements>>();
    case Type::BF16:
      return fused_kernels<DotFloat<BF16Elements>>();
#if defined(__AVX512VNNI__)
    case Type::Q4_0:
      return fused_kernels<DotQ8_0Pairs<BlockQ4_0>>();
    case Type::Q5_0:
      return fused_kernels<DotQ8_0Pairs<BlockQ5_0>>();
    case Type::Q8_0:
      return fused_kernels<DotQ8_0Pairs<BlockQ8_0>>();
#endif
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

#endif  // PG4_QUANT_AVX512
