// The CUDA forward, kernels included, built for the host against the emulation runtime: a
// Python module whose `forward` takes CPU tensors and runs xent_cuda_forward.h (the plan, the
// launches) and xent_kernels.cuh (the kernels) exactly as the CUDA build does, with a device
// description chosen by the caller.  Built on the fly by tests/test_cuda_static.py.
#define XENT_CUDA_EMULATION 1

#include <torch/extension.h>

#include <map>
#include <string>
#include <tuple>

#include "../../xent_forward.h"
#include "../xent_cuda_forward.h"

namespace {

struct EmuConfig {
  xent::cuda::DeviceProps dev{132, 227 * 1024, 228 * 1024};
  xent::cuda::Regime force = xent::cuda::Regime::kAuto;
  std::string plan;  // what the last call ran
};

EmuConfig& config() {
  static EmuConfig c;
  return c;
}

std::string plan_text(const xent::cuda::Plan& p) {
  return std::string(xent::cuda::regime_name(p.regime)) + " vec=" + std::to_string(p.vec) +
         " group=" + std::to_string(p.group) + " nv=" + std::to_string(p.nv) +
         " splits=" + std::to_string(p.splits) + " cache_items=" + std::to_string(p.cache_items) +
         " items_per_thread=" + std::to_string(p.items_per_thread) +
         " cluster=" + std::to_string(p.cluster) + (p.aligned ? " aligned" : "") +
         (p.plain ? " plain" : "");
}

void emu_kernel(xent::ForwardArgs& a) {
  EmuConfig& c = config();
  xent_emu::Launcher launch{c.dev.smem_optin - 1024, {}};
  xent_emu::rt().asserts = 0;
  const xent::cuda::Plan p = xent::cuda::run_forward(a, c.dev, c.force, launch);
  c.plan = plan_text(p);
  if (p.transposed) c.plan += " transposed";
  for (const std::string& l : launch.launched) c.plan += " [" + l + "]";
  if (xent_emu::rt().asserts > 0) {
    TORCH_CHECK(false, "device-side assert triggered (emulated): ", xent_emu::rt().first_assert);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::string> forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, double z_loss, bool compute_grad, const std::string& regime, int64_t sms,
    int64_t smem_optin, int64_t smem_per_sm, int64_t max_cluster, bool inplace) {
  TORCH_CHECK(input.device().is_cpu(), "the emulation runs on CPU tensors");
  EmuConfig& c = config();
  c.dev = xent::cuda::DeviceProps{static_cast<int>(sms), smem_optin, smem_per_sm,
                                  static_cast<int>(max_cluster)};
  c.force = xent::cuda::regime_from_name(regime.c_str());
  c.plan = "none";
  const xent::GradMode mode = !compute_grad ? xent::GradMode::kNone
                              : inplace     ? xent::GradMode::kIntoInput
                                            : xent::GradMode::kNewBuffer;
  auto [loss, lse, grad] =
      xent::cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing,
                                  logit_scale, softcap, z_loss, mode, &emu_kernel);
  return std::make_tuple(loss, lse, grad, c.plan);
}

// scale_grad_ (the backward) on CPU tensors through the emulated kernel; returns the plan.
std::string scale_grad(at::Tensor grad, const at::Tensor& scale, int64_t sms) {
  TORCH_CHECK(grad.device().is_cpu() && scale.device().is_cpu(), "CPU tensors");
  xent_emu::Launcher launch{0, {}};
  xent::cuda::run_scale_grad(grad, scale, xent::cuda::DeviceProps{static_cast<int>(sms), 0, 0},
                             launch);
  std::string plan = "scale_grad";
  for (const std::string& l : launch.launched) plan += " [" + l + "]";
  return plan;
}

}  // namespace

// The plan the CUDA backend would make for a call, without running anything: for the static
// performance model (tests/test_cuda_model.py).
std::map<std::string, int64_t> plan(int64_t rows, int64_t C, int64_t S, int64_t elem, bool vec_ok,
                                    bool aligned, bool prob, bool grad, bool plain, int64_t sms,
                                    int64_t smem_optin, int64_t smem_per_sm, int64_t max_cluster,
                                    const std::string& regime) {
  const xent::cuda::DeviceProps dev{static_cast<int>(sms), smem_optin, smem_per_sm,
                                    static_cast<int>(max_cluster)};
  const xent::cuda::PlanInput in{rows, C,    S,    static_cast<int>(elem), vec_ok, aligned,
                                 prob, grad, plain};
  const xent::cuda::Plan p =
      xent::cuda::plan_forward(in, dev, xent::cuda::regime_from_name(regime.c_str()));
  return {{"regime", static_cast<int64_t>(p.regime)},
          {"vec", p.vec},
          {"group", p.group},
          {"nv", p.nv},
          {"items_per_thread", p.items_per_thread},
          {"cluster", p.cluster},
          {"threads", p.threads},
          {"blocks", p.blocks},
          {"grid_y", p.grid_y},
          {"cache_items", p.cache_items},
          {"smem", p.smem},
          {"splits", p.splits},
          {"slice_items", p.slice_items},
          {"aligned", p.aligned ? 1 : 0},
          {"plain", p.plain ? 1 : 0},
          {"transposed", p.transposed ? 1 : 0}};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("plan", &plan, "plan_forward for a shape on a described device; returns the plan fields");
  m.def("regime_name", [](int64_t r) {
    return std::string(xent::cuda::regime_name(static_cast<xent::cuda::Regime>(r)));
  });
  m.def("forward", &forward,
        "cross_entropy_fwd on CPU tensors through the CUDA kernels, emulated; returns (loss, lse, "
        "grad, plan)");
  m.def("scale_grad", &scale_grad, "scale_grad_ on CPU tensors through the emulated kernel");
}
