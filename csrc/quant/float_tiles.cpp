// Whether a weight type and instruction set have tile kernels.
#include "quant/float_tiles.h"

#include "quant/dot.h"

namespace pg4::quant {

namespace detail {
#if defined(PG4_QUANT_AVX512)
const FloatTileKernels* avx512_float_tiles(Type weight_type);
#endif
}  // namespace detail

const FloatTileKernels* float_tile_kernels(Type weight_type, Isa isa, int64_t n) {
  if (n % 16 != 0) return nullptr;
#if defined(PG4_QUANT_AVX512)
  if (isa >= Isa::kAvx512) return detail::avx512_float_tiles(weight_type);
#endif
  return nullptr;
}

}  // namespace pg4::quant
