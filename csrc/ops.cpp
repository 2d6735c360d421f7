// The kve_fast::churn / euler / heun operators: schemas, argument checks, and the CPU and Meta
// implementations (the CUDA one is ops_cuda.cpp). Out-variant ops: they write into the buffers they are
// given (the reused state buffers of kve_fast.ops.step_cuda.CudaStep) and return nothing, so they can
// be captured in CUDA graphs and traced by torch.compile (through the Meta kernels, which do nothing).
//
// Device-generic torch headers only: compiles against the CPU torch wheel (tests/test_csrc.py).
#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "ops.h"
#include "step_args.h"

namespace kve_fast {
namespace {

constexpr int64_t kMaxElements = (int64_t(1) << 31) - 1024;  // as the Triton backend: 32-bit Philox counters

// An optional tensor that was given: None, and an undefined tensor (which only C++ callers can pass), are absent.
const at::Tensor* given(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

void check_defined(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": `", name, "` is an undefined tensor");
}

// The tensor every other of a call is compared with: float32, on the implementation's device type, one dense
// layout, int32-countable.
void check_base(const char* op, const char* name, const at::Tensor& t, c10::DeviceType device_type) {
  check_defined(op, name, t);
  TORCH_CHECK(t.device().type() == device_type, op, ": the ", c10::DeviceTypeName(device_type),
              " implementation got `", name, "` on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": `", name,
              "` must be dense (contiguous, or one permutation of it), got strides ", t.strides());
  TORCH_CHECK(t.numel() <= kMaxElements, op, ": `", name, "` has ", t.numel(), " elements; at most ", kMaxElements);
}

// Same dtype, device, shape and strides as ``like`` (the kernels index every tensor linearly).
void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  check_defined(op, name, t);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), op, ": `", name, "` has shape ", t.sizes(), ", expected ", like.sizes());
  TORCH_CHECK(t.strides() == like.strides(), op, ": `", name, "` has strides ", t.strides(), ", expected ",
              like.strides(), " (one layout for every tensor)");
}

void check_like(const char* op, const char* name, const OptTensor& t, const at::Tensor& like) {
  if (const at::Tensor* p = given(t)) check_like(op, name, *p, like);
}

void check_scalars(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like, int64_t count) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": `", name, "` must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": `", name, "` is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.is_contiguous() && t.numel() >= count, op, ": `", name, "` must be a contiguous tensor of ", count,
              " values, got shape ", t.sizes());
}

// The noise of a churn: ``eps`` (a tensor like ``like``), or Philox ``keys`` with ``per_sample``; not both.
void check_noise(const char* op, const at::Tensor& like, const OptTensor& eps, const OptTensor& keys,
                 int64_t per_sample) {
  const at::Tensor* e = given(eps);
  const at::Tensor* k = given(keys);
  TORCH_CHECK(e || k, op, ": give `eps` (noise) or `keys` (Philox noise made in the kernel)");
  TORCH_CHECK(!(e && k), op, ": give `eps` (noise) or `keys` (Philox noise made in the kernel), not both");
  if (e) {
    check_like(op, "eps", *e, like);
    TORCH_CHECK(per_sample == 0, op, ": `per_sample` counts the elements of one key, and `eps` takes no keys: give 0, "
                "got ", per_sample);
    return;
  }
  TORCH_CHECK(k->scalar_type() == at::kLong && k->dim() == 1 && k->numel() >= 1 && k->is_contiguous(), op,
              ": `keys` must be a contiguous 1-D int64 tensor of at least one key, got ", k->scalar_type(), " ",
              k->sizes());
  TORCH_CHECK(k->device() == like.device(), op, ": `keys` is on ", k->device(), ", expected ", like.device());
  TORCH_CHECK(per_sample >= 0, op, ": `per_sample` must be >= 0, got ", per_sample);
  if (per_sample == 0) {
    TORCH_CHECK(k->numel() == 1, op, ": `per_sample` = 0 (one key for the whole tensor) takes one key, got ",
                k->numel());
  } else {
    // keys * per_sample == numel, by division: the product can overflow int64 (and wrap onto numel)
    const int64_t n = like.numel();
    TORCH_CHECK(n % per_sample == 0 && n / per_sample == k->numel(), op, ": ", k->numel(), " keys of ", per_sample,
                " elements each do not cover the ", n, " elements");
  }
}

// -- overlap: the kernels read and write in place, one group of 4 elements per thread ----------------------

enum class Access {
  kOut,        // written
  kReadFirst,  // read at each element before any output is written there (by the same thread): an output may
               // be this very tensor (the same view; heun's hat_next = hat), but not overlap it otherwise
  kReadShared, // read by every thread (scalars, keys), or after the outputs are written: no output may overlap it
};

struct Arg {
  const char* name;
  const at::Tensor* t;  // nullptr: not given
  Access access;
};

// Outputs overlap no other tensor of the call (one another included), except that an output may be exactly a
// kReadFirst input. Data pointers are compared, never dereferenced; run after the dtype/device/layout checks.
void check_overlaps(const char* op, std::initializer_list<Arg> args) {
  for (const Arg* out = args.begin(); out != args.end(); ++out) {
    if (!out->t || out->access != Access::kOut) continue;
    for (const Arg* other = args.begin(); other != args.end(); ++other) {
      if (other == out || !other->t || (other->access == Access::kOut && other < out)) continue;  // pairs once
      const at::MemOverlapStatus s = at::get_overlap_status(*out->t, *other->t);
      if (s == at::MemOverlapStatus::No) continue;
      const bool full = s == at::MemOverlapStatus::Full;
      switch (other->access) {
        case Access::kOut:
          TORCH_CHECK(false, op, ": outputs `", out->name, "` and `", other->name, "` ",
                      full ? "are the same memory" : "overlap in memory", ": give separate tensors");
        case Access::kReadFirst:
          TORCH_CHECK(full, op, ": output `", out->name, "` partially overlaps input `", other->name,
                      "`: an output may be an input itself (the same view) or lie apart from it, not partly on it");
          break;
        case Access::kReadShared:
          TORCH_CHECK(false, op, ": output `", out->name, "` overlaps `", other->name,
                      "`, which is read after outputs are written or by every thread: give separate tensors");
      }
    }
  }
}

// A tensor for a stage the call does not run: refused rather than ignored.
void refuse_unused(const char* op, const char* name, const OptTensor& t, const char* why) {
  TORCH_CHECK(!given(t), op, ": `", name, "` is given but ", why, ", so it would be ignored: pass None");
}

float* ptr(const at::Tensor& t) { return t.data_ptr<float>(); }
float* ptr(const OptTensor& t) { return given(t) ? t->data_ptr<float>() : nullptr; }

// A churn's pointers and floats (checked already: check_noise, and the tensors' layout)
Churn churn_part(bool apply, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                 double c, const OptTensor& scalars, const at::Tensor& hat, const OptTensor& xin) {
  Churn ch;
  ch.apply = apply;
  ch.c = static_cast<float>(c);
  ch.s_noise = static_cast<float>(s_noise);
  if (apply) {
    ch.noise.eps = ptr(eps);
    if (!given(eps)) {
      ch.noise.keys = keys->data_ptr<int64_t>();
      ch.noise.per_sample = per_sample;
    }
    ch.cs = ptr(scalars);
  }
  ch.hat = ptr(hat);
  ch.xin = ptr(xin);
  return ch;
}

Scalars stage_scalars(double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars) {
  Scalars s;
  s.half_sigma = static_cast<float>(half_sigma);
  s.sigma = static_cast<float>(sigma);
  s.inv_sigma = static_cast<float>(inv_sigma);
  s.dt = static_cast<float>(dt);
  s.mem = ptr(scalars);
  return s;
}

}  // namespace

ChurnArgs churn_args(const at::Tensor& x, const OptTensor& eps, const OptTensor& keys, int64_t per_sample,
                     double s_noise, double c, const OptTensor& scalars, const at::Tensor& hat,
                     const OptTensor& xin, c10::DeviceType device_type) {
  const char* op = "kve_fast::churn";
  check_base(op, "x", x, device_type);
  check_noise(op, x, eps, keys, per_sample);
  if (const at::Tensor* cs = given(scalars)) check_scalars(op, "scalars", *cs, x, 2);
  check_like(op, "hat", hat, x);
  check_like(op, "xin", xin, x);
  check_overlaps(op, {{"x", &x, Access::kReadFirst}, {"eps", given(eps), Access::kReadFirst},
                      {"keys", given(keys), Access::kReadShared}, {"scalars", given(scalars), Access::kReadShared},
                      {"hat", &hat, Access::kOut}, {"xin", given(xin), Access::kOut}});
  ChurnArgs a;
  a.x = ptr(x);
  a.n = x.numel();
  a.churn = churn_part(true, eps, keys, per_sample, s_noise, c, scalars, hat, xin);
  return a;
}

EulerArgs euler_args(const at::Tensor& raw, const at::Tensor& hat, double half_sigma, double sigma,
                     double inv_sigma, double dt, const OptTensor& scalars, bool denoiser, bool true_div,
                     const at::Tensor& prev, const OptTensor& d, const OptTensor& xin, const OptTensor& pred,
                     const OptTensor& image, c10::DeviceType device_type) {
  const char* op = "kve_fast::euler";
  check_base(op, "hat", hat, device_type);
  check_like(op, "raw", raw, hat);
  check_like(op, "prev", prev, hat);
  check_like(op, "d", d, hat);
  check_like(op, "xin", xin, hat);
  check_like(op, "pred", pred, hat);
  if (const at::Tensor* s = given(scalars)) check_scalars(op, "scalars", *s, hat, 4);
  const at::Tensor* img = given(image);
  const bool u8 = img && img->scalar_type() != at::kFloat;
  if (img && !u8) {
    check_like(op, "image", *img, hat);  // (x / 2 + 0.5).clamp(0, 1) in the state's layout
  } else if (u8) {
    TORCH_CHECK(img->scalar_type() == at::kByte, op, ": `image` must be float32 (BCHW) or uint8 (BHWC), got ",
                img->scalar_type());
    TORCH_CHECK(hat.dim() == 4 && hat.is_contiguous(), op, ": a uint8 `image` needs a contiguous BCHW `hat`, got ",
                hat.sizes());
    TORCH_CHECK(img->device() == hat.device(), op, ": `image` is on ", img->device(), ", expected ", hat.device());
    const int64_t b = hat.size(0), c = hat.size(1), h = hat.size(2), w = hat.size(3);
    TORCH_CHECK(img->dim() == 4 && img->size(0) == b && img->size(1) == h && img->size(2) == w &&
                    img->size(3) == c && img->is_contiguous(),
                op, ": a uint8 `image` must be contiguous BHWC [", b, ", ", h, ", ", w, ", ", c, "], got ",
                img->sizes());
  }
  check_overlaps(op, {{"raw", &raw, Access::kReadFirst}, {"hat", &hat, Access::kReadFirst},
                      {"scalars", given(scalars), Access::kReadShared}, {"prev", &prev, Access::kOut},
                      {"d", given(d), Access::kOut}, {"xin", given(xin), Access::kOut},
                      {"pred", given(pred), Access::kOut}, {"image", img, Access::kOut}});
  EulerArgs a;
  a.raw = ptr(raw);
  a.hat = ptr(hat);
  a.n = hat.numel();
  a.s = stage_scalars(half_sigma, sigma, inv_sigma, dt, scalars);
  a.denoiser = denoiser;
  a.true_div = true_div;
  a.prev = ptr(prev);
  a.d = ptr(d);
  a.xin = ptr(xin);
  a.pred = ptr(pred);
  if (img && !u8) a.image = ptr(*img);
  if (u8) {
    a.image_u8 = img->data_ptr<uint8_t>();
    a.hw = hat.size(2) * hat.size(3);
    a.channels = hat.size(1);
  }
  return a;
}

HeunArgs heun_args(const at::Tensor& raw, const at::Tensor& hat, const at::Tensor& prev, const at::Tensor& d,
                   double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars,
                   bool denoiser, bool true_div, const OptTensor& x, const OptTensor& pred, bool churn,
                   bool apply, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                   double c, const OptTensor& churn_scalars, const OptTensor& hat_next, const OptTensor& xin,
                   c10::DeviceType device_type) {
  const char* op = "kve_fast::heun";
  check_base(op, "hat", hat, device_type);
  check_like(op, "raw", raw, hat);
  check_like(op, "prev", prev, hat);
  check_like(op, "d", d, hat);
  check_like(op, "x", x, hat);
  check_like(op, "pred", pred, hat);
  if (const at::Tensor* s = given(scalars)) check_scalars(op, "scalars", *s, hat, 4);
  // What only the fused churn reads or writes is refused where the kernel would ignore it (the floats s_noise
  // and c are ignored there, as they are wherever `churn_scalars` gives them)
  if (!churn) {
    const char* why = "`churn` is False (no fused churn)";
    TORCH_CHECK(!apply, op, ": `apply` is True but ", why);
    refuse_unused(op, "hat_next", hat_next, why);
    refuse_unused(op, "xin", xin, why);
  }
  if (!churn || !apply) {
    const char* why = churn ? "`apply` is False (the next x_hat is x: no noise)" : "`churn` is False (no fused churn)";
    refuse_unused(op, "eps", eps, why);
    refuse_unused(op, "keys", keys, why);
    refuse_unused(op, "churn_scalars", churn_scalars, why);
    TORCH_CHECK(per_sample == 0, op, ": `per_sample` is ", per_sample, " but ", why, ": give 0");
  }
  if (churn) {
    TORCH_CHECK(given(hat_next), op, ": the fused churn (`churn`=True) needs `hat_next`");
    check_like(op, "hat_next", *hat_next, hat);
    check_like(op, "xin", xin, hat);
    if (apply) {
      check_noise(op, hat, eps, keys, per_sample);
      TORCH_CHECK((given(scalars) != nullptr) == (given(churn_scalars) != nullptr), op,
                  ": `scalars` and `churn_scalars` must both be given (device memory) or both be None");
      if (given(churn_scalars)) check_scalars(op, "churn_scalars", *churn_scalars, hat, 2);
    }
  }
  // heun reads raw, hat, prev, d first, then writes x and pred, then reads eps (the churn's noise) and writes
  // hat_next and xin: eps may not be an output
  check_overlaps(op, {{"raw", &raw, Access::kReadFirst}, {"hat", &hat, Access::kReadFirst},
                      {"prev", &prev, Access::kReadFirst}, {"d", &d, Access::kReadFirst},
                      {"scalars", given(scalars), Access::kReadShared}, {"eps", given(eps), Access::kReadShared},
                      {"keys", given(keys), Access::kReadShared},
                      {"churn_scalars", given(churn_scalars), Access::kReadShared},
                      {"x", given(x), Access::kOut}, {"pred", given(pred), Access::kOut},
                      {"hat_next", given(hat_next), Access::kOut}, {"xin", given(xin), Access::kOut}});
  HeunArgs a;
  a.raw = ptr(raw);
  a.hat = ptr(hat);
  a.prev = ptr(prev);
  a.d = ptr(d);
  a.n = hat.numel();
  a.s = stage_scalars(half_sigma, sigma, inv_sigma, dt, scalars);
  a.denoiser = denoiser;
  a.true_div = true_div;
  a.x = ptr(x);
  a.pred = ptr(pred);
  a.churn = churn;
  if (churn) a.next = churn_part(apply, eps, keys, per_sample, s_noise, c, churn_scalars, *hat_next, xin);
  return a;
}

namespace {

// -- CPU: the element code on the host (true_div as the caller asks: torch on the CPU divides truly) --------

void churn_cpu_op(const at::Tensor& x, const OptTensor& eps, const OptTensor& keys, int64_t per_sample, double s_noise,
                  double c, const OptTensor& scalars, const at::Tensor& hat, const OptTensor& xin) {
  churn_cpu(churn_args(x, eps, keys, per_sample, s_noise, c, scalars, hat, xin, c10::DeviceType::CPU));
}

void euler_cpu_op(const at::Tensor& raw, const at::Tensor& hat, double half_sigma, double sigma, double inv_sigma,
                  double dt, const OptTensor& scalars, bool denoiser, bool true_div, const at::Tensor& prev,
                  const OptTensor& d, const OptTensor& xin, const OptTensor& pred, const OptTensor& image) {
  euler_cpu(euler_args(raw, hat, half_sigma, sigma, inv_sigma, dt, scalars, denoiser, true_div, prev, d, xin, pred,
                       image, c10::DeviceType::CPU));
}

void heun_cpu_op(const at::Tensor& raw, const at::Tensor& hat, const at::Tensor& prev, const at::Tensor& d,
                 double half_sigma, double sigma, double inv_sigma, double dt, const OptTensor& scalars, bool denoiser,
                 bool true_div, const OptTensor& x, const OptTensor& pred, bool churn, bool apply, const OptTensor& eps,
                 const OptTensor& keys, int64_t per_sample, double s_noise, double c, const OptTensor& churn_scalars,
                 const OptTensor& hat_next, const OptTensor& xin) {
  heun_cpu(heun_args(raw, hat, prev, d, half_sigma, sigma, inv_sigma, dt, scalars, denoiser, true_div, x, pred, churn,
                     apply, eps, keys, per_sample, s_noise, c, churn_scalars, hat_next, xin,
                     c10::DeviceType::CPU));
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
