// AVX-512 VNNI kernels of the interleaved layout. A tile of up to eight tokens runs against one
// group of 16 rows: each step of unpacked quants (four columns of the 16 rows) meets each token's
// four activation bytes, broadcast, in one vpdpbusd, the tokens giving eight independent chains
// to cover its latency. Sub-block scales are applied in int32 (exact), the float work is once per
// super-block.
#include "quant/dot.h"
#include "quant/interleaved.h"

#if defined(PG4_QUANT_AVX512) && defined(__AVX512VNNI__)

#include <cstring>

#include "quant/interleaved_layout.h"
#include "quant/simd_x86.h"

namespace pg4::quant::detail {

namespace {

inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }

// The int32 at p (four activation bytes, or two int16 bsums) in every lane.
// (A may_alias load, not memcpy, lets the compiler fold it into the product's embedded
// broadcast operand.)
using AliasedInt32 = int32_t __attribute__((may_alias, aligned(1)));
inline __m512i broadcast32(const void* p) {
  return _mm512_set1_epi32(*static_cast<const AliasedInt32*>(p));
}

// Byte `byte` (0-3) of each int32 lane, zero-extended.
inline __m512i lane_byte(__m512i v, int byte) {
  return _mm512_and_si512(_mm512_srli_epi32(v, 8 * byte), _mm512_set1_epi32(0xff));
}

// Asks for the part `part` of kParts of the super-block kPrefetchAhead ahead of `block`: spread
// over the sub-blocks, so that the group streams from memory while the tile computes (without
// it, eight tokens against weights from DRAM ran at a third of their speed from L1). Into L2
// only: prefetched into L1 as well, the weights evicted the tile's activations and held L1's
// miss buffers for a whole DRAM trip, so compute and memory time added up instead of
// overlapping (2 threads, a 512 MB Q4_K matrix: 8 tokens 1.6 times faster, 1 token 1.3). Four
// super-blocks ahead rather than two: 5 tokens a tenth faster, as fast as one token.
constexpr int kPrefetchAhead = 4;
template <typename Group, int kParts>
inline void prefetch_part(const Group* block, int part) {
  constexpr int kLines = (sizeof(Group) + 63) / 64;
  const char* ahead = reinterpret_cast<const char*>(block + kPrefetchAhead);
  for (int line = part * kLines / kParts; line < (part + 1) * kLines / kParts; ++line) {
    _mm_prefetch(ahead + 64 * line, _MM_HINT_T2);
  }
}

template <int T>
struct Tile {
  const BlockQ8_K* y[T];
  Tile(const uint8_t* acts, size_t stride) {
    for (int t = 0; t < T; ++t) y[t] = reinterpret_cast<const BlockQ8_K*>(acts + t * stride);
  }
};

// out[t] (16 floats) += value * dy of token t. The sums live in `out`, not in registers, which
// the integer accumulators need.
inline void accumulate(float* out, __m512 value, float dy) {
  _mm512_storeu_ps(out, _mm512_fmadd_ps(value, _mm512_set1_ps(dy), _mm512_loadu_ps(out)));
}

template <int T>
void zero_outputs(float* out, size_t out_stride) {
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out + t * out_stride, _mm512_setzero_ps());
}

// The products of one step of unpacked quants w with four activation bytes of each token at
// column `col` of super-block i, into acc (started from zero when `first`).
template <int T>
inline void step(const Tile<T>& tile, int64_t i, int col, __m512i w, __m512i* acc, bool first) {
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    acc[t] = _mm512_dpbusd_epi32(first ? _mm512_setzero_si512() : acc[t], w,
                                 broadcast32(tile.y[t][i].qs + col));
  }
}

// tot[t] += acc[t] * scale for every token (tot = acc * scale when `first`): a sub-block's
// sums weighted by its scales, exact in int32. The empty asm pins each sub-block's totals in
// program order: without it GCC kept the unscaled sums of every sub-block alive to multiply them
// later, spilling them to the stack (an eight-token Q6_K tile: 270 stack accesses per
// super-block, and 1.5 times slower).
template <int T>
inline void add_scaled(const __m512i* acc, __m512i scale, __m512i* tot, bool first) {
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    const __m512i scaled = _mm512_mullo_epi32(acc[t], scale);
    tot[t] = first ? scaled : _mm512_add_epi32(tot[t], scaled);
    __asm__ volatile("" : "+v"(tot[t]));
  }
}

template <int T>
void q4_k_tile(int64_t n, const uint8_t* group, const uint8_t* acts, size_t stride, float* out,
               size_t out_stride) {
  const auto* g = reinterpret_cast<const GroupQ4_K*>(group);
  const Tile<T> tile(acts, stride);
  zero_outputs<T>(out, out_stride);
  const __m512i low4 = _mm512_set1_epi8(0x0f), low6 = _mm512_set1_epi8(0x3f);
  const __m512i low2 = _mm512_set1_epi8(0x03);
  // Bytes 0 and 1 (2 and 3) of each int32 lane, zero-extended to its two int16 halves.
  const __m512i first_pair = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, -1, 1, -1, 4, -1, 5, -1, 8, -1, 9, -1, 12, -1, 13, -1));
  const __m512i second_pair = _mm512_broadcast_i32x4(
      _mm_setr_epi8(2, -1, 3, -1, 6, -1, 7, -1, 10, -1, 11, -1, 14, -1, 15, -1));
  for (int64_t i = 0; i < n / kQKK; ++i) {
    const GroupQ4_K& b = g[i];
    // The scales and minimums of the 16 rows, four sub-blocks to a vector (see k_scales_mins).
    const __m512i w0 = load512(b.scale_words[0]);
    const __m512i w2 = load512(b.scale_words[2]);
    const __m512i scales_low = _mm512_and_si512(w0, low6);
    const __m512i scales_high =
        _mm512_or_si512(_mm512_and_si512(w2, low4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w0, 6), low2), 4));
    __m512i tot[T], acc[T];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      prefetch_part<GroupQ4_K, 8>(&b, j);
      const int col = 32 * j;
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        const __m512i bits = load512(b.qs[4 * j + h]);
        step(tile, i, col + 4 * h, _mm512_and_si512(bits, low4), acc, h == 0);
        step(tile, i, col + 16 + 4 * h, _mm512_and_si512(_mm512_srli_epi16(bits, 4), low4), acc,
             false);
      }
      const __m512i scale = lane_byte(j < 4 ? scales_low : scales_high, j % 4);
      add_scaled<T>(acc, scale, tot, j == 0);
    }
    const __m512i w1 = load512(b.scale_words[1]);
    const __m512i mins_low = _mm512_and_si512(w1, low6);
    const __m512i mins_high =
        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(w2, 4), low4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(w1, 6), low2), 4));
    // mins = sum_j min_j * (bsums 2j and 2j+1), two sub-blocks per int16 pair: (min_j,
    // min_j+1) against (sum of sub-block j, of j+1), half the products of one pair per j.
    const __m512i min_pairs[4] = {
        _mm512_shuffle_epi8(mins_low, first_pair), _mm512_shuffle_epi8(mins_low, second_pair),
        _mm512_shuffle_epi8(mins_high, first_pair), _mm512_shuffle_epi8(mins_high, second_pair)};
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256i sums = _mm256_madd_epi16(load256(tile.y[t][i].bsums), _mm256_set1_epi16(1));
      // Sub-block sums 0-3 in dwords 0-1 of the low half, 4-7 in dwords 4-5.
      alignas(32) int32_t sum_pairs[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(sum_pairs), _mm256_packs_epi32(sums, sums));
      constexpr int kDword[4] = {0, 1, 4, 5};
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        acc[t] = _mm512_dpwssd_epi32(p == 0 ? _mm512_setzero_si512() : acc[t], min_pairs[p],
                                     _mm512_set1_epi32(sum_pairs[kDword[p]]));
      }
    }
    const __m512 d = _mm512_cvtph_ps(load256(b.d));
    const __m512 dmin = _mm512_cvtph_ps(load256(b.dmin));
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512 value = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(acc[t]), dmin,
                                            _mm512_mul_ps(d, _mm512_cvtepi32_ps(tot[t])));
      accumulate(out + t * out_stride, value, tile.y[t][i].d);
    }
  }
}

template <int T>
void q6_k_tile(int64_t n, const uint8_t* group, const uint8_t* acts, size_t stride, float* out,
               size_t out_stride) {
  const auto* g = reinterpret_cast<const GroupQ6_K*>(group);
  const Tile<T> tile(acts, stride);
  zero_outputs<T>(out, out_stride);
  const __m512i low4 = _mm512_set1_epi8(0x0f), top2 = _mm512_set1_epi8(0x30);
  for (int64_t i = 0; i < n / kQKK; ++i) {
    const GroupQ6_K& b = g[i];
    __m512i tot[T], acc[T];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      prefetch_part<GroupQ6_K, 16>(&b, j);
      const int col = 16 * j;
      const __m512i ql0 = load512(b.sub[j].ql[0]), ql1 = load512(b.sub[j].ql[1]);
      const __m512i qh = load512(b.sub[j].qh);
      // The low four bits, and the two high bits of step s moved to bits 4-5.
      step(tile, i, col,
           _mm512_ternarylogic_epi32(_mm512_and_si512(ql0, low4), _mm512_slli_epi16(qh, 4), top2,
                                     0xf8),
           acc, true);
      step(tile, i, col + 4,
           _mm512_ternarylogic_epi32(_mm512_and_si512(ql1, low4), _mm512_slli_epi16(qh, 2), top2,
                                     0xf8),
           acc, false);
      step(tile, i, col + 8,
           _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(ql0, 4), low4), qh, top2,
                                     0xf8),
           acc, false);
      step(tile, i, col + 12,
           _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(ql1, 4), low4),
                                     _mm512_srli_epi16(qh, 2), top2, 0xf8),
           acc, false);
      const __m512i scale =
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales[j])));
      add_scaled<T>(acc, scale, tot, j == 0);
    }
    // The offset of the quants: sum_j scale_j * bsum_j, two sub-blocks per int16 pair.
#pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales[2 * p]));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales[2 * p + 1]));
      const __m512i pairs =
          _mm512_cvtepi8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a, c), _mm_unpacklo_epi8(a, c)));
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        acc[t] = _mm512_dpwssd_epi32(p == 0 ? _mm512_setzero_si512() : acc[t], pairs,
                                     broadcast32(tile.y[t][i].bsums + 2 * p));
      }
    }
    const __m512 d = _mm512_cvtph_ps(load256(b.d));
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512 value = _mm512_mul_ps(
          d, _mm512_cvtepi32_ps(_mm512_sub_epi32(tot[t], _mm512_slli_epi32(acc[t], 5))));
      accumulate(out + t * out_stride, value, tile.y[t][i].d);
    }
  }
}

// n_acts (1..kInterleavedTile) to the tile of that width.
template <void (*... kTiles)(int64_t, const uint8_t*, const uint8_t*, size_t, float*, size_t)>
void by_width(int64_t n, const uint8_t* group, const uint8_t* acts, size_t stride, int n_acts,
              float* out, size_t out_stride) {
  using Tile = void (*)(int64_t, const uint8_t*, const uint8_t*, size_t, float*, size_t);
  static constexpr Tile kTable[] = {kTiles...};
  kTable[n_acts - 1](n, group, acts, stride, out, out_stride);
}

}  // namespace

InterleavedDotFn avx512_interleaved_kernel(Type type) {
  switch (type) {
    case Type::Q4_K:
      return &by_width<q4_k_tile<1>, q4_k_tile<2>, q4_k_tile<3>, q4_k_tile<4>, q4_k_tile<5>,
                       q4_k_tile<6>, q4_k_tile<7>, q4_k_tile<8>>;
    case Type::Q6_K:
      return &by_width<q6_k_tile<1>, q6_k_tile<2>, q6_k_tile<3>, q6_k_tile<4>, q6_k_tile<5>,
                       q6_k_tile<6>, q6_k_tile<7>, q6_k_tile<8>>;
    default:
      return nullptr;
  }
}

}  // namespace pg4::quant::detail

#endif
