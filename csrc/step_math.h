// The element code of the fused step kernels, shared by the CUDA kernels (step_kernels.cu, nvcc) and the
// host loops (step_cpu.cpp, any C++ compiler): one group of 4 consecutive elements at a time.
//
// Bit-exactness: every float operation below is one IEEE operation rounded to nearest, in the
// reference's order (kve_fast/ops/step_triton.py has the same order with its comments). On the device
// the intrinsics __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn are never contracted into FMAs (and the
// build passes --fmad=false besides); on the host, build with -ffp-contract=off. Where torch on CUDA
// divides by a CPU scalar it multiplies by the host's float32 reciprocal: ``true_div`` false.
//
// Philox noise follows Triton's tl.randn4x (Philox4x32-10, key = the 64-bit seed, counter = (q, 0, 0, 0),
// the same uint32 -> uniform map and Box-Muller), so the integer stream is Triton's; the normals may
// differ in the last bits (logf / sincosf are not Triton's).
#pragma once

#include <cmath>
#include <cstdint>

#include "step_args.h"

#if defined(__CUDACC__)
#define KVE_HD __host__ __device__ __forceinline__
#else
#define KVE_HD inline
#endif

namespace kve_fast {
namespace math {

// -- IEEE float32 operations, each rounded once ---------------------------------------------------------

KVE_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

KVE_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

KVE_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

KVE_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// num / s as torch rounds it on the device the kernel runs for: IEEE division, or num * (1 / s)
KVE_HD float divide(float num, float s, float inv_s, bool true_div) {
  return true_div ? div(num, s) : mul(num, inv_s);
}

// -- Philox4x32-10 and normals (Triton's tl.randint4x / tl.randn4x / tl.randn) --------------------------

KVE_HD uint32_t umulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

KVE_HD void philox(uint32_t counter, uint64_t key, uint32_t out[4]) {
  uint32_t c0 = counter, c1 = 0u, c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = umulhi(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = umulhi(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// uint32 -> [0, 1): as a signed int, ~x for negatives, times (2^23 - 1) / 2^23 * 2^-31
KVE_HD float uniform(uint32_t bits) {
  int32_t i = static_cast<int32_t>(bits);
  if (i < 0) i = ~i;
  return mul(static_cast<float>(i), 4.6566127342e-10f);
}

// Box-Muller: u1 = max(1e-7, u1); r = sqrt(-2 log u1); (r cos(2 pi u2), r sin(2 pi u2))
KVE_HD void box_muller(float u1, float u2, float& z1, float& z2) {
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = mul(6.283185307179586f, u2);
  const float r = sqrtf(mul(-2.0f, logf(u1)));
  float s, c;
#if defined(__CUDA_ARCH__)
  sincosf(th, &s, &c);
#else
  s = sinf(th);
  c = cosf(th);
#endif
  z1 = mul(r, c);
  z2 = mul(r, s);
}

// Standard normals for elements i0 .. i0 + 3 (those < n).
KVE_HD void group_normals(const Noise& nz, int64_t i0, int64_t n, float z[4]) {
  if (nz.per_sample == 0 || nz.per_sample % 4 == 0) {
    // one Philox call per group: counter q = the group's index (within its sample); no group straddles
    // two samples. Elements 4q .. 4q + 3 take n1, n3, n2, n4 (Triton's randn4x joined in that order).
    const int64_t b = nz.per_sample == 0 ? 0 : i0 / nz.per_sample;
    const uint32_t q = static_cast<uint32_t>((i0 - b * nz.per_sample) >> 2);
    uint32_t r[4];
    philox(q, static_cast<uint64_t>(nz.keys[b]), r);
    float n1, n2, n3, n4;
    box_muller(uniform(r[0]), uniform(r[1]), n1, n2);
    box_muller(uniform(r[2]), uniform(r[3]), n3, n4);
    z[0] = n1;
    z[1] = n3;
    z[2] = n2;
    z[3] = n4;
  } else {
    // samples of a size not divisible by 4: one call per element, counter = the position in its sample
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k;
      if (i >= n) {
        z[k] = 0.f;
        continue;
      }
      const int64_t b = i / nz.per_sample;
      uint32_t r[4];
      philox(static_cast<uint32_t>(i - b * nz.per_sample), static_cast<uint64_t>(nz.keys[b]), r);
      float unused;
      box_muller(uniform(r[0]), uniform(r[1]), z[k], unused);
    }
  }
}

// -- loads and stores of one group ---------------------------------------------------------------------

// VEC: every pointer is 16-byte aligned, so a full group moves as one float4 (device only).
template <bool VEC>
KVE_HD void load4(const float* p, int64_t i0, int64_t n, float v[4]) {
#if defined(__CUDA_ARCH__)
  if (VEC && i0 + 4 <= n) {
    const float4 t = *reinterpret_cast<const float4*>(p + i0);
    v[0] = t.x;
    v[1] = t.y;
    v[2] = t.z;
    v[3] = t.w;
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) v[k] = i0 + k < n ? p[i0 + k] : 0.f;
}

template <bool VEC>
KVE_HD void store4(float* p, int64_t i0, int64_t n, const float v[4]) {
#if defined(__CUDA_ARCH__)
  if (VEC && i0 + 4 <= n) {
    *reinterpret_cast<float4*>(p + i0) = make_float4(v[0], v[1], v[2], v[3]);
    return;
  }
#endif
  for (int k = 0; k < 4; ++k)
    if (i0 + k < n) p[i0 + k] = v[k];
}

// -- the stages ----------------------------------------------------------------------------------------

// (x / 2 + 0.5).clamp(0, 1), NaN kept as NaN (torch's clamp propagates it)
KVE_HD float image_value(float x) {
  const float v = add(mul(x, 0.5f), 0.5f);
  if (v != v) return v;
  return v < 0.f ? 0.f : (v > 1.f ? 1.f : v);
}

// round(v) half to even as uint8 (v in [0, 255]; NaN -> 0)
KVE_HD uint8_t to_uint8(float v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint8_t>(__float2uint_rn(v));
#else
  return v != v ? uint8_t(0) : static_cast<uint8_t>(static_cast<uint32_t>(std::nearbyint(v)));
#endif
}

// Lines 5-6 on values x[4]: x_hat = x + c * (S_noise * eps) (or x_hat = x), stored with the model input
template <bool VEC>
KVE_HD void churn_store(const Churn& ch, int64_t i0, int64_t n, const float x[4]) {
  float hat[4];
  if (ch.apply) {
    const float c = ch.cs ? ch.cs[0] : ch.c;
    const float s_noise = ch.cs ? ch.cs[1] : ch.s_noise;
    float e[4];
    if (ch.noise.eps) {
      load4<VEC>(ch.noise.eps, i0, n, e);
    } else {
      group_normals(ch.noise, i0, n, e);
    }
    for (int k = 0; k < 4; ++k) hat[k] = add(x[k], mul(c, mul(s_noise, e[k])));
  } else {
    for (int k = 0; k < 4; ++k) hat[k] = x[k];
  }
  store4<VEC>(ch.hat, i0, n, hat);
  if (ch.xin) {
    float xin[4];
    for (int k = 0; k < 4; ++k) xin[k] = mul(add(hat[k], 1.0f), 0.5f);  // (x_hat + 1) / 2
    store4<VEC>(ch.xin, i0, n, xin);
  }
}

template <bool VEC>
KVE_HD void churn_group(const ChurnArgs& a, int64_t g) {
  const int64_t i0 = g * 4;
  float x[4];
  load4<VEC>(a.x, i0, a.n, x);
  churn_store<VEC>(a.churn, i0, a.n, x);
}

KVE_HD void read_scalars(const Scalars& s, float& half_sigma, float& sigma, float& inv_sigma, float& dt) {
  if (s.mem) {
    half_sigma = s.mem[0];
    sigma = s.mem[1];
    inv_sigma = s.mem[2];
    dt = s.mem[3];
  } else {
    half_sigma = s.half_sigma;
    sigma = s.sigma;
    inv_sigma = s.inv_sigma;
    dt = s.dt;
  }
}

// Lines 7-8
template <bool VEC>
KVE_HD void euler_group(const EulerArgs& a, int64_t g) {
  const int64_t i0 = g * 4, n = a.n;
  float half_sigma, sigma, inv_sigma, dt;
  read_scalars(a.s, half_sigma, sigma, inv_sigma, dt);
  float raw[4], hat[4], pred[4], d[4], prev[4];
  load4<VEC>(a.raw, i0, n, raw);
  load4<VEC>(a.hat, i0, n, hat);
  for (int k = 0; k < 4; ++k) {
    if (a.denoiser) {
      pred[k] = raw[k];  // a denoiser returns D itself
    } else {
      // model_output = (sigma_hat / 2) * F ; D = x_hat + sigma_hat * model_output
      pred[k] = add(hat[k], mul(sigma, mul(half_sigma, raw[k])));
    }
    // d = (x_hat - D) / sigma_hat ; x_prev = x_hat + (sigma_prev - sigma_hat) * d
    d[k] = divide(sub(hat[k], pred[k]), sigma, inv_sigma, a.true_div);
    prev[k] = add(hat[k], mul(dt, d[k]));
  }
  store4<VEC>(a.prev, i0, n, prev);
  if (a.d) store4<VEC>(a.d, i0, n, d);
  if (a.xin) {
    float xin[4];
    for (int k = 0; k < 4; ++k) xin[k] = mul(add(prev[k], 1.0f), 0.5f);
    store4<VEC>(a.xin, i0, n, xin);
  }
  if (a.pred) store4<VEC>(a.pred, i0, n, pred);
  if (a.image) {
    float img[4];
    for (int k = 0; k < 4; ++k) img[k] = image_value(prev[k]);
    store4<VEC>(a.image, i0, n, img);
  }
  if (a.image_u8) {
    // round(image * 255) as uint8, BCHW -> BHWC
    const int64_t chw = a.channels * a.hw;
    for (int k = 0; k < 4; ++k) {
      const int64_t i = i0 + k;
      if (i >= n) break;
      const int64_t b = i / chw, rem = i - b * chw, ch = rem / a.hw, p = rem - ch * a.hw;
      a.image_u8[(b * a.hw + p) * a.channels + ch] = to_uint8(mul(image_value(prev[k]), 255.0f));
    }
  }
}

// Lines 9-11, then the next step's lines 5-6
template <bool VEC>
KVE_HD void heun_group(const HeunArgs& a, int64_t g) {
  const int64_t i0 = g * 4, n = a.n;
  float half_sigma, sigma, inv_sigma, dt;
  read_scalars(a.s, half_sigma, sigma, inv_sigma, dt);
  float raw[4], hat[4], prev[4], d[4], pred[4], x[4];
  load4<VEC>(a.raw, i0, n, raw);
  load4<VEC>(a.hat, i0, n, hat);
  load4<VEC>(a.prev, i0, n, prev);
  load4<VEC>(a.d, i0, n, d);
  for (int k = 0; k < 4; ++k) {
    if (a.denoiser) {
      // D' is the denoiser's output ; d' = (x_prev - D') / sigma_prev ; x = x_hat + ((d + d') / 2) * dt
      pred[k] = raw[k];
      const float dc = divide(sub(prev[k], pred[k]), sigma, inv_sigma, a.true_div);
      x[k] = add(hat[k], mul(mul(add(d[k], dc), 0.5f), dt));
    } else {
      // model_output = (sigma_prev / 2) * F ; D' = x_prev + sigma_prev * model_output
      pred[k] = add(prev[k], mul(sigma, mul(half_sigma, raw[k])));
      // d' = (x_prev - D') / sigma_prev ; x = x_hat + (sigma_prev - sigma_hat) * (d / 2 + d' / 2)
      const float dc = divide(sub(prev[k], pred[k]), sigma, inv_sigma, a.true_div);
      x[k] = add(hat[k], mul(dt, add(mul(0.5f, d[k]), mul(0.5f, dc))));
    }
  }
  if (a.x) store4<VEC>(a.x, i0, n, x);
  if (a.pred) store4<VEC>(a.pred, i0, n, pred);
  if (a.churn) churn_store<VEC>(a.next, i0, n, x);
}

}  // namespace math
}  // namespace kve_fast
