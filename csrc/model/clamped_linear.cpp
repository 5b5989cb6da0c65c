#include "model/clamped_linear.h"

namespace pg4 {

ClampBounds clamp_bounds(const WeightTable& weights, const std::string& stem) {
  auto bound = [&](const char* which, float absent) {
    const std::string name = stem + "." + which;
    return weights.has(name) ? weights.scalar(name) : absent;
  };
  ClampBounds b;
  b.in_lo = bound("input_min", -INFINITY);
  b.in_hi = bound("input_max", INFINITY);
  b.out_lo = bound("output_min", -INFINITY);
  b.out_hi = bound("output_max", INFINITY);
  return b;
}

void ClampedLinear::apply(Ops& ops, const float* x, int n, float* y, float* scratch) const {
  if (bounds.clamps_input()) {
    const size_t n_in = static_cast<size_t>(n) * weight.cols();
    ops.copy(scratch, x, n_in);
    ops.clamp(scratch, bounds.in_lo, bounds.in_hi, n_in);
    x = scratch;
  }
  ops.matmul(weight, x, n, y);
  if (bounds.clamps_output()) {
    ops.clamp(y, bounds.out_lo, bounds.out_hi, static_cast<size_t>(n) * weight.rows());
  }
}

}  // namespace pg4
