// Row math shared by the CPU and CUDA kernels.
//
// A "row" is the vector of C logits of one sample (one (n, d1..dk) position).  Every kernel does
// the same three things per row, and the pieces here are written so that a fused linear+CE or a
// vocab-parallel CE can reuse them slice by slice:
//
//   1. partial statistics over a slice: running max and sum of exp(y - max)   (MaxSum, ms_push),
//      and target sums kept relative to that max                             (DotAcc, dot_push)
//   2. combine partial statistics of two slices                              (ms_combine,
//   dot_combine)
//   3. given the row's normaliser, the gradient of each element              (grad_element)
//
// Notation. x: logit, y = T(x): transformed logit (logit_scale, optional softcap).  The row's
// normaliser is kept as two numbers, a reference r (its max, or a value at most 64 below it) and
// log_sum = log sum_j exp(y_j - r): lse = r + log_sum.  Every quantity is formed relative to r:
//
//   p_j = exp(y_j - r) / exp(log_sum),     lse - y_j = (r - y_j) + log_sum,
//
// never as lse - y_j or exp(y_j - lse) with lse already holding the row's magnitude, so adding a
// constant to a row changes r and nothing else (shift invariance: rows at 1e30 or at 1e4 in
// float32 are as accurate as rows near 0).  A row's loss with target coefficients c_j:
//
//   loss = sum_j c_j (lse - y_j) + z_loss * lse^2 = A log_sum - D + z_loss lse^2,
//   A = sum_j c_j,  D = sum_j c_j (y_j - r),
//   dloss/dy_j = (A + 2 z_loss lse) p_j - c_j,            dloss/dx_j = dloss/dy_j * T'(x_j)
//
// Class-index target t, class weights w (all ones when absent), label smoothing eps:
//   c_j = (1 - eps) w_t [j == t] + (eps / C) w_j          (PyTorch's definition)
// Probability target q:
//   c_j = w_j ((1 - eps) q_j + eps / C)
// An ignored row has c = 0 and no z-loss: loss 0, gradient 0 * p_j.
//
// Non-finite values follow torch's log_softmax: a row with a NaN or a +inf logit, or only -inf
// logits, has NaN log-probabilities throughout, so its loss (unless ignored) and every entry of
// its gradient (ignored or not) are NaN; -inf entries of an otherwise finite row get p = 0.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define XENT_HD __host__ __device__ __forceinline__
#else
#define XENT_HD inline
#endif

namespace xent {

using std::exp;
using std::log;
using std::tanh;

// Per-call options that shape the row math.  Plain values so the struct is trivially copyable
// to a CUDA kernel's parameter space.  Doubles, so that float64 inputs see the options at full
// precision; a float kernel converts each to float once.
// Every function below takes the options as any RowOptionsT<U>: kernels that keep values in
// registers (the CUDA thread-per-row kernel) use a float copy for float rows.
template <typename U>
struct RowOptionsT {
  int64_t num_classes;   // C
  int64_t ignore_index;  // only for class-index targets
  U label_smoothing;     // eps in [0, 1]
  U logit_scale;         // y = logit_scale * x (1: off)
  U softcap;             // > 0: y = softcap * tanh(logit_scale * x / softcap)
  U z_loss;              // coefficient of lse^2 (0: off)
};
using RowOptions = RowOptionsT<double>;

template <typename U>
XENT_HD RowOptionsT<U> options_as(const RowOptions& o) {
  return {o.num_classes,    o.ignore_index, U(o.label_smoothing),
          U(o.logit_scale), U(o.softcap),   U(o.z_loss)};
}

// Accumulation type: float for float/half/bfloat16, double for double.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

template <typename T>
XENT_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// ---------------------------------------------------------------------------------------------
// 1-2. Online max and sum-exp.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct MaxSum {
  T max;  // running maximum (-inf for an empty or all -inf slice)
  T sum;  // sum of exp(y - max) over the slice
};

template <typename T>
XENT_HD MaxSum<T> ms_empty() {
  return {neg_inf<T>(), T(0)};
}

// Merge two slices.  A slice whose max is -inf contributes nothing; without the guard,
// exp(-inf - -inf) would turn the sum into NaN for rows that start with masked entries.  Its
// sum still enters as sum * 0: a NaN logit seen while the slice's max was -inf left the max
// at -inf and the sum NaN (ms_push), and that NaN must poison the row.
template <typename T>
XENT_HD MaxSum<T> ms_combine(MaxSum<T> a, MaxSum<T> b) {
  // NaN in either max must poison the result; the comparison below would drop it.
  if (a.max != a.max || b.max != b.max) return {a.max + b.max, a.sum + b.sum};
  const T m = a.max > b.max ? a.max : b.max;
  if (m == neg_inf<T>()) return {m, a.sum * T(0) + b.sum * T(0)};
  const T sa = a.max == neg_inf<T>() ? a.sum * T(0) : a.sum * exp(a.max - m);
  const T sb = b.max == neg_inf<T>() ? b.sum * T(0) : b.sum * exp(b.max - m);
  return {m, sa + sb};
}

// Add one element: one exp in the common case (y not a new maximum).
template <typename T>
XENT_HD MaxSum<T> ms_push(MaxSum<T> a, T y) {
  if (y > a.max) {
    // From an empty start exp(-inf - y) is 0, and a NaN sum stays NaN (a NaN logit seen
    // while the max was still -inf must not be forgotten).
    return {y, a.sum * exp(a.max - y) + T(1)};
  }
  if (y == neg_inf<T>()) return a;
  return {a.max, a.sum + exp(y - a.max)};  // a NaN y lands here and poisons the sum
}

// A finished row's normaliser, lse = ref + log_sum (see the file comment).
template <typename T>
struct RowNorm {
  T ref;      // the reference the row's exps were taken against
  T log_sum;  // log sum_j exp(y_j - ref): NaN for a NaN or +inf logit, -inf for an all -inf row
  XENT_HD T lse() const { return ref + log_sum; }
};

// From a finished row's max (or lagging reference) and sum: log_sum is NaN when the max is +inf
// (as log_softmax, where +inf - +inf is NaN), -inf when every entry is -inf (sum 0).
template <typename T>
XENT_HD RowNorm<T> ms_norm(MaxSum<T> a) {
  if (a.max == -neg_inf<T>()) return {a.max, a.max - a.max};
  return {a.max, log(a.sum)};
}

// True when torch's log_softmax of the row is NaN everywhere: a NaN or +inf logit (log_sum NaN),
// or only -inf logits (ref -inf).  Such a row's gradient is NaN in every entry, ignored or not.
template <typename T>
XENT_HD bool row_is_nan(const RowNorm<T>& n) {
  return n.log_sum != n.log_sum || n.ref == neg_inf<T>();
}

// The gradient entry of an ignored row: 0 * p_j, which is NaN where p is (row_is_nan).
template <typename T>
XENT_HD T ignored_grad(const RowNorm<T>& n) {
  return row_is_nan(n) ? T(NAN) : T(0);
}

// Target sums of a row seen element by element: dot = sum_j c_j (y_j - m), kept relative to the
// running max m of the row's MaxSum, so it never holds large values that later cancel; mass =
// sum_j c_j moves it when m rises (every term shifts by m_old - m_new).  While m is -inf (every y
// so far -inf) the terms are taken against 0: c_j * -inf, as torch's c_j * log_softmax_j (-inf,
// or NaN for c_j == 0), and they stay so whatever m becomes.
template <typename T>
struct DotAcc {
  T dot;
  T mass;
};

template <typename T>
XENT_HD DotAcc<T> dot_empty() {
  return {T(0), T(0)};
}

// The accumulator relative to m_old, moved to m_new >= m_old.
template <typename T>
XENT_HD DotAcc<T> dot_move(DotAcc<T> d, T m_old, T m_new) {
  if (m_old != m_new && m_old != neg_inf<T>()) d.dot += d.mass * (m_old - m_new);
  return d;
}

// Adds element y with coefficient c; m is the running max after y was pushed.
template <typename T>
XENT_HD DotAcc<T> dot_push(DotAcc<T> d, T m, T y, T c) {
  const T ref = m == neg_inf<T>() ? T(0) : m;
  return {d.dot + c * (y - ref), d.mass + c};
}

// Merges two slices' sums, relative to their maxima ma and mb, into sums relative to m.
template <typename T>
XENT_HD DotAcc<T> dot_combine(DotAcc<T> a, T ma, DotAcc<T> b, T mb, T m) {
  a = dot_move(a, ma, m);
  b = dot_move(b, mb, m);
  return {a.dot + b.dot, a.mass + b.mass};
}

// Pushes y into a slice's max/sum and, with coefficient c, into its target sums, keeping them
// relative to the running max (the partial statistics of one slice of a row: a vocab-parallel
// shard, or a piece of a split row).
template <typename T>
XENT_HD void ms_dot_push(MaxSum<T>& ms, DotAcc<T>& d, T y, T c) {
  const T m_old = ms.max;
  ms = ms_push(ms, y);
  d = dot_push(dot_move(d, m_old, ms.max), ms.max, y, c);
}

// ---------------------------------------------------------------------------------------------
// Logit transform y = T(x) and its derivative.
// ---------------------------------------------------------------------------------------------
template <typename T, typename O>
XENT_HD T transform_logit(T x, const O& o) {
  // -inf marks a masked (or padded) entry: it stays -inf, rather than becoming -softcap or,
  // with a negative logit_scale, +inf, so such entries never receive probability mass.
  if (x == neg_inf<T>()) return x;
  if (o.softcap > 0.0) return T(o.softcap) * tanh(T(o.logit_scale) * x / T(o.softcap));
  return T(o.logit_scale) * x;
}

template <typename T, typename O>
XENT_HD T transform_slope(T x, const O& o) {
  if (o.softcap > 0.0) {
    if (x == neg_inf<T>()) return T(0);
    const T th = tanh(T(o.logit_scale) * x / T(o.softcap));
    return T(o.logit_scale) * (T(1) - th * th);
  }
  return T(o.logit_scale);
}

// ---------------------------------------------------------------------------------------------
// 3. Loss and gradient given the row's normaliser.
// ---------------------------------------------------------------------------------------------
// Row-level coefficients of a class-index target.
template <typename T>
struct IndexRow {
  T w_t;    // weight of the target class (0 for an ignored row)
  T y_t;    // transformed target logit
  T w_sum;  // sum_j w_j (C without weights); read only with label smoothing
  T dot;    // sum_j w_j (y_j - ref), relative to the normaliser's ref; only with label smoothing
};

// Loss of one class-index row (0 for an ignored row: valid == false).
template <typename T, typename O>
XENT_HD T index_row_loss(const IndexRow<T>& r, const RowNorm<T>& n, bool valid, const O& o) {
  if (!valid) return T(0);
  const T eps = T(o.label_smoothing);
  T loss = (T(1) - eps) * r.w_t * ((n.ref - r.y_t) + n.log_sum);
  // Only with smoothing do the other classes' weights enter (an inf weight on a class no target
  // uses must not touch the loss, as in torch).
  if (o.label_smoothing > 0.0) loss += eps / T(o.num_classes) * (r.w_sum * n.log_sum - r.dot);
  if (o.z_loss > 0.0) {
    const T lse = n.lse();
    loss += T(o.z_loss) * lse * lse;
  }
  return loss;
}

// Coefficients of the gradient of one class-index row, already multiplied by the row's
// gradient scale s (1/total weight for 'mean'), in terms of e_j = exp(y_j - ref):
//   dx_j = (a * e_j - b * w_j - [j == t] * hot) * T'(x_j)
// a carries 1 / sum (= exp(-log_sum)), so that no kernel needs the absolute lse.
template <typename T>
struct GradCoef {
  T a;    // s * (A + 2 z lse) / sum
  T b;    // s * eps / C
  T hot;  // s * (1 - eps) * w_t
};

template <typename T, typename O>
XENT_HD GradCoef<T> index_grad_coef(const IndexRow<T>& r, const RowNorm<T>& n, bool valid, T s,
                                    const O& o) {
  const T inv_sum = exp(-n.log_sum);
  // An ignored row: 0 * p_j, NaN where p is (row_is_nan; the 0 must not be scaled by s, which
  // is inf for 'mean' when every target is ignored).
  if (!valid) return {T(0) * inv_sum, T(0), T(0)};
  const T eps = T(o.label_smoothing);
  T big_a = (T(1) - eps) * r.w_t;
  T per_class = T(0);
  if (o.label_smoothing > 0.0) {
    per_class = eps / T(o.num_classes);
    big_a += per_class * r.w_sum;
  }
  if (o.z_loss > 0.0) big_a += T(2) * T(o.z_loss) * n.lse();
  return {s * big_a * inv_sum, s * per_class, s * (T(1) - eps) * r.w_t};
}

// The gradient of one element, rounded once by the caller.  e = exp(y - ref) is computed here,
// in the accumulation type, so that p - 1 at the target class keeps its precision in bfloat16.
// A row with ref = -inf (all -inf) gets exp(NaN) = NaN, as torch.
template <typename T, typename O>
XENT_HD T grad_element(T x, T ref, T coef_a, T coef_c, const O& o) {
  const T y = transform_logit(x, o);
  const T e = exp(y - ref);
  return (coef_a * e - coef_c) * transform_slope(x, o);
}

// Probability targets: c_j = w_j ((1 - eps) q_j + eps / C).
template <typename T, typename O>
XENT_HD T prob_coef(T q, T w, const O& o) {
  const T eps = T(o.label_smoothing);
  return w * ((T(1) - eps) * q + eps / T(o.num_classes));
}

// Loss of a probability-target row from A = sum_j c_j and D = sum_j c_j (y_j - ref).
template <typename T, typename O>
XENT_HD T prob_row_loss(T big_a, T dot, const RowNorm<T>& n, const O& o) {
  T loss = big_a * n.log_sum - dot;
  if (o.z_loss > 0.0) {
    const T lse = n.lse();
    loss += T(o.z_loss) * lse * lse;
  }
  return loss;
}

// Gradient coefficient a of a probability-target row (dx_j = (a e_j - s c_j) T'(x_j)).
template <typename T, typename O>
XENT_HD T prob_grad_a(T big_a, const RowNorm<T>& n, T s, const O& o) {
  T a = big_a;
  if (o.z_loss > 0.0) a += T(2) * T(o.z_loss) * n.lse();
  return s * a * exp(-n.log_sum);
}

}  // namespace xent
