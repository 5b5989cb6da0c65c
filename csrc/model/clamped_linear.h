// The linear layers of Gemma 4's vision and audio encoders: a weight whose input and output may
// be clamped to ranges the mmproj file stores beside it (`<stem>.input_min`, `.input_max`,
// `.output_min`, `.output_max`; transformers' clipped linears).
#pragma once

#include <cmath>
#include <string>

#include "model/weights.h"
#include "ops/ops.h"

namespace pg4 {

// The clamp ranges of one linear; an absent bound is infinite.
struct ClampBounds {
  float in_lo = -INFINITY, in_hi = INFINITY, out_lo = -INFINITY, out_hi = INFINITY;

  bool clamps_input() const { return std::isfinite(in_lo) || std::isfinite(in_hi); }
  bool clamps_output() const { return std::isfinite(out_lo) || std::isfinite(out_hi); }
};

// The bounds of the linear `stem` (e.g. "v.blk.0.attn_q"), read while `weights` are host memory.
ClampBounds clamp_bounds(const WeightTable& weights, const std::string& stem);

struct ClampedLinear {
  Weight weight;
  ClampBounds bounds;

  // y[n][rows] = clamp_out(weight · clamp_in(x)) for x[n][cols]; `scratch` holds the clamped
  // input (n × cols values) when the input is clamped.
  void apply(Ops& ops, const float* x, int n, float* y, float* scratch) const;
};

}  // namespace pg4
