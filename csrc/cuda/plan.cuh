// The host-side plan: which regime, kernel variant, grid and shared memory a call gets.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernel_common.cuh"
#include "regime_kdim.cuh"

namespace xent {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Host side: the plan.
// ---------------------------------------------------------------------------------------------
struct DeviceProps {
  int sms;              // multiprocessors
  int64_t smem_optin;   // most shared memory one block may use (static + dynamic), bytes
  int64_t smem_per_sm;  // shared memory of one multiprocessor, bytes
  int max_cluster = 1;  // blocks of a thread-block cluster the regs regime may use (1: none)
};

enum class Regime { kAuto, kGroup, kRegs, kBlock, kBlockScalar, kSplit, kStrided, kKdim };

inline const char* regime_name(Regime r) {
  switch (r) {
    case Regime::kGroup:
      return "group";
    case Regime::kRegs:
      return "regs";
    case Regime::kBlock:
      return "block";
    case Regime::kBlockScalar:
      return "block_scalar";
    case Regime::kSplit:
      return "split";
    case Regime::kStrided:
      return "strided";
    case Regime::kKdim:
      return "kdim";
    default:
      return "auto";
  }
}

// "auto" or one of the names above; anything else is auto.
inline Regime regime_from_name(const char* s) {
  if (s == nullptr) return Regime::kAuto;
  for (Regime r : {Regime::kGroup, Regime::kRegs, Regime::kBlock, Regime::kBlockScalar,
                   Regime::kSplit, Regime::kStrided, Regime::kKdim}) {
    const char* n = regime_name(r);
    const char* a = s;
    while (*n != '\0' && *a == *n) ++a, ++n;
    if (*n == '\0' && *a == '\0') return r;
  }
  return Regime::kAuto;
}

struct Plan {
  Regime regime = Regime::kStrided;
  int vec = 1;               // elements per item
  int group = 32;            // group regime: lanes per row
  int nv = 1;                // group regime: items per lane
  int items_per_thread = 0;  // regs regime: R
  int cluster = 1;           // regs regime: blocks per row (a thread-block cluster)
  int threads = kStridedThreads;
  int64_t blocks = 1;       // grid x
  int64_t grid_y = 1;       // split regime: rows
  int64_t cache_items = 0;  // block regime
  int64_t smem = 0;         // dynamic shared memory per block, bytes
  int64_t splits = 1;       // split regime
  int64_t slice_items = 0;  // split regime
  bool aligned = false;     // regs regime: the variant for whole aligned rows
  bool plain = false;       // regs regime: ... with no transform and no target sums
  bool transposed = false;  // K-dim input to run as contiguous rows of a transposed copy
};

// Thresholds of the regimes (see xent_kernels.cuh).
constexpr int64_t kGroupMaxItems = 32 * 8;  // group regime up to 256 items (2048 bf16, 1024 f32)
constexpr int64_t kSplitMinClasses = 32768;
constexpr int64_t kStridedForcedMaxClasses = 512;  // XENT_CUDA_REGIME=strided: up to here
constexpr int64_t kSplitMinSliceItems = kSplitThreads * kUnroll;
constexpr int64_t kStaticSmemReserve = 2048;   // block_reduce's scratch, with room to spare
constexpr int64_t kTransposeMinClasses = 512;  // K-dim without the tile regime: transpose from here
// Regs regime: items per thread without a gradient (a streaming pass: registers per load batch).
constexpr int kRegsStreamItems = 8;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

// Regs regime with a gradient: R items per thread and K blocks per row, so that R * K *
// kRegsThreads items cover a row of `items`: one block with the fewest items per thread that
// fit, else R = 8 (three blocks per SM) with the fewest blocks, else R = 16 (two blocks per SM).
// False when the row does not fit K <= max_cluster blocks' registers.
inline bool regs_fit(int64_t items, int max_cluster, int* r_out, int* k_out) {
  const int64_t t = kRegsThreads;
  if (items <= 8 * t) {
    *r_out = static_cast<int>(pow2_ceil(ceil_div(items, t)));
    *k_out = 1;
    return true;
  }
  for (const int r : {8, 16}) {
    const int64_t k = pow2_ceil(ceil_div(items, r * t));
    if (k <= max_cluster && (r == 16 || k <= 8)) {
      *r_out = r;
      *k_out = static_cast<int>(k);
      return true;
    }
  }
  return false;
}

// What the plan is made from.
struct PlanInput {
  int64_t rows;  // N * S
  int64_t C;     // classes
  int64_t S;     // positions (1: contiguous rows)
  int elem;      // sizeof(T)
  bool vec_ok;   // x, grad and probability target share their offset modulo 16 bytes
  bool aligned;  // every row starts on a 16-byte boundary and is a whole number of 16 bytes
  bool prob;     // probability targets
  bool grad;     // a gradient is written
  bool plain;    // logits as they are (no scale, no softcap) and no label smoothing
};

// `force` picks a regime for tests; one that cannot run the shape falls back to the automatic
// choice.
inline Plan plan_forward(const PlanInput& in, const DeviceProps& d, Regime force = Regime::kAuto) {
  const int64_t rows = in.rows, C = in.C, S = in.S;
  const int elem = in.elem;
  const bool vec_ok = in.vec_ok, prob = in.prob, grad = in.grad;
  Plan p;
  const int64_t sms = std::max(d.sms, 1);
  auto strided = [&] {
    p.regime = Regime::kStrided;
    p.threads = kStridedThreads;
    p.blocks = std::max<int64_t>(1, std::min(ceil_div(rows, p.threads), sms * 8 * 4));
    return p;
  };
  // In-row indices are 32-bit: rows of 2^30 classes or more take the strided kernel (64-bit).
  if (C == 0 || C >= (int64_t(1) << 30)) return strided();
  if (S != 1) {
    // K-dim: tiles of 32 positions in shared memory, read along s; without room for a tile,
    // one thread per row for few classes, else a transposed copy (run as contiguous rows).
    const int64_t smem = kdim_smem_bytes(C, elem, prob);
    if (force != Regime::kStrided && smem + kStaticSmemReserve <= d.smem_optin) {
      p.regime = Regime::kKdim;
      p.threads = kKdimThreads;
      p.smem = smem;
      const int64_t tiles = (rows / S) * ceil_div(S, kKdimTileS);
      const int64_t resident = std::max<int64_t>(1, d.smem_per_sm / (smem + kStaticSmemReserve));
      p.blocks = std::max<int64_t>(1, std::min(tiles, sms * std::min<int64_t>(resident, 8)));
      return p;
    }
    if (force == Regime::kStrided || C < kTransposeMinClasses) return strided();
    p.transposed = true;
    return p;
  }
  if (force == Regime::kStrided && C < kStridedForcedMaxClasses) return strided();

  const int full_vec = 16 / elem;
  // Items of a row at most, whatever its offset (aligned rows: exactly C / VEC).
  const int64_t items_max = in.aligned ? C / full_vec : ceil_div(C + full_vec - 1, full_vec);
  const bool group_ok =
      vec_ok && items_max <= kGroupMaxItems &&
      group_smem_bytes(kGroupThreads, 32, 8, prob) + kStaticSmemReserve <= d.smem_optin;
  int regs_r = kRegsStreamItems, regs_k = 1;
  const bool regs_ok = vec_ok && !prob &&
                       (!grad || regs_fit(items_max, std::max(d.max_cluster, 1), &regs_r, &regs_k));
  const int64_t split_slices_want = ceil_div(2 * sms, rows);
  const bool split_ok =
      vec_ok && rows <= 65535 && split_slices_want >= 2 && items_max >= 2 * kSplitMinSliceItems;

  Regime reg = force;
  if (reg == Regime::kStrided || reg == Regime::kKdim) reg = Regime::kAuto;
  if ((reg == Regime::kGroup && !group_ok) || (reg == Regime::kSplit && !split_ok) ||
      (reg == Regime::kRegs && !regs_ok)) {
    reg = Regime::kAuto;
  }
  if (reg == Regime::kBlock && !vec_ok) reg = Regime::kBlockScalar;
  if (reg == Regime::kAuto) {
    if (!vec_ok) {
      reg = Regime::kBlockScalar;
    } else if (group_ok) {
      reg = Regime::kGroup;
    } else if (regs_ok && (grad || d.max_cluster > 1 || !(split_ok && 2 * rows <= sms))) {
      reg = Regime::kRegs;
    } else if (split_ok && 2 * rows <= sms && C >= kSplitMinClasses) {
      reg = Regime::kSplit;
    } else {
      reg = Regime::kBlock;
    }
  }
  p.regime = reg;

  if (reg == Regime::kGroup) {
    p.vec = full_vec;
    // A warp or less per row: the fewest lanes (a power of two) that hold the row in one item
    // each, up to 32; longer rows take 2 or 4 items per lane.
    p.group = static_cast<int>(std::min<int64_t>(32, std::max<int64_t>(2, pow2_ceil(items_max))));
    p.nv = items_max <= 32 ? 1 : items_max <= 64 ? 2 : items_max <= 128 ? 4 : 8;
    p.threads = kGroupThreads;
    p.smem = group_smem_bytes(p.threads, p.group, p.nv, prob);
    // No more blocks than stay resident (the least the launch bounds promise, or what shared
    // memory allows): each group then walks many rows, and the copies of the next one overlap
    // the work on the current one.
    const int64_t resident = std::max<int64_t>(
        1, std::min<int64_t>(group_min_blocks(elem, p.nv, prob), d.smem_per_sm / (p.smem + 1024)));
    const int64_t rows_per_block = p.threads / p.group;
    p.blocks = std::max<int64_t>(1, std::min(ceil_div(rows, rows_per_block), sms * resident));
    return p;
  }
  if (reg == Regime::kRegs) {
    p.vec = full_vec;
    p.threads = kRegsThreads;
    if (grad) {
      // Few rows: more blocks per row (fewer items per thread, the same coverage) while that
      // still leaves SMs idle.
      while (rows * regs_k * 2 <= sms && regs_k * 2 <= d.max_cluster && regs_r >= 4) {
        regs_k *= 2;
        regs_r /= 2;
      }
    } else {
      // A streaming pass: few rows are spread over a cluster's blocks (where there are
      // clusters) so that every SM has work.
      regs_r = kRegsStreamItems;
      const int64_t want =
          ceil_div(sms * regs_min_blocks(regs_r, elem, in.aligned, in.aligned && in.plain), rows);
      const int64_t useful = ceil_div(items_max, int64_t(regs_r) * kRegsThreads);
      int64_t k = 1;
      while (2 * k <= std::min<int64_t>({want, useful, std::max(d.max_cluster, 1)})) k *= 2;
      regs_k = static_cast<int>(k);
    }
    p.items_per_thread = regs_r;
    p.cluster = regs_k;
    p.aligned = in.aligned;
    p.plain = in.aligned && in.plain;
    // One cluster per row (the hardware keeps regs_min_blocks blocks of it per SM).
    p.blocks = std::min<int64_t>(rows, (int64_t(1) << 30) / regs_k) * regs_k;
    return p;
  }
  if (reg == Regime::kSplit) {
    p.vec = full_vec;
    p.threads = kSplitThreads;
    int64_t slice = std::max(kSplitMinSliceItems, ceil_div(items_max, split_slices_want));
    slice = ceil_div(slice, p.threads) * p.threads;
    p.slice_items = slice;
    p.splits = ceil_div(items_max, slice);
    p.blocks = p.splits;
    p.grid_y = rows;
    return p;
  }
  // Block regime.
  p.vec = reg == Regime::kBlockScalar ? 1 : full_vec;
  const int64_t items = reg == Regime::kBlockScalar ? C : items_max;
  const int64_t want = ceil_div(ceil_div(items, kUnroll), 32) * 32;
  p.threads = static_cast<int>(std::min<int64_t>(kBlockThreads, std::max<int64_t>(64, want)));
  const int64_t item_bytes = static_cast<int64_t>(p.vec) * elem * (prob ? 2 : 1);
  // The cache also serves the loss alone: copies into shared memory keep far more of the row
  // in flight than loads into registers.
  const int64_t budget = std::max<int64_t>(0, d.smem_optin - kStaticSmemReserve);
  p.cache_items = std::min(items, budget / item_bytes);
  p.smem = p.cache_items * item_bytes;
  if (p.vec > 1 && (2 * (p.smem + kStaticSmemReserve) > d.smem_per_sm || p.cache_items < items)) {
    // One block per SM, or a row that does not fit: more threads, more loads in flight.
    p.threads = static_cast<int>(std::min<int64_t>(kBlockBigThreads, std::max<int64_t>(64, want)));
  }
  const int64_t by_threads = std::max<int64_t>(1, 2048 / p.threads);
  const int64_t by_smem = std::max<int64_t>(1, d.smem_per_sm / (p.smem + kStaticSmemReserve));
  p.blocks = std::max<int64_t>(1, std::min(rows, sms * std::min(by_threads, by_smem)));
  return p;
}

}  // namespace cuda
}  // namespace xent
