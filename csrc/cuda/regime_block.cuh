// Block regime: one block per row, the row cached in shared memory (cp.async, in four groups
// reduced as they land), the part that does not fit swept from global memory.
#pragma once

#include "slice_sweeps.cuh"

namespace xent {
namespace cuda {

// Block regime: one block per row, the row cached in shared memory up to k.cache_items items.
// kThreads: the most threads per block (512 for rows so large that one block fills an SM's
// shared memory: the SM's only block then has twice the loads in flight).
template <typename T, int VEC, bool kProb, int kThreads>
__global__ void __launch_bounds__(kThreads, (block_min_blocks<T, kProb, kThreads>()))
    block_rows_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  using P = Pack<T, VEC>;
  P* xs = reinterpret_cast<P*>(dynamic_smem());
  P* qs = xs + k.cache_items;
  for (int64_t row = blockIdx.x; row < k.rows; row += gridDim.x) {
    const RowRef<T> r = make_row<VEC>(k, row, true);
    const Partial<acc> part = block_reduce(
        row_partial_cached<kProb, VEC, (kThreads > kBlockThreads ? kUnroll : 1)>(r, k, xs, qs));
    const RowResult<acc> res = finish_row<kProb>(part, r, k);
    if (threadIdx.x == 0) {
      k.loss[row] = res.loss;
      k.lse[row] = res.norm.lse();
    }
    if (r.g != nullptr) slice_grad<kProb, true, VEC>(r, 0, r.items, res, k, xs, qs);
  }
}

}  // namespace cuda
}  // namespace xent
