// The backend-independent half of the forward op: argument checks, output allocation, the
// 'mean' divisor (computed on the device, never read back on the host) and the final
// reduction.  Each backend supplies only the row kernel.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "xent_row.h"

namespace xent {

// What a row kernel reads and writes.  Every tensor is contiguous.
struct ForwardArgs {
  at::Tensor input;       // (N, C, S): rows are (n, s), classes are strided by S
  at::Tensor target;      // (N, S) int64 class indices, or (N, C, S) probabilities
  at::Tensor weight;      // (C,) in the accumulation dtype, or undefined
  at::Tensor grad_scale;  // 0-dim, accumulation dtype: multiplies the gradient; or undefined
  bool prob_target = false;
  RowOptions opt{};
  at::Tensor loss_rows;  // (N, S) accumulation dtype: unreduced, weighted loss
  at::Tensor lse;        // (N, S) accumulation dtype
  at::Tensor grad;       // (N, C, S) input dtype, or undefined when no gradient is wanted
};

using RowKernel = void (*)(ForwardArgs&);

// Reduction codes, as at::Reduction.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// How the gradient is produced.
enum class GradMode { kNone, kNewBuffer, kIntoInput };

// Returns (loss reduced and rounded to the input dtype, lse (N, S), grad (N, C, S) or an empty
// tensor).  The gradient is that of the reduced loss for an incoming gradient of 1; with
// kIntoInput it overwrites the (contiguous) input, which is then also what is returned.
// Kernels must read every logit of a row they need before writing its gradient element.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, double z_loss, GradMode grad_mode, RowKernel kernel);

// The two operators as a backend registers them, for its row kernel.  (The kernel guards its
// device itself; the at:: operations before it follow their tensors' devices.)
template <RowKernel kKernel>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_op(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, double z_loss, bool compute_grad) {
  return cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing,
                               logit_scale, softcap, z_loss,
                               compute_grad ? GradMode::kNewBuffer : GradMode::kNone, kKernel);
}

template <RowKernel kKernel>
std::tuple<at::Tensor, at::Tensor> forward_inplace_op(at::Tensor& input, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight,
                                                      int64_t reduction, int64_t ignore_index,
                                                      double label_smoothing, double logit_scale,
                                                      double softcap, double z_loss) {
  auto [loss, lse, grad] =
      cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing,
                            logit_scale, softcap, z_loss, GradMode::kIntoInput, kKernel);
  return {loss, lse};
}

// Multiplies grad (N, C, S) in place by scale (one value, or one per row (N, S)).  Rows whose
// scale is exactly 1 are not touched: the common `loss.backward()` costs nothing.
void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& scale);

}  // namespace xent
