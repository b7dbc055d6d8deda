// Operator schemas, defined once for every backend, and the Python module entry point.
//
// cross_entropy_fwd: input (N, C, S), target (N, S) int64 or (N, C, S) probabilities.  Returns
//   the reduced loss (input dtype), the per-row log-sum-exp (float32; float64 for float64
//   input) and, when compute_grad, the gradient of the reduced loss (softmax - target, scaled
//   for the reduction), else an empty tensor.  The Python layer registers its fake kernel and
//   its autograd formula.
// cross_entropy_fwd_inplace_: the same, with the gradient written over the (contiguous) input.
// scale_grad_: grad *= scale in place, skipping rows whose scale is exactly 1 (the backward).
// vocab_stats, vocab_grad, vocab_grad_: one slice [vocab_start, vocab_start + V) of every row's
//   classes (vocab-parallel cross entropy): the slice's partial statistics (N, 7) = [max,
//   sum-exp relative to it, target logit, target weight, hit, smoothing sums relative to the
//   max], and its gradient given the row's normaliser and coefficients (N, 4) = [ref, a, b, hot]
//   (see xent_ext/_vocab_ops.py; CPU kernels in cpu/xent_cpu_vocab.cpp, ATen elsewhere).
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <set>

#include "cpu/buffer_cache.h"
#include "cpu/cpu_isa.h"

TORCH_LIBRARY(xent_ext, m) {
  m.def(
      "cross_entropy_fwd(Tensor input, Tensor target, Tensor? weight, int reduction, "
      "int ignore_index, float label_smoothing, float logit_scale, float softcap, "
      "float z_loss, bool compute_grad) -> (Tensor loss, Tensor lse, Tensor grad)");
  m.def(
      "cross_entropy_fwd_inplace_(Tensor(a!) input, Tensor target, Tensor? weight, "
      "int reduction, int ignore_index, float label_smoothing, float logit_scale, "
      "float softcap, float z_loss) -> (Tensor loss, Tensor lse)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def(
      "vocab_stats(Tensor logits, Tensor target, Tensor? weight, int vocab_start, "
      "int ignore_index, float label_smoothing, float logit_scale, float softcap) -> Tensor");
  m.def(
      "vocab_grad(Tensor logits, Tensor target, Tensor? weight, int vocab_start, Tensor coef, "
      "float logit_scale, float softcap) -> Tensor");
  m.def(
      "vocab_grad_(Tensor(a!) logits, Tensor target, Tensor? weight, int vocab_start, "
      "Tensor coef, float logit_scale, float softcap) -> ()");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xent_ext kernels; the operators live under torch.ops.xent_ext";
  m.def("cpu_isa", &xent_cpu::active_isa_name,
        "Instruction set of the vectorised CPU row kernels in use (avx512, avx2 or base).");
  m.def("set_cpu_isa", &xent_cpu::set_isa,
        "Force the CPU kernels to an instruction set the CPU supports ('auto' to detect); "
        "returns the one now in use.");
  // The CPU kernels' own vector math, exposed for accuracy tests.
  auto vec_math = [](const at::Tensor& x, void (*f)(const float*, float*, int64_t)) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
                "expects a float32 CPU tensor");
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    f(xc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), xc.numel());
    return y;
  };
  m.def(
      "_vec_exp", [=](const at::Tensor& x) { return vec_math(x, xent_cpu::active_kernels().exp); },
      "exp(x) computed by the CPU kernels' vector exp (for accuracy tests).");
  m.def(
      "_vec_exp_fast",
      [=](const at::Tensor& x) { return vec_math(x, xent_cpu::active_kernels().exp_fast); },
      "exp(x), x <= 88, computed by the vector exp of the CPU row sweeps (for accuracy tests).");
  m.def(
      "_vec_exp_f64",
      [](const at::Tensor& x) {
        TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kDouble,
                    "expects a float64 CPU tensor");
        const at::Tensor xc = x.contiguous();
        at::Tensor y = at::empty_like(xc);
        xent_cpu::active_kernels().exp_f64(xc.const_data_ptr<double>(),
                                           y.mutable_data_ptr<double>(), xc.numel());
        return y;
      },
      "exp(x), x <= 700, computed by the float64 vector exp of the CPU kernels (for tests).");
  m.def(
      "_vec_log", [=](const at::Tensor& x) { return vec_math(x, xent_cpu::active_kernels().log); },
      "log(x) computed by the CPU kernels' vector log (for accuracy tests).");
  m.def(
      "_parallel_threads",
      [](int64_t tasks) {
        // One task per index, grain 1: each thread of the pool takes a share.  1 means this
        // build's at::parallel_for is serial (e.g. compiled without OpenMP).
        std::vector<int> who(tasks, -1);
        at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) who[i] = at::get_thread_num();
        });
        return static_cast<int64_t>(std::set<int>(who.begin(), who.end()).size());
      },
      "Distinct threads at::parallel_for used for `tasks` tasks in this extension's code.");
  m.def("empty_cpu_cache", &xent_cpu::empty_cache,
        "Free the cached CPU gradient buffers; returns the bytes released.");
  m.def("cpu_cache_bytes", &xent_cpu::cached_bytes,
        "Bytes of freed CPU gradient buffers the cache holds for reuse.");
  m.def("has_cuda", []() {
#ifdef XENT_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
