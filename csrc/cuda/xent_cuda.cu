// CUDA kernels of the forward op and of scale_grad_.
//
// Regimes:
//  * contiguous rows (S == 1): one block per row (grid-stride over rows).  Each thread keeps an
//    online max / sum-exp over its 16-byte vectors, the block combines the partial statistics
//    (max and sum travel together), then a second sweep writes the gradient; the row was just
//    read, so that sweep mostly hits L2.  Vector loads need a 16-byte aligned base and a row
//    length that keeps every row aligned (C % (16 / sizeof(T)) == 0); otherwise scalar loads.
//  * K-dim inputs (S > 1, classes strided by S): one thread per (n, s) row walking the classes
//    with stride S, so neighbouring threads read neighbouring addresses (coalesced).  It runs
//    xent_row_strided.h, the very code of the CPU scalar path.
// Out-of-range class targets trip a device-side assertion, as in PyTorch, and are never read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

#include "../xent_forward.h"
#include "../xent_row.h"
#include "../xent_row_strided.h"

namespace xent {
namespace {

template <typename scalar_t>
struct KernelArgs {
  const scalar_t* x;
  const int64_t* t_index;  // class-index targets, or nullptr
  const scalar_t* t_prob;  // probability targets, or nullptr
  const acc_t<scalar_t>* w;
  const acc_t<scalar_t>* w_sum;       // device scalar, or nullptr (then C)
  const acc_t<scalar_t>* grad_scale;  // device scalar, or nullptr (then 1)
  scalar_t* g;                        // or nullptr
  acc_t<scalar_t>* loss;
  acc_t<scalar_t>* lse;
  int64_t rows;
  int64_t S;
  RowOptions opt;
};

// Statistics of a slice of a row: max / sum-exp plus two running sums (index targets:
// d0 = sum w_j (y_j - ref); probability targets: d0 = sum c_j, d1 = sum c_j (y_j - ref)).
template <typename acc>
struct Partial {
  MaxSum<acc> ms;
  acc d0;
  acc d1;
};

template <typename acc>
__device__ __forceinline__ Partial<acc> combine(const Partial<acc>& a, const Partial<acc>& b) {
  return {ms_combine(a.ms, b.ms), a.d0 + b.d0, a.d1 + b.d1};
}

template <typename acc>
__device__ __forceinline__ Partial<acc> warp_reduce(Partial<acc> p) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Partial<acc> o;
    o.ms.max = __shfl_xor_sync(0xffffffffu, p.ms.max, off);
    o.ms.sum = __shfl_xor_sync(0xffffffffu, p.ms.sum, off);
    o.d0 = __shfl_xor_sync(0xffffffffu, p.d0, off);
    o.d1 = __shfl_xor_sync(0xffffffffu, p.d1, off);
    p = combine(p, o);
  }
  return p;
}

// Every thread of the block gets the combined statistics.  blockDim.x is a multiple of 32.
template <typename acc>
__device__ Partial<acc> block_reduce(Partial<acc> p) {
  __shared__ Partial<acc> warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  p = warp_reduce(p);
  if (blockDim.x == 32) {
    __syncwarp();  // orders the lanes' earlier reads before any later (in-place) writes
    return p;
  }
  if (lane == 0) warp_part[warp] = p;
  __syncthreads();
  if (warp == 0) {
    const Partial<acc> empty{ms_empty<acc>(), acc(0), acc(0)};
    p = lane < static_cast<int>(blockDim.x >> 5) ? warp_part[lane] : empty;
    p = warp_reduce(p);
    if (lane == 0) warp_part[0] = p;
  }
  __syncthreads();
  const Partial<acc> r = warp_part[0];
  __syncthreads();  // warp_part is reused by the block's next row
  return r;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

__device__ __forceinline__ bool check_target(int64_t t, const RowOptions& o) {
  if (t == o.ignore_index) return false;
  const bool in_range = t >= 0 && t < o.num_classes;
  CUDA_KERNEL_ASSERT(in_range && "Target is out of bounds");
  return in_range;
}

// One block per contiguous row.
template <typename scalar_t, int VEC, bool kProb>
__global__ void __launch_bounds__(1024) rows_kernel(KernelArgs<scalar_t> k) {
  using acc = acc_t<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const RowOptions& o = k.opt;
  const int64_t C = o.num_classes;
  const acc w_sum = k.w_sum ? *k.w_sum : acc(C);
  const acc s = k.grad_scale ? *k.grad_scale : acc(1);
  const bool smooth = o.label_smoothing > 0.f;

  for (int64_t row = blockIdx.x; row < k.rows; row += gridDim.x) {
    const scalar_t* x = k.x + row * C;
    const scalar_t* q = kProb ? k.t_prob + row * C : nullptr;
    int64_t t = -1;
    bool valid = true;
    if (!kProb) {
      t = k.t_index[row];
      valid = check_target(t, o);
    }
    const acc ref = transform_logit(acc(x[0]), o);

    // Sweep 1: online max / sum-exp and the target sums.
    Partial<acc> part{ms_empty<acc>(), acc(0), acc(0)};
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < C;
         i += static_cast<int64_t>(blockDim.x) * VEC) {
      const P xv = *reinterpret_cast<const P*>(x + i);
      P qv;
      if (kProb) qv = *reinterpret_cast<const P*>(q + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc y = transform_logit(acc(xv.v[e]), o);
        part.ms = ms_push(part.ms, y);
        const acc wj = k.w ? k.w[i + e] : acc(1);
        if (kProb) {
          const acc c = prob_coef(acc(qv.v[e]), wj, o);
          part.d0 += c;
          part.d1 += c * (y - ref);
        } else if (smooth) {
          part.d0 += wj * (y - ref);
        }
      }
    }
    // The target logit is read before the block-wide reduction: with the gradient written in
    // place, the reduction's barrier is what orders this read before any overwrite.
    const acc y_t = (!kProb && valid) ? transform_logit(acc(x[t]), o) : acc(0);
    part = block_reduce(part);
    const acc lse = ms_lse(part.ms);

    acc loss;
    GradCoef<acc> gc{};
    if (kProb) {
      loss = prob_row_loss(part.d0, part.d1, ref, lse, o);
      gc.a = prob_grad_a(part.d0, lse, s, o);
    } else {
      IndexRow<acc> ir{};
      ir.ref = ref;
      ir.w_sum = w_sum;
      ir.dot_ref = part.d0;
      if (valid) {
        ir.w_t = k.w ? k.w[t] : acc(1);
        ir.y_t = y_t;
      }
      loss = index_row_loss(ir, lse, valid, o);
      gc = index_grad_coef(ir, lse, valid, s, o);
    }
    if (threadIdx.x == 0) {
      k.loss[row] = loss;
      k.lse[row] = lse;
    }
    if (k.g == nullptr) continue;

    // Sweep 2: the gradient, computed in acc and rounded once.
    scalar_t* g = k.g + row * C;
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * VEC; i < C;
         i += static_cast<int64_t>(blockDim.x) * VEC) {
      const P xv = *reinterpret_cast<const P*>(x + i);
      P qv, gv;
      if (kProb) qv = *reinterpret_cast<const P*>(q + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const int64_t j = i + e;
        const acc wj = k.w ? k.w[j] : acc(1);
        acc c;
        if (kProb) {
          c = s * prob_coef(acc(qv.v[e]), wj, o);
        } else {
          c = gc.b * wj + (j == t ? gc.hot : acc(0));
        }
        gv.v[e] = valid ? static_cast<scalar_t>(grad_element(acc(xv.v[e]), lse, gc.a, c, o))
                        : static_cast<scalar_t>(0);
      }
      *reinterpret_cast<P*>(g + i) = gv;
    }
  }
}

// One thread per (n, s) row, classes strided by S.
template <typename scalar_t, bool kProb>
__global__ void strided_kernel(KernelArgs<scalar_t> k) {
  using acc = acc_t<scalar_t>;
  const RowOptions& o = k.opt;
  const int64_t C = o.num_classes, S = k.S;
  StridedRow<scalar_t, acc> row{};
  row.stride = S;
  row.w = k.w;
  row.w_sum = k.w_sum ? *k.w_sum : acc(C);
  row.grad_scale = k.grad_scale ? *k.grad_scale : acc(1);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; r < k.rows;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (r / S) * C * S + r % S;
    row.x = k.x + base;
    row.g = k.g ? k.g + base : nullptr;
    if (kProb) {
      k.loss[r] = prob_row_strided(row, k.t_prob + base, o, &k.lse[r]);
    } else {
      const int64_t t = k.t_index[r];
      k.loss[r] = index_row_strided(row, t, check_target(t, o), o, &k.lse[r]);
    }
  }
}

int64_t grid_for(int64_t work, int threads) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t resident = static_cast<int64_t>(sms) * (2048 / threads) * 4;
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, resident));
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

template <typename scalar_t, bool kProb>
void launch_rows(const KernelArgs<scalar_t>& k, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const int64_t C = k.opt.num_classes;
  const bool vec_ok = C % kVec == 0 && aligned16(k.x) && (k.g == nullptr || aligned16(k.g)) &&
                      (!kProb || aligned16(k.t_prob));
  const int vec = vec_ok ? kVec : 1;
  // About four vectors per thread, 32 to 1024 threads.
  const int64_t want = (C / vec + 3) / 4;
  const int threads =
      static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (want + 31) / 32 * 32)));
  const int64_t blocks = std::min<int64_t>(k.rows, grid_for(k.rows * threads, threads));
  if (vec_ok) {
    rows_kernel<scalar_t, kVec, kProb><<<blocks, threads, 0, stream>>>(k);
  } else {
    rows_kernel<scalar_t, 1, kProb><<<blocks, threads, 0, stream>>>(k);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void forward_cuda_kernel(ForwardArgs& a) {
  const c10::cuda::CUDAGuard guard(a.input.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor w_sum = a.weight.defined() ? a.weight.sum() : at::Tensor();
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
        if (k.S == 1 && k.opt.num_classes > 0) {
          if (a.prob_target) {
            launch_rows<scalar_t, true>(k, stream);
          } else {
            launch_rows<scalar_t, false>(k, stream);
          }
        } else {
          constexpr int kThreads = 256;
          const int64_t blocks = grid_for(k.rows, kThreads);
          if (a.prob_target) {
            strided_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(k);
          } else {
            strided_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(k);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, int64_t ignore_index, double label_smoothing, double logit_scale,
    double softcap, double z_loss, bool compute_grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy_forward(
      input, target, weight, reduction, ignore_index, label_smoothing, logit_scale, softcap, z_loss,
      compute_grad ? GradMode::kNewBuffer : GradMode::kNone, &forward_cuda_kernel);
}

std::tuple<at::Tensor, at::Tensor> forward_inplace_cuda(at::Tensor& input, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        int64_t reduction, int64_t ignore_index,
                                                        double label_smoothing, double logit_scale,
                                                        double softcap, double z_loss) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto [loss, lse, grad] = cross_entropy_forward(input, target, weight, reduction, ignore_index,
                                                 label_smoothing, logit_scale, softcap, z_loss,
                                                 GradMode::kIntoInput, &forward_cuda_kernel);
  return {loss, lse};
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
  m.impl("cross_entropy_fwd_inplace_", &xent::forward_inplace_cuda);
  m.impl("scale_grad_", &xent::scale_grad_cuda);
}
