// Repacking rows into interleaved groups and back, and the portable reference of the interleaved
// kernels: the same integer sums and the same float operations, in the same order, as the SIMD
// kernels, so the two agree bit for bit.
#include "quant/interleaved.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "quant/dot.h"
#include "quant/interleaved_layout.h"

namespace pg4::quant {

namespace {

using detail::GroupQ4_K;
using detail::GroupQ6_K;
using detail::kGroupRows;

// The 256 quants of a file block, in column order (Q4_K: 0..15, Q6_K: 0..63 before the -32).
void block_quants(const BlockQ4_K& x, uint8_t q[kQKK]) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      q[64 * c + l] = x.qs[32 * c + l] & 0x0f;
      q[64 * c + 32 + l] = x.qs[32 * c + l] >> 4;
    }
  }
}

void block_quants(const BlockQ6_K& x, uint8_t q[kQKK]) {
  for (int e = 0; e < kQKK; ++e) {
    const int h = e / 128, c = (e / 32) % 4, l = e % 32;
    const int low = (x.ql[64 * h + 32 * (c % 2) + l] >> (4 * (c / 2))) & 0x0f;
    const int high = (x.qh[32 * h + l] >> (2 * c)) & 3;
    q[e] = static_cast<uint8_t>(low | high << 4);
  }
}

void set_block_quants(const uint8_t q[kQKK], BlockQ4_K& x) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      x.qs[32 * c + l] = static_cast<uint8_t>(q[64 * c + l] | q[64 * c + 32 + l] << 4);
    }
  }
}

void set_block_quants(const uint8_t q[kQKK], BlockQ6_K& x) {
  std::memset(x.ql, 0, sizeof x.ql);
  std::memset(x.qh, 0, sizeof x.qh);
  for (int e = 0; e < kQKK; ++e) {
    const int h = e / 128, c = (e / 32) % 4, l = e % 32;
    x.ql[64 * h + 32 * (c % 2) + l] |= static_cast<uint8_t>((q[e] & 0x0f) << (4 * (c / 2)));
    x.qh[32 * h + l] |= static_cast<uint8_t>((q[e] >> 4) << (2 * c));
  }
}

// Column of step s, byte b.
constexpr int column(int step, int b) { return 4 * step + b; }

// Quant of row r at column 32j + 4s + b of a Q4_K group (s < 8 within sub-block j).
uint8_t group_quant(const GroupQ4_K& g, int r, int j, int s, int b) {
  const uint8_t byte = g.qs[4 * j + s % 4][4 * r + b];
  return s < 4 ? byte & 0x0f : byte >> 4;
}

// Quant of row r at column 16j + 4i + b of a Q6_K group (i < 4 within sub-block j).
uint8_t group_quant(const GroupQ6_K& g, int r, int j, int i, int b) {
  const uint8_t byte = g.sub[j].ql[i % 2][4 * r + b];
  const int low = i < 2 ? byte & 0x0f : byte >> 4;
  const int high = (g.sub[j].qh[4 * r + b] >> (2 * i)) & 3;
  return static_cast<uint8_t>(low | high << 4);
}

void interleave_q4_k(const uint8_t* src, size_t row_bytes, int64_t nb, GroupQ4_K* dst) {
  uint8_t q[kQKK];
  for (int64_t i = 0; i < nb; ++i) {
    GroupQ4_K& g = dst[i];
    for (int r = 0; r < kGroupRows; ++r) {
      const auto& x = reinterpret_cast<const BlockQ4_K*>(src + r * row_bytes)[i];
      g.d[r] = x.d;
      g.dmin[r] = x.dmin;
      for (int w = 0; w < 3; ++w) std::memcpy(&g.scale_words[w][r], x.scales + 4 * w, 4);
      block_quants(x, q);
      for (int j = 0; j < 8; ++j) {
        for (int h = 0; h < 4; ++h) {
          for (int b = 0; b < 4; ++b) {
            g.qs[4 * j + h][4 * r + b] =
                static_cast<uint8_t>(q[32 * j + column(h, b)] | q[32 * j + column(4 + h, b)] << 4);
          }
        }
      }
    }
  }
}

void interleave_q6_k(const uint8_t* src, size_t row_bytes, int64_t nb, GroupQ6_K* dst) {
  uint8_t q[kQKK];
  for (int64_t i = 0; i < nb; ++i) {
    GroupQ6_K& g = dst[i];
    for (int r = 0; r < kGroupRows; ++r) {
      const auto& x = reinterpret_cast<const BlockQ6_K*>(src + r * row_bytes)[i];
      g.d[r] = x.d;
      for (int j = 0; j < 16; ++j) g.scales[j][r] = x.scales[j];
      block_quants(x, q);
      for (int j = 0; j < 16; ++j) {
        for (int b = 0; b < 4; ++b) {
          uint8_t high = 0;
          for (int s = 0; s < 4; ++s)
            high |= static_cast<uint8_t>((q[16 * j + column(s, b)] >> 4) << (2 * s));
          g.sub[j].qh[4 * r + b] = high;
          for (int h = 0; h < 2; ++h) {
            g.sub[j].ql[h][4 * r + b] = static_cast<uint8_t>(
                (q[16 * j + column(h, b)] & 0x0f) | (q[16 * j + column(2 + h, b)] & 0x0f) << 4);
          }
        }
      }
    }
  }
}

void deinterleave_q4_k(const GroupQ4_K* groups, int r, int64_t nb, BlockQ4_K* dst) {
  uint8_t q[kQKK];
  for (int64_t i = 0; i < nb; ++i) {
    const GroupQ4_K& g = groups[i];
    BlockQ4_K& x = dst[i];
    x.d = g.d[r];
    x.dmin = g.dmin[r];
    for (int w = 0; w < 3; ++w) std::memcpy(x.scales + 4 * w, &g.scale_words[w][r], 4);
    for (int j = 0; j < 8; ++j) {
      for (int s = 0; s < 8; ++s) {
        for (int b = 0; b < 4; ++b) q[32 * j + column(s, b)] = group_quant(g, r, j, s, b);
      }
    }
    set_block_quants(q, x);
  }
}

void deinterleave_q6_k(const GroupQ6_K* groups, int r, int64_t nb, BlockQ6_K* dst) {
  uint8_t q[kQKK];
  for (int64_t i = 0; i < nb; ++i) {
    const GroupQ6_K& g = groups[i];
    BlockQ6_K& x = dst[i];
    x.d = g.d[r];
    for (int j = 0; j < 16; ++j) x.scales[j] = g.scales[j][r];
    for (int j = 0; j < 16; ++j) {
      for (int s = 0; s < 4; ++s) {
        for (int b = 0; b < 4; ++b) q[16 * j + column(s, b)] = group_quant(g, r, j, s, b);
      }
    }
    set_block_quants(q, x);
  }
}

// Reference Q4_K: per super-block, tot = sum_j scale_j * (q . y over sub-block j) and
// mins = sum_j min_j * (the bsums of sub-block j), both exact in int32; then
// out += dy * (d * tot - dmin * mins), each step rounded as the SIMD kernel rounds it.
void reference_q4_k(int64_t n, const uint8_t* group, const uint8_t* acts, size_t act_stride,
                    int n_acts, float* out, size_t out_stride) {
  const auto* g = reinterpret_cast<const GroupQ4_K*>(group);
  for (int t = 0; t < n_acts; ++t) {
    const auto* y = reinterpret_cast<const BlockQ8_K*>(acts + t * act_stride);
    for (int r = 0; r < kGroupRows; ++r) {
      float sum = 0.0f;
      for (int64_t i = 0; i < n / kQKK; ++i) {
        uint8_t packed[12];
        for (int w = 0; w < 3; ++w) std::memcpy(packed + 4 * w, &g[i].scale_words[w][r], 4);
        uint32_t scales_mins[4];
        k_scales_mins(packed, scales_mins);
        int32_t tot = 0, mins = 0;
        for (int j = 0; j < 8; ++j) {
          int32_t dot = 0;
          for (int s = 0; s < 8; ++s) {
            for (int b = 0; b < 4; ++b) {
              dot += group_quant(g[i], r, j, s, b) * y[i].qs[32 * j + column(s, b)];
            }
          }
          tot += dot * byte_of(scales_mins, j);
          mins += byte_of(scales_mins, 8 + j) * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
        }
        const float scaled = fp16(g[i].d[r]) * static_cast<float>(tot);
        const float value = std::fma(-static_cast<float>(mins), fp16(g[i].dmin[r]), scaled);
        sum = std::fma(value, y[i].d, sum);
      }
      out[t * out_stride + r] = sum;
    }
  }
}

// Reference Q6_K: per super-block, tot = sum_j scale_j * (q . y over sub-block j) with q the
// unsigned quants, less 32 * sum_j scale_j * bsum_j for their offset, exact in int32; then
// out += dy * (d * that).
void reference_q6_k(int64_t n, const uint8_t* group, const uint8_t* acts, size_t act_stride,
                    int n_acts, float* out, size_t out_stride) {
  const auto* g = reinterpret_cast<const GroupQ6_K*>(group);
  for (int t = 0; t < n_acts; ++t) {
    const auto* y = reinterpret_cast<const BlockQ8_K*>(acts + t * act_stride);
    for (int r = 0; r < kGroupRows; ++r) {
      float sum = 0.0f;
      for (int64_t i = 0; i < n / kQKK; ++i) {
        int32_t tot = 0, offset = 0;
        for (int j = 0; j < 16; ++j) {
          int32_t dot = 0;
          for (int s = 0; s < 4; ++s) {
            for (int b = 0; b < 4; ++b) {
              dot += group_quant(g[i], r, j, s, b) * y[i].qs[16 * j + column(s, b)];
            }
          }
          tot += dot * g[i].scales[j][r];
          offset += g[i].scales[j][r] * y[i].bsums[j];
        }
        const float value = fp16(g[i].d[r]) * static_cast<float>(tot - 32 * offset);
        sum = std::fma(value, y[i].d, sum);
      }
      out[t * out_stride + r] = sum;
    }
  }
}

void require_layout(Type type) {
  if (!has_interleaved_layout(type)) {
    throw std::invalid_argument(std::string(type_info(type).name) + " has no interleaved layout");
  }
}

}  // namespace

bool has_interleaved_layout(Type type) { return type == Type::Q4_K || type == Type::Q6_K; }

void interleave_rows(Type type, const uint8_t* src, size_t row_bytes, int64_t n, uint8_t* dst) {
  require_layout(type);
  const int64_t nb = n / kQKK;
  if (type == Type::Q4_K) {
    interleave_q4_k(src, row_bytes, nb, reinterpret_cast<GroupQ4_K*>(dst));
  } else {
    interleave_q6_k(src, row_bytes, nb, reinterpret_cast<GroupQ6_K*>(dst));
  }
}

void deinterleave_row(Type type, const uint8_t* group, int row, int64_t n, uint8_t* dst) {
  require_layout(type);
  const int64_t nb = n / kQKK;
  if (type == Type::Q4_K) {
    deinterleave_q4_k(reinterpret_cast<const GroupQ4_K*>(group), row, nb,
                      reinterpret_cast<BlockQ4_K*>(dst));
  } else {
    deinterleave_q6_k(reinterpret_cast<const GroupQ6_K*>(group), row, nb,
                      reinterpret_cast<BlockQ6_K*>(dst));
  }
}

InterleavedDotFn interleaved_dot_reference(Type type) {
  switch (type) {
    case Type::Q4_K:
      return &reference_q4_k;
    case Type::Q6_K:
      return &reference_q6_k;
    default:
      return nullptr;
  }
}

InterleavedDotFn interleaved_dot_fn(Type type, Isa isa) {
#if defined(PG4_QUANT_AVX512) && defined(__AVX512VNNI__)
  return isa >= Isa::kAvx512 ? detail::avx512_interleaved_kernel(type) : nullptr;
#else
  return nullptr;
#endif
}

}  // namespace pg4::quant
