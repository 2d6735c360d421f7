"""Clocks, repeat counts and comparisons for ``kve-fast bench``: what one timed call and one bit comparison are.

Import-light: torch and numpy load inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time

__all__ = ["RepeatPolicy", "compare", "inside_share", "relative_rms", "precision_label", "low_precision_copy",
           "environment", "GRAPH_ENV"]

GRAPH_ENV = "KVE_FAST_CUDA_GRAPH"


class RepeatPolicy:
    """How many timed calls follow the first (untimed-for-the-median) call of a row.

    ``fixed``: exactly that many (a user's ``--repeats``; the row then says whether the repeat rule was met).
    Otherwise as many as fit in ``row_seconds`` at the first call's duration, between ``min_repeats`` and
    ``max_repeats``, and never fewer than the rule: 5 where a call takes under 2 s, 3 otherwise
    (``kve_fast.benchmark.provenance.required_repeats``; ``_time_row`` checks it again on the median).
    """

    def __init__(self, row_seconds: float = 5.0, min_repeats: int = 1, max_repeats: int = 5, fixed: int | None = None):
        self.row_seconds, self.min_repeats, self.max_repeats, self.fixed = row_seconds, min_repeats, max_repeats, fixed

    def repeats(self, first_call_s: float) -> int:
        from .provenance import required_repeats

        if self.fixed is not None:
            return self.fixed
        n = int(self.row_seconds // max(first_call_s, 1e-6))
        return max(required_repeats(first_call_s), self.min_repeats, min(self.max_repeats, n))

    def as_dict(self) -> dict:
        return {"row_seconds": self.row_seconds, "min_repeats": self.min_repeats, "max_repeats": self.max_repeats,
                "fixed": self.fixed, "rule": "at least 5 timed calls where a call takes under 2 s, else at least 3"}


def _sync(device):
    import torch

    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _host(x):
    """A host copy of an output (tensor or array), so later calls cannot change it."""
    import numpy as np

    if hasattr(x, "detach"):
        return x.detach().to("cpu", copy=True)
    return np.array(x, copy=True)


def compare(a, b) -> dict:
    """Element-by-element comparison, no tolerance (NaN where the other has NaN counts as equal):
    ``{"equal", "mismatches", "elements", "bitwise"}``; ``bitwise``: the float32 bit patterns are equal."""
    import numpy as np
    import torch

    ta = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    tb = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
    ta, tb = ta.detach().cpu(), tb.detach().cpu()
    if ta.shape != tb.shape or ta.dtype != tb.dtype:
        return {"equal": False, "mismatches": None, "elements": ta.numel(), "bitwise": False,
                "why": f"shape/dtype {tuple(ta.shape)} {ta.dtype} vs {tuple(tb.shape)} {tb.dtype}"}
    diff = ta != tb
    if ta.is_floating_point():
        diff &= ~(torch.isnan(ta) & torch.isnan(tb))
    bad = int(diff.sum())
    bitwise = bad == 0
    if bitwise and ta.dtype == torch.float32:
        bitwise = torch.equal(ta.contiguous().view(torch.int32), tb.contiguous().view(torch.int32))
    return {"equal": bad == 0, "mismatches": bad, "elements": ta.numel(), "bitwise": bool(bitwise)}


def inside_share(images) -> float:
    """The share of pixels strictly inside (0, 1) of float images (saturated pixels prove little)."""
    import numpy as np

    a = np.asarray(images)
    return float(((a > 0) & (a < 1)).mean()) if a.size else float("nan")


def _latent_to_np(latent):
    """diffusers' own last lines on a final sample: ``(x / 2 + 0.5).clamp(0, 1)``, BHWC numpy."""
    return (latent / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy()


def relative_rms(a, b) -> float:
    """``||a - b|| / ||b||`` over all elements, in float64 (tensors or arrays; inf where ``b`` is all zeros)."""
    import numpy as np
    import torch

    ta = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    tb = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(b))
    ta, tb = ta.detach().cpu().double(), tb.detach().cpu().double()
    if ta.shape != tb.shape:
        raise ValueError(f"relative_rms: shapes differ, {tuple(ta.shape)} vs {tuple(tb.shape)}")
    den = float(tb.norm())
    num = float((ta - tb).norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


_DTYPE_SHORT = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def precision_label(unet_dtype=None, tf32: bool = False) -> str | None:
    """How kve_fast's rows run the UNet, for labels: ``"bf16"``, ``"fp16"``, ``"fp32 + TF32"``,
    ``"bf16 + TF32"``; None for float32 without TF32 (the exact path, labelled as before)."""
    name = _DTYPE_SHORT.get(str(unet_dtype), "fp32") if unet_dtype is not None else "fp32"
    if name == "fp32" and not tf32:
        return None
    return name + (" + TF32" if tf32 else "")


def _fast_fir_runs(device) -> bool:
    """Where the sampler's fast modes put NCSN++ FIR blocks on the Triton kernel (kve_fast/sampler.py::_fast_fir):
    CUDA, or Triton's interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def _diffusers_quiet():
    """diffusers' logger at error level for the block (``ModelMixin.to(dtype)`` warns about an empty list of
    float32 modules)."""
    try:
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        yield
        return
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def low_precision_copy(unet, dtype):
    """``copy.deepcopy(unet).to(dtype)``: the caller's float32 UNet stays as it is."""
    with _diffusers_quiet():
        return copy.deepcopy(unet).to(dtype)


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def _params(model) -> int | None:
    try:
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def environment(device, command: list[str] | None = None) -> dict:
    """Card, driver, versions, commit and dirty flag, date and command, for the record
    (``kve_fast.benchmark.provenance.provenance``), with the names the report reads."""
    from .provenance import provenance

    env = provenance(device, argv=command)
    env.update(
        gpu=env["card"], date=env["date_utc"],
        git=None if env["commit"] is None else env["commit"][:7] + {True: " (DIRTY tree)", False: " (clean tree)",
                                                                    None: " (tree state unknown)"}[env["dirty"]],
        tf32_matmul=env["tf32"]["matmul"], tf32_cudnn=env["tf32"]["cudnn"],
        KVE_FAST_CUDA_GRAPH=os.environ.get(GRAPH_ENV))
    return env


def _needs_patch(model) -> bool:
    try:
        import torch

        from .. import ncsnpp

        return isinstance(model, torch.nn.Module) and ncsnpp.needs_patch(model)
    except Exception:
        return False


def _settle(device) -> None:
    """After a failed call: wait for the device (errors here are reported by the next call, not raised)."""
    if device.type == "cuda":
        try:
            import torch

            torch.cuda.synchronize(device)
        except Exception:
            pass
