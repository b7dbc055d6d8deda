// Row math shared by the CPU and CUDA kernels.
//
// A "row" is the vector of C logits of one sample (one (n, d1..dk) position).  Every kernel does
// the same three things per row, and the pieces here are written so that a later fused
// linear+CE or a vocab-parallel CE can reuse them slice by slice:
//
//   1. partial statistics over a slice: running max and sum of exp(y - max)   (MaxSum, ms_push)
//   2. combine partial statistics of two slices                              (ms_combine)
//   3. given the row's log-sum-exp, the gradient of each element              (grad_element)
//
// Notation. x: logit, y = T(x): transformed logit (logit_scale, optional softcap),
// p = exp(y - lse): softmax.  A row's loss is written with target coefficients c_j:
//
//   loss = sum_j c_j (lse - y_j) + z_loss * lse^2,        A = sum_j c_j
//   dloss/dy_j = (A + 2 z_loss lse) p_j - c_j,            dloss/dx_j = dloss/dy_j * T'(x_j)
//
// Class-index target t, class weights w (all ones when absent), label smoothing eps:
//   c_j = (1 - eps) w_t [j == t] + (eps / C) w_j          (PyTorch's definition)
// Probability target q:
//   c_j = w_j ((1 - eps) q_j + eps / C)
// An ignored row has c = 0 and no z-loss: loss 0, gradient 0.
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
// exp(-inf - -inf) would turn the sum into NaN for rows that start with masked entries.
template <typename T>
XENT_HD MaxSum<T> ms_combine(MaxSum<T> a, MaxSum<T> b) {
  // NaN in either max must poison the result; the comparison below would drop it.
  if (a.max != a.max || b.max != b.max) return {a.max + b.max, a.sum + b.sum};
  const T m = a.max > b.max ? a.max : b.max;
  if (m == neg_inf<T>()) return {m, T(0)};
  const T sa = a.max == neg_inf<T>() ? T(0) : a.sum * exp(a.max - m);
  const T sb = b.max == neg_inf<T>() ? T(0) : b.sum * exp(b.max - m);
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

// log-sum-exp of a finished row: -inf when every entry is -inf, NaN when one is +inf (as
// log_softmax, where +inf - +inf is NaN).
template <typename T>
XENT_HD T ms_lse(MaxSum<T> a) {
  if (a.max == -neg_inf<T>()) return a.max - a.max;
  return a.max + log(a.sum);
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
// 3. Loss and gradient given the log-sum-exp.
// ---------------------------------------------------------------------------------------------
// Row-level coefficients of a class-index target.  `dot_ref` is sum_j w_j (y_j - ref) for a
// reference value ref inside the row (its first element): summing differences instead of raw
// logits keeps the smoothing term accurate when the logits are large (1e4 and up).
template <typename T>
struct IndexRow {
  T w_t;      // weight of the target class (0 for an ignored row)
  T y_t;      // transformed target logit
  T w_sum;    // sum_j w_j (C without weights)
  T dot_ref;  // sum_j w_j (y_j - ref), needed only with label smoothing
  T ref;
};

// Loss of one class-index row (0 for an ignored row, signalled by w_t == 0 and valid == false).
template <typename T, typename O>
XENT_HD T index_row_loss(const IndexRow<T>& r, T lse, bool valid, const O& o) {
  if (!valid) return T(0);
  const T eps = T(o.label_smoothing);
  T loss = (T(1) - eps) * r.w_t * (lse - r.y_t);
  if (o.label_smoothing > 0.0) {
    loss += eps / T(o.num_classes) * (r.w_sum * (lse - r.ref) - r.dot_ref);
  }
  if (o.z_loss > 0.0) loss += T(o.z_loss) * lse * lse;
  return loss;
}

// Coefficients of the gradient of one class-index row, already multiplied by the row's
// gradient scale s (1/total weight for 'mean'):
//   dx_j = (a * p_j - b * w_j - [j == t] * hot) * T'(x_j)
template <typename T>
struct GradCoef {
  T a;    // s * (A + 2 z lse)
  T b;    // s * eps / C
  T hot;  // s * (1 - eps) * w_t
};

template <typename T, typename O>
XENT_HD GradCoef<T> index_grad_coef(const IndexRow<T>& r, T lse, bool valid, T s, const O& o) {
  if (!valid) return {T(0), T(0), T(0)};
  const T eps = T(o.label_smoothing);
  const T per_class = eps / T(o.num_classes);
  T big_a = (T(1) - eps) * r.w_t + per_class * r.w_sum;
  if (o.z_loss > 0.0) big_a += T(2) * T(o.z_loss) * lse;
  return {s * big_a, s * per_class, s * (T(1) - eps) * r.w_t};
}

// The gradient of one element, rounded once by the caller.  p is computed here, in the
// accumulation type, so that p - 1 at the target class keeps its precision in bfloat16.
template <typename T, typename O>
XENT_HD T grad_element(T x, T lse, T coef_a, T coef_c, const O& o) {
  const T y = transform_logit(x, o);
  const T p = exp(y - lse);
  return (coef_a * p - coef_c) * transform_slope(x, o);
}

// Probability targets: c_j = w_j ((1 - eps) q_j + eps / C).
template <typename T, typename O>
XENT_HD T prob_coef(T q, T w, const O& o) {
  const T eps = T(o.label_smoothing);
  return w * ((T(1) - eps) * q + eps / T(o.num_classes));
}

// Loss of a probability-target row from A = sum_j c_j and cdot_ref = sum_j c_j (y_j - ref).
template <typename T, typename O>
XENT_HD T prob_row_loss(T big_a, T cdot_ref, T ref, T lse, const O& o) {
  T loss = big_a * (lse - ref) - cdot_ref;
  if (o.z_loss > 0.0) loss += T(o.z_loss) * lse * lse;
  return loss;
}

// Gradient coefficient a of a probability-target row (dx_j = (a p_j - s c_j) T'(x_j)).
template <typename T, typename O>
XENT_HD T prob_grad_a(T big_a, T lse, T s, const O& o) {
  T a = big_a;
  if (o.z_loss > 0.0) a += T(2) * T(o.z_loss) * lse;
  return s * a;
}

}  // namespace xent
