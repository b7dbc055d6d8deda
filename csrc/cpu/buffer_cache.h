// Large CPU output buffers: a small cache of freed buffers, so a training loop never pays for
// fresh pages twice.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace xent_cpu {

// An uninitialised contiguous tensor like `like`.  A gradient buffer the size of the logits is
// written once, right after allocation.  Fresh memory costs a page fault per 4 KiB page and
// the kernel zeroing it, about as much as the whole fused pass, so freed buffers of several
// MiB are kept for the next call of the same size (Linux; elsewhere, or for small tensors:
// at::empty_like).  Only the most recent size is kept, at most two buffers of it, and at most
// XENT_CPU_CACHE_MB (default 4096) in all: with varying batch sizes resident memory stays
// that of torch's own allocator (buffer_cache.cpp says why).
// Allocations are reported to torch's profiler like those of torch's own CPU allocator.
at::Tensor empty_like_cached(const at::Tensor& like);

// Returns the cached buffers to the system; returns the bytes released.
int64_t empty_cache();

// The bytes the cache holds now (freed buffers kept for reuse).
int64_t cached_bytes();

}  // namespace xent_cpu
