// K-dim tile regime: inputs (N, C, S) whose classes are strided by S (segmentation maps, K-dim
// outputs), read coalesced along the spatial dimension, with no transposed copy.
//
// A block takes a tile of kKdimTileS = 32 consecutive positions s of one n: it copies the tile's
// C x 32 logits (and probability targets) into shared memory with 16-byte copies along s
// (cp.async; element by element when a class row is not 16-byte aligned), then each of its 8
// warps takes every 8th class of the 32 positions, a lane per position (shared-memory reads
// along s: no bank conflicts).  The 8 warps' statistics of a position are combined in shared
// memory, loss and lse written, the gradient computed into the same shared memory and copied
// out with 16-byte stores.  Every logit is read once and every gradient element written once;
// a block has 32 rows in flight.  The plan sends K-dim inputs here while a tile fits in shared
// memory (C up to a few thousand).
#pragma once

#include "kernel_common.cuh"

namespace xent {
namespace cuda {

constexpr int kKdimTileS = 32;
constexpr int kKdimWarps = 8;
constexpr int kKdimThreads = kKdimWarps * 32;

// Shared memory of a tile: C x 32 logits, and as much again for probability targets.
inline int64_t kdim_smem_bytes(int64_t C, int elem, bool prob) {
  return C * kKdimTileS * elem * (prob ? 2 : 1);
}

// Copies (out == false) the tile's slab x[n, :, s0 : s0 + width] into xs[j * 32 + l], or
// (out == true) xs back to g[n, :, s0 : s0 + width].  16-byte accesses when `vec` (every class
// row of the slab is 16-byte aligned), element by element otherwise and for a partial tile.
template <bool kOut, typename T>
XENT_DEV void kdim_copy(T* xs, const T* src, T* dst, int64_t C, int64_t S, int width, bool vec) {
  constexpr int V = 16 / sizeof(T);
  constexpr int kItems = kKdimTileS / V;  // items of one class row of the slab
  if (vec && width == kKdimTileS) {
    for (int64_t i = threadIdx.x; i < C * kItems; i += blockDim.x) {
      const int64_t j = i / kItems;
      const int c = static_cast<int>(i % kItems);
      using P = Pack<T, V>;
      if (kOut) {
        *reinterpret_cast<P*>(dst + j * S + c * V) =
            *reinterpret_cast<const P*>(xs + j * kKdimTileS + c * V);
      } else {
        async_copy16(xs + j * kKdimTileS + c * V, src + j * S + c * V);
      }
    }
    return;
  }
  for (int64_t i = threadIdx.x; i < C * kKdimTileS; i += blockDim.x) {
    const int64_t j = i / kKdimTileS;
    const int l = static_cast<int>(i % kKdimTileS);
    if (l >= width) continue;
    if (kOut) {
      dst[j * S + l] = xs[j * kKdimTileS + l];
    } else {
      xs[j * kKdimTileS + l] = src[j * S + l];
    }
  }
}

template <typename T, bool kProb>
__global__ void __launch_bounds__(kKdimThreads, 1) kdim_tile_kernel(KernelArgs<T> k) {
  using acc = acc_t<T>;
  using P1 = Pack<T, 1>;
  const int64_t C = k.opt.num_classes, S = k.S;
  const int64_t N = k.rows / S;
  const int64_t tiles_per_n = (S + kKdimTileS - 1) / kKdimTileS;
  T* const xs = reinterpret_cast<T*>(dynamic_smem());
  T* const qs = xs + C * kKdimTileS;
  Partial<acc>* const parts = block_scratch<Partial<acc>, kKdimWarps * kKdimTileS>();
  RowResult<acc>* const results = block_scratch<RowResult<acc>, kKdimTileS>();
  RowRef<T>* const rows = block_scratch<RowRef<T>, kKdimTileS>();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // 16-byte copies need every class row of a slab to start on a 16-byte boundary.
  const bool vec = (reinterpret_cast<uintptr_t>(k.x) % 16 == 0) && (S * sizeof(T)) % 16 == 0 &&
                   (k.g == nullptr || reinterpret_cast<uintptr_t>(k.g) % 16 == 0) &&
                   (k.t_prob == nullptr || reinterpret_cast<uintptr_t>(k.t_prob) % 16 == 0);

  for (int64_t tile = blockIdx.x; tile < N * tiles_per_n; tile += gridDim.x) {
    const int64_t n = tile / tiles_per_n;
    const int64_t s0 = (tile % tiles_per_n) * kKdimTileS;
    const int width = static_cast<int>(S - s0 < kKdimTileS ? S - s0 : kKdimTileS);
    const int64_t base = n * C * S + s0;
    kdim_copy<false>(xs, k.x + base, static_cast<T*>(nullptr), C, S, width, vec);
    if (kProb) kdim_copy<false>(qs, k.t_prob + base, static_cast<T*>(nullptr), C, S, width, vec);
    async_commit();
    async_wait_all();
    // This lane's row (n, s0 + lane), as the row pieces of kernel_common see it: one element
    // per "item" (VEC = 1), classes j of the slab.
    const bool active = lane < width;
    RowRef<T> r{};
    r.C = active ? static_cast<int>(C) : 0;
    r.t = -1;
    r.valid = active;
    if (active && !kProb) {
      r.t = k.t_index[n * S + s0 + lane];
      r.valid = check_target(r.t, k.opt);
    }
    sync_block();  // every copy has landed
    if (r.valid && !kProb) r.y_t = k.em.y(acc(xs[r.t * kKdimTileS + lane]));

    // Statistics: this warp's classes of the lane's row, max first, then the sums against it.
    acc m = neg_inf<acc>();
    for (int64_t j = warp; j < r.C; j += kKdimWarps)
      m = elem_max(m, k.em.y(acc(xs[j * kKdimTileS + lane])));
    Partial<acc> part = partial_empty<acc>();
    part.ms.max = m;
    for (int64_t j = warp; j < r.C; j += kKdimWarps) {
      const ItemSpan sp{static_cast<int>(j), 0, 1};
      const P1 xv{xs[j * kKdimTileS + lane]};
      const P1 qv{kProb ? qs[j * kKdimTileS + lane] : xv.v[0]};
      push_item<kProb, true>(part, r, sp, xv, qv, k);
    }
    parts[warp * kKdimTileS + lane] = part;
    sync_block();
    if (warp == 0) {
      Partial<acc> p = partial_empty<acc>();
      for (int w = 0; w < kKdimWarps; ++w) p = partial_combine(p, parts[w * kKdimTileS + lane]);
      const RowResult<acc> res = finish_row<kProb>(p, r, k);
      results[lane] = res;
      rows[lane] = r;
      if (active) {
        k.loss[n * S + s0 + lane] = res.loss;
        k.lse[n * S + s0 + lane] = res.norm.lse();
      }
    }
    sync_block();
    if (k.g != nullptr) {
      const RowResult<acc> res = results[lane];
      const RowRef<T> rr = rows[lane];
      for (int64_t j = warp; j < rr.C; j += kKdimWarps) {
        const ItemSpan sp{static_cast<int>(j), 0, 1};
        const P1 xv{xs[j * kKdimTileS + lane]};
        const P1 qv{kProb ? qs[j * kKdimTileS + lane] : xv.v[0]};
        xs[j * kKdimTileS + lane] = grad_item<kProb, true>(rr, sp, xv, qv, res, k).v[0];
      }
      sync_block();
      kdim_copy<true>(xs, static_cast<const T*>(nullptr), k.g + base, C, S, width, vec);
    }
    sync_block();  // the slab is free for the next tile
  }
}

}  // namespace cuda
}  // namespace xent
