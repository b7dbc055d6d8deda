#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace xent_cpu {
namespace {

bool cpu_has(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("bmi2");
  }
  if (isa == "avx2") {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
  }
#endif
  return isa == "base";
}

// Only called once the CPU is known to support the instruction set.
const VecKernels* table_for(const std::string& isa) {
  if (isa == "avx512") return kernels_avx512();
  if (isa == "avx2") return kernels_avx2();
  return kernels_base();
}

const VecKernels* detect() {
  for (const char* isa : {"avx512", "avx2"}) {
    if (cpu_has(isa) && table_for(isa) != nullptr) return table_for(isa);
  }
  return kernels_base();
}

// XENT_CPU_ISA forces an instruction set at start-up; a name that is not one, or one this CPU
// (or build) cannot run, is an error naming the variable rather than a silent fallback.
const VecKernels* initial() {
  const char* env = std::getenv("XENT_CPU_ISA");
  if (env == nullptr || std::string(env) == "auto" || std::string(env).empty()) return detect();
  const std::string name(env);
  TORCH_CHECK(name == "avx512" || name == "avx2" || name == "base", "XENT_CPU_ISA: unknown ",
              "instruction set '", name, "'; expected auto, avx512, avx2 or base");
  TORCH_CHECK(cpu_has(name) && table_for(name) != nullptr, "XENT_CPU_ISA=", name,
              ": this CPU (or build) does not support it; expected auto or one of: ",
              cpu_has("avx512") ? "avx512, " : "", cpu_has("avx2") ? "avx2, " : "", "base");
  return table_for(name);
}

std::atomic<const VecKernels*>& current() {
  static std::atomic<const VecKernels*> k{initial()};
  return k;
}

}  // namespace

const VecKernels& active_kernels() {
  return *current().load(std::memory_order_relaxed);
}

std::string active_isa_name() {
  std::string n = active_kernels().name;
  return n.substr(n.find('_') + 1);  // "isa_avx2" -> "avx2"
}

std::string set_isa(const std::string& name) {
  if (name == "auto") {
    current().store(detect());
  } else {
    TORCH_CHECK(name == "avx512" || name == "avx2" || name == "base",
                "set_cpu_isa: unknown instruction set '", name,
                "'; expected auto, avx512, avx2 or base");
    TORCH_CHECK(cpu_has(name) && table_for(name) != nullptr, "set_cpu_isa: this CPU (or build)",
                " does not support ", name);
    current().store(table_for(name));
  }
  return active_isa_name();
}

}  // namespace xent_cpu
