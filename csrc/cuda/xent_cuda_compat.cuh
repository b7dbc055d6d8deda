// The few CUDA primitives the kernels of xent_kernels.cuh use, behind one name each.
//
// Compiled by nvcc they are the CUDA intrinsics.  With XENT_CUDA_EMULATION defined, a host
// compiler builds the same kernels against emu/xent_emu_runtime.h, which runs every thread of a
// block as a cooperative fiber on the CPU: the kernels' index math, reductions and barriers are
// then tested without a GPU (tests/test_cuda_static.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(XENT_CUDA_EMULATION)

#include "emu/xent_emu_runtime.h"

#define XENT_DEV inline

namespace xent {
namespace cuda {
inline unsigned char* dynamic_smem() {
  return ::xent_emu::dynamic_smem();
}
// A block's own static shared array, one per instantiation (as a __shared__ array declared in a
// device function template).
template <typename T, int N, int Tag = 0>
inline T* block_scratch() {
  static const char key = 0;
  return static_cast<T*>(::xent_emu::static_smem(&key, sizeof(T) * N));
}
inline void sync_block() {
  ::xent_emu::sync_block();
}
inline unsigned cluster_rank() {
  return ::xent_emu::cluster_rank();
}
inline unsigned cluster_size() {
  return ::xent_emu::cluster_size();
}
inline void sync_cluster() {
  ::xent_emu::sync_cluster();
}
template <typename T>
inline const T* cluster_map(const T* p, unsigned rank) {
  return static_cast<const T*>(::xent_emu::cluster_map(p, rank));
}
template <typename T>
inline T shfl_xor(T v, int lane_mask) {
  return ::xent_emu::shfl_xor(v, lane_mask);
}
inline void sync_warp() {}  // emulated threads run one at a time: memory is already ordered
// The copy is done at once; waiting is then a no-op.
inline void async_copy16(void* smem, const void* gmem) {
  std::memcpy(smem, gmem, 16);
}
inline void async_wait_all() {}
inline void async_commit() {}
template <int N>
inline void async_wait_pending() {}
// No-op here (see the CUDA version).
template <typename P>
inline void forget(P&) {}
inline float fast_exp(float x) {
  return std::exp(x);
}
inline double fast_exp(double x) {
  return std::exp(x);
}
}  // namespace cuda
}  // namespace xent

#else  // nvcc

#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT
#include <cuda_runtime.h>

#define XENT_DEV __device__ __forceinline__

namespace xent {
namespace cuda {
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char xent_dynamic_smem[];
  return xent_dynamic_smem;
}
// A block's static shared array, one per instantiation.
template <typename T, int N, int Tag = 0>
__device__ __forceinline__ T* block_scratch() {
  __shared__ __align__(16) T buf[N];
  return buf;
}
__device__ __forceinline__ void sync_block() {
  __syncthreads();
}
// Thread-block clusters (sm_90): this block's rank in its cluster, the cluster's size, a barrier
// of every thread of the cluster (release / acquire: shared-memory writes before it are seen by
// the cluster's blocks after it), and the address of a shared-memory location in another block
// of the cluster (distributed shared memory).  Compiled for an earlier architecture, or launched
// without a cluster, a block is a cluster of one.
__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return __clusterRelativeBlockRank();
#else
  return 0;
#endif
}
__device__ __forceinline__ unsigned cluster_size() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return __clusterSizeInBlocks();
#else
  return 1;
#endif
}
__device__ __forceinline__ void sync_cluster() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __cluster_barrier_arrive();
  __cluster_barrier_wait();
#else
  __syncthreads();
#endif
}
template <typename T>
__device__ __forceinline__ const T* cluster_map(const T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<const T*>(__cluster_map_shared_rank(p, rank));
#else
  return p;
#endif
}
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
// Orders the warp's earlier memory accesses before its later ones (shuffles do not).
__device__ __forceinline__ void sync_warp() {
  __syncwarp();
}
// A 16-byte copy from global to shared memory that completes in the background (cp.async,
// sm_80 and later; L2 only, the logits are read once): a thread can have its whole share of a
// row in flight without holding it in registers.  async_wait_all() waits for every copy this
// thread started; the kernels read back only the shared memory a thread copied itself, so no
// barrier is needed.  Before sm_80, a plain load and store.
__device__ __forceinline__ void async_copy16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
// Copies started since the last async_commit() form a group.
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
// Waits until at most N of this thread's committed groups are still in flight (N = 1 in double
// buffering: the next row's copies stay in flight while the current row is used).
template <int N>
__device__ __forceinline__ void async_wait_pending() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes the compiler forget what it knows of the 16-byte value v (no instruction is emitted):
// values it derived from v before (converted logits) are recomputed from v after this point
// instead of being kept alive in registers across it.  The regs regime holds a row slice in
// registers as packed 16-bit values; without this the compiler keeps their float conversions
// from the first sweep for the second, twice the registers, and spills.
template <typename P>
__device__ __forceinline__ void forget(P& v) {
  static_assert(sizeof(P) % 4 == 0, "whole 32-bit words");
  unsigned* w = reinterpret_cast<unsigned*>(&v);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(P) / 4); ++i) asm volatile("" : "+r"(w[i]));
}
// exp for the sweeps over a row: ex2.approx of x * log2(e) (__expf), two instructions.  Its
// relative error is about 2^-22 plus |x| * 2^-24 from rounding the product: below 1e-6 for
// the |x| < 10 where the softmax and its gradient get their mass, below 1e-5 down to x = -87
// (where exp(x) < 1e-37 no longer matters next to the row's other terms), so float32 results
// stay well inside float32 tolerances.  Results below the float32 normal range flush to zero.
__device__ __forceinline__ float fast_exp(float x) {
  // __expf without -use_fast_math rescales around a non-flushing ex2 (three more instructions
  // per call); the flushing form is what the comment above promises.
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x * 1.4426950408889634f));
  return r;
}
__device__ __forceinline__ double fast_exp(double x) {
  return exp(x);
}
}  // namespace cuda
}  // namespace xent

#endif
