// The kve_fast::churn / euler / heun operators: schemas, argument checks, and the CPU and Meta
// implementations (the CUDA one is ops_cuda.cpp). Out-variant ops: they write into the buffers they are
// given (the reused state buffers of kve_fast.ops.step_cuda.CudaStep) and return nothing, so they can
// be captured in CUDA graphs and traced by torch.compile (through the Meta kernels, which do nothing).
//
// Device-generic torch headers only: compiles against the CPU torch wheel (tests/test_csrc.py).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "ops.h"
#include "step_args.h"

namespace kve_fast {
namespace {

constexpr int64_t kMaxElements = (int64_t(1) << 31) - 1024;  // as the Triton backend: 32-bit Philox counters

// The tensor every other of a call is compared with: float32, one dense layout, int32-countable.
void check_base(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": `", name,
              "` must be dense (contiguous, or one permutation of it), got strides ", t.strides());
  TORCH_CHECK(t.numel() <= kMaxElements, op, ": `", name, "` has ", t.numel(), " elements; at most ", kMaxElements);
}

// Same dtype, device, shape and strides as ``like`` (the kernels index every tensor linearly).
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": `", name, "` has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.strides() == like.strides(), op, ": `", name, "` has strides ", t.strides(), ", expected ",
              like.strides(), " (one layout for every tensor)");
}

void check_scalars(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like, int64_t count) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous() && t.numel() >= count, op, ": `", name, "` must be a contiguous tensor of ", count,
              " values, got shape ", t.sizes());
}

float* ptr(const at::Tensor& t, bool pointers) { return pointers ? t.data_ptr<float>() : nullptr; }
float* ptr(const OptTensor& t, bool pointers) { return pointers && t ? t->data_ptr<float>() : nullptr; }

// The noise of a churn: a tensor like ``like``, or Philox keys (``keys``, ``per_sample``).
Noise noise_args(const char* op, const at::Tensor& like, const OptTensor& eps, const OptTensor& keys,
                 int64_t per_sample, bool pointers) {
  Noise nz;
  if (eps) {
    check_like(op, "eps", *eps, like);
    nz.eps = ptr(eps, pointers);
    return nz;
  }
  TORCH_CHECK(keys.has_value(), op, ": give `eps` (noise) or `keys` (Philox noise made in the kernel)");
  const at::Tensor& k = *keys;
  TORCH_CHECK(k.scalar_type() == at::kLong && k.dim() == 1 && k.numel() >= 1 && k.is_contiguous(), op,
              ": `keys` must be a contiguous 1-D int64 tensor of at least one key, got ", k.scalar_type(), " ",
              k.sizes());
  TORCH_CHECK(k.device() == like.device(), op, ": `keys` is on ", k.device(), ", expected ", like.device());
  TORCH_CHECK(per_sample >= 0, op, ": `per_sample` must be >= 0, got ", per_sample);
  if (per_sample == 0) {
    TORCH_CHECK(k.numel() == 1, op, ": `per_sample` = 0 (one key for the whole tensor) takes one key, got ", k.numel());
  } else {
    TORCH_CHECK(k.numel() * per_sample == like.numel(), op, ": ", k.numel(), " keys of ", per_sample,
                " elements each do not cover the ", like.numel(), " elements");
  }
  nz.keys = pointers ? k.data_ptr<int64_t>() : nullptr;
  nz.per_sample = per_sample;
  return nz;
}

Churn churn_part(const char* op, const at::Tensor& like, bool apply, const OptTensor& eps, const OptTensor& keys,
                 int64_t per_sample, double s_noise, double c, const OptTensor& scalars, const at::Tensor& hat,
                 const OptTensor& xin, bool pointers) {
  Churn ch;
  ch.apply = apply;
  ch.c = static_cast<float>(c);
  ch.s_noise = static_cast<float>(s_noise);
  if (apply) {
    ch.noise = noise_args(op, like, eps, keys, per_sample, pointers);
    if (scalars) {
      check_scalars(op, "scalars", *scalars, like, 2);
      ch.cs = ptr(scalars, pointers);
    }
  }
  check_like(op, "hat", hat, like);
  ch.hat = ptr(hat, pointers);
  if (xin) check_like(op, "xin", *xin, like);
  ch.xin = ptr(xin, pointers);
  return ch;
}

Scalars stage_scalars(const char* op, const at::Tensor& like, double half_sigma, double sigma, double inv_sigma,
                      double dt, const OptTensor& scalars, bool pointers) {
  Scalars s;
  s.half_sigma = static_cast<float>(half_sigma);
  s.sigma = static_cast<float>(sigma);
  s.inv_sigma = static_cast<float>(inv_sigma);
  s.dt = static_cast<float>(dt);
  if (scalars) {
    check_scalars(op, "scalars", *scalars, like, 4);
    s.mem = ptr(scalars, pointers);
  }
  return s;
}

}  // namespace

ChurnArgs churn_args(const at::Tensor& x, const OptTensor& eps, const OptTensor& keys, int64_t per_sample,
                     double s_noise, double c, const OptTensor& scalars, const at::Tensor& hat,
                     const OptTensor& xin, bool pointers) {
  const char* op = "kve_fast::churn";
  check_base(op, "x", x);
  ChurnArgs a;
  a.x = ptr(x, pointers);
  a.n = x.numel();
  a.churn = churn_part(op, x, true, eps, keys, per_sample, s_noise, c, scalars, hat, xin, pointers);
  return a;
}

EulerArgs euler_args(const at::Tensor& raw, const at::Tensor& hat, double half_sigma, double sigma,
                     double inv_sigma, double dt, const OptTensor& scalars, bool denoiser, bool true_div,
                     const at::Tensor& prev, const OptTensor& d, const OptTensor& xin, const OptTensor& pred,
                     const OptTensor& image, bool pointers) {
  const char* op = "kve_fast::euler";
  check_base(op, "hat", hat);
  check_like(op, "raw", raw, hat);
  check_like(op, "prev", prev, hat);
  if (d) check_like(op, "d", *d, hat);
  if (xin) check_like(op, "xin", *xin, hat);
  if (pred) check_like(op, "pred", *pred, hat);
  EulerArgs a;
  a.raw = ptr(raw, pointers);
  a.hat = ptr(hat, pointers);
  a.n = hat.numel();
  a.s = stage_scalars(op, hat, half_sigma, sigma, inv_sigma, dt, scalars, pointers);
  a.denoiser = denoiser;
  a.true_div = true_div;
  a.prev = ptr(prev, pointers);
  a.d = ptr(d, pointers);
  a.xin = ptr(xin, pointers);
  a.pred = ptr(pred, pointers);
  if (image) {
    const at::Tensor& img = *image;
    if (img.scalar_type() == at::kFloat) {
      check_like(op, "image", img, hat);  // (x / 2 + 0.5).clamp(0, 1) in the state's layout
      a.image = ptr(image, pointers);
    } else {
      TORCH_CHECK(img.scalar_type() == at::kByte, op, ": `image` must be float32 (BCHW) or uint8 (BHWC), got ",
                  img.scalar_type());
      TORCH_CHECK(hat.dim() == 4 && hat.is_contiguous(), op, ": a uint8 `image` needs a contiguous BCHW `hat`, got ",
                  hat.sizes());
      const int64_t b = hat.size(0), c = hat.size(1), h = hat.size(2), w = hat.size(3);
      TORCH_CHECK(img.device() == hat.device(), op, ": `image` is on ", img.device(), ", expected ", hat.device());
      TORCH_CHECK(img.dim() == 4 && img.size(0) == b && img.size(1) == h && img.size(2) == w && img.size(3) == c &&
                      img.is_contiguous(),
                  op, ": a uint8 `image` must be contiguous BHWC [", b, ", ", h, ", ", w, ", ", c, "], got ",
                  img.sizes());
      a.image_u8 = pointers ? img.data_ptr<uint8_t>() : nullptr;
      a.hw = h * w;
      a.channels = c;
    }
  }
  return a;
}

HeunArgs heun_args(const at::Tensor& raw, const at::Tensor& hat, const at::Tensor& prev, const at::Tensor& d,
                   double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars,
                   bool denoiser, bool true_div, const OptTensor& x, const OptTensor& pred, bool churn,
                   bool apply, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                   double c, const OptTensor& churn_scalars, const OptTensor& hat_next, const OptTensor& xin,
                   bool pointers) {
  const char* op = "kve_fast::heun";
  check_base(op, "hat", hat);
  check_like(op, "raw", raw, hat);
  check_like(op, "prev", prev, hat);
  check_like(op, "d", d, hat);
  if (x) check_like(op, "x", *x, hat);
  if (pred) check_like(op, "pred", *pred, hat);
  HeunArgs a;
  a.raw = ptr(raw, pointers);
  a.hat = ptr(hat, pointers);
  a.prev = ptr(prev, pointers);
  a.d = ptr(d, pointers);
  a.n = hat.numel();
  a.s = stage_scalars(op, hat, half_sigma, sigma, inv_sigma, dt, scalars, pointers);
  a.denoiser = denoiser;
  a.true_div = true_div;
  a.x = ptr(x, pointers);
  a.pred = ptr(pred, pointers);
  a.churn = churn;
  if (churn) {
    TORCH_CHECK(hat_next.has_value(), op, ": the fused churn (`churn`=True) needs `hat_next`");
    TORCH_CHECK(!apply || scalars.has_value() == churn_scalars.has_value(), op,
                ": `scalars` and `churn_scalars` must both be given (device memory) or both be None");
    a.next = churn_part(op, hat, apply, eps, keys, per_sample, s_noise, c, churn_scalars, *hat_next, xin, pointers);
  }
  return a;
}

namespace {

// -- CPU: the element code on the host (true_div as the caller asks: torch on the CPU divides truly) --------

void churn_cpu_op(const at::Tensor& x, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                  double c, const OptTensor& scalars, const at::Tensor& hat, const OptTensor& xin) {
  churn_cpu(churn_args(x, eps, keys, per_sample, s_noise, c, scalars, hat, xin, true));
}

void euler_cpu_op(const at::Tensor& raw, const at::Tensor& hat, double half_sigma, double sigma, double inv_sigma,
                  double dt, const OptTensor& scalars, bool denoiser, bool true_div, const at::Tensor& prev,
                  const OptTensor& d, const OptTensor& xin, const OptTensor& pred, const OptTensor& image) {
  euler_cpu(euler_args(raw, hat, half_sigma, sigma, inv_sigma, dt, scalars, denoiser, true_div, prev, d, xin, pred,
                       image, true));
}

void heun_cpu_op(const at::Tensor& raw, const at::Tensor& hat, const at::Tensor& prev, const at::Tensor& d,
                 double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars, bool denoiser,
                 bool true_div, const OptTensor& x, const OptTensor& pred, bool churn, bool apply, const OptTensor& eps,
                 const OptTensor& keys, int64_t per_sample, double s_noise, double c, const OptTensor& churn_scalars,
                 const OptTensor& hat_next, const OptTensor& xin) {
  heun_cpu(heun_args(raw, hat, prev, d, half_sigma, sigma, inv_sigma, dt, scalars, denoiser, true_div, x, pred, churn,
                     apply, eps, keys, per_sample, s_noise, c, churn_scalars, hat_next, xin, true));
}

// -- Meta: nothing to compute (out-variant ops return nothing; the real kernels check the arguments, since
// sizes may be symbolic here) ------------------------------------------------------------------------------

void churn_meta(const at::Tensor&, const OptTensor&, const OptTensor&, int64_t, double, double, const OptTensor&,
                const at::Tensor&, const OptTensor&) {}

void euler_meta(const at::Tensor&, const at::Tensor&, double, double, double, double, const OptTensor&, bool, bool,
                const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&) {}

void heun_meta(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, double,
               double, const OptTensor&, bool, bool, const OptTensor&, const OptTensor&, bool, bool, const OptTensor&,
               const OptTensor&, int64_t, double, double, const OptTensor&, const OptTensor&, const OptTensor&) {}

}  // namespace
}  // namespace kve_fast

// Floats are the host's float32 values (kve_fast.plan); ``scalars``: the same values in device memory
// instead ([c, s_noise] for a churn, [sigma / 2, sigma, 1 / sigma, dt] for a stage), for CUDA graphs.
// ``keys``/``per_sample``: Philox noise (see step_args.h's Noise) where ``eps`` is None.
TORCH_LIBRARY(kve_fast, m) {
  m.def(
      "churn(Tensor x, Tensor? eps, Tensor? keys, int per_sample, float s_noise, float c, Tensor? scalars, "
      "Tensor(a!) hat, Tensor(b!)? xin) -> ()");
  m.def(
      "euler(Tensor raw, Tensor hat, float half_sigma, float sigma, float inv_sigma, float dt, Tensor? scalars, "
      "bool denoiser, bool true_div, Tensor(a!) prev, Tensor(b!)? d, Tensor(c!)? xin, Tensor(d!)? pred, "
      "Tensor(e!)? image) -> ()");
  m.def(
      "heun(Tensor raw, Tensor hat, Tensor prev, Tensor d, float half_sigma, float sigma, float inv_sigma, float dt, "
      "Tensor? scalars, bool denoiser, bool true_div, Tensor(a!)? x, Tensor(b!)? pred, bool churn, bool apply, "
      "Tensor? eps, Tensor? keys, int per_sample, float s_noise, float c, Tensor? churn_scalars, "
      "Tensor(c!)? hat_next, Tensor(d!)? xin) -> ()");
}

TORCH_LIBRARY_IMPL(kve_fast, CPU, m) {
  m.impl("churn", &kve_fast::churn_cpu_op);
  m.impl("euler", &kve_fast::euler_cpu_op);
  m.impl("heun", &kve_fast::heun_cpu_op);
}

TORCH_LIBRARY_IMPL(kve_fast, Meta, m) {
  m.impl("churn", &kve_fast::churn_meta);
  m.impl("euler", &kve_fast::euler_meta);
  m.impl("heun", &kve_fast::heun_meta);
}

// An importable (empty) Python module, so that setup.py's ``kve_fast._C`` loads with ``import``.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define KVE_CONCAT_(a, b) a##b
#define KVE_CONCAT(a, b) KVE_CONCAT_(a, b)
#define KVE_STR_(a) #a
#define KVE_STR(a) KVE_STR_(a)

PyMODINIT_FUNC KVE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, KVE_STR(TORCH_EXTENSION_NAME),
                                      "kve_fast's fused step kernels: the operators torch.ops.kve_fast.*", -1,
                                      nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
