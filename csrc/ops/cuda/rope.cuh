// The NEOX rotary embedding of one head row, shared by the query and the key kernels.
#pragma once

#include "ops/ops.h"

namespace pg4::cuda {

// out[i] = row[i] rotated for position pos: pairs (i, i + n_rot / 2) turn by pos * freq_i, the
// dims from n_rot on are copied. The angle is computed in double, as on the CPU: positions in
// the hundred thousands times a float frequency would lose the phase.
__device__ __forceinline__ void rotate_into(const float* row, int pos, int head_dim,
                                            const Rope& rope, float* out) {
  const int half = rope.n_rot / 2;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    if (i >= rope.n_rot) {
      out[i] = row[i];
      continue;
    }
    const int pair = i % half;
    double freq = pow(static_cast<double>(rope.base), -2.0 * pair / rope.n_rot);
    if (rope.freq_factors != nullptr) freq /= rope.freq_factors[pair];
    double s, c;
    sincos(pos * freq, &s, &c);
    const float sin_a = static_cast<float>(s), cos_a = static_cast<float>(c);
    const float a = row[pair], b = row[pair + half];
    out[i] = i < half ? a * cos_a - b * sin_a : b * cos_a + a * sin_a;
  }
}

}  // namespace pg4::cuda
