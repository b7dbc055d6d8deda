// Large CPU output buffers backed by transparent huge pages.
#pragma once

#include <ATen/ATen.h>

namespace xent_cpu {

// An uninitialised contiguous tensor like `like`.  A gradient buffer the size of the logits is
// written once, right after allocation; with 4 KiB pages the first touch of each page (a page
// fault, and the kernel zeroing it) costs about as much as the whole fused pass, so buffers of
// several MiB are aligned to 2 MiB and marked for huge pages (Linux; elsewhere at::empty_like).
at::Tensor empty_like_huge_pages(const at::Tensor& like);

}  // namespace xent_cpu
