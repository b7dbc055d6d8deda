// Run-time choice of the vectorised CPU row kernels.
#pragma once

#include <string>

#include "vec_rows.h"

namespace xent_cpu {

// The kernels in use: the widest the CPU supports, unless XENT_CPU_ISA (avx512, avx2, base)
// or set_isa() asked for a narrower one.
const VecKernels& active_kernels();
std::string active_isa_name();
// Select "auto", "avx512", "avx2" or "base"; an instruction set the CPU lacks is an error.
std::string set_isa(const std::string& name);

}  // namespace xent_cpu
