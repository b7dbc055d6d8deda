// AVX2 + FMA + F16C build of the vectorised row kernels; chosen at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define XENT_VEC_AVX2 1
#include "vec_rows_impl.h"
const xent_cpu::VecKernels* xent_cpu::kernels_avx2() {
  return &xent_cpu::isa_avx2::table;
}
#else
#include "vec_rows.h"
const xent_cpu::VecKernels* xent_cpu::kernels_avx2() {
  return nullptr;
}
#endif
