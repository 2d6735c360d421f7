// The torch-facing side of the fused step kernels: argument checks and the packing of tensors into the
// kernels' plain argument structs (step_args.h), shared by the CPU, Meta (ops.cpp) and CUDA
// (ops_cuda.cpp) implementations of the kve_fast::churn / euler / heun operators.
//
// Only device-generic torch headers: this compiles against the CPU torch wheel (csrc-build notes).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <optional>

#include "step_args.h"

namespace kve_fast {

using OptTensor = std::optional<at::Tensor>;

// Each *_args checks every argument first (dtype, device, shape, one dense layout, keys; outputs that overlap
// inputs or one another; tensors for a stage the call does not run) and only then takes the data pointers
// into the kernel's argument struct: a refused call has touched no data and launched nothing. The first
// tensor (``x`` or ``hat``) must be on ``device_type`` (the implementation's: CPU or CUDA), every other
// on its device. Optional tensors that are undefined count as None; the floats that a device tensor
// replaces (``scalars``, ``churn_scalars``) are ignored.
//
// Aliasing: an output may be exactly an input that the kernel reads at each element before writing that
// element (churn: x, eps; euler: raw, hat; heun: raw, hat, prev, d), as kve_fast.ops.fused.FusedStep
// uses it (heun's hat_next = hat; euler's prev = hat in k-diffusion's Euler where gamma = 0); any other
// overlap of an output with an input or with another output is refused, heun's eps included (it is read
// after x and pred are written).
ChurnArgs churn_args(const at::Tensor& x, const OptTensor& eps, const OptTensor& keys, int64_t per_sample,
                     double s_noise, double c, const OptTensor& scalars, const at::Tensor& hat,
                     const OptTensor& xin, c10::DeviceType device_type);

EulerArgs euler_args(const at::Tensor& raw, const at::Tensor& hat, double half_sigma, double sigma,
                     double inv_sigma, double dt, const OptTensor& scalars, bool denoiser, bool true_div,
                     const at::Tensor& prev, const OptTensor& d, const OptTensor& xin, const OptTensor& pred,
                     const OptTensor& image, c10::DeviceType device_type);

HeunArgs heun_args(const at::Tensor& raw, const at::Tensor& hat, const at::Tensor& prev, const at::Tensor& d,
                   double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars,
                   bool denoiser, bool true_div, const OptTensor& x, const OptTensor& pred, bool churn,
                   bool apply, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                   double c, const OptTensor& churn_scalars, const OptTensor& hat_next, const OptTensor& xin,
                   c10::DeviceType device_type);

}  // namespace kve_fast
