// CPU kernels of the vocab-parallel operators (schemas and semantics in csrc/ops.cpp): the
// partial statistics of one slice of every row's classes, and the slice's gradient given the
// row's global normaliser.  Rows in parallel; each row is the shared row math (xent_row.h)
// applied element by element, so every sum stays relative to the slice's running max.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../xent_row.h"

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

inline int64_t grain_for(int64_t v) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(v, 1));
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
            if (smooth) {
              for (int64_t j = 0; j < V; ++j) {
                ms_dot_push(ms, d, transform_logit(static_cast<acc>(row[j]), oa),
                            wp ? wp[j] : acc(1));
              }
            } else {
              for (int64_t j = 0; j < V; ++j)
                ms = ms_push(ms, transform_logit(static_cast<acc>(row[j]), oa));
            }
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
            for (int64_t j = 0; j < V; ++j) {
              const acc c = b * (wp ? wp[j] : acc(1)) + (j == tl ? hot : acc(0));
              grow[j] =
                  static_cast<scalar_t>(grad_element(static_cast<acc>(row[j]), ref, a, c, oa));
            }
          }
        });
      });
}

at::Tensor vocab_grad_cpu(const at::Tensor& logits_, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, int64_t vocab_start,
                          const at::Tensor& coef, double logit_scale, double softcap) {
  check_slice_args(logits_, target, weight, "vocab_grad");
  const at::Tensor logits = logits_.contiguous();
  at::Tensor out = at::empty_like(logits, at::MemoryFormat::Contiguous);
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
