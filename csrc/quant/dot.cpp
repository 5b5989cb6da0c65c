// Picks the kernels for a weight type: the widest instruction set the build targets that has one,
// falling back to the scalar reference.
#include "quant/dot.h"

#include <stdexcept>
#include <string>

namespace pg4::quant {

namespace {

detail::Kernels best_kernels(Type weight_type) {
#if defined(PG4_QUANT_AVX512)
  const detail::Kernels avx512 = detail::avx512_kernels(weight_type);
  if (avx512.one != nullptr) return avx512;
#endif
#if defined(PG4_QUANT_AVX2)
  const detail::Kernels avx2 = detail::avx2_kernels(weight_type);
  if (avx2.one != nullptr) return avx2;
#endif
  return detail::scalar_kernels(weight_type);
}

detail::Kernels checked(Type weight_type, detail::Kernels kernels) {
  if (kernels.one == nullptr) {
    throw std::invalid_argument(std::string(type_info(weight_type).name) + " is not a weight type");
  }
  return kernels;
}

}  // namespace

VecDotFn vec_dot_fn(Type weight_type) {
  return checked(weight_type, best_kernels(weight_type)).one;
}

VecDotFn vec_dot_fn_scalar(Type weight_type) {
  return checked(weight_type, detail::scalar_kernels(weight_type)).one;
}

VecDotMultiFn vec_dot_multi_fn(Type weight_type) {
  return checked(weight_type, best_kernels(weight_type)).multi;
}

}  // namespace pg4::quant
