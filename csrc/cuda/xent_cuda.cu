// CUDA backend of the forward op and of scale_grad_.
//
// The kernels and the plan that picks one (group / block / split / strided regimes) live in
// xent_kernels.cuh; xent_cuda_forward.h turns ForwardArgs into kernel arguments.  This file
// launches them on the current stream.
//
// XENT_CUDA_REGIME (environment, read at each call) forces a regime for tests and benchmarks:
// group, block, block_scalar, split or auto (the default); a regime that cannot run the shape
// falls back to the automatic choice.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>

#include "../xent_forward.h"
#include "xent_cuda_forward.h"
#include "xent_kernels.cuh"

namespace xent {
namespace {

using cuda::DeviceProps;

DeviceProps device_props(int device) {
  DeviceProps d{};
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  d.sms = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.smem_optin = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  d.smem_per_sm = v;
  return d;
}

struct CudaLauncher {
  cudaStream_t stream;
  template <typename Arg>
  void operator()(void (*kernel)(Arg), dim3 grid, dim3 block, int64_t smem, const Arg& arg) {
    if (smem > 48 * 1024) {
      // Above 48 KiB a kernel must opt in to dynamic shared memory (a host-side attribute, no
      // stream operation).
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<grid, block, static_cast<size_t>(smem), stream>>>(arg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void forward_cuda_kernel(ForwardArgs& a) {
  const c10::cuda::CUDAGuard guard(a.input.device());
  CudaLauncher launch{c10::cuda::getCurrentCUDAStream()};
  const DeviceProps dev = device_props(a.input.get_device());
  cuda::run_forward(a, dev, cuda::regime_from_name(std::getenv("XENT_CUDA_REGIME")), launch);
}

int64_t grid_for(int64_t work, int threads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t resident = static_cast<int64_t>(sms) * (2048 / threads) * 4;
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, resident));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, double z_loss, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_forward(input, target, weight, reduction, ignore_index, label_smoothing,
                               logit_scale, softcap, z_loss, compute_grad, &forward_cuda_kernel);
}

// grad *= scale; a block whose scale is exactly 1 returns at once, so the usual backward of a
// 'mean' or 'sum' loss costs one tiny launch and no memory traffic.
template <typename scalar_t>
__global__ void scale_grad_kernel(scalar_t* g, const acc_t<scalar_t>* scale, bool per_row,
                                  int64_t numel, int64_t C, int64_t S) {
  using acc = acc_t<scalar_t>;
  if (!per_row && scale[0] == acc(1)) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc f = per_row ? scale[(i / (C * S)) * S + i % S] : scale[0];
    if (f != acc(1)) g[i] = static_cast<scalar_t>(acc(g[i]) * f);
  }
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_grad_args(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  if (grad.numel() == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
        using acc = acc_t<scalar_t>;
        const at::Tensor sc = scale.to(c10::CppTypeToScalarType<acc>::value).contiguous();
        constexpr int kThreads = 256;
        const int64_t blocks = grid_for(grad.numel(), kThreads);
        scale_grad_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
            grad.mutable_data_ptr<scalar_t>(), sc.const_data_ptr<acc>(), sc.numel() != 1,
            grad.numel(), grad.size(1), grad.size(2));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace
}  // namespace xent

TORCH_LIBRARY_IMPL(xent_ext, CUDA, m) {
  m.impl("cross_entropy_fwd", &xent::forward_cuda);
  m.impl("scale_grad_", &xent::scale_grad_cuda);
}
