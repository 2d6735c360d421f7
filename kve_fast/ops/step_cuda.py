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
import sys
import threading
import warnings
from pathlib import Path

import torch

from . import fused

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
_MAX_ELEMENTS = fused.MAX_ELEMENTS  # 32-bit Philox counters, as the Triton backend
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
# layout; each output a tensor to write or None for "not wanted").


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


def _launch_churn(x, eps, seed, coef, *, hat, model_input=None):
    """``coef``: ``(c, S_noise)`` floats or a device tensor ``[c, S_noise]``; ``seed`` (``eps`` None): an int or
    per-sample keys (as step_triton's)."""
    keys, per_sample = (None, 0) if eps is not None else _seed_args(seed, x.numel(), x.device)
    (c, s_noise), cs = _scalar_args(coef, 2)
    _ops().churn(x, eps, keys, per_sample, s_noise, c, cs, hat, model_input)


def _launch_euler(raw, hat, level, *, x_next, d=None, model_input=None, denoised=None, image=None, image_kind=None,
                  denoiser: bool, true_div: bool):
    """``level``: ``(sigma / 2, sigma, 1 / sigma, dt)`` at sigma_hat, or a device tensor of them (as step_triton's);
    ``image_kind`` follows from ``image``'s dtype in the op."""
    values, mem = _scalar_args(level, 4)
    _ops().euler(raw, hat, *values, mem, denoiser, true_div, x_next, d, model_input, denoised, image)


def _launch_heun(raw, hat, x_next, d, level, *, x=None, denoised=None, then=None, denoiser: bool, true_div: bool):
    """``then``: None or the next step's churn (``kve_fast.ops.fused.NextChurn``), as step_triton's."""
    keys = cs = eps = hat_next = input_next = None
    per_sample, s_noise, c, apply = 0, 0.0, 0.0, False
    values, mem = _scalar_args(level, 4)
    if then is not None:
        eps, seed, coef, hat_next, input_next, apply = then
        if apply:
            if eps is None:
                keys, per_sample = _seed_args(seed, hat.numel(), hat.device)
            (c, s_noise), cs = _scalar_args(coef, 2)
            if (mem is None) != (cs is None):
                raise ValueError("the step's scalars and the next churn's must both be floats or both device tensors")
        else:
            eps = None
    _ops().heun(raw, hat, x_next, d, *values, mem, denoiser, true_div, x, denoised, then is not None, apply, eps, keys,
                per_sample, float(s_noise), float(c), cs, hat_next, input_next)


# ----------------------------------------------------------------------------------------------------
# Public ops and the step backend: the shared host side (``fused.py``) with these launchers.

_SELF = sys.modules[__name__]


# churn (lines 5-6), euler (7-8), heun (9-11, optionally fused with the next churn): see fused.py
churn, euler, heun = fused.bind_ops(_SELF)

class CudaStep(fused.FusedStep):
    """The CUDA C++ step backend: ``fused.FusedStep`` (the Triton backend's launches, buffers and
    conventions) with the extension's kernels. Making one loads the operators (``load_ops``), building
    them just in time where needed."""

    name = "cuda"
    launch = _SELF

    def __init__(self, convention, device: torch.device, shape=None, layout: torch.Tensor | None = None,
                 model_dtype: torch.dtype = torch.float32):
        super().__init__(convention, device, shape, layout, model_dtype)  # float32 kernels: casts around the model
        _ops()
