// The backward's kernel: grad *= scale in place.
#pragma once

#include "kernel_common.cuh"
#include "plan.cuh"

namespace xent {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// The backward: grad *= scale over the flat (N, C, S) gradient, in 16-byte items (the first and
// last may be partial).  scale holds one factor, or one per loss row (n, s).  Items whose
// factors are all exactly 1 are not written; with a single factor of 1 the kernel returns at
// once, so the usual backward of a 'mean' or 'sum' loss costs one tiny launch.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
struct ScaleArgs {
  scalar_t* g;
  const acc_t<scalar_t>* scale;
  int64_t numel, C, S;
};

constexpr int kScaleThreads = 256;

template <typename T, int VEC, bool kPerRow>
__global__ void __launch_bounds__(kScaleThreads) scale_grad_kernel(ScaleArgs<T> a) {
  using acc = acc_t<T>;
  if (!kPerRow && a.scale[0] == acc(1)) return;
  const int64_t n = a.numel;
  const int shift =
      VEC == 1 ? 0 : static_cast<int>((reinterpret_cast<uintptr_t>(a.g) / sizeof(T)) % VEC);
  const int64_t items = (n + shift + VEC - 1) / VEC;
  for (int64_t it = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; it < items;
       it += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j0 = it * VEC - shift;
    const bool full = j0 >= 0 && j0 + VEC <= n;
    Pack<T, VEC> p;
    if (full) {
      p = *reinterpret_cast<const Pack<T, VEC>*>(a.g + j0);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) p.v[e] = (j0 + e >= 0 && j0 + e < n) ? a.g[j0 + e] : T(0);
    }
    // Row of the first element in range, and where the next row starts (S == 1).
    const int64_t first = j0 < 0 ? 0 : j0;
    int64_t row = kPerRow && a.S == 1 ? first / a.C : 0;
    int64_t next = (row + 1) * a.C;
    bool changed = false;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const int64_t j = j0 + e;
      if (j < 0 || j >= n) continue;
      acc f;
      if (!kPerRow) {
        f = a.scale[0];
      } else if (a.S == 1) {
        while (j >= next) {
          ++row;
          next += a.C;
        }
        f = a.scale[row];
      } else {
        f = a.scale[(j / (a.C * a.S)) * a.S + j % a.S];
      }
      if (f != acc(1)) {
        p.v[e] = static_cast<T>(acc(p.v[e]) * f);
        changed = true;
      }
    }
    if (!changed) continue;
    if (full) {
      *reinterpret_cast<Pack<T, VEC>*>(a.g + j0) = p;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        if (j0 + e >= 0 && j0 + e < n) a.g[j0 + e] = p.v[e];
      }
    }
  }
}

template <typename T, typename Launcher>
void launch_scale_grad(const ScaleArgs<T>& a, bool per_row, const DeviceProps& d,
                       Launcher& launch) {
  constexpr int V = 16 / sizeof(T);
  const int64_t items = (a.numel + 2 * V - 2) / V;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((items + kScaleThreads - 1) / kScaleThreads,
                                             static_cast<int64_t>(std::max(d.sms, 1)) * 8));
  const dim3 grid(static_cast<unsigned>(blocks)), block(kScaleThreads);
  if (per_row) {
    launch(&scale_grad_kernel<T, V, true>, grid, block, 0, a);
  } else {
    launch(&scale_grad_kernel<T, V, false>, grid, block, 0, a);
  }
}

}  // namespace cuda
}  // namespace xent
