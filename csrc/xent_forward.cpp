#include "xent_forward.h"

#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>

#include "cpu/buffer_cache.h"

namespace xent {
namespace {

void check_args(const at::Tensor& input, const at::Tensor& target,
                const std::optional<at::Tensor>& weight, int64_t reduction, double label_smoothing,
                double softcap, double z_loss) {
  TORCH_CHECK(input.dim() == 3, "cross_entropy_fwd: input must be (N, C, S), got ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "cross_entropy_fwd: input must be floating point, got ", input.scalar_type());
  const bool prob = target.is_floating_point();
  if (prob) {
    TORCH_CHECK(target.sizes() == input.sizes(),
                "cross_entropy_fwd: probability target must have the input's shape ", input.sizes(),
                ", got ", target.sizes());
    TORCH_CHECK(target.scalar_type() == input.scalar_type(),
                "cross_entropy_fwd: probability target must have the input's dtype");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong,
                "cross_entropy_fwd: class-index target must be int64, got ", target.scalar_type());
    TORCH_CHECK(
        target.dim() == 2 && target.size(0) == input.size(0) && target.size(1) == input.size(2),
        "cross_entropy_fwd: class-index target must be (N, S) = (", input.size(0), ", ",
        input.size(2), "), got ", target.sizes());
  }
  TORCH_CHECK(target.device() == input.device(), "cross_entropy_fwd: target is on ",
              target.device(), " but input is on ", input.device());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == input.size(1),
                "cross_entropy_fwd: weight must be (C,) = (", input.size(1), ",), got ",
                weight->sizes());
    TORCH_CHECK(weight->device() == input.device(), "cross_entropy_fwd: weight is on ",
                weight->device(), " but input is on ", input.device());
    TORCH_CHECK(weight->is_floating_point(), "cross_entropy_fwd: weight must be floating");
  }
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "cross_entropy_fwd: unknown reduction code ", reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "cross_entropy_fwd: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(softcap >= 0.0, "cross_entropy_fwd: softcap must be >= 0 (0: off), got ", softcap);
  TORCH_CHECK(z_loss >= 0.0, "cross_entropy_fwd: z_loss must be >= 0, got ", z_loss);
}

// Sum of the target weights over the rows that are not ignored: the 'mean' divisor of
// class-index targets.  Out-of-range targets are clamped here only so that this helper never
// indexes out of bounds; the row kernel reports them.
at::Tensor index_total_weight(const at::Tensor& target, const at::Tensor& weight,
                              int64_t ignore_index, int64_t num_classes, at::ScalarType acc) {
  const at::Tensor valid = target.ne(ignore_index);
  if (!weight.defined()) return valid.sum(acc);
  const at::Tensor safe = target.clamp(0, std::max<int64_t>(num_classes - 1, 0)).reshape(-1);
  const at::Tensor wt = weight.index_select(0, safe).view_as(target);
  return at::where(valid, wt, at::zeros({}, wt.options())).sum(acc);
}

// CPU tensors: the 'mean' divisor and the reductions as plain loops.  Each ATen operation
// costs microseconds of dispatch and allocation, and the five of them (ne, sum, reciprocal,
// sum, div) cost more than the whole kernel for a small batch; on the CPU nothing needs to
// stay on a device, so the host computes them (in double, then rounded once).
double host_total_weight(const ForwardArgs& a, int64_t ignore_index, int64_t C) {
  const int64_t* t = a.target.const_data_ptr<int64_t>();
  const int64_t n = a.target.numel();
  double total = 0.0;
  if (!a.weight.defined()) {
    for (int64_t i = 0; i < n; ++i) total += t[i] != ignore_index ? 1.0 : 0.0;
    return total;
  }
  AT_DISPATCH_FLOATING_TYPES(a.weight.scalar_type(), "xent_total_weight", [&] {
    const scalar_t* w = a.weight.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (t[i] == ignore_index) continue;
      // Out-of-range targets are clamped only so that this never reads out of bounds; the
      // row kernel reports them.
      const int64_t c = std::min<int64_t>(std::max<int64_t>(t[i], 0), std::max<int64_t>(C - 1, 0));
      total += C > 0 ? static_cast<double>(w[c]) : 0.0;
    }
  });
  return total;
}

double host_sum(const at::Tensor& rows) {
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "xent_loss_sum", [&] {
    const scalar_t* r = rows.const_data_ptr<scalar_t>();
    const int64_t n = rows.numel();
    for (int64_t i = 0; i < n; ++i) total += static_cast<double>(r[i]);
  });
  return total;
}

// A 0-dim tensor of `dtype` holding v, rounded first to the accumulation dtype `acc` (the
// precision the loss is kept in), then once to `dtype`.
at::Tensor host_scalar(double v, at::ScalarType acc, const at::TensorOptions& opts) {
  at::Tensor out = at::empty({}, opts);
  const double kept = acc == at::kDouble ? v : static_cast<double>(static_cast<float>(v));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "xent_scalar", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      *out.mutable_data_ptr<scalar_t>() = kept;
    } else {
      *out.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(static_cast<float>(kept));
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
    const at::Tensor& input_, const at::Tensor& target_, const std::optional<at::Tensor>& weight_,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, double z_loss, GradMode grad_mode, RowKernel kernel) {
  const bool compute_grad = grad_mode != GradMode::kNone;
  check_args(input_, target_, weight_, reduction, label_smoothing, softcap, z_loss);
  const at::ScalarType acc = input_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = input_.size(0), C = input_.size(1), S = input_.size(2);

  if (grad_mode == GradMode::kIntoInput) {
    TORCH_CHECK(input_.is_contiguous(),
                "cross_entropy_fwd_inplace_: the logits must be contiguous to receive their "
                "gradient in place");
  }
  ForwardArgs a;
  a.input = input_.contiguous();
  a.target = target_.contiguous();
  a.prob_target = target_.is_floating_point();
  if (weight_.has_value()) a.weight = weight_->to(acc).contiguous();
  a.opt.num_classes = C;
  a.opt.ignore_index = ignore_index;
  a.opt.label_smoothing = label_smoothing;
  a.opt.logit_scale = logit_scale;
  a.opt.softcap = softcap;
  a.opt.z_loss = z_loss;

  const auto acc_opts = a.input.options().dtype(acc);
  a.loss_rows = at::empty({N, S}, acc_opts);
  a.lse = at::empty({N, S}, acc_opts);

  const bool host = a.input.is_cpu();
  double host_divisor = 0.0;
  at::Tensor divisor;  // 'mean' only
  if (reduction == kMean && host) {
    host_divisor =
        a.prob_target ? static_cast<double>(N * S) : host_total_weight(a, ignore_index, C);
    if (compute_grad) a.grad_scale = host_scalar(1.0 / host_divisor, acc, acc_opts);
  } else if (reduction == kMean) {
    divisor = a.prob_target ? at::full({}, static_cast<double>(N * S), acc_opts)
                            : index_total_weight(a.target, a.weight, ignore_index, C, acc);
    if (compute_grad) a.grad_scale = divisor.reciprocal();
  }
  if (grad_mode == GradMode::kIntoInput) {
    a.grad = a.input;
  } else if (compute_grad) {
    a.grad = a.input.is_cpu() ? xent_cpu::empty_like_cached(a.input)
                              : at::empty_like(a.input, at::MemoryFormat::Contiguous);
  }

  if (N * S > 0) kernel(a);

  at::Tensor out;
  if (reduction == kNone) {
    out = a.loss_rows.to(input_.scalar_type());
  } else if (host) {
    // 0 / 0 = NaN when every target is ignored or there are no rows, as in torch.
    const double sum = host_sum(a.loss_rows);
    out = host_scalar(reduction == kSum ? sum : sum / host_divisor, acc,
                      a.input.options().dtype(input_.scalar_type()));
  } else if (reduction == kSum) {
    out = a.loss_rows.sum().to(input_.scalar_type());
  } else {  // 0 / 0 = NaN, as above
    out = a.loss_rows.sum().div(divisor).to(input_.scalar_type());
  }
  at::Tensor grad = compute_grad ? a.grad : at::empty({0}, a.input.options());
  return {out, a.lse, grad};
}

void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous(),
              "scale_grad_: grad must be a contiguous (N, C, S) tensor");
  TORCH_CHECK(scale.device() == grad.device(), "scale_grad_: scale is on ", scale.device(),
              " but grad is on ", grad.device());
  TORCH_CHECK(scale.numel() == 1 || scale.numel() == grad.size(0) * grad.size(2),
              "scale_grad_: scale must hold 1 or N*S values, got ", scale.numel());
}

}  // namespace xent
