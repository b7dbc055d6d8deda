// The row kernels for c10::BFloat16 inputs (see xent_cuda_launcher.h).
#include "xent_cuda_launcher.h"

namespace xent {
namespace cuda {
XENT_LAUNCH_PLANS(, c10::BFloat16);
}  // namespace cuda
}  // namespace xent
