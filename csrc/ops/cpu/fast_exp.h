// e^x for loops that must vectorise, shared by the CPU backend's activations and softmaxes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace pg4 {

// e^x to about 1 ulp, written without branches or library calls so that loops over it
// vectorise (std::tanh in the GELU loop took a fifth of prefill time). Range reduction
// x = n ln2 + r with ln2 split in two for exactness, then a degree-6 polynomial for e^r. n is
// rounded by adding 1.5 * 2^23, whose float then holds n in its low mantissa bits: std::floor and
// a float-to-int conversion would keep GCC from vectorising (they may trap).
inline float fast_exp(float x) {
  constexpr float kRounder = 12582912.0f;  // 1.5 * 2^23
  constexpr int32_t kRounderBits = 0x4b400000;
  x = std::min(88.0f, std::max(-87.0f, x));
  const float rounded = x * 1.44269504f + kRounder;
  const float n = rounded - kRounder;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t rounded_bits;
  std::memcpy(&rounded_bits, &rounded, sizeof rounded_bits);
  const int32_t bits = (rounded_bits - kRounderBits + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace pg4
