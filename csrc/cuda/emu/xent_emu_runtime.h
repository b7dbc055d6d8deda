// A small CPU emulation of the CUDA execution model, enough to run the kernels of csrc/cuda on
// the host: every thread of a block is a cooperative fiber (ucontext); the blocks of a thread-
// block cluster run together (their fibers interleaved), clusters one after another;
// __syncthreads, cluster barriers and warp shuffles are barriers between the fibers; each block
// has its own dynamic and static shared memory, and a block of a cluster reaches another's
// through cluster_map (distributed shared memory).  It checks what a GPU would not report: a
// barrier that not every thread of the block, cluster or warp reaches is reported as a deadlock
// instead of undefined behaviour.
//
// Not emulated: memory ordering (fibers run one at a time), timing, races; blocks of different
// clusters never run together, so kernels may not communicate between clusters.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
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

// Barrier state: arrivals and a generation that opens the barrier when it changes.
struct Barrier {
  int arrived = 0;
  unsigned gen = 0;
};

// One block of the running cluster.
struct Block {
  dim3 idx;
  std::vector<unsigned char> smem;                            // dynamic shared memory
  std::map<const void*, std::vector<unsigned char>> statics;  // block_scratch, by call site
  Barrier barrier;
  std::vector<Barrier> warps;
  std::vector<uint64_t> warp_buf;  // 32 slots per warp
};

struct Runtime {
  std::vector<Fiber> fibers;  // blocks * threads, block-major
  std::vector<Block> blocks;  // of the running cluster
  Barrier cluster;
  ucontext_t scheduler;
  int current = -1;
  int threads = 0;  // per block
  int stalls = 0;   // resumes that found their barrier still closed
  std::function<void()> body;
  char* stacks = nullptr;
  size_t stack_bytes = 256 * 1024;
  int stack_count = 0;
  int asserts = 0;
  std::string first_assert;
  Block& block() { return blocks[current / threads]; }
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

// Arrives at b, for `expected` arrivals in all, and waits until the barrier opens.
inline void arrive_and_wait(Barrier& b, int expected) {
  const unsigned seen = b.gen;
  if (++b.arrived == expected) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == seen) {
    yield();
    if (b.gen == seen) ++rt().stalls;
  }
}

inline void sync_block() {
  Runtime& r = rt();
  arrive_and_wait(r.block().barrier, r.threads);
}

inline void sync_warp() {
  Runtime& r = rt();
  const int w = static_cast<int>(threadIdx.x) / 32;
  arrive_and_wait(r.block().warps[w], std::min(32, r.threads - w * 32));
}

// Every thread of every block of the cluster.
inline void sync_cluster() {
  Runtime& r = rt();
  arrive_and_wait(r.cluster, r.threads * static_cast<int>(r.blocks.size()));
}

inline unsigned cluster_rank() {
  return static_cast<unsigned>(rt().current / rt().threads);
}

inline unsigned cluster_size() {
  return static_cast<unsigned>(rt().blocks.size());
}

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of 8 bytes at most");
  Runtime& r = rt();
  Block& b = r.block();
  const int tid = static_cast<int>(threadIdx.x);
  const int w = tid / 32, lane = tid % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.warp_buf[w * 32 + lane] = bits;
  sync_warp();
  const int src = lane ^ lane_mask;
  if (w * 32 + src >= r.threads) throw std::logic_error("emu: shuffle from a lane past the block");
  bits = b.warp_buf[w * 32 + src];
  sync_warp();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned char* dynamic_smem() {
  return rt().block().smem.data();
}

// The block's own copy of a static shared array (one per call site `key`), poisoned at first
// use as fresh shared memory is.
inline void* static_smem(const void* key, size_t bytes) {
  std::vector<unsigned char>& buf = rt().block().statics[key];
  if (buf.empty()) buf.assign(bytes + 16, 0xff);
  return buf.data();
}

// The address in block `rank` of the cluster of what `p` is in this block's shared memory.
inline void* cluster_map(const void* p, unsigned rank) {
  Runtime& r = rt();
  if (rank >= r.blocks.size())
    throw std::logic_error("emu: cluster_map to a rank past the cluster");
  const auto* q = static_cast<const unsigned char*>(p);
  Block& self = r.block();
  Block& other = r.blocks[rank];
  auto inside = [q](const std::vector<unsigned char>& v) {
    return !v.empty() && q >= v.data() && q < v.data() + v.size();
  };
  if (inside(self.smem)) return other.smem.data() + (q - self.smem.data());
  for (auto& [key, buf] : self.statics) {
    if (!inside(buf)) continue;
    std::vector<unsigned char>& theirs = other.statics[key];
    if (theirs.empty()) theirs.assign(buf.size(), 0xff);
    return theirs.data() + (q - buf.data());
  }
  throw std::logic_error("emu: cluster_map of an address outside shared memory");
}

inline void fiber_main() {
  Runtime& r = rt();
  r.body();
  r.fibers[r.current].done = true;
}

// Runs body() once per thread of every block of one cluster (blocks `ids`), interleaved.
inline void run_cluster(const std::vector<dim3>& ids, unsigned threads, int64_t smem) {
  Runtime& r = rt();
  if (threads == 0 || threads > 1024) throw std::invalid_argument("emu: bad block size");
  const int total = static_cast<int>(threads * ids.size());
  if (r.stack_count < total) {
    if (r.stacks != nullptr) munmap(r.stacks, r.stack_bytes * r.stack_count);
    void* mem = mmap(nullptr, r.stack_bytes * total, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("emu: cannot map fiber stacks");
    r.stacks = static_cast<char*>(mem);
    r.stack_count = total;
  }
  r.threads = static_cast<int>(threads);
  const int warps = (r.threads + 31) / 32;
  r.blocks.assign(ids.size(), Block{});
  for (size_t b = 0; b < ids.size(); ++b) {
    Block& blk = r.blocks[b];
    blk.idx = ids[b];
    // Fresh, poisoned shared memory for every block: a read before a write shows up.
    blk.smem.assign(static_cast<size_t>(smem) + 16, 0xff);
    blk.warps.assign(warps, Barrier{});
    blk.warp_buf.assign(static_cast<size_t>(warps) * 32, 0);
  }
  r.cluster = Barrier{};
  r.fibers.assign(total, Fiber{});
  for (int i = 0; i < total; ++i) {
    Fiber& f = r.fibers[i];
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = r.stacks + r.stack_bytes * i;
    f.ctx.uc_stack.ss_size = r.stack_bytes;
    f.ctx.uc_link = &r.scheduler;
    makecontext(&f.ctx, &fiber_main, 0);
  }
  int live = total;
  while (live > 0) {
    int resumed = 0;
    r.stalls = 0;
    for (int i = 0; i < total; ++i) {
      if (r.fibers[i].done) continue;
      r.current = i;
      threadIdx = dim3(static_cast<unsigned>(i % r.threads));
      blockIdx = r.blocks[i / r.threads].idx;
      ++resumed;
      swapcontext(&r.scheduler, &r.fibers[i].ctx);
      if (r.fibers[i].done) --live;
    }
    if (live > 0 && resumed > 0 && r.stalls == resumed) {
      throw std::runtime_error(
          "emu: deadlock: a barrier or shuffle that not every thread of the block, cluster or "
          "warp reaches (block " +
          std::to_string(ids[0].x) + "," + std::to_string(ids[0].y) + ")");
    }
  }
  r.current = -1;
}

// The launcher of launch_plan (csrc/cuda): runs every cluster of the grid in turn (a cluster of
// `cluster` consecutive blocks along x; 1 for a plain launch).
struct Launcher {
  int64_t smem_limit;
  std::vector<std::string> launched;  // kernel sizes, for the tests: "grid.x,grid.y x block"
  template <typename Arg>
  void operator()(void (*kernel)(Arg), dim3 grid, dim3 block, int64_t smem, const Arg& arg,
                  unsigned cluster = 1) {
    if (block.x % 32 != 0) throw std::invalid_argument("emu: block size not a multiple of 32");
    if (smem > smem_limit) throw std::invalid_argument("emu: dynamic shared memory over limit");
    if (grid.x == 0 || grid.y == 0) throw std::invalid_argument("emu: empty grid");
    if (cluster == 0 || cluster > 16 || grid.x % cluster != 0) {
      throw std::invalid_argument("emu: the grid is not a whole number of clusters");
    }
    std::string what = std::to_string(grid.x) + "," + std::to_string(grid.y) + "x" +
                       std::to_string(block.x) + "+" + std::to_string(smem);
    if (cluster > 1) what += " cluster " + std::to_string(cluster);
    launched.push_back(what);
    Runtime& r = rt();
    r.body = [kernel, &arg] { kernel(arg); };
    gridDim = grid;
    blockDim = block;
    std::vector<dim3> ids(cluster);
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; bx += cluster) {
        for (unsigned c = 0; c < cluster; ++c) ids[c] = dim3(bx + c, by);
        run_cluster(ids, block.x, smem);
      }
    }
  }
};

}  // namespace xent_emu
