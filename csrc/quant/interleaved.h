// Weight matrices with their rows interleaved in groups of 16, the layout of the CPU's integer
// matrix kernels: one 64-byte vector of unpacked quants holds four consecutive columns of each of
// the 16 rows, so a VNNI product against four broadcast activation bytes advances 16 rows at once
// and a tile of tokens shares every unpacked vector. A group takes exactly the bytes of its 16
// rows in the file's layout, so offsets into a matrix (experts, row bands) are the same in both.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant/quant.h"

namespace pg4::quant {

constexpr int kInterleavedRows = 16;

// Whether `type` has an interleaved layout (Q4_K and Q6_K, the bulk of K-quant models).
bool has_interleaved_layout(Type type);

// Writes the 16 rows of n elements at src (row_bytes apart, the file's layout) as one
// interleaved group of 16 * row_bytes(type, n) bytes at dst.
void interleave_rows(Type type, const uint8_t* src, size_t row_bytes, int64_t n, uint8_t* dst);

// Writes row `row` of an interleaved group back in the file's layout (row_bytes(type, n) bytes).
void deinterleave_row(Type type, const uint8_t* group, int row, int64_t n, uint8_t* dst);

// out[t * out_stride + r] = the dot product of row r of an interleaved group with activation
// row t (Q8_K, act_stride bytes apart), for r < 16 and t < n_acts <= kInterleavedTile. Every
// (row, token) product is computed by the same arithmetic whatever n_acts is, so a batch gets
// the bits of one token at a time.
constexpr int kInterleavedTile = 8;
using InterleavedDotFn = void (*)(int64_t n, const uint8_t* group, const uint8_t* acts,
                                  size_t act_stride, int n_acts, float* out, size_t out_stride);

// The SIMD kernel for `type` where the build has one within `isa` (AVX-512 VNNI), else nullptr.
InterleavedDotFn interleaved_dot_fn(Type type, Isa isa = widest_isa());
// The portable reference of the same products, bit for bit; nullptr without a layout.
InterleavedDotFn interleaved_dot_reference(Type type);

}  // namespace pg4::quant
