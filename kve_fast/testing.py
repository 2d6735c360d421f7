"""Helpers for checking kve_fast against the reference packages (the tests and bench/ scripts share them).

- ``import_k_diffusion_sampling(root)``: the real k-diffusion ``sampling`` module from the folder
  holding its ``k_diffusion`` package, without running the package ``__init__`` (which imports its
  training stack: wandb, CLIP, torchvision models). ``utils.py``, which ``sampling.py`` imports,
  imports ``torchvision.transforms.functional`` at the top and never uses it for sampling, so
  torchvision is stubbed for the import (an installed torchvision may not match this torch);
  ``sys.modules`` is put back as it was. Nothing of k-diffusion is copied here.
- ``mismatches(a, b)``: how many elements differ (NaN where the other has NaN counts as equal; -1 for
  another shape or dtype), for the bit-exactness tables of bench/ scripts.
- ``NearFreeScore``: a score model that costs one elementwise kernel, so the sampler's own cost is
  what a benchmark times.
"""

from __future__ import annotations

import importlib
import os
import sys
import types

import torch

K_DIFFUSION = "k-diffusion==0.1.1.post1"


def import_k_diffusion_sampling(root: str):
    """``k_diffusion.sampling`` from ``root/k_diffusion`` (see the module docstring)."""
    names = ["k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "torchvision", "torchvision.transforms",
             "torchvision.transforms.functional"]
    saved = {name: sys.modules.get(name) for name in names}
    try:
        package = types.ModuleType("k_diffusion")
        package.__path__ = [os.path.join(root, "k_diffusion")]
        sys.modules["k_diffusion"] = package
        for name in names[3:]:
            stub = types.ModuleType(name)
            stub.__path__ = []
            sys.modules[name] = stub
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def mismatches(a, b) -> int:
    """Elements of ``a`` and ``b`` (tensors or arrays) that differ; -1 when shapes or dtypes differ."""
    import numpy as np

    a = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))
    b = b if isinstance(b, torch.Tensor) else torch.from_numpy(np.array(b))
    if a.shape != b.shape or a.dtype != b.dtype:
        return -1
    a, b = a.cpu(), b.cpu()
    if torch.equal(a, b):
        return 0
    diff = a != b
    if a.is_floating_point():
        diff &= ~(torch.isnan(a) & torch.isnan(b))
    return int(diff.sum())


class NearFreeScore(torch.nn.Module):
    """A near-free score model (``-x``, one elementwise kernel) with the config a pipeline reads."""

    def __init__(self, size: int, channels: int = 3):
        super().__init__()
        self.config = types.SimpleNamespace(sample_size=size, in_channels=channels, out_channels=channels)
        self.w = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.w.device

    @property
    def dtype(self):
        return self.w.dtype

    def forward(self, x, sigma):
        from diffusers.utils import BaseOutput

        return BaseOutput(sample=torch.neg(x))
