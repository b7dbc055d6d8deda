// One whole row, element by element, with the classes strided by S: the scalar path of the
// CPU kernel and the thread-per-row CUDA kernel for K-dim inputs run exactly this code, so the
// CPU tests exercise the CUDA kernel's row logic too.
#pragma once

#include "xent_row.h"

namespace xent {

// Where one row lives and what it writes.  g may be null (no gradient wanted).
template <typename scalar_t, typename acc>
struct StridedRow {
  const scalar_t* x;  // logits x[j * stride]
  scalar_t* g;        // gradient g[j * stride], or nullptr
  int64_t stride;
  const acc* w;    // class weights, or nullptr
  acc w_sum;       // sum of the weights (C without weights)
  acc grad_scale;  // 1, or 1 / total weight for 'mean'
};

// Class-index target t; valid is false for an ignored (or rejected) target, and then t is not
// read.  Returns the row's loss and writes its normaliser.  One pass for the statistics (the
// smoothing sum relative to the running max, xent_row.h's DotAcc), one for the gradient.
template <typename scalar_t, typename acc, typename O>
XENT_HD acc index_row_strided(const StridedRow<scalar_t, acc>& r, int64_t t, bool valid, const O& o,
                              RowNorm<acc>* norm_out) {
  const int64_t C = o.num_classes, S = r.stride;
  const bool smooth = o.label_smoothing > 0.f;
  MaxSum<acc> ms = ms_empty<acc>();
  DotAcc<acc> dot = dot_empty<acc>();
  for (int64_t j = 0; j < C; ++j) {
    const acc y = transform_logit(acc(r.x[j * S]), o);
    const acc m_old = ms.max;
    ms = ms_push(ms, y);
    if (smooth) dot = dot_push(dot_move(dot, m_old, ms.max), ms.max, y, r.w ? r.w[j] : acc(1));
  }
  const RowNorm<acc> norm = ms_norm(ms);
  IndexRow<acc> ir{};
  ir.w_sum = r.w_sum;
  ir.dot = dot.dot;
  if (valid) {
    ir.w_t = r.w ? r.w[t] : acc(1);
    ir.y_t = transform_logit(acc(r.x[t * S]), o);
  }
  *norm_out = norm;
  if (r.g != nullptr) {
    const GradCoef<acc> gc = index_grad_coef(ir, norm, valid, r.grad_scale, o);
    for (int64_t j = 0; j < C; ++j) {
      // Other classes' weights enter only with smoothing (b is 0 without it; an inf weight on a
      // class no target uses must not make 0 * inf = NaN).
      const acc w_j = smooth && r.w ? r.w[j] : acc(1);
      const acc c = gc.b * w_j + (j == t ? gc.hot : acc(0));
      r.g[j * S] = static_cast<scalar_t>(grad_element(acc(r.x[j * S]), norm.ref, gc.a, c, o));
    }
  }
  return index_row_loss(ir, norm, valid, o);
}

// Probability target q[j * stride] (same layout as x).  Returns the row's loss.
// A zero probability on a -inf logit gives 0 * -inf = NaN, as torch's -(q * log_softmax).
template <typename scalar_t, typename acc, typename O>
XENT_HD acc prob_row_strided(const StridedRow<scalar_t, acc>& r, const scalar_t* q, const O& o,
                             RowNorm<acc>* norm_out) {
  const int64_t C = o.num_classes, S = r.stride;
  MaxSum<acc> ms = ms_empty<acc>();
  DotAcc<acc> dot = dot_empty<acc>();  // mass: A = sum_j c_j
  for (int64_t j = 0; j < C; ++j) {
    const acc y = transform_logit(acc(r.x[j * S]), o);
    const acc c = prob_coef(acc(q[j * S]), r.w ? r.w[j] : acc(1), o);
    const acc m_old = ms.max;
    ms = ms_push(ms, y);
    dot = dot_push(dot_move(dot, m_old, ms.max), ms.max, y, c);
  }
  const RowNorm<acc> norm = ms_norm(ms);
  *norm_out = norm;
  if (r.g != nullptr) {
    const acc ga = prob_grad_a(dot.mass, norm, r.grad_scale, o);
    for (int64_t j = 0; j < C; ++j) {
      const acc c = r.grad_scale * prob_coef(acc(q[j * S]), r.w ? r.w[j] : acc(1), o);
      r.g[j * S] = static_cast<scalar_t>(grad_element(acc(r.x[j * S]), norm.ref, ga, c, o));
    }
  }
  return prob_row_loss(dot.mass, dot.dot, norm, o);
}

}  // namespace xent
