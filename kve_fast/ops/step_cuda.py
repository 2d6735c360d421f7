"""The fused step kernels as a CUDA C++ extension (``csrc/``): ``backend="cuda"``, a second exact GPU backend.

The same three kernels as the Triton backend (``step_triton.py``: its docstring describes them), the same
op order and the same launches per step, registered as torch operators (``torch.ops.kve_fast.churn``,
``euler``, ``heun``): out-variant ops that write into given buffers, launch on the tensors' device and on
torch's current stream (so they can be captured in CUDA graphs), with Meta kernels for torch.compile.
They need no Triton and no JIT warm-up once built.

Bit-exactness: every float operation is one IEEE operation rounded to nearest (``__fmul_rn`` and
friends, built with ``--fmad=false``); division by a step scalar multiplies by the host's float32
reciprocal where torch on CUDA does (``true_div`` False) and divides (``__fdiv_rn``) in k-diffusion's
convention; the uint8 image rounds half to even like numpy. Fast noise is Philox4x32-10 keyed per sample
with Triton's counters and mapping (the same integer stream; the normals may differ in the last bits).

Loading, on first use: the ops already registered; else the extension built at install time
(``kve_fast._C``, setup.py); else a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension.load``
(a CUDA torch, nvcc and ninja, from a source checkout; compiled once, then loaded from torch's cache); else
an ``ExtensionUnavailable`` error that says how to get it. The operators also have CPU implementations
(the same element code on the host, ``csrc/step_cpu.cpp``), which the CPU tests use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import shutil
import threading
import warnings
from pathlib import Path

import torch

from ..images import to_image
from ..noise import StepKeys
from ..plan import _f32, churn_coefficient, euler_scalars, heun_scalars

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
_MAX_ELEMENTS = 2**31 - 1024  # 32-bit Philox counters, as the Triton backend
_LOCK = threading.Lock()
_JIT_NAMES = {True: "kve_fast_cuda", False: "kve_fast_cpu"}


class ExtensionUnavailable(RuntimeError):
    """The CUDA extension is neither built nor buildable here (the message says why and what to do)."""


# ----------------------------------------------------------------------------------------------------
# Loading the operators


def registered() -> bool:
    """Whether ``torch.ops.kve_fast.churn`` / ``euler`` / ``heun`` exist in this process."""
    try:
        ops = torch.ops.kve_fast
        return all(hasattr(ops, name) for name in ("churn", "euler", "heun"))
    except (AttributeError, RuntimeError):
        return False


def has_cuda_kernels() -> bool:
    """Whether the registered operators have CUDA implementations (not only the CPU test build)."""
    return registered() and torch._C._dispatch_has_kernel_for_dispatch_key("kve_fast::churn", "CUDA")


def build_settings() -> dict:
    """setup.py's build settings (sources, flags, archs), so the just-in-time build compiles like the install."""
    setup_py = ROOT / "setup.py"
    if not setup_py.is_file():
        raise ExtensionUnavailable(f"no source checkout: {setup_py} is missing")
    return runpy.run_path(str(setup_py))  # defines settings; setup() runs only as __main__


def jit_problem(cuda: bool = True) -> str:
    """Why a just-in-time build cannot run here ('' if it can)."""
    if cuda and not torch.version.cuda:
        return f"this torch ({torch.__version__}) has no CUDA"
    if not (CSRC / "ops.cpp").is_file():
        return f"the sources are not here ({CSRC} is missing: kve_fast is not installed from a source checkout)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is missing (`pip install ninja`)"
    if cuda and build_settings()["find_nvcc"]() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on the PATH)"
    if not cuda and shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return ""


def how_to_get() -> str:
    return ("to get it: build it at install time (a CUDA torch, then `pip install --no-build-isolation -e .` in "
            "kve_fast's checkout), or let backend='cuda' build it just in time (needs a CUDA torch, nvcc and ninja, "
            "and a source checkout)")


def jit_build(cuda: bool = True, build_directory: str | None = None, verbose: bool = False) -> None:
    """Compile ``csrc/`` with ``torch.utils.cpp_extension.load`` and register its operators in this process.

    ``cuda``: the whole extension, for the current GPU's architecture; False: the CPU operators only (tests).
    """
    from torch.utils.cpp_extension import load

    s = build_settings()
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        sources, cuda_flags = s["SOURCES"], s["nvcc_flags"]((f"{major}{minor}",), False)
    else:
        sources, cuda_flags = s["CPU_SOURCES"], None
    kwargs = {"build_directory": build_directory} if build_directory else {}
    if build_directory:
        os.makedirs(build_directory, exist_ok=True)
    load(name=_JIT_NAMES[cuda], sources=[str(ROOT / p) for p in sources], extra_cflags=list(s["CXX_FLAGS"]),
         extra_cuda_cflags=cuda_flags, extra_include_paths=[str(CSRC)], is_python_module=False, verbose=verbose,
         **kwargs)


def load_ops(jit: bool = True, cuda: bool = True):
    """``torch.ops.kve_fast`` with the operators registered: already, from ``kve_fast._C``, or built just in time.

    Raises ``ExtensionUnavailable`` (with how to get it) where none of these works.
    """
    with _LOCK:
        if registered() and (not cuda or has_cuda_kernels()):
            return torch.ops.kve_fast
        if registered():  # the CPU test build is loaded: a second registration of the namespace would fail
            raise ExtensionUnavailable("kve_fast's CPU-only test build of the operators is loaded in this process; "
                                       "the CUDA extension cannot be loaded beside it")
        problem = ""
        try:
            importlib.import_module("kve_fast._C")
        except ImportError as exc:
            problem = f"kve_fast._C is not built ({exc})" if isinstance(exc, ModuleNotFoundError) else \
                f"kve_fast._C does not load ({exc})"
        if registered():
            return torch.ops.kve_fast
        why = jit_problem(cuda) if jit else "just-in-time building is off"
        if why:
            raise ExtensionUnavailable(f"kve_fast's CUDA extension is unavailable: {problem or 'not built'}; "
                                       f"it cannot be built just in time: {why}; {how_to_get()}")
        warnings.warn("kve_fast: building the CUDA extension (csrc/) just in time for backend='cuda': this can take a "
                      "minute, once; later processes load it from torch's extension cache", RuntimeWarning, stacklevel=3)
        jit_build(cuda)
        if not registered():
            raise ExtensionUnavailable("the just-in-time build finished but registered no kve_fast operators")
        return torch.ops.kve_fast


def available(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether ``backend="cuda"`` can run on ``device`` (loaded, built, or buildable just in time), and why not.

    Builds nothing: a just-in-time build happens when the backend is first made.
    """
    if device is not None and device.type != "cuda":
        return False, f"it needs CUDA tensors, the device is {device}"
    if has_cuda_kernels():
        return True, ""
    if importlib.util.find_spec("kve_fast._C") is not None:
        return True, ""
    why = jit_problem(True)
    if why:
        return False, f"the extension is not built and cannot be built just in time ({why}); {how_to_get()}"
    return True, ""


# ----------------------------------------------------------------------------------------------------
# Launchers: the same contracts as step_triton's (callers pass float32 tensors of one shape and dense
# layout); None for "not wanted". They return what they wrote.


def _true_div(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _scalar_args(scalars, count: int):
    """Floats for the op, and the device tensor the kernel reads them from instead (or None)."""
    if isinstance(scalars, torch.Tensor):
        return (0.0,) * count, scalars
    return tuple(float(v) for v in scalars), None


def _int64(seed: int) -> int:
    """An int seed as the int64 with the same low 64 bits (Triton's seed argument is an int64 too)."""
    seed &= 2**64 - 1
    return seed - 2**64 if seed >= 2**63 else seed


def _seed_args(seed, n: int, device):
    """``(keys, per_sample)`` for Philox noise from ``seed``: an int (one key for the whole tensor, counted
    by the global position) or an int64 device tensor of K per-sample keys (K divides ``n``)."""
    if isinstance(seed, torch.Tensor):
        return seed, n // seed.numel()
    return torch.tensor([_int64(seed or 0)], dtype=torch.int64, device=device), 0


_OPS = None  # the loaded ops (torch.ops.kve_fast), looked up once


def _ops():
    global _OPS
    if _OPS is None:
        _OPS = torch.ops.kve_fast if registered() else load_ops()
    return _OPS


def _launch_churn(x, eps, seed, s_noise, c, out=None, store_xin: bool = True):
    """``c`` a float (with ``s_noise``) or a device tensor ``[c, s_noise]``; ``seed`` (``eps`` None): an int or
    per-sample keys. ``out``: ``(hat, xin)`` buffers. Returns ``(hat, xin or None)``."""
    hat, xin = out if out is not None else (torch.empty_like(x), torch.empty_like(x) if store_xin else None)
    xin = xin if store_xin else None
    keys, per_sample = (None, 0) if eps is not None else _seed_args(seed, x.numel(), x.device)
    (c_f, s_f), cs = _scalar_args(c, 2) if isinstance(c, torch.Tensor) else ((c, s_noise), None)
    _ops().churn(x, eps, keys, per_sample, float(s_f), float(c_f), cs, hat, xin)
    return hat, xin


def _launch_euler(raw, hat, scalars, want_input: bool, want_derivative: bool, want_pred: bool, image, out=None,
                  denoiser: bool = False):
    """``scalars``: ``(sigma_hat / 2, sigma_hat, 1 / sigma_hat, dt)`` or a device tensor of them; ``out``:
    ``(prev, d, xin)`` buffers. Returns ``(prev, d, xin, pred, image)``."""
    if out is not None:
        prev, d, xin = out
        d, xin = (d if want_derivative else None), (xin if want_input else None)
    else:
        prev = torch.empty_like(hat)
        d = torch.empty_like(hat) if want_derivative else None
        xin = torch.empty_like(hat) if want_input else None
    pred = torch.empty_like(hat) if want_pred else None
    img = None
    if image is not None:
        b, channels, h, w = hat.shape
        img = (torch.empty_like(hat) if image == "float"
               else torch.empty((b, h, w, channels), dtype=torch.uint8, device=hat.device))
    values, mem = _scalar_args(scalars, 4)
    _ops().euler(raw, hat, *values, mem, denoiser, denoiser or _true_div(hat), prev, d, xin, pred, img)
    return prev, d, xin, pred, img


def _launch_heun(raw, hat, prev, d, scalars, want_sample: bool, want_pred: bool, churn_next, out=None,
                 denoiser: bool = False):
    """``churn_next``: None, or ``(eps or None, seed, s_noise, c)`` (``c`` None: the next x_hat is x itself;
    a device tensor ``[c, s_noise]`` with device ``scalars``). ``out``: ``(hat_next, xin)`` buffers
    (``hat_next`` may be ``hat``). Returns ``(x, pred, hat_next, xin)``."""
    x = torch.empty_like(hat) if want_sample else None
    pred = torch.empty_like(hat) if want_pred else None
    hat_next = xin = keys = cs = eps = None
    per_sample, s_noise, c = 0, 0.0, 0.0
    apply = False
    if churn_next is not None:
        eps, seed, s_noise, c = churn_next
        apply = c is not None
        hat_next, xin = out if out is not None else (torch.empty_like(hat), torch.empty_like(hat))
        xin = None if denoiser else xin
        if apply and eps is None:
            keys, per_sample = _seed_args(seed, hat.numel(), hat.device)
        if isinstance(c, torch.Tensor):
            cs, c, s_noise = c, 0.0, 0.0
        if not apply:
            eps, c = None, 0.0
    values, mem = _scalar_args(scalars, 4)
    if churn_next is not None and apply and (mem is None) != (cs is None):
        raise ValueError("the step's scalars and the next churn's must both be floats or both device tensors")
    _ops().heun(raw, hat, prev, d, *values, mem, denoiser, denoiser or _true_div(hat), x, pred, churn_next is not None,
                apply, eps, keys, per_sample, float(s_noise), float(c if c is not None else 0.0), cs, hat_next, xin)
    return x, pred, hat_next, xin


# ----------------------------------------------------------------------------------------------------
# Public ops, as step_triton's: check inputs (wrong dtype or device is an error; non-contiguous inputs
# are copied), compute the reference's scalars on the host, launch.


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"`{name}` must be float32, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"`{name}` has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"`{name}` is on {t.device}, expected {like.device}")
    if t.numel() > _MAX_ELEMENTS:
        raise ValueError(f"`{name}` has {t.numel()} elements; the kernels count with 32 bits (at most {_MAX_ELEMENTS})")
    return t.contiguous()


def _check_seed(seed, sample: torch.Tensor):
    """An int seed, or per-sample keys: a 1-D int64 tensor on ``sample``'s device whose length divides its size."""
    if seed is None:
        raise ValueError("`seed` is required when `eps` is None (device noise)")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 1 or seed.numel() == 0:
            raise TypeError(f"`seed` as per-sample keys must be a 1-D int64 tensor, got {seed.dtype} {tuple(seed.shape)}")
        if seed.device != sample.device:
            raise ValueError(f"`seed` is on {seed.device}, expected {sample.device}")
        if sample.numel() % seed.numel():
            raise ValueError(f"`seed` has {seed.numel()} keys, which do not divide the sample's {sample.numel()} "
                             "elements into equal samples")
        return seed.contiguous()
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"`seed` must be an int or a tensor of per-sample keys, got {type(seed).__name__}")
    return seed


def churn(sample, eps, s_noise, sigma, sigma_hat, seed: int | torch.Tensor | None = None):
    """Lines 5-6. ``eps`` is unscaled noise, or None with ``seed`` for in-kernel Philox noise (an int, or
    per-sample int64 keys). Returns ``(sample_hat, model_input)``."""
    sample = _check("sample", sample)
    if eps is None:
        seed = _check_seed(seed, sample)
    eps = None if eps is None else _check("eps", eps, sample)
    return _launch_churn(sample, eps, seed, _f32(s_noise), churn_coefficient(sigma, sigma_hat))


def euler(raw, sample_hat, sigma_hat, sigma_prev, want_input=True, want_derivative=True, want_pred=False,
          image: str | None = None):
    """Lines 7-8 from the raw model output. Returns ``(sample_prev, derivative, model_input, pred, image)``."""
    sample_hat = _check("sample_hat", sample_hat)
    raw = _check("raw", raw, sample_hat)
    if image not in (None, "float", "uint8"):
        raise ValueError(f"`image` must be None, 'float' or 'uint8', got {image!r}")
    if image is not None and sample_hat.dim() != 4:
        raise ValueError("`image` output needs a BCHW `sample_hat`")
    return _launch_euler(raw, sample_hat, euler_scalars(sigma_hat, sigma_prev), want_input, want_derivative,
                         want_pred, image)


def heun(raw, sample_hat, sample_prev, derivative, sigma_hat, sigma_prev, want_sample=True, want_pred=False,
         next_churn: tuple | None = None):
    """Lines 9-11, optionally fused with the next churn: ``next_churn`` is ``(eps, s_noise, sigma_next,
    sigma_hat_next, seed)``. Returns ``(sample, pred, sample_hat_next, model_input_next)``."""
    sample_hat = _check("sample_hat", sample_hat)
    raw = _check("raw", raw, sample_hat)
    sample_prev = _check("sample_prev", sample_prev, sample_hat)
    derivative = _check("derivative", derivative, sample_hat)
    churn_next = None
    if next_churn is not None:
        eps, s_noise, sigma_n, sigma_hat_n, seed = next_churn
        if eps is None:
            seed = _check_seed(seed, sample_hat)
        eps = None if eps is None else _check("eps", eps, sample_hat)
        churn_next = (eps, seed, _f32(s_noise), churn_coefficient(sigma_n, sigma_hat_n))
    return _launch_heun(raw, sample_hat, sample_prev, derivative, heun_scalars(sigma_hat, sigma_prev), want_sample,
                        want_pred, churn_next)


# ----------------------------------------------------------------------------------------------------
# The step backend


class CudaStep:
    """The CUDA C++ step backend: the Triton backend's launches, buffers and conventions (``TritonStep``).

    ``denoiser=False``: the reference pipeline's convention (a score model at ``(x + 1) / 2``, scalars from
    ``kve_fast.plan.Step``, division as torch does it on the device); ``denoiser=True``: k-diffusion's
    (scalars from ``kve_fast.plan.KStep``, true division). Noise arrives as a tensor (exact mode) or as
    per-sample keys (fast mode, ``kve_fast.noise.StepKeys``; an int seed keys the whole batch).
    The state the loop never hands out lives in five buffers reused every step; what it hands out is
    always a new tensor. All tensors a kernel touches share one dense layout (``layout``, contiguous by default).

    Making one loads the operators (``load_ops``), building them just in time where needed.
    """

    name = "cuda"

    def __init__(self, s_noise: float, want_pred: bool = False, shape=None, denoiser: bool = False,
                 layout: torch.Tensor | None = None):
        if shape is not None:
            numel = 1
            for dim in shape:
                numel *= int(dim)
            if numel > _MAX_ELEMENTS:
                raise ValueError(f"`shape` {tuple(shape)} has {numel} elements; the CUDA backend takes at most "
                                 f"{_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
        _ops()
        self.s_noise = _f32(s_noise)
        self.want_pred = want_pred
        self.denoiser = denoiser
        self._layout = layout
        self._buffers = None

    def _like(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the state's layout (a copy only when its strides differ)."""
        if self._layout is None:
            return t.contiguous()
        if t.stride() == self._layout.stride():
            return t
        return torch.empty_like(self._layout).copy_(t)

    def _new(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(like if self._layout is None else self._layout)

    def _buf(self, like: torch.Tensor):
        b = self._buffers
        if b is None or b[0].shape != like.shape or b[0].device != like.device:
            if like.numel() > _MAX_ELEMENTS:
                raise ValueError(f"`shape` {tuple(like.shape)} has {like.numel()} elements; the CUDA backend "
                                 f"takes at most {_MAX_ELEMENTS} (use backend='torch' or a smaller batch)")
            if self._layout is None:
                b = [torch.empty(like.shape, dtype=torch.float32, device=like.device) for _ in range(5)]
            else:
                b = [torch.empty_like(self._layout) for _ in range(5)]
            self._buffers = b
        return b  # hat, xin (first model input), prev, d, xin2 (second model input)

    def _noise(self, noise):
        """``(eps, seed)`` for the launchers: a noise tensor in the state's layout, or Philox keys / an int seed."""
        if isinstance(noise, StepKeys):
            keys = noise.device
            if self._layout is not None and not self._layout.is_contiguous():
                # positions count in memory order: draw contiguous (as in every other layout), then copy
                zero = torch.zeros(self._layout.shape, dtype=torch.float32, device=keys.device)
                eps = _launch_churn(zero, None, keys, 1.0, 1.0, store_xin=False)[0]  # 0 + 1 * (1 * z) = z
                return self._like(eps), None
            return None, keys
        if isinstance(noise, int):
            return None, noise
        return self._like(noise), None

    def _euler_scalars(self, step):
        return (0.0, step.sigma_hat_f, 0.0, step.dt) if self.denoiser else step.euler

    def _heun_scalars(self, step):
        return (0.0, step.sigma_next_f, 0.0, step.dt) if self.denoiser else step.heun

    def churn(self, sample, noise, step, keep: bool = False):
        """Lines 5-6; returns ``(x_hat, model input)``. ``keep``: x_hat is handed out (a new tensor)."""
        sample = self._like(sample)
        if self.denoiser and step.churn is None:
            return sample, sample  # k-diffusion leaves x as it is where gamma = 0 (the noise is still drawn)
        eps, seed = self._noise(noise)
        b = self._buf(sample)
        out = None if not keep else (self._new(sample), None if self.denoiser else self._new(sample))
        hat, xin = _launch_churn(sample, eps, seed, self.s_noise, step.churn,
                                 out=out or (b[0], None if self.denoiser else b[1]), store_xin=not self.denoiser)
        return hat, hat if self.denoiser else xin

    def euler(self, raw, sample_hat, step, want_input: bool, want_derivative: bool = True,
              image: str | None = None, keep: bool = True):
        """``keep``: x_prev is handed out (the final sample, or a callback's): a new tensor, not a buffer."""
        b = self._buf(sample_hat)
        out = None if keep else (b[2], b[3], b[4])
        prev, d, xin, pred, img = _launch_euler(self._like(raw), sample_hat, self._euler_scalars(step),
                                                want_input and not self.denoiser, want_derivative, self.want_pred,
                                                image, out=out, denoiser=self.denoiser)
        if self.denoiser and want_input:
            xin = prev  # a denoiser's second call takes x_prev itself
        return prev, d, pred, xin, img

    def heun(self, raw, sample_hat, sample_prev, derivative, step, next_step=None, noise_next=None):
        churn_next = None
        if next_step is not None:
            eps, seed = self._noise(noise_next)
            churn_next = (eps, seed, self.s_noise, next_step.churn)
        b = self._buf(sample_hat)
        x, pred, hat, xin = _launch_heun(self._like(raw), sample_hat, sample_prev, derivative,
                                         self._heun_scalars(step), next_step is None, self.want_pred, churn_next,
                                         out=(b[0], b[1]), denoiser=self.denoiser)
        if next_step is None:
            return x, pred, None
        return x, pred, (hat, hat if self.denoiser else xin)

    def to_image(self, sample, kind: str):
        """The final image of a sample that a callback replaced (the fused Euler path did not run)."""
        return to_image(sample, kind)
