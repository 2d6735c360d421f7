// The CUDA implementations of the kve_fast::churn / euler / heun operators: check everything (ops.h: before any
// data pointer is taken), pack, and launch on
// the tensors' device (a device guard) and on torch's current stream there, so the launches are ordered
// with torch's work and are captured by CUDA graphs.
//
// Device-generic torch headers only (no c10/cuda, no ATen/cuda): the current stream comes through the
// device-guard interface that torch's CUDA library registers, so this file compiles against the CPU
// torch wheel too (tests/test_csrc.py); the kernels themselves are step_kernels.cu.
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <cstdint>

#include "ops.h"
#include "step_args.h"

namespace kve_fast {
namespace {

// torch's current CUDA stream on ``device`` (a cudaStream_t)
void* current_stream(const c10::Device& device) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(device.type());
  return impl->getStreamNativeHandle(impl->getStream(device));
}

void check_launch(const char* op, int error) {
  TORCH_CHECK(error == 0, op, ": CUDA launch failed: ", cuda_error_string(error));
}

void churn_cuda(const at::Tensor& x, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                double c, const OptTensor& scalars, const at::Tensor& hat, const OptTensor& xin) {
  const ChurnArgs a = churn_args(x, eps, keys, per_sample, s_noise, c, scalars, hat, xin, c10::DeviceType::CUDA);
  const c10::DeviceGuard guard(x.device());
  check_launch("kve_fast::churn", launch_churn(a, current_stream(x.device())));
}

void euler_cuda(const at::Tensor& raw, const at::Tensor& hat, double half_sigma, double sigma, double inv_sigma,
                double dt, const OptTensor& scalars, bool denoiser, bool true_div, const at::Tensor& prev,
                const OptTensor& d, const OptTensor& xin, const OptTensor& pred, const OptTensor& image) {
  const EulerArgs a = euler_args(raw, hat, half_sigma, sigma, inv_sigma, dt, scalars, denoiser, true_div, prev, d, xin,
                                 pred, image, c10::DeviceType::CUDA);
  const c10::DeviceGuard guard(hat.device());
  check_launch("kve_fast::euler", launch_euler(a, current_stream(hat.device())));
}

void heun_cuda(const at::Tensor& raw, const at::Tensor& hat, const at::Tensor& prev, const at::Tensor& d,
               double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars, bool denoiser,
               bool true_div, const OptTensor& x, const OptTensor& pred, bool churn, bool apply, const OptTensor& eps,
               const OptTensor& keys, int64_t per_sample, double s_noise, double c, const OptTensor& churn_scalars,
               const OptTensor& hat_next, const OptTensor& xin) {
  const HeunArgs a = heun_args(raw, hat, prev, d, half_sigma, sigma, inv_sigma, dt, scalars, denoiser, true_div, x,
                               pred, churn, apply, eps, keys, per_sample, s_noise, c, churn_scalars, hat_next, xin,
                               c10::DeviceType::CUDA);
  const c10::DeviceGuard guard(hat.device());
  check_launch("kve_fast::heun", launch_heun(a, current_stream(hat.device())));
}

}  // namespace
}  // namespace kve_fast

TORCH_LIBRARY_IMPL(kve_fast, CUDA, m) {
  m.impl("churn", &kve_fast::churn_cuda);
  m.impl("euler", &kve_fast::euler_cuda);
  m.impl("heun", &kve_fast::heun_cuda);
}
