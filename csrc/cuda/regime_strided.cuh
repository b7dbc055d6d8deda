// Strided regime: one thread per (n, s) row, classes strided by S, running xent_row_strided.h
// (the very code of the CPU scalar path).
#pragma once

#include "kernel_common.cuh"

namespace xent {
namespace cuda {

// Strided regime: one thread per (n, s) row, classes strided by S.
template <typename T, bool kProb>
__global__ void __launch_bounds__(kStridedThreads, 1) strided_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  // The options in the row type: a float row keeps floats, not doubles, in registers.
  const RowOptionsT<acc> o = options_as<acc>(k.opt);
  const int64_t C = o.num_classes, S = k.S;
  StridedRow<T, acc> row{};
  row.stride = S;
  row.w = k.w;
  row.w_sum = k.w_sum != nullptr ? *k.w_sum : acc(C);
  row.grad_scale = k.grad_scale != nullptr ? *k.grad_scale : acc(1);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < k.rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (r / S) * C * S + r % S;
    row.x = k.x + base;
    row.g = k.g != nullptr ? k.g + base : nullptr;
    RowNorm<acc> norm;
    if (kProb) {
      k.loss[r] = prob_row_strided(row, k.t_prob + base, o, &norm);
    } else {
      const int64_t t = k.t_index[r];
      k.loss[r] = index_row_strided(row, t, check_target(t, k.opt), o, &norm);
    }
    k.lse[r] = norm.lse();
  }
}

}  // namespace cuda
}  // namespace xent
