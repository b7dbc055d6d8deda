#include "huge_alloc.h"

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace xent_cpu {

at::Tensor empty_like_huge_pages(const at::Tensor& like) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes >= 4 * kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (p != nullptr) {
      madvise(p, rounded, MADV_HUGEPAGE);  // advisory: failure only costs speed
      return at::from_blob(
          p, like.sizes(), [](void* q) { std::free(q); },
          like.options().memory_format(c10::nullopt));
    }
  }
#endif
  return at::empty_like(like, at::MemoryFormat::Contiguous);
}

}  // namespace xent_cpu
