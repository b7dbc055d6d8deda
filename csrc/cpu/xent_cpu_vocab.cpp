// CPU kernels of the vocab-parallel operators (schemas and semantics in csrc/ops.cpp): the
// partial statistics of one slice of every row's classes, and the slice's gradient given the
// row's global normaliser.  Rows in parallel.  float32 / float16 / bfloat16 rows (and float64
// rows without softcap, for the statistics) take the vectorised row sweeps of the forward op
// (vec_rows.h: one exp per element, sums relative to a reference at most 64 below the max);
// the rest is the shared row math (xent_row.h) element by element, relative to the running max.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

#include "../xent_row.h"
#include "buffer_cache.h"
#include "cpu_isa.h"

namespace xent {
namespace {

// Columns of vocab_stats' result (the Python combine reads them by these positions).
enum StatsCol : int64_t { kMax, kSum, kYt, kWt, kHit, kDot, kMass, kStatsCols };

void check_slice_args(const at::Tensor& logits, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be (N, V_local), got ", logits.dim(),
              " dimensions");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op,
              ": target must be (N,) with N = ", logits.size(0));
  TORCH_CHECK(!target.is_floating_point(), op, ": target must hold class indices");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1), op,
                ": weight must hold the ", logits.size(1), " local classes, got ", weight->numel());
  }
}

// The weight as a contiguous vector in the accumulation type (undefined when absent).
at::Tensor acc_weight(const std::optional<at::Tensor>& weight, at::ScalarType acc) {
  return weight.has_value() ? weight->to(acc).contiguous() : at::Tensor();
}

template <typename scalar_t>
constexpr xent_cpu::Dtype vec_dtype() {
  if constexpr (std::is_same_v<scalar_t, at::Half>) return xent_cpu::Dtype::f16;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) return xent_cpu::Dtype::bf16;
  if constexpr (std::is_same_v<scalar_t, double>) return xent_cpu::Dtype::f64;
  return xent_cpu::Dtype::f32;
}

inline int64_t grain_for(int64_t v) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(v, 1));
}

// One row's max (or reference) / sum and smoothing sums: the vector sweep where there is one.
template <typename scalar_t, typename acc>
void row_stats(const xent_cpu::VecKernels& k, const scalar_t* row, int64_t V, const acc* wp,
               bool smooth, const RowOptionsT<acc>& oa, MaxSum<acc>& ms, DotAcc<acc>& d) {
  if (V == 0) return;  // an empty slice: -inf / 0
  if constexpr (!std::is_same_v<acc, double>) {
    const xent_cpu::VecTransform tr{oa.logit_scale, oa.softcap > 0 ? oa.softcap : 0.f};
    const xent_cpu::RowStats rs = k.stats(row, vec_dtype<scalar_t>(), V, tr, wp, smooth, nullptr);
    ms = {rs.max, rs.sum};
    d = {rs.dot, rs.w_sum};
    return;
  } else {
    if (!(oa.softcap > 0)) {
      const xent_cpu::RowStatsD rs = k.stats_f64(row, V, oa.logit_scale, wp, smooth, nullptr);
      ms = {rs.max, rs.sum};
      d = {rs.dot, rs.w_sum};
      return;
    }
    for (int64_t j = 0; j < V; ++j) {
      ms_dot_push(ms, d, transform_logit(static_cast<acc>(row[j]), oa), wp ? wp[j] : acc(1));
    }
  }
}

// One row's gradient given its coefficients (a row whose log-probabilities are not NaN).
template <typename scalar_t, typename acc>
void row_grad(const xent_cpu::VecKernels& k, const scalar_t* row, scalar_t* grow, int64_t V,
              int64_t tl, acc ref, acc a, acc b, acc hot, const acc* wp,
              const RowOptionsT<acc>& oa) {
  if constexpr (!std::is_same_v<acc, double>) {
    const bool has_t = tl >= 0 && tl < V;
    const acc x_t = has_t ? static_cast<acc>(row[tl]) : acc(0);  // read before written
    const xent_cpu::VecTransform tr{oa.logit_scale, oa.softcap > 0 ? oa.softcap : 0.f};
    k.grad(row, grow, vec_dtype<scalar_t>(), V, tr, ref, a, b, wp);
    if (has_t) {
      grow[tl] =
          static_cast<scalar_t>(grad_element(x_t, ref, a, b * (wp ? wp[tl] : acc(1)) + hot, oa));
    }
  } else {
    for (int64_t j = 0; j < V; ++j) {
      const acc c = b * (wp ? wp[j] : acc(1)) + (j == tl ? hot : acc(0));
      grow[j] = static_cast<scalar_t>(grad_element(static_cast<acc>(row[j]), ref, a, c, oa));
    }
  }
}

at::Tensor vocab_stats_cpu(const at::Tensor& logits_, const at::Tensor& target_,
                           const std::optional<at::Tensor>& weight, int64_t vocab_start,
                           int64_t ignore_index, double label_smoothing, double logit_scale,
                           double softcap) {
  check_slice_args(logits_, target_, weight, "vocab_stats");
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor target = target_.to(at::kLong).contiguous();
  const bool is_double = logits.scalar_type() == at::kDouble;
  const at::ScalarType acc_type = is_double ? at::kDouble : at::kFloat;
  const at::Tensor w = acc_weight(weight, acc_type);
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor out = at::zeros({N, kStatsCols}, logits.options().dtype(acc_type));
  const RowOptions o{V, ignore_index, label_smoothing, logit_scale, softcap, 0.0};
  const bool smooth = label_smoothing > 0.0;
  const xent_cpu::VecKernels& k = xent_cpu::active_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "vocab_stats", [&] {
        using acc = acc_t<scalar_t>;
        const RowOptionsT<acc> oa = options_as<acc>(o);
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        const int64_t* t = target.const_data_ptr<int64_t>();
        const acc* wp = w.defined() ? w.const_data_ptr<acc>() : nullptr;
        acc* res = out.mutable_data_ptr<acc>();
        at::parallel_for(0, N, grain_for(V), [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            const scalar_t* row = x + n * V;  // 64-bit offsets
            MaxSum<acc> ms = ms_empty<acc>();
            DotAcc<acc> d = dot_empty<acc>();
            row_stats(k, row, V, wp, smooth, oa, ms, d);
            acc* r = res + n * kStatsCols;
            r[kMax] = ms.max;
            r[kSum] = ms.sum;
            const int64_t tl = t[n] - vocab_start;
            if (t[n] != ignore_index && tl >= 0 && tl < V) {
              r[kYt] = transform_logit(static_cast<acc>(row[tl]), oa);
              r[kWt] = wp ? wp[tl] : acc(1);
              r[kHit] = acc(1);
            }
            if (smooth) {
              r[kDot] = d.dot;
              r[kMass] = d.mass;
            }
          }
        });
      });
  return out;
}

// dx_j = (a exp(y_j - ref) - b w_j - hot [j == t]) T'(x_j), written into out (which may be the
// logits themselves: each element is read before it is written).
void vocab_grad_into(const at::Tensor& logits, const at::Tensor& target_,
                     const std::optional<at::Tensor>& weight, int64_t vocab_start,
                     const at::Tensor& coef_, double logit_scale, double softcap, at::Tensor& out) {
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(coef_.dim() == 2 && coef_.size(0) == N && coef_.size(1) == 4,
              "vocab_grad: coef must be (N, 4) = [ref, a, b, hot], got ", coef_.sizes());
  const bool is_double = logits.scalar_type() == at::kDouble;
  const at::ScalarType acc_type = is_double ? at::kDouble : at::kFloat;
  const at::Tensor coef = coef_.to(acc_type).contiguous();
  const at::Tensor target = target_.to(at::kLong).contiguous();
  const at::Tensor w = acc_weight(weight, acc_type);
  const RowOptions o{V, 0, 0.0, logit_scale, softcap, 0.0};
  const xent_cpu::VecKernels& k = xent_cpu::active_kernels();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "vocab_grad", [&] {
        using acc = acc_t<scalar_t>;
        const RowOptionsT<acc> oa = options_as<acc>(o);
        const scalar_t* x = logits.const_data_ptr<scalar_t>();
        scalar_t* g = out.mutable_data_ptr<scalar_t>();
        const int64_t* t = target.const_data_ptr<int64_t>();
        const acc* wp = w.defined() ? w.const_data_ptr<acc>() : nullptr;
        const acc* cf = coef.const_data_ptr<acc>();
        at::parallel_for(0, N, grain_for(V), [&](int64_t begin, int64_t end) {
          for (int64_t n = begin; n < end; ++n) {
            const acc ref = cf[n * 4], a = cf[n * 4 + 1], b = cf[n * 4 + 2], hot = cf[n * 4 + 3];
            const int64_t tl = t[n] - vocab_start;  // hot is 0 for ignored rows
            const scalar_t* row = x + n * V;
            scalar_t* grow = g + n * V;
            if (!(ref > neg_inf<acc>()) || a != a) {
              // The row's log-probabilities are NaN (a NaN or +inf logit, or only -inf ones):
              // NaN throughout, as torch, whatever a vector exp makes of exp(NaN).
              std::fill_n(grow, V, static_cast<scalar_t>(std::numeric_limits<acc>::quiet_NaN()));
              continue;
            }
            row_grad(k, row, grow, V, tl, ref, a, b, hot, wp, oa);
          }
        });
      });
}

at::Tensor vocab_grad_cpu(const at::Tensor& logits_, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, int64_t vocab_start,
                          const at::Tensor& coef, double logit_scale, double softcap) {
  check_slice_args(logits_, target, weight, "vocab_grad");
  const at::Tensor logits = logits_.contiguous();
  // The gradient buffer from the cache of freed ones: fresh pages cost as much as the pass.
  at::Tensor out = xent_cpu::empty_like_cached(logits);
  vocab_grad_into(logits, target, weight, vocab_start, coef, logit_scale, softcap, out);
  return out;
}

void vocab_grad_inplace_cpu(at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, int64_t vocab_start,
                            const at::Tensor& coef, double logit_scale, double softcap) {
  check_slice_args(logits, target, weight, "vocab_grad_");
  if (logits.is_contiguous()) {
    vocab_grad_into(logits, target, weight, vocab_start, coef, logit_scale, softcap, logits);
  } else {
    logits.copy_(vocab_grad_cpu(logits, target, weight, vocab_start, coef, logit_scale, softcap));
  }
}

}  // namespace
}  // namespace xent

TORCH_LIBRARY_IMPL(xent_ext, CPU, m) {
  m.impl("vocab_stats", &xent::vocab_stats_cpu);
  m.impl("vocab_grad", &xent::vocab_grad_cpu);
  m.impl("vocab_grad_", &xent::vocab_grad_inplace_cpu);
}
