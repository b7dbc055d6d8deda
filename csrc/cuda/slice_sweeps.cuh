// Slice sweeps shared by the block and split regimes: a block's threads walk items
// [begin, end) of a row, with loads from global memory (a few in flight per thread) or from the
// block regime's shared-memory cache of the row.
#pragma once

#include "kernel_common.cuh"

namespace xent {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Slice sweeps of a block: items [begin, end) of a row, item begin + threadIdx.x + i * blockDim.x
// for thread threadIdx.x.  With kCache, items below k.cache_items go to / come from shared
// memory (indexed by item: the block regime passes begin = 0).
// ---------------------------------------------------------------------------------------------

// Adds items [begin, end) of this thread (see above) to its partial statistics, read from
// global memory through registers with U 16-byte loads in flight.
template <bool kProb, int VEC, int U = kUnroll, typename T>
XENT_DEV void sweep_partial(Partial<acc_t<T>>& part, const RowRef<T>& r, int begin, int end,
                            const KernelArgs<T>& k) {
  using P = Pack<T, VEC>;
  const int step = blockDim.x;
  for (int base = begin + threadIdx.x; base < end; base += step * U) {
    P xv[U];
    P qv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int item = base + u * step;
      if (item < end) {
        const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
        xv[u] = load_item<VEC>(r.x, sp);
        if (kProb) qv[u] = load_item<VEC>(r.q, sp);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int item = base + u * step;
      if (item < end) {
        const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
        if (item_full<VEC>(sp)) {
          push_item<kProb, true>(part, r, sp, xv[u], qv[u], k);
        } else {
          push_item<kProb, false>(part, r, sp, xv[u], qv[u], k);
        }
      }
    }
  }
}

// The partial statistics of this thread over a slice (the block's: block_reduce of them).
template <bool kProb, int VEC, typename T>
XENT_DEV Partial<acc_t<T>> slice_partial(const RowRef<T>& r, int begin, int end,
                                         const KernelArgs<T>& k) {
  Partial<acc_t<T>> part = partial_empty<acc_t<T>>();
  sweep_partial<kProb, VEC>(part, r, begin, end, k);
  return part;
}

// Starts the copy of item `item` of row r into xs[item] (and its probability targets into
// qs[item]): async_copy16 for a full 16-byte item, a load and store at once for a row's
// partial first / last item or elements narrower than 16 bytes.
template <bool kProb, int VEC, typename T>
XENT_DEV void stage_item(const RowRef<T>& r, int item, Pack<T, VEC>* xs, Pack<T, VEC>* qs) {
  const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
  if constexpr (sizeof(Pack<T, VEC>) == 16) {
    if (item_full<VEC>(sp)) {
      async_copy16(&xs[item], r.x + sp.j0);
      if (kProb) async_copy16(&qs[item], r.q + sp.j0);
      return;
    }
  }
  xs[item] = load_item<VEC>(r.x, sp);
  if (kProb) qs[item] = load_item<VEC>(r.q, sp);
}

// Block regime: this thread's partial statistics over the whole row, the row's first
// k.cache_items items kept in shared memory (xs, qs) for the gradient sweep.  Those items are
// copied with async_copy16, straight into shared memory: a thread has every one of them in
// flight at once, however many, at no register cost (register loads would allow kUnroll).
// The copies go in kStages groups (a thread's items in order); the rest of the row is swept
// from global memory while they land, then each group is reduced from shared memory as soon as
// it is there, so the arithmetic on the first groups overlaps the copies of the last ones.
constexpr int kStages = 4;

template <bool kProb, int VEC, typename T>
XENT_DEV void push_cached(Partial<acc_t<T>>& part, const RowRef<T>& r, const KernelArgs<T>& k,
                          const Pack<T, VEC>* xs, const Pack<T, VEC>* qs, int m0, int m1) {
  using P = Pack<T, VEC>;
#pragma unroll 1  // eight independent exps per item already; unrolling would spill
  for (int m = m0; m < m1; ++m) {
    const int item = threadIdx.x + m * blockDim.x;
    const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
    const P xv = xs[item];
    const P qv = kProb ? qs[item] : xv;
    if (item_full<VEC>(sp)) {
      push_item<kProb, true>(part, r, sp, xv, qv, k);
    } else {
      push_item<kProb, false>(part, r, sp, xv, qv, k);
    }
  }
}

// kRestUnroll: loads in flight per thread for the items past the cache (kUnroll where the plan
// expects rows larger than shared memory, 1 elsewhere, where it saves registers).
template <bool kProb, int VEC, int kRestUnroll, typename T>
XENT_DEV Partial<acc_t<T>> row_partial_cached(const RowRef<T>& r, const KernelArgs<T>& k,
                                              Pack<T, VEC>* xs, Pack<T, VEC>* qs) {
  static_assert(kStages == 4, "the waits below are written out for four groups");
  const int cached = r.items < k.cache_items ? r.items : k.cache_items;
  // This thread's cached items are threadIdx.x + m * blockDim.x, m < mine; group g holds
  // m in [bound(g), bound(g + 1)).
  const int mine = cached > static_cast<int>(threadIdx.x)
                       ? (cached - 1 - static_cast<int>(threadIdx.x)) / blockDim.x + 1
                       : 0;
  const auto bound = [mine](int g) { return mine * g / kStages; };
#pragma unroll
  for (int g = 0; g < kStages; ++g) {
    for (int m = bound(g); m < bound(g + 1); ++m) {
      stage_item<kProb>(r, threadIdx.x + m * blockDim.x, xs, qs);
    }
    async_commit();
  }
  Partial<acc_t<T>> part = partial_empty<acc_t<T>>();
  sweep_partial<kProb, VEC, kRestUnroll>(part, r, cached, r.items, k);
  async_wait_pending<kStages - 1>();
  push_cached<kProb, VEC>(part, r, k, xs, qs, bound(0), bound(1));
  async_wait_pending<kStages - 2>();
  push_cached<kProb, VEC>(part, r, k, xs, qs, bound(1), bound(2));
  async_wait_pending<kStages - 3>();
  push_cached<kProb, VEC>(part, r, k, xs, qs, bound(2), bound(3));
  async_wait_pending<0>();
  push_cached<kProb, VEC>(part, r, k, xs, qs, bound(3), bound(4));
  return part;
}

// The gradient of a slice given the row's lse (in res).
template <bool kProb, bool kCache, int VEC, typename T>
XENT_DEV void slice_grad(const RowRef<T>& r, int begin, int end, const RowResult<acc_t<T>>& res,
                         const KernelArgs<T>& k, const Pack<T, VEC>* xs, const Pack<T, VEC>* qs) {
  using P = Pack<T, VEC>;
  const int step = blockDim.x;
  for (int base = begin + threadIdx.x; base < end; base += step * kUnroll) {
    P xv[kUnroll];
    P qv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int item = base + u * step;
      // Ignored rows too: their gradient, 0 * p, is NaN where torch's is (the logits decide).
      if (item < end) {
        if (kCache && item < k.cache_items) {
          xv[u] = xs[item];
          if (kProb) qv[u] = qs[item];
        } else {
          const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
          xv[u] = load_item<VEC>(r.x, sp);
          if (kProb) qv[u] = load_item<VEC>(r.q, sp);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int item = base + u * step;
      if (item < end) {
        const ItemSpan sp = item_span<VEC>(item, r.shift, r.C);
        store_item<VEC>(r.g, sp,
                        item_full<VEC>(sp) ? grad_item<kProb, true>(r, sp, xv[u], qv[u], res, k)
                                           : grad_item<kProb, false>(r, sp, xv[u], qv[u], res, k));
      }
    }
  }
}

// A row's statistics from its slices' partials: thread i folds partials i, i + blockDim.x, ...
// then the block combines them.  Every thread gets the result.
template <typename acc>
XENT_DEV Partial<acc> combine_partials(const Partial<acc>* parts, int n) {
  Partial<acc> p = partial_empty<acc>();
  for (int i = threadIdx.x; i < n; i += blockDim.x) p = partial_combine(p, parts[i]);
  return block_reduce(p);
}

}  // namespace cuda
}  // namespace xent
