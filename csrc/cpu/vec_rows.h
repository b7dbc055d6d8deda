// Interface of the vectorised CPU row kernels.
//
// The kernels are compiled once per instruction set (vec_rows_{avx512,avx2,base}.cpp, each
// including vec_rows_impl.h under its own `#pragma GCC target`) and chosen at run time from the
// CPU in use, so the build never needs -march=native and never runs an instruction the machine
// lacks.  This header is plain C++ with no inline code, so it is safe to include from both the
// ISA-specific translation units and the ordinary ones.
#pragma once

#include <stdint.h>

namespace xent_cpu {

enum class Dtype : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };  // f64: stats_f64 only

// y = scale * x, or softcap * tanh(scale * x / softcap) when softcap > 0 (-inf stays -inf).
struct VecTransform {
  float scale;
  float softcap;
};

struct RowStats {
  float max;    // a reference value: max_j y_j or up to 64 below it (lse = max + log(sum))
  float sum;    // sum_j exp(y_j - max)
  float dot;    // sum_j w_j (y_j - max) when asked for, else 0 (-inf entries: w_j * -inf)
  float w_sum;  // sum_j w_j over the elements swept, when the dot is asked for, else 0
};

// Rows are processed in chunks of this many elements (8 KiB of float32): small enough that a
// chunk swept a second time (when the reference must rise) is still in L1.
constexpr int64_t kVecChunk = 2048;

// Exps a stats pass keeps for the gradient pass, so each element costs one exp in all.
struct RowKeep {
  float* e;          // n values: exp(y_j - the reference of y_j's chunk)
  float* chunk_max;  // one value per chunk: that reference (see RowStats::max)
};

// The same for float64 rows, accumulated in float64.
struct RowStatsD {
  double max;
  double sum;
  double dot;
  double w_sum;
};
struct RowKeepD {
  double* e;
  double* chunk_max;
};

// Up to `lanes` rows handled together, one row per SIMD lane: for many short rows (small C),
// and for K-dim inputs, whose rows (n, s) are interleaved with the classes strided by S.
// Element (l, j) of the block is at x[l * lane_stride + j * class_stride]; likewise g.
struct LaneBlock {
  const void* x;
  void* g;
  int64_t lanes;  // <= VecKernels::width
  int64_t num_classes;
  int64_t lane_stride;
  int64_t class_stride;
};

// Per-call constants of the loss and gradient of class-index rows, for the lane kernels: the
// terms of xent_row.h's index_row_loss and index_grad_coef, computed once in float.
struct LaneCoefs {
  float one_minus_eps;  // 1 - label_smoothing
  float eps_per_class;  // label_smoothing / C
  float z_loss;
  float w_sum;  // sum of the class weights (C without weights)
  float scale;  // the gradient scale s (1 / total weight for 'mean')
  bool smooth;  // label_smoothing > 0: the dot term is needed
};

// What the lane kernels return per lane: the row's loss (0 for a row that is not valid), its
// log-sum-exp, the reference its exps are taken against, and its gradient coefficients
// (xent_row.h's GradCoef; for a row that is not valid a is 0 * exp(-log_sum), NaN where the
// row's log-probabilities are, and b, hot are 0).
struct LaneOut {
  float* loss;
  float* lse;
  float* ref;
  float* a;
  float* b;
  float* hot;
};

struct VecKernels {
  const char* name;
  int width;  // float32 lanes per vector
  // One pass over a contiguous row of n logits: chunk by chunk, its max and its sum of exps
  // relative to a reference that lags the max by at most 64 (one exp per element; a chunk is
  // swept twice only when the reference must rise by more).  With want_dot, also the weighted
  // sum of (y_j - reference) and of the weights; w == nullptr means unit weights.  With keep
  // (ignored when softcap is on), the exps are kept for grad_kept.
  RowStats (*stats)(const void* x, Dtype dt, int64_t n, VecTransform t, const float* w,
                    bool want_dot, RowKeep* keep);
  // g_j = (a * exp(y_j - ref) - b * w_j) * T'(x_j), computed in float, rounded to dt once.
  void (*grad)(const void* x, void* g, Dtype dt, int64_t n, VecTransform t, float ref, float a,
               float b, const float* w);
  // The same gradient from the exps kept by stats (no softcap): no exp per element; also
  // subtracts `hot` at index `target` (-1: none).  stream: non-temporal stores, after which
  // the caller must issue a store fence (_mm_sfence) before the data is used.
  void (*grad_kept)(const RowKeep& keep, void* g, Dtype dt, int64_t n, float scale, float ref,
                    float a, float b, const float* w, int64_t target, float hot, bool stream);
  // Per lane (arrays of `width`): the loss, log-sum-exp and gradient coefficients of the row,
  // given its target (-1 where the row is ignored or its target out of range).  With ybuf
  // (C * width floats, for row-major blocks), the block's transformed logits are transposed
  // into it once, and lanes_grad reads them back.
  void (*lanes_stats)(const LaneBlock& b, Dtype dt, VecTransform t, const float* w,
                      const LaneCoefs& c, const int32_t* target, float* ybuf, const LaneOut& out);
  // g(l, j) = (a[l] exp(y - ref[l]) - b[l] w_j - [j == target[l]] hot[l]) T'(x), rounded once.
  void (*lanes_grad)(const LaneBlock& b, Dtype dt, VecTransform t, const float* w,
                     const float* ybuf, const float* ref, const float* a, const float* bw,
                     const float* hot, const int32_t* target);
  // y = exp(x) with the kernels' own vector exp (exposed so its accuracy can be tested).
  void (*exp)(const float* x, float* y, int64_t n);
  // The same with the exp of the row sweeps (x <= 88; fewer multiplies, same accuracy goal).
  void (*exp_fast)(const float* x, float* y, int64_t n);
  // float64 rows (contiguous, y = scale * x, no softcap): the same one-sweep statistics and
  // gradient from the kept exps, in float64 throughout.
  RowStatsD (*stats_f64)(const double* x, int64_t n, double scale, const double* w, bool want_dot,
                         RowKeepD* keep);
  void (*grad_kept_f64)(const RowKeepD& keep, double* g, int64_t n, double scale, double ref,
                        double a, double b, const double* w, int64_t target, double hot,
                        bool stream);
  // y = exp(x) with the float64 vector exp (x <= 700; for accuracy tests).
  void (*exp_f64)(const double* x, double* y, int64_t n);
  // y = log(x) with the kernels' own vector log (positive normal x; for accuracy tests).
  void (*log)(const float* x, float* y, int64_t n);
};

// Each returns nullptr when the build or the platform has no such path.
const VecKernels* kernels_avx512();
const VecKernels* kernels_avx2();
const VecKernels* kernels_base();

}  // namespace xent_cpu
