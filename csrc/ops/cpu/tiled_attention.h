// Dense (bidirectional) attention as tiled products: for a group of queries of one head, the
// scores against every key (S = Q K^T), the softmax of each row, and P V, each product on the
// panel micro-kernel.
#pragma once

#include <cstddef>

#include "ops/cpu/panel_kernel.h"

namespace pg4 {

// n rounded up to whole key panels.
int padded_keys(int n);

// Copies the n keys of one head (head_dim floats each, `stride` floats apart) into panels of
// kPanelRows keys, each [head_dim][kPanelRows] (the last panel's missing keys zero):
// padded_keys(n) * head_dim floats.
void pack_key_panels(const float* k, size_t stride, int n, int head_dim, float* panels);

// Floats of scratch attend_queries needs for n keys and heads of head_dim.
size_t attention_scratch_floats(int n, int head_dim);

// out[j * out_stride + d] = softmax_s(scale * q_j . k_s) . v_s for the n_queries (<= kPanelActs)
// queries q_j = q + j * q_stride, over the n keys packed by pack_key_panels and their values
// (v + s * v_stride).
void attend_queries(PanelKernelFn kernel, const float* q, size_t q_stride, int n_queries,
                    const float* key_panels, const float* v, size_t v_stride, int n, int head_dim,
                    float scale, float* scratch, float* out, size_t out_stride);

}  // namespace pg4
