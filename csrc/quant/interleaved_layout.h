// Internal: the byte layout of one super-block (256 columns) of an interleaved group of 16 rows,
// shared by the repacking, the reference and the SIMD kernels. Quants are stored in "steps" of
// four columns: the 64 bytes of a step hold columns 4s..4s+3 of row r at bytes 4r..4r+3.
#pragma once

#include <cstdint>

#include "quant/blocks.h"
#include "quant/interleaved.h"

namespace pg4::quant::detail {

constexpr int kGroupRows = kInterleavedRows;
constexpr int kStepBytes = 4 * kGroupRows;

// Q4_K: sub-block j (32 columns, eight steps) lies in the nibbles of qs chunks 4j..4j+3; chunk
// 4j+h holds step h of the sub-block in its low nibbles and step 4+h in its high ones. The
// scale words of the file's blocks are stored word by word across the rows, so that one vector
// unpacks the scales and minimums of all 16 rows.
struct GroupQ4_K {
  uint16_t d[kGroupRows];
  uint16_t dmin[kGroupRows];
  uint32_t scale_words[3][kGroupRows];
  uint8_t qs[kQKK / 8][kStepBytes];
};

// Q6_K: sub-block j (16 columns, four steps) is 192 consecutive bytes, read in order: chunk h of
// its ql holds the low four bits of step h (low nibbles) and of step 2+h (high nibbles), its qh
// the top two bits of step i at bits 2i..2i+1. scales[j][r] is the signed scale of row r's
// sub-block j.
struct SubBlockQ6_K {
  uint8_t ql[2][kStepBytes];
  uint8_t qh[kStepBytes];
};

struct GroupQ6_K {
  uint16_t d[kGroupRows];
  int8_t scales[kQKK / 16][kGroupRows];
  SubBlockQ6_K sub[kQKK / 16];
};

static_assert(sizeof(GroupQ4_K) == kGroupRows * sizeof(BlockQ4_K));
static_assert(sizeof(GroupQ6_K) == kGroupRows * sizeof(BlockQ6_K));

}  // namespace pg4::quant::detail
