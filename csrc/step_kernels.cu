// The fused step kernels on CUDA: one thread per group of 4 consecutive elements (step_math.h has the
// element code and its op order). Only CUDA's own headers are included here, so this file compiles on
// machines whose torch has no CUDA (tests/test_csrc.py compiles it for sm_80 and sm_90 in CI).
//
// Built with --fmad=false (setup.py); the element code uses __fmul_rn / __fadd_rn / __fdiv_rn anyway.
#include <cuda_runtime.h>

#include <cstdint>

#include "step_args.h"
#include "step_math.h"

namespace kve_fast {
namespace {

constexpr int kThreads = 256;  // threads per block; each thread owns 4 elements

template <bool VEC>
__global__ void __launch_bounds__(kThreads) churn_kernel(const ChurnArgs a) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g * 4 < a.n) math::churn_group<VEC>(a, g);
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) euler_kernel(const EulerArgs a) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g * 4 < a.n) math::euler_group<VEC>(a, g);
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) heun_kernel(const HeunArgs a) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g * 4 < a.n) math::heun_group<VEC>(a, g);
}

bool aligned(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Whether every float pointer (nullptr counts as aligned) allows float4 loads and stores.
template <typename... P>
bool all_aligned(P... p) {
  return (aligned(p) && ...);
}

dim3 blocks(int64_t n) {
  const int64_t groups = (n + 3) / 4;
  return dim3(static_cast<unsigned int>((groups + kThreads - 1) / kThreads));
}

}  // namespace

int launch_churn(const ChurnArgs& a, void* stream) {
  if (a.n <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (all_aligned(a.x, a.churn.noise.eps, a.churn.hat, a.churn.xin)) {
    churn_kernel<true><<<blocks(a.n), kThreads, 0, s>>>(a);
  } else {
    churn_kernel<false><<<blocks(a.n), kThreads, 0, s>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_euler(const EulerArgs& a, void* stream) {
  if (a.n <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (all_aligned(a.raw, a.hat, a.prev, a.d, a.xin, a.pred, a.image)) {
    euler_kernel<true><<<blocks(a.n), kThreads, 0, s>>>(a);
  } else {
    euler_kernel<false><<<blocks(a.n), kThreads, 0, s>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

int launch_heun(const HeunArgs& a, void* stream) {
  if (a.n <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (all_aligned(a.raw, a.hat, a.prev, a.d, a.x, a.pred, a.next.noise.eps, a.next.hat, a.next.xin)) {
    heun_kernel<true><<<blocks(a.n), kThreads, 0, s>>>(a);
  } else {
    heun_kernel<false><<<blocks(a.n), kThreads, 0, s>>>(a);
  }
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // namespace kve_fast
