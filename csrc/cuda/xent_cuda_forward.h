// The host half of the CUDA forward: kernel arguments from ForwardArgs, the plan, the split
// regime's workspace, and the launches.  Templated on the launcher so that the CPU emulation
// (emu/) runs exactly this code with the kernels executed on the host.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>

#include "../xent_forward.h"
#include "xent_kernels.cuh"

namespace xent {
namespace cuda {

inline uintptr_t offset16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16;
}

// Runs the row kernels for `a` on `launch`; returns the plan it used.
template <typename Launcher>
Plan run_rows(ForwardArgs& a, const DeviceProps& dev, Regime force, Launcher& launch) {
  // Sum of the class weights on the device (no host synchronisation).
  const at::Tensor w_sum = a.weight.defined() ? a.weight.sum() : at::Tensor();
  Plan plan;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.input.scalar_type(), "xent_forward_cuda", [&] {
        using acc = acc_t<scalar_t>;
        KernelArgs<scalar_t> k{};
        k.x = a.input.const_data_ptr<scalar_t>();
        k.t_index = a.prob_target ? nullptr : a.target.const_data_ptr<int64_t>();
        k.t_prob = a.prob_target ? a.target.const_data_ptr<scalar_t>() : nullptr;
        k.w = a.weight.defined() ? a.weight.const_data_ptr<acc>() : nullptr;
        k.w_sum = w_sum.defined() ? w_sum.const_data_ptr<acc>() : nullptr;
        k.grad_scale = a.grad_scale.defined() ? a.grad_scale.const_data_ptr<acc>() : nullptr;
        k.g = a.grad.defined() ? a.grad.mutable_data_ptr<scalar_t>() : nullptr;
        k.loss = a.loss_rows.mutable_data_ptr<acc>();
        k.lse = a.lse.mutable_data_ptr<acc>();
        k.rows = a.input.size(0) * a.input.size(2);
        k.S = a.input.size(2);
        k.opt = a.opt;
        k.em = make_elem_math<acc>(a.opt);
        k.smooth = a.opt.label_smoothing > 0.f;

        const uintptr_t off = offset16(k.x);
        PlanInput in{};
        in.rows = k.rows;
        in.C = k.opt.num_classes;
        in.S = k.S;
        in.elem = sizeof(scalar_t);
        in.vec_ok = (k.g == nullptr || offset16(k.g) == off) &&
                    (k.t_prob == nullptr || offset16(k.t_prob) == off);
        in.aligned = in.vec_ok && off == 0 && (in.C * in.elem) % 16 == 0;
        in.prob = a.prob_target;
        in.grad = k.g != nullptr;
        in.plain = k.em.kind == Tf::kPlain && !k.smooth;
        plan = plan_forward(in, dev, force);
        k.cache_items = static_cast<int>(plan.cache_items);
        k.splits = static_cast<int>(plan.splits);
        k.slice_items = static_cast<int>(plan.slice_items);
        at::Tensor workspace;
        if (plan.regime == Regime::kSplit) {
          constexpr int64_t per = sizeof(Partial<acc>) / sizeof(acc);
          workspace = at::empty({k.rows * (plan.splits * per + 1)},
                                a.input.options().dtype(a.lse.scalar_type()));
          k.partials = reinterpret_cast<Partial<acc>*>(workspace.mutable_data_ptr<acc>());
          k.row_vals = workspace.mutable_data_ptr<acc>() + k.rows * plan.splits * per;
        }
        if (a.prob_target) {
          launch_plan<scalar_t, true>(k, plan, launch);
        } else {
          launch_plan<scalar_t, false>(k, plan, launch);
        }
      });
  return plan;
}

// The forward's kernels for `a`: K-dim inputs whose tile does not fit the K-dim regime's shared
// memory (and with many classes) through a transposed copy run as contiguous rows (two more
// passes over the logits and two over the gradient), all else directly.  Returns the plan used.
template <typename Launcher>
Plan run_forward(ForwardArgs& a, const DeviceProps& dev, Regime force, Launcher& launch) {
  const int64_t N = a.input.size(0), C = a.input.size(1), S = a.input.size(2);
  const PlanInput in{N * S,
                     C,
                     S,
                     static_cast<int>(a.input.element_size()),
                     true,
                     false,
                     a.prob_target,
                     a.grad.defined(),
                     false};
  if (S == 1 || !plan_forward(in, dev, force).transposed) {
    return run_rows(a, dev, force, launch);
  }
  ForwardArgs b = a;
  b.input = a.input.transpose(1, 2).contiguous().view({N * S, C, 1});
  b.target = a.prob_target ? a.target.transpose(1, 2).contiguous().view({N * S, C, 1})
                           : a.target.view({N * S, 1});
  b.loss_rows = a.loss_rows.view({N * S, 1});
  b.lse = a.lse.view({N * S, 1});
  if (a.grad.defined()) b.grad = at::empty_like(b.input);
  Plan plan = run_rows(b, dev, force, launch);
  if (a.grad.defined()) a.grad.copy_(b.grad.view({N, S, C}).transpose(1, 2));
  plan.transposed = true;
  return plan;
}

// grad (N, C, S) *= scale (one value, or one per row (N, S)); see scale_grad_kernel.
template <typename Launcher>
void run_scale_grad(at::Tensor& grad, const at::Tensor& scale, const DeviceProps& dev,
                    Launcher& launch) {
  check_scale_grad_args(grad, scale);
  if (grad.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
        using acc = acc_t<scalar_t>;
        const at::Tensor sc = scale.to(c10::CppTypeToScalarType<acc>::value).contiguous();
        ScaleArgs<scalar_t> a{grad.mutable_data_ptr<scalar_t>(), sc.const_data_ptr<acc>(),
                              grad.numel(), grad.size(1), grad.size(2)};
        launch_scale_grad(a, sc.numel() != 1, dev, launch);
      });
}

}  // namespace cuda
}  // namespace xent
