"""Step-backend selection: ``"torch"`` (the reference's ops), ``"triton"`` (fused Triton kernels), ``"cuda"``
(the same kernels as a CUDA C++ extension, ``csrc/``), ``"auto"`` (Triton on CUDA where it imports, else torch;
it does not pick ``"cuda"`` until measurements on a GPU say it should: ``bench/gpu_check.py --backends cuda``)."""

from __future__ import annotations

import os

import torch

from ._warn import warn_once
from .options import BACKENDS


def triton_available() -> tuple[bool, str]:
    """Whether the Triton backend can be imported, and why not."""
    try:
        from .ops import step_triton  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that fails to initialise
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def cuda_available(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA extension backend can run on ``device`` (built, or buildable just in time), and why not."""
    from .ops import step_cuda

    return step_cuda.available(device)


def check_backend(name: str, device: torch.device) -> str:
    """Resolve ``name`` for ``device`` to ``"torch"``, ``"triton"`` or ``"cuda"``; raise on a bad name or device."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {name!r}")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if name == "torch":
        return "torch"
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"`backend`='cuda' needs CUDA tensors (the CUDA C++ extension), the device is {device}")
        ok, why = cuda_available(device)
        if not ok:
            raise ValueError(f"`backend`='cuda' cannot be used: {why}")
        return "cuda"
    if name == "triton":
        if device.type != "cuda" and not interpret:
            raise ValueError(f"`backend`='triton' needs CUDA tensors (or TRITON_INTERPRET=1), the device is {device}")
        ok, why = triton_available()
        if not ok:
            raise ValueError(f"`backend`='triton' but Triton cannot be used: {why}")
        return "triton"
    # auto: Triton on CUDA when it imports, torch otherwise (one warning when Triton is missing on CUDA).
    if device.type != "cuda":
        return "torch"
    ok, why = triton_available()
    if not ok:
        warn_once("auto-triton", f"kve_fast: Triton is unavailable ({why}); using the torch backend (same results, slower)")
        return "torch"
    return "triton"


def edm_backend(name: str, device: torch.device, dtype: torch.dtype, numel: int) -> str:
    """``check_backend`` for NVlabs' samplers, whose state is ``dtype`` with ``numel`` elements: the Triton kernels
    keep a float32 or float64 state (indexed with int32) and the CUDA extension has none of their kernels.
    ``"auto"`` runs a call they cannot serve on the torch ops (the originals' own, the same bits); naming one is a
    ValueError."""
    from .edm_plan import KERNEL_DTYPES
    from .ops.fused import MAX_ELEMENTS

    resolved = check_backend(name, device)
    why = ""
    if resolved == "cuda":
        why = "the CUDA extension has no kernels for NVlabs' samplers"
    elif resolved == "triton" and dtype not in KERNEL_DTYPES:
        why = f"the Triton kernels keep a float32 or float64 state, not {dtype}"
    elif resolved == "triton" and numel > MAX_ELEMENTS:
        why = f"the sample has {numel} elements; the Triton kernels index at most {MAX_ELEMENTS}"
    if not why:
        return resolved
    if name != "auto":
        raise ValueError(f"`backend`={name!r} cannot run this call: {why}; use backend='torch' or 'auto'")
    return "torch"


def make_backend(name: str, device: torch.device, convention, shape=None, layout: torch.Tensor | None = None,
                 model_dtype: torch.dtype = torch.float32):
    """The step backend object ``name`` (resolved for ``device`` by the front: ``check_backend``'s answer, or
    ``"torch"``); ``shape``: checked against its limits.

    ``convention``: ``kve_fast.convention.REFERENCE``, ``K_DIFFUSION``, ``EDM`` or ``EDM2`` (the kernels' arithmetic);
    ``layout``: a tensor whose dense layout the fused backends keep their state in (default contiguous);
    ``model_dtype``: the UNet's dtype, which the Triton kernels write its input in (``kve_fast.precision``).
    """
    if name not in ("torch", "triton", "cuda"):
        raise ValueError(f"make_backend takes a resolved backend (check_backend's answer), got {name!r}")
    if convention.edm:  # (``edm_backend``'s answer; ``layout``: the state's dtype and strides)
        if name == "triton":
            from .ops.edm_triton import EDMTritonStep

            return EDMTritonStep(layout)
        from .ops.step_torch import EDMTorchStep

        return EDMTorchStep()
    if name == "cuda":
        from .ops.step_cuda import CudaStep

        return CudaStep(convention, device, shape, layout=layout, model_dtype=model_dtype)
    if name == "triton":
        from .ops.step_triton import TritonStep

        return TritonStep(convention, device, shape, layout=layout, model_dtype=model_dtype)
    from .ops.step_torch import KTorchStep, TorchStep

    return KTorchStep() if convention.denoiser else TorchStep()
