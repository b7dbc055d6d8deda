// Portable build of the vectorised row kernels (SSE2 on x86-64, NEON on aarch64): the
// fallback for every CPU.
#define XENT_VEC_BASE 1
#include "vec_rows_impl.h"
const xent_cpu::VecKernels* xent_cpu::kernels_base() {
  return &xent_cpu::isa_base::table;
}
