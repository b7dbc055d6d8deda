// The row kernels for double inputs (see xent_cuda_launcher.h).
#include "xent_cuda_launcher.h"

namespace xent {
namespace cuda {
XENT_LAUNCH_PLANS(, double);
}  // namespace cuda
}  // namespace xent
