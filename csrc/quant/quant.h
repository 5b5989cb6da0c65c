// Row-level operations on GGUF block formats: dequantize a row, convert activations to the
// format a weight type is multiplied against, and the dot product of one weight row with one
// converted activation row.
#pragma once

#include "quant/types.h"

namespace pg4::quant {

// dst[0..n) = the values of a row of `type`, bit-identical to gguf.quants.dequantize.
void dequantize_row(Type type, const void* src, float* dst, int64_t n);

// Converts n floats into a row of `activation_type` (F32, F16, BF16, Q8_0, Q8_1 or Q8_K),
// rounding as llama.cpp's CPU backend does. dst holds row_bytes(activation_type, n) bytes.
void quantize_activation_row(Type activation_type, const float* src, void* dst, int64_t n);

// Dot product of a weight row of `weight_type` with an activation row already converted to
// type_info(weight_type).activation. Uses the widest SIMD the build targets.
using VecDotFn = float (*)(int64_t n, const void* weight_row, const void* activation_row);
VecDotFn vec_dot_fn(Type weight_type);

// The portable scalar version of the same product, kept as the reference for the SIMD paths.
VecDotFn vec_dot_fn_scalar(Type weight_type);

// One weight row against n_acts activation rows spaced act_stride bytes apart:
// out[j] = dot(weight_row, acts + j * act_stride), bit for bit what vec_dot_fn gives for that row.
// Lets a batch read and unpack each weight block once for several activation rows.
using VecDotMultiFn = void (*)(int64_t n, const void* weight_row, const void* acts,
                               size_t act_stride, int n_acts, float* out);
VecDotMultiFn vec_dot_multi_fn(Type weight_type);

// vec_dot_fn, vec_dot_fn_scalar and vec_dot_multi_fn throw std::invalid_argument for a type that
// is not a weight type.

}  // namespace pg4::quant
