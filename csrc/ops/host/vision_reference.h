// Plain single-threaded host computations of the vision-tower operations: the defaults of Ops
// for backends without their own, and the reference the CPU backend's threaded versions follow.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pg4::host {

void clamp(float* x, float lo, float hi, size_t n);
// One query row of dense attention: out = softmax(scale * q . k_s) . v_s over the n_tokens rows
// of k and v (stride floats apart); scores holds n_tokens floats of scratch.
void attention_row(const float* q, const float* k, const float* v, int n_tokens, size_t stride,
                   int head_dim, float scale, float* scores, float* out);
void avg_pool_2d(const float* x, int rows, int cols, int dim, int k, float* out);

}  // namespace pg4::host
