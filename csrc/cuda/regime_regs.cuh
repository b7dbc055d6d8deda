// Regs regime: a row's slice held in registers, so that each logit is read from memory once
// and each gradient element written once, with no shared-memory staging.
//
// Each of the kRegsThreads threads of a block loads its R 16-byte items of the slice at once
// (all in flight together); the max and the sum of exps (and the smoothing sums) come from the
// registers in two sweeps, are reduced over the block and then over the row's thread-block
// cluster of K blocks through distributed shared memory (sm_90); the gradient is computed from
// the same registers and stored with 16-byte writes.  Without clusters (sm_80, or K = 1) a row
// must fit one block's registers.  Without a gradient a slice may be longer than R *
// kRegsThreads items: it is streamed R items per thread at a time, the statistics carried
// across: a pure streaming reduction.
//
// Rows in flight: a block holds one row slice; the plan asks for at least two resident blocks
// per SM (launch bounds), so one block's loads overlap another's arithmetic and stores.
#pragma once

#include "kernel_common.cuh"

namespace xent {
namespace cuda {

// kAligned: every row starts on a 16-byte boundary and is a whole number of items (the common
// language-model case: C a multiple of 8 in 16-bit types), so no item is partial and the per-item
// masks (which cost the generic variant a third more registers) are not compiled at all.
// kPlain (aligned rows only): logits used as they are (no logit_scale, no softcap) and no label
// smoothing, the language-model default: no transform, no target sums, no per-class weight in
// the gradient, so the hot sweeps are only the element's own arithmetic.

// The thread's items of a slice: item = first + u * kRegsThreads for u < R, up to `end`.  The
// sweeps below keep a guard per item: without it the compiler schedules every item's
// conversions at once (for parallelism), which needs more registers than the launch bounds
// allow (measured: 129 instead of 72 at R = 8, bfloat16).
template <bool kAligned, int R, int VEC, typename T>
XENT_DEV void load_items(Pack<T, VEC> (&xv)[R], const RowRef<T>& r, int first, int end) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int item = first + u * kRegsThreads;
    if (item >= end) continue;
    if (kAligned) {
      xv[u] = *reinterpret_cast<const Pack<T, VEC>*>(r.x + static_cast<int64_t>(item) * VEC);
    } else {
      xv[u] = load_item<VEC>(r.x, item_span<VEC>(item, r.shift, r.C));
    }
  }
}

// Transformed logits of item u (see kPlain above).
template <bool kAligned, bool kPlain, int VEC, typename T>
XENT_DEV void regs_logits(acc_t<T> (&y)[VEC], const ItemSpan& sp, const Pack<T, VEC>& xv,
                          const KernelArgs<T>& k) {
  if (kPlain) {
    item_logits_as<true, Tf::kPlain>(y, sp, xv, k);
  } else if (kAligned || item_full<VEC>(sp)) {
    item_logits<true>(y, sp, xv, k);
  } else {
    item_logits<false>(y, sp, xv, k);
  }
}

template <bool kAligned, bool kPlain, int R, int VEC, typename T>
XENT_DEV void push_items(Partial<acc_t<T>>& part, const RowRef<T>& r, Pack<T, VEC> (&xv)[R],
                         int first, int end, const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  acc m = part.ms.max;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int item = first + u * kRegsThreads;
    if (item >= end) continue;
    const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
    acc y[VEC];
    regs_logits<kAligned, kPlain>(y, sp, xv[u], k);
#pragma unroll
    for (int e = 0; e < VEC; ++e) m = elem_max(m, y[e]);
  }
  // The second sweep converts the logits again rather than keeping the first sweep's floats.
#pragma unroll
  for (int u = 0; u < R; ++u) forget(xv[u]);
  // exp(-inf - m) = 0 clears an empty sum; a NaN max poisons it (as push_item).
  if (m > part.ms.max || m != m) {
    part.ms.sum *= fast_exp(part.ms.max - m);
    if (!kPlain && wants_dots<false>(k)) part.dot = dot_move(part.dot, part.ms.max, m);
    part.ms.max = m;
  }
  const acc mr = part.ms.max == neg_inf<acc>() ? acc(0) : part.ms.max;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int item = first + u * kRegsThreads;
    if (item >= end) continue;
    const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
    acc y[VEC];
    regs_logits<kAligned, kPlain>(y, sp, xv[u], k);
    if (!kPlain) {
      if (kAligned || item_full<VEC>(sp)) {
        target_sums<false, true>(part.dot, mr, sp, y, xv[u], k);
      } else {
        target_sums<false, false>(part.dot, mr, sp, y, xv[u], k);
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) part.ms.sum += fast_exp(y[e] - mr);
  }
}

// The gradient of the thread's items, from the registers.
template <bool kAligned, bool kPlain, int R, int VEC, typename T>
XENT_DEV void store_grad_items(const RowRef<T>& r, const Pack<T, VEC> (&xv)[R], int first, int end,
                               const RowResult<acc_t<T>>& res, const KernelArgs<T>& k) {
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int item = first + u * kRegsThreads;
    const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
    if (item >= end) continue;
    if (kPlain) {
      *reinterpret_cast<Pack<T, VEC>*>(r.g + static_cast<int64_t>(item) * VEC) =
          grad_item_as<false, true, Tf::kPlain, false>(r, sp, xv[u], xv[u], res, k);
    } else if (kAligned) {
      *reinterpret_cast<Pack<T, VEC>*>(r.g + static_cast<int64_t>(item) * VEC) =
          grad_item<false, true>(r, sp, xv[u], xv[u], res, k);
    } else {
      store_item<VEC>(r.g, sp,
                      item_full<VEC>(sp) ? grad_item<false, true>(r, sp, xv[u], xv[u], res, k)
                                         : grad_item<false, false>(r, sp, xv[u], xv[u], res, k));
    }
  }
}

// Class-index targets only.  The grid is a whole number of clusters; cluster c walks rows c,
// c + clusters, ...; block `rank` of a cluster takes items [rank * per, (rank + 1) * per) of
// each row.
template <typename T, int VEC, int R, bool kAligned, bool kPlain>
__global__ void __launch_bounds__(kRegsThreads, regs_min_blocks(R, sizeof(T), kAligned, kPlain))
    regs_rows_kernel(KernelArgs<T> k) {
  static_assert(kAligned || !kPlain, "the plain variant is for aligned rows");
  using acc = acc_t<T>;
  using P = Pack<T, VEC>;
  const unsigned n_blocks = cluster_size(), rank = cluster_rank();
  const int64_t clusters = gridDim.x / n_blocks;
  int parity = 0;
  for (int64_t row = blockIdx.x / n_blocks; row < k.rows; row += clusters, parity ^= 1) {
    // Every block reads x[t] here, before the cluster barrier below, and so before any block
    // of the row stores a gradient (in place, x[t] may be overwritten).
    const RowRef<T> r = make_row<VEC>(k, row, true);
    const int per = (r.items + static_cast<int>(n_blocks) - 1) / static_cast<int>(n_blocks);
    const int begin = static_cast<int>(rank) * per;
    const int end = r.items - begin < per ? r.items : begin + per;
    const int first = begin + static_cast<int>(threadIdx.x);
    Partial<acc> part = partial_empty<acc>();
    P xv[R];
    // One pass when a gradient is wanted (the plan makes R * kRegsThreads * K cover the row).
    for (int base = first; base < end; base += R * kRegsThreads) {
      load_items<kAligned, R>(xv, r, base, end);
      push_items<kAligned, kPlain, R>(part, r, xv, base, end, k);
    }
    part = cluster_reduce(block_reduce(part), parity);
    const RowResult<acc> res = finish_row<false>(part, r, k);
    if (rank == 0 && threadIdx.x == 0) {
      k.loss[row] = res.loss;
      k.lse[row] = res.norm.lse();
    }
    if (r.g != nullptr) {
#pragma unroll
      for (int u = 0; u < R; ++u) forget(xv[u]);  // as in push_items
      store_grad_items<kAligned, kPlain, R>(r, xv, first, end, res, k);
    }
  }
  if (n_blocks > 1) sync_cluster();  // no block leaves while another may read its slots
}

}  // namespace cuda
}  // namespace xent
