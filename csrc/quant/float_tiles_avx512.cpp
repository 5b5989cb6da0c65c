// The AVX-512 float tiles. The row kernel keeps four accumulators, one for each quarter of every
// 64 elements; a tile computes them a quarter at a time (a phase), so that each product needs one
// register and 4 x 6 products fit at once, and keeps each phase's sums in memory until the four
// are added as the row kernel adds them.
#include "quant/dot.h"
#include "quant/float_tiles.h"

#if defined(PG4_QUANT_AVX512)

#include <array>
#include <utility>

#include "quant/simd_x86.h"

namespace pg4::quant::detail {

namespace {

template <int R, int T>
void float_tile(int64_t n, const float* w, size_t w_stride, const float* a, size_t a_stride,
                float* y, size_t y_stride) {
  const int64_t whole = n / 64 * 64;
  __m512 phases[4][R][T];
  for (int phase = 0; phase < 4; ++phase) {
    __m512 acc[R][T];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    }
    auto step = [&](int64_t i) {
      __m512 wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * w_stride + i);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        __m512 av = _mm512_loadu_ps(a + t * a_stride + i);
        // Held in a register: GCC would fold the load into each of the R products, loading
        // it R times, and loads, not products, would then bound the loop.
        __asm__("" : "+v"(av));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r], av, acc[r][t]);
      }
    };
    for (int64_t i = 16 * phase; i < whole; i += 64) step(i);
    // The row kernel adds the 16-element steps past the last whole 64 to its first accumulator.
    if (phase == 0) {
      for (int64_t i = whole; i < n; i += 16) step(i);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) phases[phase][r][t] = acc[r][t];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      const __m512 low = _mm512_add_ps(phases[0][r][t], phases[1][r][t]);
      const __m512 high = _mm512_add_ps(phases[2][r][t], phases[3][r][t]);
      y[t * y_stride + r] = _mm512_reduce_add_ps(_mm512_add_ps(low, high));
    }
  }
}

template <int R, int... T>
constexpr std::array<FloatTileFn, kTileTokens> tile_row(std::integer_sequence<int, T...>) {
  return {&float_tile<R, T + 1>...};
}

template <int... R>
constexpr FloatTileKernels tiles_with(WidenFn widen, std::integer_sequence<int, R...>) {
  FloatTileKernels kernels{};
  const std::array<FloatTileFn, kTileTokens> rows[] = {
      tile_row<R + 1>(std::make_integer_sequence<int, kTileTokens>())...};
  for (int r = 0; r < kTileRows; ++r) {
    for (int t = 0; t < kTileTokens; ++t) kernels.tiles[r][t] = rows[r][t];
  }
  kernels.widen = widen;
  return kernels;
}

void widen_f16(const void* src, float* dst, int64_t n) {
  const auto* h = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(load256(h + i)));
}

void widen_bf16(const void* src, float* dst, int64_t n) {
  const auto* h = static_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512i wide = _mm512_cvtepu16_epi32(load256(h + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
  }
}

}  // namespace

const FloatTileKernels* avx512_float_tiles(Type weight_type) {
  constexpr auto kRows = std::make_integer_sequence<int, kTileRows>();
  static const FloatTileKernels kF32 = tiles_with(nullptr, kRows);
  static const FloatTileKernels kF16 = tiles_with(&widen_f16, kRows);
  static const FloatTileKernels kBf16 = tiles_with(&widen_bf16, kRows);
  switch (weight_type) {
    case Type::F32:
      return &kF32;
    case Type::F16:
      return &kF16;
    case Type::BF16:
      return &kBf16;
    default:
      return nullptr;
  }
}

}  // namespace pg4::quant::detail

#endif  // PG4_QUANT_AVX512
