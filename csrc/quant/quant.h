// Row-level operations on GGUF block formats: dequantize a row, convert activations to the
// format a weight type is multiplied against, and the dot product of one weight row with one
// converted activation row.
#pragma once

#include <string>
#include <vector>

#include "quant/types.h"

namespace pg4::quant {

// The instruction sets the CPU kernels are written for, narrowest first. A build has the ones
// its target supports (-march=native picks the build machine's); each kernel table falls back
// from the one asked for to the next narrower set that has a kernel for the type.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest set this build has, and all it has, narrowest first.
Isa widest_isa();
std::vector<Isa> built_isas();
const char* isa_name(Isa isa);
// The set named `name` ("scalar", "avx2", "avx512"); throws std::invalid_argument naming the
// sets this build has when it is not one of them.
Isa parse_isa(const std::string& name);

// dst[0..n) = the values of a row of `type`, bit-identical to gguf.quants.dequantize.
void dequantize_row(Type type, const void* src, float* dst, int64_t n);

// Converts n floats into a row of `activation_type` (F32, F16, BF16, Q8_0, Q8_1 or Q8_K),
// rounding as llama.cpp's CPU backend does. dst holds row_bytes(activation_type, n) bytes.
void quantize_activation_row(Type activation_type, const float* src, void* dst, int64_t n);

// Dot product of a weight row of `weight_type` with an activation row already converted to
// type_info(weight_type).activation, with the kernel of `isa` (the scalar one is the reference
// the SIMD kernels are checked against).
using VecDotFn = float (*)(int64_t n, const void* weight_row, const void* activation_row);
VecDotFn vec_dot_fn(Type weight_type, Isa isa = widest_isa());

// One weight row against n_acts activation rows spaced act_stride bytes apart:
// out[j] = dot(weight_row, acts + j * act_stride), bit for bit what vec_dot_fn gives for that row.
// Lets a batch read and unpack each weight block once for several activation rows.
using VecDotMultiFn = void (*)(int64_t n, const void* weight_row, const void* acts,
                               size_t act_stride, int n_acts, float* out);
VecDotMultiFn vec_dot_multi_fn(Type weight_type, Isa isa = widest_isa());

// vec_dot_fn and vec_dot_multi_fn throw std::invalid_argument for a type that
// is not a weight type.

}  // namespace pg4::quant
