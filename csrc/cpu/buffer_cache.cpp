#include "buffer_cache.h"

#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

namespace xent_cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;

// The policy, so that resident memory follows torch's own allocator in a loop whose batch size
// varies (dynamic padding) and the steady state still reuses its buffer:
// - only buffers of the most recently requested size are kept: a request of another size frees
//   the others first (a shape that changed is not coming back soon, and keeping every size
//   seen would grow without bound), and a buffer of another size handed back is freed;
// - at most kMaxBuffers of them (two losses alive at once, e.g. a loss and an auxiliary one);
// - never more than XENT_CPU_CACHE_MB in all.
// So the cache holds at most two gradients of the current shape, and nothing of the others.
constexpr size_t kMaxBuffers = 2;

struct Cache {
  std::mutex mu;
  std::vector<std::pair<size_t, void*>> free_list;  // (bytes, pointer)
  size_t cached = 0;
  size_t limit = 0;
  size_t last_request = 0;  // bytes of the newest request

  Cache() { limit = limit_from_env() << 20; }

  // XENT_CPU_CACHE_MB: a whole number of MiB (0 turns the cache off); anything else is an error
  // that names the variable, not a bare parse failure.
  static size_t limit_from_env() {
    const char* env = std::getenv("XENT_CPU_CACHE_MB");
    if (env == nullptr) return 4096;
    char* end = nullptr;
    errno = 0;
    const unsigned long long mb = std::strtoull(env, &end, 10);
    TORCH_CHECK(end != env && *end == '\0' && errno == 0 && env[0] != '-' && mb < (1ull << 40),
                "XENT_CPU_CACHE_MB must be a whole number of MiB (0 turns the gradient-buffer "
                "cache off), got '",
                env, "'");
    return static_cast<size_t>(mb);
  }

  void* take(size_t bytes) {
    std::vector<void*> evicted;
    void* found = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (bytes != last_request) {
        last_request = bytes;
        for (auto& entry : free_list) evicted.push_back(entry.second);
        free_list.clear();
        cached = 0;
      } else if (!free_list.empty()) {
        found = free_list.back().second;
        free_list.pop_back();
        cached -= bytes;
      }
    }
    for (void* q : evicted) std::free(q);  // outside the lock: munmap can take a while
    return found;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (bytes == last_request && free_list.size() < kMaxBuffers && cached + bytes <= limit) {
        free_list.emplace_back(bytes, p);
        cached += bytes;
        return;
      }
    }
    std::free(p);
  }

  int64_t release_all() {
    std::vector<std::pair<size_t, void*>> entries;
    {
      std::lock_guard<std::mutex> lock(mu);
      entries.swap(free_list);
      cached = 0;
    }
    int64_t released = 0;
    for (auto& entry : entries) {
      released += static_cast<int64_t>(entry.first);
      std::free(entry.second);
    }
    return released;
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mu);
    return static_cast<int64_t>(cached);
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: deleters may run at interpreter exit
  return *c;
}

}  // namespace

at::Tensor empty_like_cached(const at::Tensor& like) {
#if defined(__linux__)
  const size_t bytes = static_cast<size_t>(like.numel()) * like.element_size();
  if (bytes >= 4 * kHuge) {
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = cache().take(rounded);
    // 2 MiB aligned so that a system with transparent huge pages "always" backs it with huge
    // pages.  No MADV_HUGEPAGE: with the common defrag=madvise setting, that makes the first
    // touch compact memory synchronously, measured here at up to 5 ms per 2 MiB page.
    if (p == nullptr) p = std::aligned_alloc(kHuge, rounded);
    if (p != nullptr) {
      // Tell torch's profiler, as its own CPU allocator does, so memory tools count the buffer.
      const c10::Device cpu(c10::kCPU);
      const int64_t n = static_cast<int64_t>(rounded);
      c10::reportMemoryUsageToProfiler(p, n, 0, 0, cpu);
      return at::from_blob(
          p, like.sizes(),
          [rounded](void* q) {
            c10::reportMemoryUsageToProfiler(q, -static_cast<int64_t>(rounded), 0, 0,
                                             c10::Device(c10::kCPU));
            cache().give_back(q, rounded);
          },
          like.options().memory_format(c10::nullopt));
    }
  }
#endif
  return at::empty_like(like, at::MemoryFormat::Contiguous);
}

int64_t empty_cache() {
  return cache().release_all();
}

int64_t cached_bytes() {
  return cache().bytes();
}

}  // namespace xent_cpu
