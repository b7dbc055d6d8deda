// Group regime: G lanes per row, 256 / G rows per block, each group walking many rows, the next
// row copied into shared memory (cp.async) while the current one is worked on.
#pragma once

#include "kernel_common.cuh"

namespace xent {
namespace cuda {

// Group regime: starts the copies of this lane's items of row r into xs (then the
// probability targets into xs + G * NV) and commits them as one group.  Full 16-byte items go
// by async_copy16; a row's partial first / last item is loaded and stored at once.  Items
// past the row are left alone (the passes mask them).
template <bool kProb, int G, int NV, int VEC, typename T>
XENT_DEV void stage_group_row(const RowRef<T>& r, int lane, Pack<T, VEC>* xs) {
  Pack<T, VEC>* qs = xs + G * NV;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int item = lane + i * G;
    if (item < r.items) stage_item<kProb>(r, item, xs, qs);
  }
  async_commit();
}

// Group regime: G lanes per row, NV items per lane, rows staged in shared memory.
template <typename T, int VEC, int G, int NV, bool kProb>
__global__ void __launch_bounds__(kGroupThreads, group_min_blocks(sizeof(T), NV, kProb))
    group_rows_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  using P = Pack<T, VEC>;
  static_assert(G == 2 || G == 4 || G == 8 || G == 16 || G == 32, "group size");
  const int lane = threadIdx.x % G;
  const int groups_per_block = blockDim.x / G;
  // The loop runs the same number of times in every lane of a warp (shuffles need all 32).
  const int64_t warp_first =
      static_cast<int64_t>(blockIdx.x) * groups_per_block + (threadIdx.x / 32) * (32 / G);
  const int sub = (threadIdx.x % 32) / G;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * groups_per_block;
  // Two row buffers per group in shared memory (group_smem_bytes): the row in use and the next
  // one, whose copies are in flight meanwhile.
  constexpr int kBuf = G * NV * (kProb ? 2 : 1);
  P* const bufs = reinterpret_cast<P*>(dynamic_smem()) + (threadIdx.x / G) * 2 * kBuf;

  int64_t row = warp_first + sub;
  RowRef<T> r = make_row<VEC>(k, row, row < k.rows);
  stage_group_row<kProb, G, NV>(r, lane, bufs);
  int cur = 0;
  for (int64_t base = warp_first; base < k.rows; base += stride) {
    const int64_t next = base + stride + sub;
    const RowRef<T> rn = make_row<VEC>(k, next, next < k.rows);
    stage_group_row<kProb, G, NV>(rn, lane, bufs + (cur ^ 1) * kBuf);
    async_wait_pending<1>();  // this row's copies have landed (this lane's own items)
    const P* xs = bufs + cur * kBuf;
    const P* qs = xs + G * NV;
    const bool active = row < k.rows;

    // Pass 1: max.
    acc m = neg_inf<acc>();
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int item = lane + i * G;
      const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
      const P xv = xs[item];
      acc y[VEC];
      if (item_full<VEC>(sp)) {
        item_logits<true>(y, sp, xv, k);
      } else {
        item_logits<false>(y, sp, xv, k);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) m = elem_max(m, y[e]);
    }
    m = group_max<G>(m);
    // Pass 2: sum of exp(y - m) and the target sums relative to m.  An all -inf row sums
    // exp(-inf) = 0 and gets log_sum = -inf.
    const acc mr = m == neg_inf<acc>() ? acc(0) : m;
    acc sum = acc(0);
    DotAcc<acc> dot = dot_empty<acc>();
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int item = lane + i * G;
      const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
      const P xv = xs[item];
      const P qv = kProb ? qs[item] : xv;
      acc y[VEC];
      if (item_full<VEC>(sp)) {
        item_logits<true>(y, sp, xv, k);
        target_sums<kProb, true>(dot, mr, sp, y, qv, k);
      } else {
        item_logits<false>(y, sp, xv, k);
        target_sums<kProb, false>(dot, mr, sp, y, qv, k);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum += fast_exp(y[e] - mr);
    }
    Partial<acc> part;
    part.ms = MaxSum<acc>{m, group_sum<G>(sum)};
    part.dot = dot_empty<acc>();
    if (wants_dots<kProb>(k)) part.dot = DotAcc<acc>{group_sum<G>(dot.dot), group_sum<G>(dot.mass)};

    const RowResult<acc> res = finish_row<kProb>(part, r, k);
    if (active && lane == 0) {
      k.loss[row] = res.loss;
      k.lse[row] = res.norm.lse();
    }
    if (r.g != nullptr) {
      sync_warp();  // every lane's reads of the row (x[0], x[t]) before any in-place store
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const int item = lane + i * G;
        if (item < r.items) {
          const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
          const P xv = xs[item];
          const P qv = kProb ? qs[item] : xv;
          store_item<VEC>(r.g, sp,
                          item_full<VEC>(sp) ? grad_item<kProb, true>(r, sp, xv, qv, res, k)
                                             : grad_item<kProb, false>(r, sp, xv, qv, res, k));
        }
      }
    }
    row = next;
    r = rn;
    cur ^= 1;
  }
  async_wait_all();  // no copy may outlive the block (the last one staged an inactive row)
}

}  // namespace cuda
}  // namespace xent
