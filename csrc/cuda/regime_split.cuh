// Split regime: few rows, huge C: a row cut into slices over blocks; partial statistics of each
// slice into a workspace, then every block of the row combines them and writes its slice's
// gradient (the logits are read twice).
#pragma once

#include "slice_sweeps.cuh"

namespace xent {
namespace cuda {

// Split regime, step 1: block (slice, row) writes the partial statistics of its slice.
template <typename T, int VEC, bool kProb>
__global__ void __launch_bounds__(kSplitThreads, (block_min_blocks<T, kProb>()))
    split_stats_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  const int64_t row = blockIdx.y;
  const int slice = blockIdx.x;
  const RowRef<T> r = make_row<VEC>(k, row, true);
  const int begin = slice * k.slice_items;
  const int end = r.items - begin < k.slice_items ? r.items : begin + k.slice_items;
  const Partial<acc> part = block_reduce(slice_partial<kProb, VEC>(r, begin, end, k));
  if (threadIdx.x == 0) k.partials[row * k.splits + slice] = part;
  // The target logit, before the gradient step can overwrite the row.
  if (slice == 0 && threadIdx.x == 0) k.row_vals[row] = r.y_t;
}

// Split regime, step 2: combine the row's partials, write loss and lse (slice 0), and the
// gradient of this block's slice.  Launched with one slice per row when no gradient is wanted.
template <typename T, int VEC, bool kProb>
__global__ void __launch_bounds__(kSplitThreads, (block_min_blocks<T, kProb>()))
    split_grad_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  using P = Pack<T, VEC>;
  const int64_t row = blockIdx.y;
  const int slice = blockIdx.x;
  RowRef<T> r = make_row<VEC>(k, row, true, /*read_logits=*/false);
  r.y_t = k.row_vals[row];
  const Partial<acc> part = combine_partials(k.partials + row * k.splits, k.splits);
  const RowResult<acc> res = finish_row<kProb>(part, r, k);
  if (slice == 0 && threadIdx.x == 0) {
    k.loss[row] = res.loss;
    k.lse[row] = res.norm.lse();
  }
  if (r.g == nullptr) return;
  const int begin = slice * k.slice_items;
  const int end = r.items - begin < k.slice_items ? r.items : begin + k.slice_items;
  slice_grad<kProb, false, VEC>(r, begin, end, res, k, static_cast<const P*>(nullptr),
                                static_cast<const P*>(nullptr));
}

}  // namespace cuda
}  // namespace xent
