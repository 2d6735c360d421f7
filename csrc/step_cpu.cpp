// The fused step kernels' element code run on the host, one group of 4 elements after another: the
// same source as the CUDA kernels (step_math.h), so the CPU tests check its arithmetic and op order
// against torch's CPU ops. Build with -ffp-contract=off (setup.py, tests/test_csrc.py).
#include <cstdint>

#include "step_args.h"
#include "step_math.h"

namespace kve_fast {

void churn_cpu(const ChurnArgs& a) {
  for (int64_t g = 0; g * 4 < a.n; ++g) math::churn_group<false>(a, g);
}

void euler_cpu(const EulerArgs& a) {
  for (int64_t g = 0; g * 4 < a.n; ++g) math::euler_group<false>(a, g);
}

void heun_cpu(const HeunArgs& a) {
  for (int64_t g = 0; g * 4 < a.n; ++g) math::heun_group<false>(a, g);
}

}  // namespace kve_fast
