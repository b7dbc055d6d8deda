// CUDA backend of the forward op and of scale_grad_.
//
// The kernels and the plan that picks one (group / block / split / strided regimes) live in
// xent_kernels.cuh; xent_cuda_forward.h turns ForwardArgs into kernel arguments.  This file
// launches them on the current stream; the row kernels themselves are compiled per dtype in
// xent_kernels_<dtype>.cu (xent_cuda_launcher.h).
//
// XENT_CUDA_REGIME (environment, read at each call) forces a regime for tests and benchmarks:
// group, regs, block, block_scalar, split, strided (K-dim inputs stay strided, not tiled or
// transposed) or auto (the default); a regime that cannot run the shape falls back to the
// automatic choice.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>

#include "../xent_forward.h"
#include "xent_cuda_forward.h"
#include "xent_cuda_launcher.h"
#include "xent_kernels.cuh"

namespace xent {
namespace {

using cuda::DeviceProps;

// Queried once per device (three attribute reads would otherwise be part of every call).
DeviceProps device_props(int device) {
  static std::mutex mu;
  static std::map<int, DeviceProps> known;
  const std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(device);
  if (it != known.end()) return it->second;
  DeviceProps d{};
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  d.sms = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.smem_optin = v;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  d.smem_per_sm = v;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  // Thread-block clusters from sm_90: up to 16 blocks with the non-portable size attribute on
  // sm_90 / sm_100 (8 portable elsewhere).
  d.max_cluster = major < 9 ? 1 : (major == 9 || major == 10) ? 16 : 8;
  known.emplace(device, d);
  return d;
}

}  // namespace

namespace cuda {
void allow_large_clusters(const void* kernel) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> allowed;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  bool& done = allowed[{kernel, device}];
  if (done) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  done = true;
}

void allow_dynamic_smem(const void* kernel, int64_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const std::lock_guard<std::mutex> lock(mu);
  int64_t& have = allowed[{kernel, device}];
  if (have >= bytes) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  have = bytes;
}
}  // namespace cuda

namespace {

using cuda::CudaLauncher;

void forward_cuda_kernel(ForwardArgs& a) {
  const c10::cuda::CUDAGuard guard(a.input.device());
  CudaLauncher launch{c10::cuda::getCurrentCUDAStream()};
  const DeviceProps dev = device_props(a.input.get_device());
  cuda::run_forward(a, dev, cuda::regime_from_name(std::getenv("XENT_CUDA_REGIME")), launch);
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(grad.device());
  CudaLauncher launch{c10::cuda::getCurrentCUDAStream()};
  cuda::run_scale_grad(grad, scale, device_props(grad.get_device()), launch);
}

}  // namespace
}  // namespace xent

TORCH_LIBRARY_IMPL(xent_ext, CUDA, m) {
  m.impl("cross_entropy_fwd", &xent::forward_op<&xent::forward_cuda_kernel>);
  m.impl("cross_entropy_fwd_inplace_", &xent::forward_inplace_op<&xent::forward_cuda_kernel>);
  m.impl("scale_grad_", &xent::scale_grad_cuda);
}
