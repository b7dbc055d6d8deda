"""Our kernel registered for aten::cross_entropy_loss while a patch() is in force.

F.cross_entropy ends in torch._C._nn.cross_entropy_loss, the ATen operator, which is also what
TorchScript and C++ callers reach.  The operator has only a CompositeImplicitAutograd kernel
(log_softmax + nll_loss), so a kernel of ours for the CPU / CUDA keys and their autograd keys
takes precedence over it: every caller, including a `cross_entropy` imported from
torch.nn.functional before the patch, then runs xent_ext.  The registration is dropped when
the last patch ends, and torch's own kernel is back.

What xent_ext cannot run (another device, a CUDA tensor in a build without the CUDA kernels)
goes to torch's own composite kernel, called directly (calling the operator again would come
back here).  That is only allowed while no xent_ext option is set: torch's kernel cannot apply
z_loss or softcap, so the call raises rather than silently drop them.
"""

from __future__ import annotations

import torch

from ._capabilities import has_cuda
from .functional import cross_entropy

# The ATen schema's int reduction (torch.nn._reduction.get_enum) back to the names.
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}
# The autograd keys of other devices too (meta, XPU, MPS, out-of-tree backends), so that such a
# call raises when options are set rather than run torch's kernel without them; torch refuses
# a kernel for their backend keys on a composite operator, so under inference_mode (no
# autograd key) those devices go to torch's kernel directly.
_DISPATCH_KEYS = ("CPU", "CUDA", "AutogradCPU", "AutogradCUDA", "AutogradMeta", "AutogradXPU",
                  "AutogradMPS", "AutogradPrivateUse1")

_torch_own = torch.ops.aten.cross_entropy_loss.default.decompose


def runs_here(input: torch.Tensor) -> bool:
    device = input.device.type
    return device == "cpu" or (device == "cuda" and has_cuda())


def make_kernel(current_options):
    """The kernel for aten::cross_entropy_loss; current_options() returns the keyword options
    of the patch in force (a dict, possibly empty), read on every call."""

    def kernel(input, target, weight=None, reduction=1, ignore_index=-100,
               label_smoothing=0.0):
        options = current_options()
        if reduction not in _REDUCTIONS or not runs_here(input):
            if options:
                raise RuntimeError(
                    f"xent_ext.patch({', '.join(sorted(options))}=...): this call "
                    f"(input on {input.device}, reduction={reduction}) cannot run on xent_ext "
                    "and torch's own cross_entropy cannot apply these options")
            return _torch_own(input, target, weight, reduction, ignore_index, label_smoothing)
        return cross_entropy(input, target, weight, ignore_index=ignore_index,
                             reduction=_REDUCTIONS[reduction],
                             label_smoothing=label_smoothing, **options)

    return kernel


def register(kernel) -> torch.library.Library:
    """Registers the kernel for every key in _DISPATCH_KEYS; _destroy() on the returned
    library removes it again."""
    lib = torch.library.Library("aten", "IMPL")
    for key in _DISPATCH_KEYS:
        lib.impl("cross_entropy_loss", kernel, key)
    return lib
