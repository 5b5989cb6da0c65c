// Picks the kernels for a weight type: the widest instruction set, up to the one asked for, that
// the build targets and that has one, falling back to the scalar reference.
#include "quant/dot.h"

#include <stdexcept>
#include <string>

namespace pg4::quant {

namespace {

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

detail::Kernels best_kernels(Type weight_type, Isa isa) {
#if defined(PG4_QUANT_AVX512)
  if (isa >= Isa::kAvx512) {
    const detail::Kernels avx512 = detail::avx512_kernels(weight_type);
    if (avx512.one != nullptr) return avx512;
  }
#endif
#if defined(PG4_QUANT_AVX2)
  if (isa >= Isa::kAvx2) {
    const detail::Kernels avx2 = detail::avx2_kernels(weight_type);
    if (avx2.one != nullptr) return avx2;
  }
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

Isa widest_isa() {
#if defined(PG4_QUANT_AVX512)
  return Isa::kAvx512;
#elif defined(PG4_QUANT_AVX2)
  return Isa::kAvx2;
#else
  return Isa::kScalar;
#endif
}

std::vector<Isa> built_isas() {
  std::vector<Isa> isas;
  for (int i = 0; i <= static_cast<int>(widest_isa()); ++i) isas.push_back(static_cast<Isa>(i));
  return isas;
}

const char* isa_name(Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

Isa parse_isa(const std::string& name) {
  std::string known;
  for (Isa isa : built_isas()) {
    if (name == isa_name(isa)) return isa;
    known += std::string(known.empty() ? "" : ", ") + isa_name(isa);
  }
  throw std::invalid_argument("unknown CPU kernel set '" + name + "': this build has " + known);
}

VecDotFn vec_dot_fn(Type weight_type, Isa isa) {
  return checked(weight_type, best_kernels(weight_type, isa)).one;
}

VecDotMultiFn vec_dot_multi_fn(Type weight_type, Isa isa) {
  return checked(weight_type, best_kernels(weight_type, isa)).multi;
}

}  // namespace pg4::quant
