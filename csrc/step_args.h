// The fused step kernels' arguments and entry points, in plain C++ (no CUDA, no torch headers).
//
// Three kernels, as in kve_fast/ops/step_triton.py (read its module docstring for the op order):
//   churn: x_hat = x + c * (S_noise * eps); model input (x_hat + 1) / 2            (Algorithm 2, lines 5-6)
//   euler: d = (x_hat - D) / sigma_hat; x_prev = x_hat + dt * d; optional outputs   (lines 7-8)
//          and, on the last step, the final image (float BCHW, or uint8 BHWC for PIL)
//   heun:  the second-order correction, optionally fused with the next step's churn (lines 9-11, then 5-6)
//
// All float tensors of one call share one dense layout and are indexed linearly (element i of one is
// element i of every other); each GPU thread, or each iteration of the CPU loops, owns 4 consecutive
// elements. Pointers that are "nullptr: not stored" select optional outputs.
#pragma once

#include <cstdint>

namespace kve_fast {

// Where a churn's N(0, 1) noise comes from.
struct Noise {
  const float* eps = nullptr;      // a noise tensor ("exact" mode), or nullptr for Philox noise made in the kernel
  const int64_t* keys = nullptr;   // Philox keys (63-bit): one per sample, or a single one
  int64_t per_sample = 0;          // > 0: element i draws from keys[i / per_sample], counted from its sample's start;
                                   // 0: keys[0] for every element, counted by the global position
};

// One churn (lines 5-6): x_hat = x + c * (s_noise * eps), model input (x_hat + 1) / 2.
struct Churn {
  float c = 0.f;                 // sqrt(sigma_hat^2 - sigma^2), rounded as the reference rounds it
  float s_noise = 1.f;
  const float* cs = nullptr;     // device memory [c, s_noise] read instead of the floats (CUDA-graph mode)
  bool apply = true;             // false: x_hat = x (k-diffusion's gamma = 0)
  Noise noise;
  float* hat = nullptr;          // x_hat (may be the tensor x_hat is computed from: each element is read first)
  float* xin = nullptr;          // (x_hat + 1) / 2, the score model's input; nullptr: not stored (a denoiser)
};

// One stage's scalars, as the host computes them (kve_fast.plan): sigma / 2, sigma, the float32
// reciprocal 1 / sigma, and dt = sigma_prev - sigma_hat. ``mem``: device memory [4] read instead.
struct Scalars {
  float half_sigma = 0.f, sigma = 1.f, inv_sigma = 1.f, dt = 0.f;
  const float* mem = nullptr;
};

struct ChurnArgs {
  const float* x = nullptr;
  int64_t n = 0;
  Churn churn;
};

struct EulerArgs {
  const float* raw = nullptr;    // the model's raw output: the score (scaled by sigma_hat / 2 here) or D itself
  const float* hat = nullptr;
  int64_t n = 0;
  Scalars s;                     // at sigma_hat
  bool denoiser = false;         // raw is D (k-diffusion's convention)
  bool true_div = false;         // d = (x_hat - D) / sigma (IEEE division) instead of * (1 / sigma) (torch on CUDA)
  float* prev = nullptr;         // x_prev (always stored)
  float* d = nullptr;
  float* xin = nullptr;          // (x_prev + 1) / 2
  float* pred = nullptr;         // D
  float* image = nullptr;        // (x_prev / 2 + 0.5).clamp(0, 1), BCHW like x_prev
  uint8_t* image_u8 = nullptr;   // the same image as PIL rounds it (half to even), BHWC
  int64_t hw = 1;                // H * W and C of the BCHW state, for the BHWC image
  int64_t channels = 1;
};

struct HeunArgs {
  const float* raw = nullptr;    // the model's raw output at sigma_prev
  const float* hat = nullptr;
  const float* prev = nullptr;
  const float* d = nullptr;
  int64_t n = 0;
  Scalars s;                     // at sigma_prev
  bool denoiser = false;
  bool true_div = false;
  float* x = nullptr;            // the corrected sample; nullptr: not stored (only the fused churn's outputs)
  float* pred = nullptr;
  bool churn = false;            // fuse the next step's churn into this launch
  Churn next;
};

// CUDA launchers (step_kernels.cu): launch on ``stream`` (a cudaStream_t) on the current device and
// return the cudaError_t of the launch (0: success).
int launch_churn(const ChurnArgs& a, void* stream);
int launch_euler(const EulerArgs& a, void* stream);
int launch_heun(const HeunArgs& a, void* stream);
const char* cuda_error_string(int error);

// The same element code on the host (step_cpu.cpp): the reference the CPU tests hold the arithmetic to.
void churn_cpu(const ChurnArgs& a);
void euler_cpu(const EulerArgs& a);
void heun_cpu(const HeunArgs& a);

}  // namespace kve_fast
