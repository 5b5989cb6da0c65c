// AVX-512 dot products for the types that dominate real models (float formats, the Q8_0-family
// and Q4_K / Q5_K / Q6_K): twice the work per instruction of the AVX2 kernels, which still serve
// the other types. Integer products stay exact in int32 lanes.
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

// Float formats: 64 elements per step in four accumulators, then 16 at a time, then the
// remainder one by one.
template <typename Load, typename Scalar>
float dot_float(int64_t n, Load load, Scalar scalar) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    __m512 x, y;
    load(i, x, y);
    acc0 = _mm512_fmadd_ps(x, y, acc0);
    load(i + 16, x, y);
    acc1 = _mm512_fmadd_ps(x, y, acc1);
    load(i + 32, x, y);
    acc2 = _mm512_fmadd_ps(x, y, acc2);
    load(i + 48, x, y);
    acc3 = _mm512_fmadd_ps(x, y, acc3);
  }
  for (; i + 16 <= n; i += 16) {
    __m512 x, y;
    load(i, x, y);
    acc0 = _mm512_fmadd_ps(x, y, acc0);
  }
  float sum =
      _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  for (; i < n; ++i) sum += scalar(i);
  return sum;
}

float dot_f32(int64_t n, const void* w, const void* a) {
  const auto* x = as<float>(w);
  const auto* y = as<float>(a);
  return dot_float(
      n,
      [&](int64_t i, __m512& vx, __m512& vy) {
        vx = _mm512_loadu_ps(x + i);
        vy = _mm512_loadu_ps(y + i);
      },
      [&](int64_t i) { return x[i] * y[i]; });
}

inline __m512 load_f16(const uint16_t* p) { return _mm512_cvtph_ps(load256(p)); }

float dot_f16(int64_t n, const void* w, const void* a) {
  const auto* x = as<uint16_t>(w);
  const auto* y = as<uint16_t>(a);
  return dot_float(
      n,
      [&](int64_t i, __m512& vx, __m512& vy) {
        vx = load_f16(x + i);
        vy = load_f16(y + i);
      },
      [&](int64_t i) { return fp16_fast(x[i]) * fp16_fast(y[i]); });
}

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load256(p)), 16));
}

float dot_bf16(int64_t n, const void* w, const void* a) {
  const auto* x = as<uint16_t>(w);
  const auto* y = as<uint16_t>(a);
  return dot_float(
      n,
      [&](int64_t i, __m512& vx, __m512& vy) {
        vx = load_bf16(x + i);
        vy = load_bf16(y + i);
      },
      [&](int64_t i) { return bf16_to_float(x[i]) * bf16_to_float(y[i]); });
}

#if defined(__AVX512VNNI__)
// The 32-element formats against Q8_0, two blocks to a vector (int32 lanes 0-7 the first block,
// 8-15 the second). Quants enter as unsigned bytes u with value u - kOffset, so a block's sum is
// u . y - kOffset * sum(y), both through VNNI's unsigned-by-signed product. (Without VNNI the
// int16 pair sums of u up to 255 could saturate, so those targets keep the AVX2 kernels.)
template <int kOffset, typename Block, typename Quants>
float dot_q8_0_pairs(int64_t n, const Block* x, const BlockQ8_0* y, Quants quants) {
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(kOffset));
  auto pair = [&](int64_t a, int64_t b) {
    const __m512i yq = join256(load256(y[a].qs), load256(y[b].qs));
    const __m512i u = quants(x[a], x[b]);
    const __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, yq),
                                       _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, yq));
    return _mm512_cvtepi32_ps(p);
  };
  // Per-block scales d_x * d_y, four blocks at a time, spread over the lanes of each pair.
  const __m512i first_pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i second_pair = _mm512_add_epi32(first_pair, _mm512_set1_epi32(2));
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int64_t nb = n / kQK;
  int64_t i = 0;
  for (; i + 4 <= nb; i += 4) {
    const __m128i dx = _mm_setr_epi16(
        static_cast<int16_t>(x[i].d), static_cast<int16_t>(x[i + 1].d),
        static_cast<int16_t>(x[i + 2].d), static_cast<int16_t>(x[i + 3].d), 0, 0, 0, 0);
    const __m128i dy = _mm_setr_epi16(
        static_cast<int16_t>(y[i].d), static_cast<int16_t>(y[i + 1].d),
        static_cast<int16_t>(y[i + 2].d), static_cast<int16_t>(y[i + 3].d), 0, 0, 0, 0);
    const __m512 d = _mm512_castps128_ps512(_mm_mul_ps(_mm_cvtph_ps(dx), _mm_cvtph_ps(dy)));
    acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(first_pair, d), pair(i, i + 1), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(second_pair, d), pair(i + 2, i + 3), acc1);
  }
  for (; i < nb; ++i) {
    // A lone block goes in both halves, the second one weighted zero.
    const float d = fp16_fast(x[i].d) * fp16_fast(y[i].d);
    const __m512 scale = _mm512_maskz_mov_ps(0x00ff, _mm512_set1_ps(d));
    acc0 = _mm512_fmadd_ps(scale, pair(i, i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

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

float dot_q4_0(int64_t n, const void* w, const void* a) {
  return dot_q8_0_pairs<8>(
      n, as<BlockQ4_0>(w), as<BlockQ8_0>(a),
      [](const BlockQ4_0& p, const BlockQ4_0& q) { return nibbles_64(p.qs, q.qs); });
}

float dot_q5_0(int64_t n, const void* w, const void* a) {
  return dot_q8_0_pairs<16>(
      n, as<BlockQ5_0>(w), as<BlockQ8_0>(a), [](const BlockQ5_0& p, const BlockQ5_0& q) {
        const __m512i low = nibbles_64(p.qs, q.qs);
        return _mm512_mask_add_epi8(low, high_bits_64(p.qh, q.qh), low, _mm512_set1_epi8(16));
      });
}

// Q8_0 weights are signed; flipping the top bit adds 128 and makes them unsigned.
float dot_q8_0(int64_t n, const void* w, const void* a) {
  return dot_q8_0_pairs<128>(n, as<BlockQ8_0>(w), as<BlockQ8_0>(a),
                             [](const BlockQ8_0& p, const BlockQ8_0& q) {
                               return _mm512_xor_si512(join256(load256(p.qs), load256(q.qs)),
                                                       _mm512_set1_epi8(static_cast<char>(0x80)));
                             });
}

#endif  // __AVX512VNNI__

// Q4_K / Q5_K: 64 quants (two sub-blocks) per vector; int16 pair sums from maddubs are weighted
// by the sub-block scale, int16 lanes 0-15 the first sub-block, 16-31 the second.
template <bool kFifthBit, typename Block>
float dot_q45_k(int64_t n, const Block* x, const BlockQ8_K* y) {
  __m512 acc = _mm512_setzero_ps();
  __m256 acc_min = _mm256_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (int64_t i = 0; i < n / kQKK; ++i) {
    uint32_t packed[4];
    k_scales_mins(x[i].scales, packed);
    const __m128i scales_mins = packed_bytes(packed);
    const __m256i mins16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(
        scales_mins, _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8)));
    // int16 scale of sub-block j in every lane: scales16 lanes 0-7 hold the eight scales.
    const __m512i scales16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(scales_mins));
    __m512i high = _mm512_setzero_si512();
    if constexpr (kFifthBit) {
      const __m256i qh = load256(x[i].qh);
      high = join256(qh, _mm256_srli_epi16(qh, 1));  // bit 2c of the first half, 2c+1 of the second
    }
    __m512i sum = _mm512_setzero_si512();
    for (int c = 0; c < 4; ++c) {
      const __m256i bits = load256(x[i].qs + 32 * c);
      __m512i q = _mm512_and_si512(join256(bits, _mm256_srli_epi16(bits, 4)), low4);
      if constexpr (kFifthBit) {
        q = _mm512_or_si512(q, _mm512_slli_epi16(_mm512_and_si512(high, _mm512_set1_epi8(1)), 4));
        high = _mm512_srli_epi16(high, 2);
      }
      const __m512i idx = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(2 * c)),
                                             _mm256_set1_epi16(static_cast<int16_t>(2 * c + 1)), 1);
      const __m512i scale = _mm512_permutexvar_epi16(idx, scales16);
      sum = dot_i16(sum, _mm512_maddubs_epi16(q, load512(y[i].qs + 64 * c)), scale);
    }
    const float d = y[i].d * fp16_fast(x[i].d);
    const float dmin = y[i].d * fp16_fast(x[i].dmin);
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sum), acc);
    const __m256i mins = _mm256_madd_epi16(mins16, load256(y[i].bsums));
    acc_min = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins), acc_min);
  }
  return _mm512_reduce_add_ps(acc) - hsum(acc_min);
}

float dot_q4_k(int64_t n, const void* w, const void* a) {
  return dot_q45_k<false>(n, as<BlockQ4_K>(w), as<BlockQ8_K>(a));
}

float dot_q5_k(int64_t n, const void* w, const void* a) {
  return dot_q45_k<true>(n, as<BlockQ5_K>(w), as<BlockQ8_K>(a));
}

// Q6_K: quants u - 32 with u in 0..63; sum(u * y) per group of 16 weighted by its int8 scale,
// minus 32 * sum(scale * bsums).
float dot_q6_k(int64_t n, const void* w, const void* a) {
  const auto* x = as<BlockQ6_K>(w);
  const auto* y = as<BlockQ8_K>(a);
  __m512 acc = _mm512_setzero_ps();
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
    const __m256i offset = _mm256_madd_epi16(scales16, load256(y[i].bsums));
    const __m512i scales = _mm512_castsi256_si512(scales16);
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {
      const __m512i ql = load512(x[i].ql + 64 * h);  // chunks 0 and 1 (low), 2 and 3 (high)
      const __m256i qh = load256(x[i].qh + 32 * h);
      const __m512i qh01 = join256(qh, _mm256_srli_epi16(qh, 2));  // chunk c's bits at bit 0..1
      for (int k = 0; k < 2; ++k) {
        const __m512i low =
            k == 0 ? _mm512_and_si512(ql, low4) : _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4);
        const __m512i top = _mm512_and_si512(k == 0 ? qh01 : _mm512_srli_epi16(qh01, 4), three);
        const __m512i u = _mm512_or_si512(low, _mm512_slli_epi16(top, 4));
        const __m512i idx =
            _mm512_add_epi16(group, _mm512_set1_epi16(static_cast<int16_t>(8 * h + 4 * k)));
        sum = dot_i16(sum, _mm512_maddubs_epi16(u, load512(y[i].qs + 128 * h + 64 * k)),
                      _mm512_permutexvar_epi16(idx, scales));
      }
    }
    const __m512i offset512 = _mm512_castsi256_si512(_mm256_slli_epi32(offset, 5));
    sum = _mm512_sub_epi32(sum, _mm512_maskz_mov_epi32(0x00ff, offset512));
    const float d = fp16_fast(x[i].d) * y[i].d;
    acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sum), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

}  // namespace

Kernels avx512_kernels(Type weight_type) {
  switch (weight_type) {
    case Type::F32:
      return single_row_kernels<dot_f32>();
    case Type::F16:
      return single_row_kernels<dot_f16>();
    case Type::BF16:
      return single_row_kernels<dot_bf16>();
#if defined(__AVX512VNNI__)
    case Type::Q4_0:
      return single_row_kernels<dot_q4_0>();
    case Type::Q5_0:
      return single_row_kernels<dot_q5_0>();
    case Type::Q8_0:
      return single_row_kernels<dot_q8_0>();
#endif
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

#endif  // PG4_QUANT_AVX512
