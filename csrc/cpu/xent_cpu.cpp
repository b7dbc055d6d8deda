// CPU kernels of the forward op and of scale_grad_.
//
// Rows are split across threads with at::parallel_for.  Contiguous rows (S == 1) of float32,
// float16 and bfloat16 with class-index targets take the vectorised row kernels (vec_rows.h);
// everything else (float64, K-dim inputs whose classes are strided, probability targets) takes
// the scalar path below, which is the shared row math (xent_row.h) applied element by element.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "../xent_forward.h"
#include "../xent_row.h"
#include "../xent_row_strided.h"
#include "cpu_isa.h"

namespace xent {
namespace {

// Records an out-of-range target seen by any thread; the caller raises after the loop (an
// exception must not escape a parallel region half-way).  A flag apart from the value: every
// int64 is a possible target, -2^63 included.
struct BadTarget {
  std::atomic<bool> seen{false};
  std::atomic<int64_t> value{0};
  void record(int64_t t) {
    bool none = false;
    if (seen.compare_exchange_strong(none, true)) value.store(t);
  }
};

// Classifies a class-index target: valid, ignored, or out of range (then recorded and treated
// as ignored, so nothing is read out of bounds).
inline bool target_is_valid(int64_t t, const RowOptions& o, BadTarget& bad) {
  if (t == o.ignore_index) return false;
  if (t < 0 || t >= o.num_classes) {
    bad.record(t);
    return false;
  }
  return true;
}

template <typename acc>
acc total_of(const acc* w, int64_t n) {
  if (w == nullptr) return acc(n);
  acc s = 0;
  for (int64_t j = 0; j < n; ++j) s += w[j];
  return s;
}

// ---- scalar path: any dtype, classes strided by S (xent_row_strided.h) -----------------------
template <typename scalar_t>
void rows_scalar(ForwardArgs& a, int64_t begin, int64_t end, BadTarget& bad) {
  // Sums in double whatever the dtype: this path walks a row one element at a time (one long
  // sequential sum), and it is the path of probability targets, whose sums of c_j over 10^5
  // classes would lose digits in float.
  using acc = acc_t<scalar_t>;
  using wide = double;
  const RowOptions& o = a.opt;
  const int64_t C = o.num_classes, S = a.input.size(2);
  const scalar_t* X = a.input.const_data_ptr<scalar_t>();
  scalar_t* G = a.grad.defined() ? a.grad.mutable_data_ptr<scalar_t>() : nullptr;
  const at::Tensor w64 = a.weight.defined() ? a.weight.to(at::kDouble) : at::Tensor();
  StridedRow<scalar_t, wide> row{};
  row.stride = S;
  row.w = w64.defined() ? w64.const_data_ptr<wide>() : nullptr;
  row.w_sum = total_of(row.w, C);
  row.grad_scale = a.grad_scale.defined() ? wide(*a.grad_scale.const_data_ptr<acc>()) : wide(1);
  acc* loss_out = a.loss_rows.mutable_data_ptr<acc>();
  acc* lse_out = a.lse.mutable_data_ptr<acc>();
  for (int64_t r = begin; r < end; ++r) {
    const int64_t base = (r / S) * C * S + r % S;  // 64-bit offsets throughout
    row.x = X + base;
    row.g = G ? G + base : nullptr;
    RowNorm<wide> norm{};
    wide loss = 0;
    if (a.prob_target) {
      loss = prob_row_strided(row, a.target.const_data_ptr<scalar_t>() + base, o, &norm);
    } else {
      const int64_t t = a.target.const_data_ptr<int64_t>()[r];
      loss = index_row_strided(row, t, target_is_valid(t, o, bad), o, &norm);
    }
    loss_out[r] = static_cast<acc>(loss);
    lse_out[r] = static_cast<acc>(norm.lse());
  }
}

// ---- vectorised path: contiguous rows of float32 / float16 / bfloat16 (and float64 rows) -----
template <typename scalar_t>
xent_cpu::Dtype vec_dtype();
template <>
xent_cpu::Dtype vec_dtype<double>() {
  return xent_cpu::Dtype::f64;
}
template <>
xent_cpu::Dtype vec_dtype<float>() {
  return xent_cpu::Dtype::f32;
}
template <>
xent_cpu::Dtype vec_dtype<at::Half>() {
  return xent_cpu::Dtype::f16;
}
template <>
xent_cpu::Dtype vec_dtype<at::BFloat16>() {
  return xent_cpu::Dtype::bf16;
}

struct LaneBlocks;

// The row kernels by accumulation type: float32 for float32 / float16 / bfloat16 logits,
// float64 for float64 (whose kernels take no softcap).
template <typename acc>
struct VecRow;
template <>
struct VecRow<float> {
  using Keep = xent_cpu::RowKeep;
  static xent_cpu::RowStats stats(const xent_cpu::VecKernels& k, const void* x, xent_cpu::Dtype dt,
                                  int64_t n, xent_cpu::VecTransform t, double, const float* w,
                                  bool dot, Keep* keep) {
    return k.stats(x, dt, n, t, w, dot, keep);
  }
  static void grad_kept(const xent_cpu::VecKernels& k, const Keep& keep, void* g,
                        xent_cpu::Dtype dt, int64_t n, float scale, float ref, float a, float b,
                        const float* w, int64_t t, float hot, bool stream) {
    k.grad_kept(keep, g, dt, n, scale, ref, a, b, w, t, hot, stream);
  }
};
template <>
struct VecRow<double> {
  using Keep = xent_cpu::RowKeepD;
  static xent_cpu::RowStatsD stats(const xent_cpu::VecKernels& k, const void* x, xent_cpu::Dtype,
                                   int64_t n, xent_cpu::VecTransform, double scale, const double* w,
                                   bool dot, Keep* keep) {
    return k.stats_f64(static_cast<const double*>(x), n, scale, w, dot, keep);
  }
  static void grad_kept(const xent_cpu::VecKernels& k, const Keep& keep, void* g, xent_cpu::Dtype,
                        int64_t n, double scale, double ref, double a, double b, const double* w,
                        int64_t t, double hot, bool stream) {
    k.grad_kept_f64(keep, static_cast<double*>(g), n, scale, ref, a, b, w, t, hot, stream);
  }
};

// What the vectorised drivers (one row at a time, rows across lanes, a row split across threads)
// read from the call: contiguous rows of class-index targets, accumulated in acc_t<scalar_t>.
template <typename scalar_t>
struct VecDriver {
  using acc = acc_t<scalar_t>;
  ForwardArgs& a;
  const xent_cpu::VecKernels& k = xent_cpu::active_kernels();
  const xent_cpu::Dtype dt = vec_dtype<scalar_t>();
  const RowOptions& o = a.opt;
  const int64_t C = o.num_classes;
  const xent_cpu::VecTransform tr{static_cast<float>(o.logit_scale), static_cast<float>(o.softcap)};
  const scalar_t* X = a.input.const_data_ptr<scalar_t>();
  const int64_t* T = a.target.const_data_ptr<int64_t>();
  const acc* w = a.weight.defined() ? a.weight.const_data_ptr<acc>() : nullptr;
  scalar_t* G = a.grad.defined() ? a.grad.mutable_data_ptr<scalar_t>() : nullptr;
  const acc s = a.grad_scale.defined() ? *a.grad_scale.const_data_ptr<acc>() : acc(1);
  const acc w_sum = total_of(w, C);
  const bool smooth = o.label_smoothing > 0.0;
  // The weights of the gradient's b * w_j term: only label smoothing spreads the loss over
  // other classes (without it b is 0, and an inf weight on a class no target uses must not
  // turn 0 * inf into NaN).
  const acc* w_b = smooth ? w : nullptr;
  acc* loss_out = a.loss_rows.mutable_data_ptr<acc>();
  acc* lse_out = a.lse.mutable_data_ptr<acc>();

  explicit VecDriver(ForwardArgs& args) : a(args) {}
  void rows(int64_t begin, int64_t end, BadTarget& bad);
  void blocks(const LaneBlocks& lb, int64_t begin, int64_t end, BadTarget& bad);
  void split(int64_t slices, BadTarget& bad);
};

template <typename scalar_t>
void VecDriver<scalar_t>::rows(int64_t begin, int64_t end, BadTarget& bad) {
  // With a gradient to write and no softcap, the stats pass keeps its exps (in this task's
  // scratch, which stays in L2 for rows up to ~10^5 classes) and the gradient pass reuses them.
  const bool keep_exps = G != nullptr && !(o.softcap > 0.0);
  // Non-temporal stores only for gradients far larger than the caches: smaller ones are read
  // back soon (by the backward) and are better left in cache.
  const bool stream = keep_exps && a.grad.numel() * a.grad.element_size() >= (int64_t(128) << 20);
  using Row = VecRow<acc>;
  std::vector<acc> scratch(keep_exps ? C + C / xent_cpu::kVecChunk + 1 : 0);
  typename Row::Keep keep{scratch.data(), scratch.data() + C};

  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* x = X + r * C;
    const int64_t t = T[r];
    const bool valid = target_is_valid(t, o, bad);
    const auto st =
        Row::stats(k, x, dt, C, tr, o.logit_scale, w, smooth, keep_exps && valid ? &keep : nullptr);
    const RowNorm<acc> norm = ms_norm(MaxSum<acc>{st.max, st.sum});
    IndexRow<acc> ir{};
    ir.w_sum = w_sum;
    ir.dot = st.dot;
    if (valid) {
      ir.w_t = w ? w[t] : acc(1);
      ir.y_t = transform_logit(acc(x[t]), o);
    }
    loss_out[r] = index_row_loss(ir, norm, valid, o);
    lse_out[r] = norm.lse();
    if (G == nullptr) continue;
    scalar_t* g = G + r * C;
    if (!valid || row_is_nan(norm)) {  // 0, or NaN throughout (as torch)
      std::fill_n(g, C, static_cast<scalar_t>(ignored_grad(norm)));
      continue;
    }
    const GradCoef<acc> gc = index_grad_coef(ir, norm, valid, s, o);
    if (keep_exps) {
      // gc already carries the gradient scale s; grad_kept's `scale` is T'(x) = logit_scale.
      Row::grad_kept(k, keep, g, dt, C, static_cast<acc>(o.logit_scale), norm.ref, gc.a, gc.b, w_b,
                     t, gc.hot, stream);
      continue;
    }
    if constexpr (std::is_same_v<acc, float>) {  // softcap: float32 kernels only
      const float x_t = float(x[t]);  // read before the sweep overwrites it (in-place gradient)
      k.grad(x, g, dt, C, tr, norm.ref, gc.a, gc.b, w_b);
      // The target element again, from scratch in float: p - 1 rounded once to the dtype.
      g[t] = static_cast<scalar_t>(
          grad_element(x_t, norm.ref, gc.a, gc.b * (w_b ? w_b[t] : 1.f) + gc.hot, o));
    }
  }
#if defined(__x86_64__)
  if (stream) _mm_sfence();  // the streaming stores are visible before the task ends
#endif
}

// ---- one row per SIMD lane: short rows, and K-dim rows (classes strided by S) ---------------
// Rows shorter than this go through the lane kernels when S == 1: per-row overheads (a call,
// horizontal reductions, a ragged tail) would dominate a row-at-a-time pass.
constexpr int64_t kLanesMaxClasses = 48;

// Blocks of up to W rows: consecutive rows for S == 1, consecutive s of one n for S > 1.
struct LaneBlocks {
  int64_t N, C, S, W;
  int64_t per_n() const { return S == 1 ? 0 : (S + W - 1) / W; }
  int64_t count() const { return S == 1 ? (N + W - 1) / W : N * per_n(); }
  // First row index, lanes, element offset of (lane 0, class 0), lane stride, class stride.
  void locate(int64_t k, int64_t* row0, int64_t* lanes, int64_t* offset, int64_t* lane_stride,
              int64_t* class_stride) const {
    if (S == 1) {
      *row0 = k * W;
      *lanes = std::min(W, N - *row0);
      *offset = *row0 * C;
      *lane_stride = C;
      *class_stride = 1;
    } else {
      const int64_t n = k / per_n(), s0 = (k % per_n()) * W;
      *row0 = n * S + s0;
      *lanes = std::min(W, S - s0);
      *offset = n * C * S + s0;
      *lane_stride = 1;
      *class_stride = S;
    }
  }
};

template <typename scalar_t>
void VecDriver<scalar_t>::blocks(const LaneBlocks& lb, int64_t begin, int64_t end, BadTarget& bad) {
  constexpr int kMaxW = 16;
  float loss[kMaxW], lse[kMaxW], ref[kMaxW], ca[kMaxW], cb[kMaxW], hot[kMaxW];
  int32_t tgt[kMaxW];
  const xent_cpu::LaneOut out{loss, lse, ref, ca, cb, hot};
  // The per-call terms of index_row_loss / index_grad_coef (xent_row.h), in float as there.
  const float eps = static_cast<float>(o.label_smoothing);
  const xent_cpu::LaneCoefs coefs{
      1.f - eps, eps / static_cast<float>(C), static_cast<float>(o.z_loss), w_sum, s, smooth};
  // Row-major blocks keep their transposed logits here between the two kernels.
  std::vector<float> ybuf(lb.S == 1 ? lb.C * lb.W : 0);

  for (int64_t blk = begin; blk < end; ++blk) {
    int64_t row0, lanes, offset, ls, cs;
    lb.locate(blk, &row0, &lanes, &offset, &ls, &cs);
    const xent_cpu::LaneBlock b{X + offset, G ? G + offset : nullptr, lanes, lb.C, ls, cs};
    float* yb = ybuf.empty() ? nullptr : ybuf.data();
    // The rows of a block are consecutive: row0 + l.  -1 marks a row that is not valid.
    for (int l = 0; l < kMaxW; ++l) {
      tgt[l] = l < lanes && target_is_valid(T[row0 + l], o, bad) ? static_cast<int32_t>(T[row0 + l])
                                                                 : -1;
    }
    k.lanes_stats(b, dt, tr, w, coefs, tgt, yb, out);
    std::memcpy(loss_out + row0, loss, lanes * sizeof(float));
    std::memcpy(lse_out + row0, lse, lanes * sizeof(float));
    if (G == nullptr) continue;
    for (int l = lanes; l < kMaxW; ++l) ref[l] = 0.f;  // absent lanes: no NaN computed there
    // Ignored rows come out as 0 * p (0, or NaN where torch's are) from their coefficients.
    k.lanes_grad(b, dt, tr, w_b, yb, ref, ca, cb, hot, tgt);
  }
}

// ---- few rows, many classes: each row split across threads ----------------------------------
// Partial max / sum-exp per slice, a combine per row, then the gradient of each slice given the
// row's log-sum-exp: the structure a vocabulary-parallel cross-entropy needs across devices.
template <typename scalar_t>
void VecDriver<scalar_t>::split(int64_t slices, BadTarget& bad) {
  const int64_t rows = a.input.size(0);  // no softcap here: the caller only splits without it
  // Slices are whole chunks, so the kept per-chunk maxima line up with the slices.
  const int64_t chunk = xent_cpu::kVecChunk;
  const int64_t len = ((C + slices - 1) / slices + chunk - 1) / chunk * chunk;
  const int64_t P = (C + len - 1) / len, chunks_per_slice = len / chunk;
  std::vector<xent_cpu::RowStats> part(rows * P);
  std::vector<float> kept(G ? rows * C : 0), kept_max(G ? rows * P * chunks_per_slice : 0);
  auto keep_of = [&](int64_t q) {
    return xent_cpu::RowKeep{kept.data() + (q / P) * C + (q % P) * len,
                             kept_max.data() + q * chunks_per_slice};
  };
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r = q / P, start = (q % P) * len, n = std::min(len, C - start);
      xent_cpu::RowKeep keep = keep_of(q);
      part[q] = k.stats(X + r * C + start, dt, n, tr, w ? w + start : nullptr, smooth,
                        G ? &keep : nullptr);
    }
  });
  // Combine the slices of each row (few rows: serial): xent_row.h's ms_combine and dot_combine.
  std::vector<RowNorm<float>> norm(rows);
  std::vector<GradCoef<float>> coef(rows);
  std::vector<char> valid(rows);
  for (int64_t r = 0; r < rows; ++r) {
    MaxSum<float> ms = ms_empty<float>();
    DotAcc<float> dot = dot_empty<float>();
    for (int64_t p = 0; p < P; ++p) {
      const xent_cpu::RowStats& st = part[r * P + p];
      const MaxSum<float> next = ms_combine(ms, MaxSum<float>{st.max, st.sum});
      dot = dot_combine(dot, ms.max, DotAcc<float>{st.dot, st.w_sum}, st.max, next.max);
      ms = next;
    }
    const int64_t t = T[r];
    valid[r] = target_is_valid(t, o, bad);
    norm[r] = ms_norm(ms);
    IndexRow<float> ir{};
    ir.w_sum = w_sum;
    ir.dot = dot.dot;
    if (valid[r]) {
      ir.w_t = w ? w[t] : 1.f;
      ir.y_t = transform_logit(float(X[r * C + t]), o);
    }
    loss_out[r] = index_row_loss(ir, norm[r], bool(valid[r]), o);
    lse_out[r] = norm[r].lse();
    coef[r] = index_grad_coef(ir, norm[r], bool(valid[r]), s, o);
  }
  if (G == nullptr) return;
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t r = q / P, start = (q % P) * len, n = std::min(len, C - start);
      scalar_t* g = G + r * C + start;
      if (!valid[r] || row_is_nan(norm[r])) {  // 0, or NaN throughout (as torch)
        std::fill_n(g, n, static_cast<scalar_t>(ignored_grad(norm[r])));
        continue;
      }
      const int64_t t = T[r] - start;
      k.grad_kept(keep_of(q), g, dt, n, tr.scale, norm[r].ref, coef[r].a, coef[r].b,
                  w_b ? w_b + start : nullptr, t >= 0 && t < n ? t : -1, coef[r].hot, false);
    }
  });
}

// How forward_cpu_kernel splits the work: the vectorised drivers it may use.
struct VecPlan {
  int64_t rows, grain, split;
  bool vec_ok, use_lanes;
  LaneBlocks lb;
};

// Runs the vectorised driver the plan calls for; false: none applies (the scalar path runs).
// A function template, so that the drivers a dtype never takes are never instantiated.
template <typename scalar_t>
bool run_vectorised(ForwardArgs& a, const VecPlan& p, BadTarget& bad) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    // float64: contiguous rows without softcap (short and K-dim rows, and fewer rows than
    // threads, stay on the scalar path).
    if (!p.vec_ok || p.lb.S != 1 || a.opt.softcap > 0.0 || p.use_lanes || p.split > 1) {
      return false;
    }
  } else {
    if (p.split > 1) {
      VecDriver<scalar_t>(a).split(p.split, bad);
      return true;
    }
    if (p.use_lanes) {
      const int64_t grain_blocks = std::max<int64_t>(1, p.grain / p.lb.W);
      at::parallel_for(0, p.lb.count(), grain_blocks, [&](int64_t begin, int64_t end) {
        VecDriver<scalar_t>(a).blocks(p.lb, begin, end, bad);
      });
      return true;
    }
    if (!p.vec_ok) return false;
  }
  at::parallel_for(0, p.rows, p.grain, [&](int64_t begin, int64_t end) {
    VecDriver<scalar_t>(a).rows(begin, end, bad);
  });
  return true;
}

void forward_cpu_kernel(ForwardArgs& a) {
  const int64_t rows = a.input.size(0) * a.input.size(2);
  const int64_t C = a.input.size(1);
  // Enough work per task to amortise the scheduling: about 64K elements.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1));
  const int64_t S = a.input.size(2);
  const bool vec_ok = C > 0 && !a.prob_target;
  const bool use_lanes = vec_ok && (S > 1 || C <= kLanesMaxClasses);
  const LaneBlocks lb{a.input.size(0), C, S, xent_cpu::active_kernels().width};
  // Fewer rows than threads and long rows: split each row so that every core works.
  const int64_t threads = at::get_num_threads();
  const int64_t split =
      vec_ok && S == 1 && !(a.opt.softcap > 0.0) && rows < threads && C >= 4 * xent_cpu::kVecChunk
          ? (threads + rows - 1) / rows
          : 1;
  const VecPlan plan{rows, grain, split, vec_ok, use_lanes, lb};
  BadTarget bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, a.input.scalar_type(), "xent_forward_cpu", [&] {
        if (run_vectorised<scalar_t>(a, plan, bad)) return;
        at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
          rows_scalar<scalar_t>(a, begin, end, bad);
        });
      });
  // The message is one ready std::string (std::to_string, no stream): one build (a custom GCC,
  // Python's -Bsymbolic-functions link) crashed here while formatting the integer through a
  // copy of std::ostream::_M_insert<long> it had emitted into this library.
  TORCH_CHECK_INDEX(!bad.seen.load(), std::string("Target ") + std::to_string(bad.value.load()) +
                                          " is out of bounds.");
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale_) {
  check_scale_grad_args(grad, scale_);
  const int64_t N = grad.size(0), C = grad.size(1), S = grad.size(2);
  const at::Tensor scale = scale_.to(at::kDouble).contiguous();
  const double* sc = scale.const_data_ptr<double>();
  const bool per_row = scale.numel() != 1;
  if (!per_row && sc[0] == 1.0) return;  // the common case: nothing to do
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cpu", [&] {
        using acc = acc_t<scalar_t>;
        scalar_t* g = grad.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, N, std::max<int64_t>(1, 65536 / std::max<int64_t>(C * S, 1)),
                         [&](int64_t b, int64_t e) {
                           for (int64_t n = b; n < e; ++n) {
                             for (int64_t j = 0; j < C; ++j) {
                               scalar_t* row = g + (n * C + j) * S;
                               for (int64_t sp = 0; sp < S; ++sp) {
                                 const acc f = static_cast<acc>(per_row ? sc[n * S + sp] : sc[0]);
                                 if (f != acc(1)) row[sp] = static_cast<scalar_t>(acc(row[sp]) * f);
                               }
                             }
                           }
                         });
      });
}

}  // namespace
}  // namespace xent

TORCH_LIBRARY_IMPL(xent_ext, CPU, m) {
  m.impl("cross_entropy_fwd", &xent::forward_op<&xent::forward_cpu_kernel>);
  m.impl("cross_entropy_fwd_inplace_", &xent::forward_inplace_op<&xent::forward_cpu_kernel>);
  m.impl("scale_grad_", &xent::scale_grad_cpu);
}
