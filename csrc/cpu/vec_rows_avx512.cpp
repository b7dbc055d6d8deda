// AVX-512 (F, BW, VL, DQ) build of the vectorised row kernels; chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define XENT_VEC_AVX512 1
#include "vec_rows_impl.h"
const xent_cpu::VecKernels* xent_cpu::kernels_avx512() {
  return &xent_cpu::isa_avx512::table;
}
#else
#include "vec_rows.h"
const xent_cpu::VecKernels* xent_cpu::kernels_avx512() {
  return nullptr;
}
#endif
