// A small CPU emulation of the CUDA execution model, enough to run the kernels of
// xent_kernels.cuh on the host: every thread of a block is a cooperative fiber (ucontext),
// blocks run one after another, __syncthreads and warp shuffles are barriers between the
// fibers.  It checks what a GPU would not report: a barrier that not every thread of the block
// (or warp) reaches is reported as a deadlock instead of undefined behaviour.
//
// Not emulated: memory ordering between blocks (blocks run in sequence), timing, races.  The
// kernels use no inter-block communication within one launch.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The running fiber's coordinates (switched by the scheduler).
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define CUDA_KERNEL_ASSERT(cond) \
  ((cond) ? (void)0 : ::xent_emu::device_assert_failed(#cond, __FILE__, __LINE__))

namespace xent_emu {

struct Fiber {
  ucontext_t ctx;
  bool done = false;
};

struct Runtime {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = -1;
  int threads = 0;
  // Block barrier and per-warp barriers: arrival count and generation.
  int block_arrived = 0;
  unsigned block_gen = 0;
  std::vector<int> warp_arrived;
  std::vector<unsigned> warp_gen;
  std::vector<uint64_t> warp_buf;  // 32 slots per warp
  int stalls = 0;                  // resumes that found their barrier still closed
  std::vector<unsigned char> smem;
  std::function<void()> body;
  char* stacks = nullptr;
  size_t stack_bytes = 256 * 1024;
  int stack_count = 0;
  int asserts = 0;
  std::string first_assert;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

inline void device_assert_failed(const char* what, const char* file, int line) {
  Runtime& r = rt();
  if (r.asserts++ == 0) {
    r.first_assert = std::string(what) + " (" + file + ":" + std::to_string(line) + ", block " +
                     std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + ", thread " +
                     std::to_string(threadIdx.x) + ")";
  }
}

inline void yield() {
  Runtime& r = rt();
  swapcontext(&r.fibers[r.current].ctx, &r.scheduler);
}

inline void wait_for(unsigned* gen, unsigned seen) {
  while (*gen == seen) {
    yield();
    if (*gen == seen) ++rt().stalls;
  }
}

inline void sync_block() {
  Runtime& r = rt();
  const unsigned seen = r.block_gen;
  if (++r.block_arrived == r.threads) {
    r.block_arrived = 0;
    ++r.block_gen;
    return;
  }
  wait_for(&r.block_gen, seen);
}

inline void sync_warp() {
  Runtime& r = rt();
  const int w = static_cast<int>(threadIdx.x) / 32;
  const int lanes = std::min(32, r.threads - w * 32);
  const unsigned seen = r.warp_gen[w];
  if (++r.warp_arrived[w] == lanes) {
    r.warp_arrived[w] = 0;
    ++r.warp_gen[w];
    return;
  }
  wait_for(&r.warp_gen[w], seen);
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of 8 bytes at most");
  Runtime& r = rt();
  const int tid = static_cast<int>(threadIdx.x);
  const int w = tid / 32, lane = tid % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  r.warp_buf[w * 32 + lane] = bits;
  sync_warp();
  const int src = lane ^ lane_mask;
  if (w * 32 + src >= r.threads) throw std::logic_error("emu: shuffle from a lane past the block");
  bits = r.warp_buf[w * 32 + src];
  sync_warp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned char* dynamic_smem() {
  return rt().smem.data();
}

inline void fiber_main() {
  Runtime& r = rt();
  r.body();
  r.fibers[r.current].done = true;
}

// Runs body() once per thread of one block.
inline void run_block(unsigned threads) {
  Runtime& r = rt();
  if (threads == 0 || threads > 1024) throw std::invalid_argument("emu: bad block size");
  if (r.stack_count < static_cast<int>(threads)) {
    if (r.stacks != nullptr) munmap(r.stacks, r.stack_bytes * r.stack_count);
    void* mem = mmap(nullptr, r.stack_bytes * threads, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("emu: cannot map fiber stacks");
    r.stacks = static_cast<char*>(mem);
    r.stack_count = static_cast<int>(threads);
  }
  r.threads = static_cast<int>(threads);
  r.fibers.assign(threads, Fiber{});
  const int warps = (r.threads + 31) / 32;
  r.block_arrived = 0;
  r.warp_arrived.assign(warps, 0);
  r.warp_gen.assign(warps, 0);
  r.warp_buf.assign(static_cast<size_t>(warps) * 32, 0);
  for (int i = 0; i < r.threads; ++i) {
    Fiber& f = r.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks + r.stack_bytes * i;
    f.ctx.uc_stack.ss_size = r.stack_bytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, &fiber_main, 0);
  }
  int live = r.threads;
  while (live > 0) {
    int resumed = 0;
    r.stalls = 0;
    for (int i = 0; i < r.threads; ++i) {
      if (r.fibers[i].done) continue;
      r.current = i;
      threadIdx = dim3(static_cast<unsigned>(i));
      ++resumed;
      swapcontext(&r.scheduler, &r.fibers[i].ctx);
      if (r.fibers[i].done) --live;
    }
    if (live > 0 && resumed > 0 && r.stalls == resumed) {
      throw std::runtime_error(
          "emu: deadlock: a barrier or shuffle that not every thread of the block or warp "
          "reaches (block " +
          std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + ")");
    }
  }
  r.current = -1;
}

// The launcher of launch_plan (xent_kernels.cuh): runs every block of the grid in turn.
struct Launcher {
  int64_t smem_limit;
  std::vector<std::string> launched;  // kernel sizes, for the tests: "grid.x,grid.y x block"
  template <typename Arg>
  void operator()(void (*kernel)(Arg), dim3 grid, dim3 block, int64_t smem, const Arg& arg) {
    if (block.x % 32 != 0) throw std::invalid_argument("emu: block size not a multiple of 32");
    if (smem > smem_limit) throw std::invalid_argument("emu: dynamic shared memory over limit");
    if (grid.x == 0 || grid.y == 0) throw std::invalid_argument("emu: empty grid");
    launched.push_back(std::to_string(grid.x) + "," + std::to_string(grid.y) + "x" +
                       std::to_string(block.x) + "+" + std::to_string(smem));
    Runtime& r = rt();
    r.body = [kernel, &arg] { kernel(arg); };
    gridDim = grid;
    blockDim = block;
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by);
        // Fresh, poisoned shared memory for every block: a read before a write shows up.
        r.smem.assign(static_cast<size_t>(smem) + 16, 0xff);
        run_block(block.x);
      }
    }
  }
};

}  // namespace xent_emu
