// The row kernels for float inputs (see xent_cuda_launcher.h).
#include "xent_cuda_launcher.h"

namespace xent {
namespace cuda {
XENT_LAUNCH_PLANS(, float);
}  // namespace cuda
}  // namespace xent
