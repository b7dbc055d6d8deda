// What every row kernel shares: the kernel arguments, the per-element math, partial statistics
// and their warp / block / cluster reductions, 16-byte items and the row as the kernels see it,
// the per-item pieces of the statistics and of the gradient, and the finish of a row.  The row
// math itself is xent_row.h; each regime's kernel has a file of its own (regime_*.cuh).
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

// What happens to a logit before the softmax, fixed per call, so that the common case (no
// scale, no softcap) costs no instruction per element: the kernels dispatch once per item (or
// per kernel) on it and run a variant compiled for the kind.
enum class Tf : int { kPlain, kScaled, kCapped };

// Per-element transform and target coefficient with the per-call divisions done once (on the
// host): the formulas of transform_logit / transform_slope / prob_coef in xent_row.h, with
// logit_scale / softcap and eps / C precomputed (results may differ from them in the last bit).
// Kept in the kernel parameters, so its fields are constant-bank operands, not registers.
template <typename acc>
struct ElemMath {
  acc scale, cap, scale_over_cap, keep, eps_over_c;
  Tf kind;
  // y = T(x); -inf (a masked entry) stays -inf under a softcap and under a scale <= 0.
  template <Tf K>
  XENT_HD acc y_as(acc x) const {
    if (K == Tf::kPlain) return x;
    if (K == Tf::kScaled) return x == neg_inf<acc>() ? x : scale * x;
    return x == neg_inf<acc>() ? x : cap * tanh(scale_over_cap * x);
  }
  template <Tf K>
  XENT_HD acc slope_as(acc x) const {
    if (K == Tf::kPlain) return acc(1);
    if (K == Tf::kScaled) return scale;
    if (x == neg_inf<acc>()) return acc(0);
    const acc th = tanh(scale_over_cap * x);
    return scale * (acc(1) - th * th);
  }
  XENT_HD acc y(acc x) const {
    if (kind == Tf::kCapped) return y_as<Tf::kCapped>(x);
    return kind == Tf::kScaled ? y_as<Tf::kScaled>(x) : x;
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
  m.kind = o.softcap > 0.f ? Tf::kCapped : o.logit_scale != 1.0 ? Tf::kScaled : Tf::kPlain;
  return m;
}

// Calls f(tag) with the kind of the call as a compile-time value: one variant per kind.
template <Tf K>
struct TfTag {
  static constexpr Tf value = K;
};
template <typename F>
XENT_DEV void with_tf(Tf kind, F&& f) {
  if (kind == Tf::kCapped) {
    f(TfTag<Tf::kCapped>{});
  } else if (kind == Tf::kScaled) {
    f(TfTag<Tf::kScaled>{});
  } else {
    f(TfTag<Tf::kPlain>{});
  }
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
  Partial<acc>* const warp_part = block_scratch<Partial<acc>, 32>();
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

// Every thread of every block of a thread-block cluster gets the statistics combined over the
// cluster's blocks (each block passes its own, already reduced over the block).  Blocks write
// their statistics to one of two exchange slots, alternating with `parity` from call to call,
// and read every block's slot through distributed shared memory after one cluster barrier: a
// block writes a slot again (two calls later) only after passing the next call's barrier, which
// every other block reaches only once done reading.  The blocks combine in rank order, so all
// of them get the same bits.  A kernel that calls this must pass one last cluster barrier
// before exiting, so that no block's shared memory goes while another may read it.
template <typename acc>
XENT_DEV Partial<acc> cluster_reduce(const Partial<acc>& p, int parity) {
  const unsigned n = cluster_size();
  if (n == 1) return p;
  Partial<acc>* const slots = block_scratch<Partial<acc>, 2, 1>();
  if (threadIdx.x == 0) slots[parity] = p;
  sync_cluster();
  Partial<acc> r = partial_empty<acc>();
  for (unsigned b = 0; b < n; ++b) r = partial_combine(r, *cluster_map(slots + parity, b));
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

// Transformed logits of an item; -inf outside the row.  The transform is decided once per item
// (it is the same for every element of the call): per element it would cost a branch and a
// convergence barrier around an inlined tanh, more than the rest of the element's work.
template <bool kFull, Tf K, int VEC, typename T>
XENT_DEV void item_logits_as(acc_t<T> (&y)[VEC], const ItemSpan& sp, const Pack<T, VEC>& xv,
                             const KernelArgs<T>& k) {
  using acc = acc_t<T>;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    y[e] =
        (kFull || (e >= sp.lo && e < sp.hi)) ? k.em.template y_as<K>(acc(xv.v[e])) : neg_inf<acc>();
  }
}

template <bool kFull, int VEC, typename T>
XENT_DEV void item_logits(acc_t<T> (&y)[VEC], const ItemSpan& sp, const Pack<T, VEC>& xv,
                          const KernelArgs<T>& k) {
  with_tf(k.em.kind, [&](auto tf) { item_logits_as<kFull, decltype(tf)::value>(y, sp, xv, k); });
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
};

template <bool kProb, typename T>
XENT_DEV RowResult<acc_t<T>> finish_row(const Partial<acc_t<T>>& part, const RowRef<T>& r,
                                        const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  const RowOptions& o = k.opt;
  const acc s = k.grad_scale != nullptr ? *k.grad_scale : acc(1);
  RowResult<acc> res;
  res.norm = ms_norm(part.ms);
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
// An ignored row needs no case of its own: its coefficients (index_grad_coef) give 0 * e_j, 0
// or NaN exactly where torch's is.  K and kWeighted are the call's transform and class weights,
// decided once per item by grad_item (the same for every element): the plain kind has no
// multiply by T', and without weights the target's term is a select between b and b + hot.
template <bool kProb, bool kFull, Tf K, bool kWeighted, int VEC, typename T>
XENT_DEV Pack<T, VEC> grad_item_as(const RowRef<T>& r, const ItemSpan& sp, const Pack<T, VEC>& xv,
                                   const Pack<T, VEC>& qv, const RowResult<acc_t<T>>& res,
                                   const KernelArgs<T>& k) {
  using acc = acc_t<T>;
  Pack<T, VEC> gv;
  // The target's element in this item (32-bit: one compare per element), or -1.
  const int t_local = r.t - sp.j0 >= 0 && r.t - sp.j0 < VEC ? static_cast<int>(r.t - sp.j0) : -1;
  const acc b_hot = res.gc.b + res.gc.hot;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    acc gj = acc(0);
    if (kFull || (e >= sp.lo && e < sp.hi)) {
      acc c;
      if (kProb) {
        c = res.gc.b * k.em.prob_c(acc(qv.v[e]), kWeighted ? k.w[sp.j0 + e] : acc(1));
      } else if (kWeighted) {
        c = res.gc.b * k.w[sp.j0 + e] + (e == t_local ? res.gc.hot : acc(0));
      } else {
        c = e == t_local ? b_hot : res.gc.b;
      }
      const acc xj = acc(xv.v[e]);
      const acc ej = fast_exp(k.em.template y_as<K>(xj) - res.norm.ref);
      gj = res.gc.a * ej - c;
      if (K != Tf::kPlain) gj *= k.em.template slope_as<K>(xj);
    }
    gv.v[e] = static_cast<T>(gj);
  }
  return gv;
}

// Class-index rows read the other classes' weights only with label smoothing (b is 0 without
// it, and an inf weight on a class no target uses must not make 0 * inf = NaN).
template <bool kProb, typename T>
XENT_DEV bool grad_weighted(const KernelArgs<T>& k) {
  return k.w != nullptr && wants_dots<kProb>(k);
}

template <bool kProb, bool kFull, int VEC, typename T>
XENT_DEV Pack<T, VEC> grad_item(const RowRef<T>& r, const ItemSpan& sp, const Pack<T, VEC>& xv,
                                const Pack<T, VEC>& qv, const RowResult<acc_t<T>>& res,
                                const KernelArgs<T>& k) {
  Pack<T, VEC> g;
  with_tf(k.em.kind, [&](auto tf) {
    constexpr Tf K = decltype(tf)::value;
    g = grad_weighted<kProb>(k) ? grad_item_as<kProb, kFull, K, true>(r, sp, xv, qv, res, k)
                                : grad_item_as<kProb, kFull, K, false>(r, sp, xv, qv, res, k);
  });
  return g;
}

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
  if (nv == 8) return (prob || elem == 8) ? 1 : 2;  // 8 items a lane: twice the loop state
  return (!prob && elem <= 4) ? (nv == 4 ? 3 : 4) : 2;
}
template <typename T, bool kProb, int kThreads = 256>
constexpr int block_min_blocks() {
  return kThreads > 256 ? 1 : (!kProb && sizeof(T) <= 4) ? 3 : 2;
}
constexpr int kStridedThreads = 256;
// Regs regime: R items of 16 bytes per thread held in registers (4 registers each).  Measured
// in the compiler's report (sm_90, bfloat16, with a gradient): aligned rows need about 95
// registers at R = 8 and 128 at R = 16, so both keep two blocks per SM (<= 128 registers a
// thread), R <= 4 three (<= 85), and so does the plain variant at R = 8 (72); rows that are
// not whole aligned items carry per-item masks (a third more registers) and float64 twice the
// arithmetic registers: one block fewer.
constexpr int kRegsThreads = 256;
constexpr int regs_min_blocks(int items_per_thread, int elem, bool aligned, bool plain = false) {
  return (items_per_thread <= 4 || (plain && items_per_thread <= 8) ? 3 : 2) -
         (elem == 8 || !aligned ? 1 : 0);
}
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread (slice sweeps)

// Shared memory of a group-regime block: two row buffers per group.
inline int64_t group_smem_bytes(int threads, int group, int nv, bool prob) {
  return static_cast<int64_t>(threads / group) * 2 * group * nv * 16 * (prob ? 2 : 1);
}

}  // namespace cuda
}  // namespace xent
