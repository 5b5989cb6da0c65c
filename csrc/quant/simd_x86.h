// Internal: small x86 vector helpers shared by the AVX2 and AVX-512 kernels. Include only where
// PG4_QUANT_AVX2 is defined.
#pragma once

// GCC 12's AVX-512 headers trip -Wuninitialized on their own _mm512_undefined_* placeholders
// (a GCC 12 regression): the warnings point into the headers, and are silenced there only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <cstdint>
#include <cstring>

namespace pg4::quant::detail {

// F16C conversion of a block scale; exact, like half_to_float, but a single instruction.
inline float fp16_fast(uint16_t h) { return _cvtsh_ss(h); }

// acc + the sums of four adjacent products of unsigned bytes u with signed bytes s, in int32
// lanes. VNNI does it in one instruction; without it the pair sums pass through int16, which
// cannot saturate for the quant ranges used here (|u| <= 128, |s| <= 127).
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of nibbles to 32 bytes: the low nibbles first, then the high ones (the order of the
// 32-element block formats).
inline __m256i nibbles_32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0f));
}

// 32 bits (little-endian) to 32 bytes, 0xff where the bit is set.
inline __m256i bits_32(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

// The 16 bytes of four unpacked scale words (see k_scales_mins, q3_k_scales).
inline __m128i packed_bytes(const uint32_t w[4]) {
  return _mm_set_epi32(static_cast<int>(w[3]), static_cast<int>(w[2]), static_cast<int>(w[1]),
                       static_cast<int>(w[0]));
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// int16 lanes 0-7 = scales[2 * c], lanes 8-15 = scales[2 * c + 1], from 16 signed byte scales:
// the factors for one 32-element chunk whose two halves have their own scale.
inline __m256i scale_pair(__m128i scales, int c) {
  const __m128i idx =
      _mm_set_epi64x(0x0101010101010101LL * (2 * c + 1), 0x0101010101010101LL * (2 * c));
  return _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, idx));
}

}  // namespace pg4::quant::detail
