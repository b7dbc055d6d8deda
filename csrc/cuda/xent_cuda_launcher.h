// The CUDA launcher of the kernels (xent_kernels.cuh) and where their instantiations live.
//
// The row kernels of each input dtype are instantiated in a translation unit of their own
// (xent_kernels_<dtype>.cu), so that the build compiles them in parallel; xent_cuda.cu sees
// launch_plan only through the extern declarations below.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "xent_kernels.cuh"

namespace xent {
namespace cuda {

// Above 48 KiB a kernel must opt in to dynamic shared memory: a host-side attribute of the
// kernel on the current device (no stream operation).  Set once per kernel, device and size.
void allow_dynamic_smem(const void* kernel, int64_t bytes);

// More than 8 blocks in a cluster needs the kernel's non-portable-cluster attribute (sm_90).
void allow_large_clusters(const void* kernel);

// Launches on the stream, with a cluster of `cluster` blocks along x when cluster > 1 (the grid
// is then a whole number of clusters), and checks the launch.
struct CudaLauncher {
  cudaStream_t stream;
  template <typename Arg>
  void operator()(void (*kernel)(Arg), dim3 grid, dim3 block, int64_t smem, const Arg& arg,
                  unsigned cluster = 1) {
    if (smem > 48 * 1024) allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem);
    if (cluster <= 1) {
      kernel<<<grid, block, static_cast<size_t>(smem), stream>>>(arg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (cluster > 8) allow_large_clusters(reinterpret_cast<const void*>(kernel));
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = static_cast<size_t>(smem);
    config.stream = stream;
    cudaLaunchAttribute attr{};
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster;
    attr.val.clusterDim.y = 1;
    attr.val.clusterDim.z = 1;
    config.attrs = &attr;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, arg));
  }
};

#define XENT_LAUNCH_PLAN(T, PROB) \
  void launch_plan<T, PROB, CudaLauncher>(const KernelArgs<T>&, const Plan&, CudaLauncher&)
#define XENT_LAUNCH_PLANS(DECL, T)          \
  DECL template XENT_LAUNCH_PLAN(T, false); \
  DECL template XENT_LAUNCH_PLAN(T, true)

XENT_LAUNCH_PLANS(extern, float);
XENT_LAUNCH_PLANS(extern, double);
XENT_LAUNCH_PLANS(extern, c10::Half);
XENT_LAUNCH_PLANS(extern, c10::BFloat16);

}  // namespace cuda
}  // namespace xent
