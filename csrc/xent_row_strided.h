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
// read.  Returns the row's loss and writes its lse.
template <typename scalar_t, typename acc, typename O>
XENT_HD acc index_row_strided(const StridedRow<scalar_t, acc>& r, int64_t t, bool valid, const O& o,
                              acc* lse_out) {
  const int64_t C = o.num_classes, S = r.stride;
  const bool smooth = o.label_smoothing > 0.f;
  IndexRow<acc> ir{};
  ir.ref = C > 0 ? transform_logit(acc(r.x[0]), o) : acc(0);
  MaxSum<acc> ms = ms_empty<acc>();
  for (int64_t j = 0; j < C; ++j) {
    const acc y = transform_logit(acc(r.x[j * S]), o);
    ms = ms_push(ms, y);
    if (smooth) ir.dot_ref += (r.w ? r.w[j] : acc(1)) * (y - ir.ref);
  }
  const acc lse = ms_lse(ms);
  ir.w_sum = r.w_sum;
  if (valid) {
    ir.w_t = r.w ? r.w[t] : acc(1);
    ir.y_t = transform_logit(acc(r.x[t * S]), o);
  }
  *lse_out = lse;
  if (r.g != nullptr) {
    const GradCoef<acc> gc = index_grad_coef(ir, lse, valid, r.grad_scale, o);
    for (int64_t j = 0; j < C; ++j) {
      const acc c = gc.b * (r.w ? r.w[j] : acc(1)) + (j == t ? gc.hot : acc(0));
      r.g[j * S] = valid ? static_cast<scalar_t>(grad_element(acc(r.x[j * S]), lse, gc.a, c, o))
                         : static_cast<scalar_t>(0);
    }
  }
  return index_row_loss(ir, lse, valid, o);
}

// Probability target q[j * stride] (same layout as x).  Returns the row's loss.
// A zero probability on a -inf logit gives 0 * -inf = NaN, as torch's -(q * log_softmax).
template <typename scalar_t, typename acc, typename O>
XENT_HD acc prob_row_strided(const StridedRow<scalar_t, acc>& r, const scalar_t* q, const O& o,
                             acc* lse_out) {
  const int64_t C = o.num_classes, S = r.stride;
  const acc ref = C > 0 ? transform_logit(acc(r.x[0]), o) : acc(0);
  MaxSum<acc> ms = ms_empty<acc>();
  acc big_a = 0, cdot = 0;
  for (int64_t j = 0; j < C; ++j) {
    const acc y = transform_logit(acc(r.x[j * S]), o);
    const acc c = prob_coef(acc(q[j * S]), r.w ? r.w[j] : acc(1), o);
    ms = ms_push(ms, y);
    big_a += c;
    cdot += c * (y - ref);
  }
  const acc lse = ms_lse(ms);
  *lse_out = lse;
  if (r.g != nullptr) {
    const acc ga = prob_grad_a(big_a, lse, r.grad_scale, o);
    for (int64_t j = 0; j < C; ++j) {
      const acc c = r.grad_scale * prob_coef(acc(q[j * S]), r.w ? r.w[j] : acc(1), o);
      r.g[j * S] = static_cast<scalar_t>(grad_element(acc(r.x[j * S]), lse, ga, c, o));
    }
  }
  return prob_row_loss(big_a, cdot, ref, lse, o);
}

}  // namespace xent
