// CUDA kernels of the forward op, and the host-side plan that picks one.
//
// Every kernel computes, per row: the log-sum-exp, the loss and, when asked, the gradient of
// every element rounded once to the input dtype; the row math itself is xent_row.h.
//
// Regimes (plan_forward picks one from C, the dtype, the row count and the alignment):
//
//  * group:   C from 129 up to 128 items (1024 16-bit, 512 float32 classes; G = 8 lanes for
//             rows of at most 8 items when forced).  G = 32 lanes per row, 256/G rows per
//             block, as many blocks as stay resident, each group walking many rows.  A group
//             copies its next row into shared memory (cp.async, up to 4 items of 16 bytes per
//             lane, plus the probability target) while it works on the current one; each lane
//             reads back only what it copied.  Max and sum-exp are two passes over shared
//             memory, reduced with warp shuffles: no barrier.
//  * block:   medium and large C.  One block per row (grid-stride over rows).  Each thread
//             starts asynchronous 16-byte copies (cp.async) of its items of the row into
//             shared memory, all of them at once: the whole row is in flight, whatever the
//             occupancy, with no registers held.  Items past what shared memory holds are
//             swept from global memory (16-byte loads, four in flight per thread) while the
//             copies land; then the cached items are swept from shared memory.  Each thread
//             keeps an online max / sum-exp; a block reduction gives the lse; the gradient
//             sweep reads the cached items from shared memory again and the rest from global
//             memory.  Each thread reads back only the shared memory it copied, so the cache
//             needs no barrier.  256 threads per block, 512 when a row's cache leaves room
//             for only one block per SM.
//  * split:   few rows (at most half the SMs) with huge C (>= 32768).  A row is cut into slices of
//             `slice_items` 16-byte items; split_stats_kernel reduces every slice to a Partial
//             (max, sum-exp, target sums) in a small workspace, then split_grad_kernel combines
//             a row's partials (every block of the row does it, so no atomics or counters are
//             needed), writes loss and lse from slice 0 and the gradient of its own slice.
//             slice_partial / combine_partials / slice_grad are the pieces a vocab-parallel
//             cross entropy would reuse (there the combine runs over shards).  With a gradient
//             it reads the logits twice (three passes instead of two): worth it only while one
//             block per row would leave most SMs idle.
//  * strided: K-dim inputs (S > 1, classes strided by S) with C < 512, contiguous rows of at
//             most 128 classes, and C == 0.  One thread per (n, s) row running
//             xent_row_strided.h, the very code of the CPU scalar path; with S > 1 neighbouring
//             threads read neighbouring addresses, with S == 1 a warp's rows are one contiguous
//             span that its loads share through L1.  K-dim inputs with more
//             classes are transposed to contiguous rows first (xent_cuda_forward.h).
//
// Alignment.  Rows are walked in "items" of VEC = 16 / sizeof(T) elements aligned to 16 bytes
// in memory: element j of a row lies in item (j + shift) / VEC, where shift is the row start's
// offset from a 16-byte boundary.  Only a row's first and last items can be partial; they are
// loaded and stored element by element, every other item with one 16-byte access.  So odd C
// (32001, 50257) keeps 16-byte loads for all but at most two items per row.  This needs x, the
// gradient and the probability target to share their offset modulo 16 bytes (true for
// tensors allocated by PyTorch); if they do not, the block regime runs with VEC = 1.
//
// Precision.  Accumulation in float (double for double), the gradient computed in that type
// and rounded once.  Float exps use fast_exp (see xent_cuda_compat.cuh).  Row offsets are
// 64-bit.  Out-of-range class targets trip a device-side assertion and are never read; no
// kernel reads a value back to the host.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../xent_row.h"
#include "../xent_row_strided.h"
#include "xent_cuda_compat.cuh"

namespace xent {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Statistics of a slice of a row: max / sum-exp, and the target sums relative to that max
// (xent_row.h's DotAcc: dot = sum_j c_j (y_j - max), mass = sum_j c_j, with c_j = w_j for the
// label-smoothing sum of class-index targets, c_j = prob_coef for probability targets).
// ---------------------------------------------------------------------------------------------
template <typename acc>
struct Partial {
  MaxSum<acc> ms;
  DotAcc<acc> dot;
};

template <typename acc>
XENT_DEV Partial<acc> partial_empty() {
  return {ms_empty<acc>(), dot_empty<acc>()};
}

template <typename acc>
XENT_DEV Partial<acc> partial_combine(const Partial<acc>& a, const Partial<acc>& b) {
  const MaxSum<acc> ms = ms_combine(a.ms, b.ms);
  return {ms, dot_combine(a.dot, a.ms.max, b.dot, b.ms.max, ms.max)};
}

// Maximum that propagates NaN (a NaN logit must make the row's lse NaN, as in PyTorch).
template <typename acc>
XENT_DEV acc nan_max(acc a, acc b) {
  return (b > a || b != b) ? b : a;
}

// Maximum that drops NaN (one instruction, fmax): for the max of an item's elements, which are
// all summed as exp(y - max) afterwards, so a NaN logit still poisons the row through its exp.
template <typename acc>
XENT_DEV acc elem_max(acc a, acc b) {
  return fmax(a, b);
}

// Per-element transform and target coefficient with the per-call divisions done once (on the
// host): the formulas of transform_logit / transform_slope / prob_coef in xent_row.h, with
// logit_scale / softcap and eps / C precomputed (results may differ from them in the last bit).
// Kept in the kernel parameters, so its fields are constant-bank operands, not registers.
template <typename acc>
struct ElemMath {
  acc scale, cap, scale_over_cap, keep, eps_over_c;
  bool capped;
  // y = T(x); -inf (a masked entry) stays -inf under the softcap.
  XENT_HD acc y(acc x) const {
    if (capped) return x == neg_inf<acc>() ? x : cap * tanh(scale_over_cap * x);
    return scale * x;
  }
  XENT_HD acc slope(acc x) const {
    if (capped) {
      if (x == neg_inf<acc>()) return acc(0);
      const acc th = tanh(scale_over_cap * x);
      return scale * (acc(1) - th * th);
    }
    return scale;
  }
  // c_j of a probability target.
  XENT_HD acc prob_c(acc q, acc w) const { return w * (keep * q + eps_over_c); }
};

template <typename acc>
inline ElemMath<acc> make_elem_math(const RowOptions& o) {
  ElemMath<acc> m;
  m.scale = acc(o.logit_scale);
  m.cap = acc(o.softcap);
  m.scale_over_cap = o.softcap > 0.f ? acc(o.logit_scale) / acc(o.softcap) : acc(0);
  m.keep = acc(1) - acc(o.label_smoothing);
  m.eps_over_c = o.num_classes > 0 ? acc(o.label_smoothing) / acc(o.num_classes) : acc(0);
  m.capped = o.softcap > 0.f;
  return m;
}

template <typename scalar_t>
struct KernelArgs {
  using acc = acc_t<scalar_t>;
  const scalar_t* x;
  const int64_t* t_index;  // class-index targets, or nullptr
  const scalar_t* t_prob;  // probability targets, or nullptr
  const acc* w;
  const acc* w_sum;       // device scalar, or nullptr (then C)
  const acc* grad_scale;  // device scalar, or nullptr (then 1)
  scalar_t* g;            // or nullptr
  acc* loss;
  acc* lse;
  int64_t rows;
  int64_t S;
  RowOptions opt;
  ElemMath<acc> em;
  bool smooth;             // label_smoothing > 0
  int cache_items;         // block regime: items of a row kept in shared memory
  int splits;              // split regime: slices per row
  int slice_items;         // split regime: items per slice
  Partial<acc>* partials;  // split regime: (rows, splits)
  acc* row_vals;           // split regime: (rows,) y_t, from the stats step
};

// ---------------------------------------------------------------------------------------------
// Reductions.  Butterfly shuffles leave the same value in every lane (the combines are
// symmetric), so no broadcast is needed within a group.
// ---------------------------------------------------------------------------------------------
template <int G, typename acc>
XENT_DEV acc group_max(acc v) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v = nan_max(v, shfl_xor(v, off));
  return v;
}

template <int G, typename acc>
XENT_DEV acc group_sum(acc v) {
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) v += shfl_xor(v, off);
  return v;
}

template <typename acc>
XENT_DEV Partial<acc> warp_reduce(Partial<acc> p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Partial<acc> o;
    o.ms.max = shfl_xor(p.ms.max, off);
    o.ms.sum = shfl_xor(p.ms.sum, off);
    o.dot.dot = shfl_xor(p.dot.dot, off);
    o.dot.mass = shfl_xor(p.dot.mass, off);
    p = partial_combine(p, o);
  }
  return p;
}

// Every thread of the block gets the combined statistics.  blockDim.x is a multiple of 32.
// Ends with a barrier, so the block may call it again at once (next row).
template <typename acc>
XENT_DEV Partial<acc> block_reduce(Partial<acc> p) {
  XENT_SHARED Partial<acc> warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  p = warp_reduce(p);
  if (blockDim.x == 32) return p;
  if (lane == 0) warp_part[warp] = p;
  sync_block();
  if (warp == 0) {
    p = lane < static_cast<int>(blockDim.x >> 5) ? warp_part[lane] : partial_empty<acc>();
    p = warp_reduce(p);
    if (lane == 0) warp_part[0] = p;
  }
  sync_block();
  const Partial<acc> r = warp_part[0];
  sync_block();
  return r;
}

// ---------------------------------------------------------------------------------------------
// Items: VEC elements aligned to 16 bytes.  Indices within a row are 32-bit (the plan keeps
// C < 2^30 here); row offsets are 64-bit.
// ---------------------------------------------------------------------------------------------
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One row as the kernels see it.
template <typename T>
struct RowRef {
  using acc = acc_t<T>;
  const T* x;  // the row's logits
  const T* q;  // its probability targets, or nullptr
  T* g;        // its gradient, or nullptr
  int C;       // elements; 0 for an inactive row (group regime), which masks every element
  int shift;   // offset of x from a 16-byte boundary, in elements (0 when VEC == 1)
  int items;
  acc y_t;     // transformed target logit (valid class-index rows), read before any gradient
               // store: with the gradient written over the logits (in place), x[t] changes
  int64_t t;   // class-index target (-1 for probability targets)
  bool valid;  // false for an ignored (or out-of-range) target: loss 0, gradient 0
};

// Elements [lo, hi) of an item lie inside the row (all VEC of them except in the first and
// last item).
struct ItemSpan {
  int j0;  // row index of the item's element 0 (negative in a partial first item)
  int lo, hi;
};

template <int VEC>
XENT_DEV ItemSpan item_span(int item, int shift, int C) {
  const int j0 = item * VEC - shift;
  return {j0, j0 < 0 ? -j0 : 0, C - j0 < VEC ? C - j0 : VEC};
}

template <int VEC>
XENT_DEV bool item_full(const ItemSpan& sp) {
  return sp.lo == 0 && sp.hi == VEC;
}

template <int VEC, typename T>
XENT_DEV Pack<T, VEC> load_item(const T* row, const ItemSpan& sp) {
  Pack<T, VEC> p;
  if (sp.lo == 0 && sp.hi == VEC) {
    p = *reinterpret_cast<const Pack<T, VEC>*>(row + sp.j0);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) p.v[e] = (e >= sp.lo && e < sp.hi) ? row[sp.j0 + e] : T(0);
  }
  return p;
}

template <int VEC, typename T>
XENT_DEV void store_item(T* row, const ItemSpan& sp, const Pack<T, VEC>& p) {
  if (sp.lo == 0 && sp.hi == VEC) {
    *reinterpret_cast<Pack<T, VEC>*>(row + sp.j0) = p;
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      if (e >= sp.lo && e < sp.hi) row[sp.j0 + e] = p.v[e];
    }
  }
}

XENT_DEV bool check_target(int64_t t, const RowOptions& o) {
  if (t == o.ignore_index) return false;
  const bool in_range = t >= 0 && t < o.num_classes;
  CUDA_KERNEL_ASSERT(in_range && "Target is out of bounds");
  return in_range;
}

// The row's pointers and target.  Reads x[t] and the target only for an active row, and the
// logits not at all with read_logits == false (the split regime's gradient step, where other
// blocks may already have overwritten them: it takes y_t from k.row_vals).
template <int VEC, typename T>
XENT_DEV RowRef<T> make_row(const KernelArgs<T>& k, int64_t row, bool active,
                            bool read_logits = true) {
  using acc = acc_t<T>;
  const int64_t C = k.opt.num_classes;
  const int64_t off = (active ? row : 0) * C;
  RowRef<T> rr;
  rr.x = k.x + off;
  rr.q = k.t_prob != nullptr ? k.t_prob + off : nullptr;
  rr.g = k.g != nullptr ? k.g + off : nullptr;
  rr.C = active ? static_cast<int>(C) : 0;
  rr.shift = VEC == 1 ? 0 : static_cast<int>((reinterpret_cast<uintptr_t>(rr.x) / sizeof(T)) % VEC);
  rr.items = active ? (rr.C + rr.shift + VEC - 1) / VEC : 0;
  rr.y_t = acc(0);
  rr.t = -1;
  rr.valid = active;
  if (active && k.t_index != nullptr) {
    rr.t = k.t_index[row];
    rr.valid = check_target(rr.t, k.opt);
    if (rr.valid && read_logits) rr.y_t = k.em.y(acc(rr.x[rr.t]));
  }
  return rr;
}

// ---------------------------------------------------------------------------------------------
// Per-item pieces.
// ---------------------------------------------------------------------------------------------

// Whether a call needs the target sums: probability targets, or label smoothing.
template <bool kProb, typename T>
XENT_DEV bool wants_dots(const KernelArgs<T>& k) {
  return kProb || k.smooth;
}

// Target sums of one item (no exp), relative to mr, the running max of the slice after this
// item (0 while that is -inf): see Partial.
template <bool kProb, bool kFull, int VEC, typename T>
XENT_DEV void target_sums(DotAcc<acc_t<T>>& d, acc_t<T> mr, const ItemSpan& sp,
                          const acc_t<T> (&y)[VEC], const Pack<T, VEC>& qv,
                          const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  if (!wants_dots<kProb>(k)) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (kFull || (e >= sp.lo && e < sp.hi)) {
      const acc wj = k.w != nullptr ? k.w[sp.j0 + e] : acc(1);
      const acc c = kProb ? k.em.prob_c(acc(qv.v[e]), wj) : wj;
      d.dot += c * (y[e] - mr);
      d.mass += c;
    }
  }
}

// Transformed logits of an item; -inf outside the row.  The softcap test is made once per item
// (it is the same for every element of the call): per element it would cost a branch and a
// convergence barrier around an inlined tanh, more than the rest of the element's work.
template <bool kFull, int VEC, typename T>
XENT_DEV void item_logits(acc_t<T> (&y)[VEC], const ItemSpan& sp, const Pack<T, VEC>& xv,
                          const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  if (k.em.capped) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      y[e] = (kFull || (e >= sp.lo && e < sp.hi)) ? k.em.y(acc(xv.v[e])) : neg_inf<acc>();
    }
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      y[e] = (kFull || (e >= sp.lo && e < sp.hi)) ? k.em.scale * acc(xv.v[e]) : neg_inf<acc>();
    }
  }
}

// Adds one item to the running statistics: one exp per element, one rescale per item at most.
// kFull: every element of the item lies in the row (all items but a row's first and last).
template <bool kProb, bool kFull, int VEC, typename T>
XENT_DEV void push_item(Partial<acc_t<T>>& part, const RowRef<T>& r, const ItemSpan& sp,
                        const Pack<T, VEC>& xv, const Pack<T, VEC>& qv, const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  acc y[VEC];
  item_logits<kFull>(y, sp, xv, k);
  acc pm = y[0];
#pragma unroll
  for (int e = 1; e < VEC; ++e) pm = elem_max(pm, y[e]);
  // exp(-inf - pm) = 0 clears an empty sum; a NaN pm or max poisons the sum.  The target sums
  // move with the max (dot_move).
  if (pm > part.ms.max || pm != pm) {
    part.ms.sum *= fast_exp(part.ms.max - pm);
    if (wants_dots<kProb>(k)) part.dot = dot_move(part.dot, part.ms.max, pm);
    part.ms.max = pm;
  }
  const acc mr = part.ms.max == neg_inf<acc>() ? acc(0) : part.ms.max;
#pragma unroll
  for (int e = 0; e < VEC; ++e) part.ms.sum += fast_exp(y[e] - mr);
  target_sums<kProb, kFull>(part.dot, mr, sp, y, qv, k);
}

// Loss, normaliser and gradient coefficients of a row from its combined statistics.
template <typename acc>
struct RowResult {
  acc loss;
  RowNorm<acc> norm;
  GradCoef<acc> gc;  // probability targets: gc.a, and gc.b = the gradient scale s
  acc ignored;       // every gradient entry of an ignored row: 0, or NaN (xent_row.h)
};

template <bool kProb, typename T>
XENT_DEV RowResult<acc_t<T>> finish_row(const Partial<acc_t<T>>& part, const RowRef<T>& r,
                                        const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  const RowOptions& o = k.opt;
  const acc s = k.grad_scale != nullptr ? *k.grad_scale : acc(1);
  RowResult<acc> res;
  res.norm = ms_norm(part.ms);
  res.ignored = ignored_grad(res.norm);
  if (kProb) {
    res.loss = prob_row_loss(part.dot.mass, part.dot.dot, res.norm, o);
    res.gc = GradCoef<acc>{prob_grad_a(part.dot.mass, res.norm, s, o), s, acc(0)};
  } else {
    IndexRow<acc> ir{};
    ir.w_sum = k.w_sum != nullptr ? *k.w_sum : acc(o.num_classes);
    ir.dot = part.dot.dot;
    if (r.valid) {
      ir.w_t = k.w != nullptr ? k.w[r.t] : acc(1);
      ir.y_t = r.y_t;
    }
    res.loss = index_row_loss(ir, res.norm, r.valid, o);
    res.gc = index_grad_coef(ir, res.norm, r.valid, s, o);
  }
  return res;
}

// Gradient of one item, computed in acc and rounded once, with e_j = exp(y_j - ref):
//   index targets:        (a e_j - b w_j - [j == t] hot) T'(x_j)
//   probability targets:  (a e_j - s c_j) T'(x_j)
// and res.ignored for every element of an ignored row.
// kCapped / kWeighted are the call's softcap and class weights, decided once per item by
// grad_item (the same for every element).
template <bool kProb, bool kFull, bool kCapped, bool kWeighted, int VEC, typename T>
XENT_DEV Pack<T, VEC> grad_item_as(const RowRef<T>& r, const ItemSpan& sp, const Pack<T, VEC>& xv,
                                   const Pack<T, VEC>& qv, const RowResult<acc_t<T>>& res,
                                   const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  Pack<T, VEC> gv;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    acc gj = r.valid ? acc(0) : res.ignored;
    if (r.valid && (kFull || (e >= sp.lo && e < sp.hi))) {
      const int j = sp.j0 + e;
      const acc wj = kWeighted ? k.w[j] : acc(1);
      acc c;
      if (kProb) {
        c = res.gc.b * k.em.prob_c(acc(qv.v[e]), wj);
      } else {
        c = res.gc.b * wj + (j == r.t ? res.gc.hot : acc(0));
      }
      const acc xj = acc(xv.v[e]);
      if (kCapped) {
        const acc ej = fast_exp(k.em.y(xj) - res.norm.ref);
        gj = (res.gc.a * ej - c) * k.em.slope(xj);
      } else {
        const acc ej = fast_exp(k.em.scale * xj - res.norm.ref);
        gj = (res.gc.a * ej - c) * k.em.scale;
      }
    }
    gv.v[e] = static_cast<T>(gj);
  }
  return gv;
}

template <bool kProb, bool kFull, int VEC, typename T>
XENT_DEV Pack<T, VEC> grad_item(const RowRef<T>& r, const ItemSpan& sp, const Pack<T, VEC>& xv,
                                const Pack<T, VEC>& qv, const RowResult<acc_t<T>>& res,
                                const KernelArgs<T>& k) {
  // Class-index rows read the other classes' weights only with label smoothing (b is 0 without
  // it, and an inf weight on a class no target uses must not make 0 * inf = NaN).
  const bool weighted = k.w != nullptr && wants_dots<kProb>(k);
  if (k.em.capped) {
    return weighted ? grad_item_as<kProb, kFull, true, true>(r, sp, xv, qv, res, k)
                    : grad_item_as<kProb, kFull, true, false>(r, sp, xv, qv, res, k);
  }
  return weighted ? grad_item_as<kProb, kFull, false, true>(r, sp, xv, qv, res, k)
                  : grad_item_as<kProb, kFull, false, false>(r, sp, xv, qv, res, k);
}

// ---------------------------------------------------------------------------------------------
// Slice sweeps of a block: items [begin, end) of a row, item begin + threadIdx.x + i * blockDim.x
// for thread threadIdx.x.  With kCache, items below k.cache_items go to / come from shared
// memory (indexed by item: the block regime passes begin = 0).
// ---------------------------------------------------------------------------------------------
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread

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
      if (item < end && r.valid) {
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

// ---------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------
// Launch bounds.  The minimum resident blocks per SM cap the registers (65536 / (threads *
// blocks)) without spilling: the common class-index float / half kernels are held to 64-85
// registers for occupancy; probability targets and double, which carry twice the state, get
// up to 128 (255 for the largest group tile).  tests/test_cuda_static.py checks that no kernel
// uses local memory.
constexpr int kGroupThreads = 256;
constexpr int kBlockThreads = 256;     // block regime
constexpr int kBlockBigThreads = 512;  // block regime, rows that leave room for one block per SM
constexpr int kSplitThreads = 256;
// Group regime: the rows live in shared memory, so registers hold little beyond one item.
constexpr int group_min_blocks(int elem, int nv, bool prob) {
  return (!prob && elem <= 4) ? (nv == 4 ? 3 : 4) : 2;
}
template <typename T, bool kProb, int kThreads = 256>
constexpr int block_min_blocks() {
  return kThreads > 256 ? 1 : (!kProb && sizeof(T) <= 4) ? 3 : 2;
}
constexpr int kStridedThreads = 256;

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

// Shared memory of a group-regime block: two row buffers per group.
inline int64_t group_smem_bytes(int threads, int group, int nv, bool prob) {
  return static_cast<int64_t>(threads / group) * 2 * group * nv * 16 * (prob ? 2 : 1);
}

// Group regime: G lanes per row, NV items per lane, rows staged in shared memory.
template <typename T, int VEC, int G, int NV, bool kProb>
__global__ void __launch_bounds__(kGroupThreads, group_min_blocks(sizeof(T), NV, kProb))
    group_rows_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  using P = Pack<T, VEC>;
  static_assert(G == 8 || G == 16 || G == 32, "group size");
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

// ---------------------------------------------------------------------------------------------
// Host side: the plan.
// ---------------------------------------------------------------------------------------------
struct DeviceProps {
  int sms;              // multiprocessors
  int64_t smem_optin;   // most shared memory one block may use (static + dynamic), bytes
  int64_t smem_per_sm;  // shared memory of one multiprocessor, bytes
};

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

enum class Regime { kAuto, kGroup, kBlock, kBlockScalar, kSplit, kStrided };

inline const char* regime_name(Regime r) {
  switch (r) {
    case Regime::kGroup:
      return "group";
    case Regime::kBlock:
      return "block";
    case Regime::kBlockScalar:
      return "block_scalar";
    case Regime::kSplit:
      return "split";
    case Regime::kStrided:
      return "strided";
    default:
      return "auto";
  }
}

// "auto" or one of the names above; anything else is auto.
inline Regime regime_from_name(const char* s) {
  if (s == nullptr) return Regime::kAuto;
  for (Regime r :
       {Regime::kGroup, Regime::kBlock, Regime::kBlockScalar, Regime::kSplit, Regime::kStrided}) {
    const char* n = regime_name(r);
    const char* a = s;
    while (*n != '\0' && *a == *n) ++a, ++n;
    if (*n == '\0' && *a == '\0') return r;
  }
  return Regime::kAuto;
}

struct Plan {
  Regime regime = Regime::kStrided;
  int vec = 1;     // elements per item
  int group = 32;  // group regime: lanes per row
  int nv = 1;      // group regime: items per lane
  int threads = kStridedThreads;
  int64_t blocks = 1;       // grid x
  int64_t grid_y = 1;       // split regime: rows
  int64_t cache_items = 0;  // block regime
  int64_t smem = 0;         // dynamic shared memory per block, bytes
  int64_t splits = 1;       // split regime
  int64_t slice_items = 0;  // split regime
  bool transposed = false;  // K-dim input run as contiguous rows of a transposed copy
};

// Thresholds of the regimes (see the file comment).
constexpr int64_t kGroupMaxItems = 32 * 4;  // group regime up to 128 items (1024 bf16, 512 f32)
constexpr int64_t kSplitMinClasses = 32768;
constexpr int64_t kStridedMaxClasses = 128;        // contiguous rows: strided regime up to here
constexpr int64_t kStridedForcedMaxClasses = 512;  // XENT_CUDA_REGIME=strided: up to here
constexpr int64_t kSplitMinSliceItems = kSplitThreads * kUnroll;
constexpr int64_t kStaticSmemReserve = 2048;  // block_reduce's scratch, with room to spare

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// rows: N * S; C: classes; elem: sizeof(T); vec_ok: x, grad and probability target share their
// offset modulo 16 bytes.
// `force` picks a regime for tests; one that cannot run the shape falls back to the automatic
// choice.
inline Plan plan_forward(int64_t rows, int64_t C, int64_t S, int elem, bool vec_ok, bool prob,
                         const DeviceProps& d, Regime force = Regime::kAuto) {
  Plan p;
  const int64_t sms = std::max(d.sms, 1);
  // In-row indices are 32-bit: rows of 2^30 classes or more take the strided kernel (64-bit).
  // It also runs short contiguous rows, one thread per row: on an H200 (bf16, 2026-11-27) it
  // took a quarter of the group regime's time for the loss at C = 10 and a third at C = 100,
  // where a group of lanes per row waits on each row's short chain of dependent steps.
  bool strided = S != 1 || C == 0 || C >= (int64_t(1) << 30);
  if (!strided && force == Regime::kStrided) strided = C < kStridedForcedMaxClasses;
  if (!strided && force == Regime::kAuto) strided = C <= kStridedMaxClasses;
  if (strided) {
    p.regime = Regime::kStrided;
    p.threads = kStridedThreads;
    p.blocks = std::max<int64_t>(1, std::min(ceil_div(rows, p.threads), sms * 8 * 4));
    return p;
  }
  const int full_vec = 16 / elem;
  // Items of a row at most, whatever its offset.
  const int64_t items_max = ceil_div(C + full_vec - 1, full_vec);
  const bool group_ok = vec_ok && items_max <= kGroupMaxItems;
  const int64_t split_slices_want = ceil_div(2 * sms, rows);
  const bool split_ok =
      vec_ok && rows <= 65535 && split_slices_want >= 2 && items_max >= 2 * kSplitMinSliceItems;

  Regime reg = force;
  if (reg == Regime::kStrided) reg = Regime::kAuto;  // rows too long for one thread each
  if ((reg == Regime::kGroup && !group_ok) || (reg == Regime::kSplit && !split_ok)) {
    reg = Regime::kAuto;
  }
  if (reg == Regime::kBlock && !vec_ok) reg = Regime::kBlockScalar;
  if (reg == Regime::kAuto) {
    if (!vec_ok) {
      reg = Regime::kBlockScalar;
    } else if (group_ok) {
      reg = Regime::kGroup;
    } else if (split_ok && 2 * rows <= sms && C >= kSplitMinClasses) {
      reg = Regime::kSplit;
    } else {
      reg = Regime::kBlock;
    }
  }
  p.regime = reg;

  if (reg == Regime::kGroup) {
    p.vec = full_vec;
    p.group = items_max <= 8 ? 8 : 32;
    p.nv = items_max <= 32 ? 1 : items_max <= 64 ? 2 : 4;
    p.threads = kGroupThreads;
    p.smem = group_smem_bytes(p.threads, p.group, p.nv, prob);
    // No more blocks than stay resident (the least the launch bounds promise, or what shared
    // memory allows): each group then walks many rows, and the copies of the next one overlap
    // the work on the current one.
    const int64_t resident = std::max<int64_t>(
        1, std::min<int64_t>(group_min_blocks(elem, p.nv, prob), d.smem_per_sm / (p.smem + 1024)));
    const int64_t rows_per_block = p.threads / p.group;
    p.blocks = std::max<int64_t>(1, std::min(ceil_div(rows, rows_per_block), sms * resident));
    return p;
  }
  if (reg == Regime::kSplit) {
    p.vec = full_vec;
    p.threads = kSplitThreads;
    int64_t slice = std::max(kSplitMinSliceItems, ceil_div(items_max, split_slices_want));
    slice = ceil_div(slice, p.threads) * p.threads;
    p.slice_items = slice;
    p.splits = ceil_div(items_max, slice);
    p.blocks = p.splits;
    p.grid_y = rows;
    return p;
  }
  // Block regime.
  p.vec = reg == Regime::kBlockScalar ? 1 : full_vec;
  const int64_t items = reg == Regime::kBlockScalar ? C : items_max;
  const int64_t want = ceil_div(ceil_div(items, kUnroll), 32) * 32;
  p.threads = static_cast<int>(std::min<int64_t>(kBlockThreads, std::max<int64_t>(64, want)));
  const int64_t item_bytes = static_cast<int64_t>(p.vec) * elem * (prob ? 2 : 1);
  // The cache also serves the loss alone: copies into shared memory keep far more of the row
  // in flight than loads into registers.
  const int64_t budget = std::max<int64_t>(0, d.smem_optin - kStaticSmemReserve);
  p.cache_items = std::min(items, budget / item_bytes);
  p.smem = p.cache_items * item_bytes;
  if (p.vec > 1 && (2 * (p.smem + kStaticSmemReserve) > d.smem_per_sm || p.cache_items < items)) {
    // One block per SM, or a row that does not fit: more threads, more loads in flight.
    p.threads = static_cast<int>(std::min<int64_t>(kBlockBigThreads, std::max<int64_t>(64, want)));
  }
  const int64_t by_threads = std::max<int64_t>(1, 2048 / p.threads);
  const int64_t by_smem = std::max<int64_t>(1, d.smem_per_sm / (p.smem + kStaticSmemReserve));
  p.blocks = std::max<int64_t>(1, std::min(rows, sms * std::min(by_threads, by_smem)));
  return p;
}

// Launches the plan's kernels through `launch(kernel, grid, block, smem_bytes, args)`: real CUDA
// launches in xent_cuda.cu, the CPU emulation in emu/.
template <typename T, bool kProb, typename Launcher>
void launch_plan(const KernelArgs<T>& k, const Plan& p, Launcher& launch) {
  constexpr int V = 16 / sizeof(T);
  static_assert(sizeof(Pack<T, V>) == 16, "16-byte items");
  const dim3 block(static_cast<unsigned>(p.threads));
  const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.grid_y));
  switch (p.regime) {
    case Regime::kGroup:
      if (p.group == 8) {
        launch(&group_rows_kernel<T, V, 8, 1, kProb>, grid, block, p.smem, k);
      } else if (p.nv == 1) {
        launch(&group_rows_kernel<T, V, 32, 1, kProb>, grid, block, p.smem, k);
      } else if (p.nv == 2) {
        launch(&group_rows_kernel<T, V, 32, 2, kProb>, grid, block, p.smem, k);
      } else {
        launch(&group_rows_kernel<T, V, 32, 4, kProb>, grid, block, p.smem, k);
      }
      break;
    case Regime::kBlock:
      if (p.threads > kBlockThreads) {
        launch(&block_rows_kernel<T, V, kProb, kBlockBigThreads>, grid, block, p.smem, k);
      } else {
        launch(&block_rows_kernel<T, V, kProb, kBlockThreads>, grid, block, p.smem, k);
      }
      break;
    case Regime::kBlockScalar:
      launch(&block_rows_kernel<T, 1, kProb, kBlockThreads>, grid, block, p.smem, k);
      break;
    case Regime::kSplit: {
      launch(&split_stats_kernel<T, V, kProb>, grid, block, 0, k);
      const dim3 grid2(k.g != nullptr ? grid.x : 1u, grid.y);
      launch(&split_grad_kernel<T, V, kProb>, grid2, block, 0, k);
      break;
    }
    default:
      launch(&strided_kernel<T, kProb>, grid, block, 0, k);
      break;
  }
}

}  // namespace cuda
}  // namespace xent
