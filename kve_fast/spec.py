"""``RunSpec``: the settings one run is built from, normalized once at the front door.

The step backend, the schedule, the buffers and the noise source of a run are all made from its
``RunSpec`` (``kve_fast.sampler.execute``), and a CUDA-graph capture is keyed by it: every field is part of
the capture key (``key()``) unless it is marked ``FED``, which says that the captured work reads its value
from device memory that is written before every replay (``kve_fast.graphs.DeviceFeed``). A new setting
therefore changes the key unless someone decides, in its declaration, that graphs are fed with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .convention import Convention
from .precision import Precision

__all__ = ["RunSpec", "FED", "resolve_device"]

FED = {"fed": True}  # field metadata: read from the device feed at every replay, not baked into a capture


def resolve_device(device: torch.device) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device (``torch.cuda.set_device`` changes it)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(frozen=True)
class RunSpec:
    """The settings of one run (see the module docstring)."""

    convention: Convention
    backend: str  # "torch", "triton" or "cuda" (resolved)
    device: torch.device  # with its index
    shape: tuple
    strides: tuple  # the state's layout (contiguous or channels_last)
    noise: str  # "exact" or "fast"
    solver: str  # "heun" or "euler"
    hand_out: bool  # a callback sees each step
    image: str | None  # None (the sample), "float" or "uint8"
    precision: Precision
    fir: str  # NCSN++ FIR resampling: "diffusers" (its ops) or "triton" (kve_fast.ncsnpp's fast kernel)
    extra: tuple | None = None  # k-diffusion's extra_args: tensors' shapes, dtypes, devices, strides; other values
    s_noise: float = field(default=1.0, metadata=FED)
    dtype: torch.dtype = torch.float32  # the state's (EDM: float64; EDM2: its `dtype`)
    guidance: float | None = None  # EDM2's guidance weight where it calls a guiding net (torch.lerp's weight)

    def key(self) -> tuple:
        """``((name, value), ...)`` of every field a capture bakes in (all but the ``FED`` ones)."""
        return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get("fed"))
