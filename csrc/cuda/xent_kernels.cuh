// CUDA kernels of the forward op, and the host-side plan that picks one.
//
// Every kernel computes, per row: the log-sum-exp, the loss and, when asked, the gradient of
// every element rounded once to the input dtype; the row math itself is xent_row.h.
//
// Regimes (plan_forward in plan.cuh picks one from C, the dtype, the row count, the alignment
// and the device); each file's header says how it works:
//
//  * group   (regime_group.cuh):   rows of up to 256 16-byte items; 2 to 32 lanes per row, each
//                                  group prefetching its next row into shared memory.
//  * regs    (regime_regs.cuh):    longer rows, class-index targets: the row in registers,
//                                  split over a thread-block cluster on sm_90; the forward
//                                  alone a streaming reduction.
//  * kdim    (regime_kdim.cuh):    K-dim inputs: 32-position tiles in shared memory, read along
//                                  the spatial dimension.
//  * block   (regime_block.cuh):   one block per row, the row cached in shared memory as far as
//                                  it fits (probability targets; long rows on sm_80).
//  * split   (regime_split.cuh):   few huge rows without clusters: partial statistics per
//                                  slice, combined, then the gradient per slice.
//  * strided (regime_strided.cuh): one thread per row (xent_row_strided.h, the CPU scalar
//                                  code): K-dim rows without room for a tile, C == 0.
//
// slice_sweeps.cuh holds the slice / combine / gradient-given-lse pieces that block and split
// share; kernel_common.cuh the per-element math, the reductions and the row set-up.
//
// Alignment.  Rows are walked in "items" of VEC = 16 / sizeof(T) elements aligned to 16 bytes
// in memory: element j of a row lies in item (j + shift) / VEC, where shift is the row start's
// offset from a 16-byte boundary.  Only a row's first and last items can be partial; they are
// loaded and stored element by element, every other item with one 16-byte access.  So odd C
// (32001, 50257) keeps 16-byte loads for all but at most two items per row.  This needs x, the
// gradient and the probability target to share their offset modulo 16 bytes (true for
// tensors allocated by PyTorch); if they do not, the block regime runs with VEC = 1.
//
// Precision.  Accumulation in float (double for double), the gradient computed in that type
// and rounded once.  Float exps use fast_exp (see xent_cuda_compat.cuh).  Row offsets are
// 64-bit.  Out-of-range class targets trip a device-side assertion and are never read; no
// kernel reads a value back to the host.
#pragma once

#include "plan.cuh"
#include "regime_block.cuh"
#include "regime_group.cuh"
#include "regime_kdim.cuh"
#include "regime_regs.cuh"
#include "regime_split.cuh"
#include "regime_strided.cuh"
#include "scale_grad.cuh"

namespace xent {
namespace cuda {

template <typename T, int V, bool kAligned, bool kPlain, typename Launcher>
void launch_regs(const KernelArgs<T>& k, const Plan& p, dim3 grid, dim3 block, unsigned cluster,
                 Launcher& launch) {
  switch (p.items_per_thread) {
    case 1:
      return launch(&regs_rows_kernel<T, V, 1, kAligned, kPlain>, grid, block, 0, k, cluster);
    case 2:
      return launch(&regs_rows_kernel<T, V, 2, kAligned, kPlain>, grid, block, 0, k, cluster);
    case 4:
      return launch(&regs_rows_kernel<T, V, 4, kAligned, kPlain>, grid, block, 0, k, cluster);
    case 8:
      return launch(&regs_rows_kernel<T, V, 8, kAligned, kPlain>, grid, block, 0, k, cluster);
    default:
      return launch(&regs_rows_kernel<T, V, 16, kAligned, kPlain>, grid, block, 0, k, cluster);
  }
}

// Launches the plan's kernels through `launch(kernel, grid, block, smem_bytes, args, cluster)`:
// real CUDA launches in xent_cuda.cu, the CPU emulation in emu/.
template <typename T, bool kProb, typename Launcher>
void launch_plan(const KernelArgs<T>& k, const Plan& p, Launcher& launch) {
  constexpr int V = 16 / sizeof(T);
  static_assert(sizeof(Pack<T, V>) == 16, "16-byte items");
  const dim3 block(static_cast<unsigned>(p.threads));
  const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.grid_y));
  switch (p.regime) {
    case Regime::kGroup:
      if (p.nv == 1) {
        switch (p.group) {
          case 2:
            return launch(&group_rows_kernel<T, V, 2, 1, kProb>, grid, block, p.smem, k, 1);
          case 4:
            return launch(&group_rows_kernel<T, V, 4, 1, kProb>, grid, block, p.smem, k, 1);
          case 8:
            return launch(&group_rows_kernel<T, V, 8, 1, kProb>, grid, block, p.smem, k, 1);
          case 16:
            return launch(&group_rows_kernel<T, V, 16, 1, kProb>, grid, block, p.smem, k, 1);
          default:
            return launch(&group_rows_kernel<T, V, 32, 1, kProb>, grid, block, p.smem, k, 1);
        }
      }
      if (p.nv == 2)
        return launch(&group_rows_kernel<T, V, 32, 2, kProb>, grid, block, p.smem, k, 1);
      if (p.nv == 4)
        return launch(&group_rows_kernel<T, V, 32, 4, kProb>, grid, block, p.smem, k, 1);
      return launch(&group_rows_kernel<T, V, 32, 8, kProb>, grid, block, p.smem, k, 1);
    case Regime::kRegs:
      if constexpr (!kProb) {  // the plan takes the regs regime for class-index targets only
        const unsigned c = static_cast<unsigned>(p.cluster);
        if (p.plain) return launch_regs<T, V, true, true>(k, p, grid, block, c, launch);
        if (p.aligned) return launch_regs<T, V, true, false>(k, p, grid, block, c, launch);
        return launch_regs<T, V, false, false>(k, p, grid, block, c, launch);
      }
      return;
    case Regime::kKdim:
      return launch(&kdim_tile_kernel<T, kProb>, grid, block, p.smem, k, 1);
    case Regime::kBlock:
      if (p.threads > kBlockThreads) {
        return launch(&block_rows_kernel<T, V, kProb, kBlockBigThreads>, grid, block, p.smem, k, 1);
      }
      return launch(&block_rows_kernel<T, V, kProb, kBlockThreads>, grid, block, p.smem, k, 1);
    case Regime::kBlockScalar:
      return launch(&block_rows_kernel<T, 1, kProb, kBlockThreads>, grid, block, p.smem, k, 1);
    case Regime::kSplit: {
      launch(&split_stats_kernel<T, V, kProb>, grid, block, 0, k, 1);
      const dim3 grid2(k.g != nullptr ? grid.x : 1u, grid.y);
      return launch(&split_grad_kernel<T, V, kProb>, grid2, block, 0, k, 1);
    }
    default:
      return launch(&strided_kernel<T, kProb>, grid, block, 0, k, 1);
  }
}

}  // namespace cuda
}  // namespace xent
