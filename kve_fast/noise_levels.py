"""Noise-level schedules: the sigmas a sampler visits.

Each schedule is defined element by element (``schedule_value``), so the sampler can compute step
i's noise level when it reaches step i; ``make_schedule`` lists the same values in the reference's
layout: ``timesteps = [N-1, ..., 0]`` and an ascending float32 ``schedule`` indexed by them, so step i
runs at ``schedule[timesteps[i]]``.
"""

from __future__ import annotations

import numpy as np
import torch

from .options import SCHEDULES

__all__ = ["SCHEDULES", "schedule_value", "make_schedule", "ve_sigmas", "edm_sigmas"]


def _diffusers_value(t, num_inference_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    # The reference's list element for timestep t (a 0-d int64 tensor): t_i of Table 1's VE column,
    # used directly as sigma, computed with the same 0-d float32 torch ops.
    return sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (t / (num_inference_steps - 1))


def _ve_value(k: int, num_inference_steps: int, sigma_min: float, sigma_max: float) -> float:
    # Table 1, VE column, as the paper means it: sigma_i = sqrt(t_i), geometric from sigma_max to sigma_min
    return sigma_max * (sigma_min / sigma_max) ** (k / (num_inference_steps - 1))


def _edm_value(k: int, num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float) -> float:
    # Eq. 5: (sigma_max^(1/rho) + k/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + k / (num_inference_steps - 1) * (b - a)) ** rho


def schedule_value(name: str, t: int, num_inference_steps: int, sigma_min: float, sigma_max: float,
                   rho: float = 7.0, device=None) -> torch.Tensor:
    """``schedule[t]`` of ``make_schedule`` (ascending index t), a 0-d float32 tensor, bit for bit."""
    if name == "diffusers":
        # the reference's list is built over timesteps = [N-1, ..., 0]: element t used timesteps[t] = N-1-t
        tt = torch.tensor(num_inference_steps - 1 - t, dtype=torch.int64, device=device)
        return _diffusers_value(tt, num_inference_steps, sigma_min, sigma_max).to(torch.float32)
    k = num_inference_steps - 1 - t  # descending position
    if name == "ve":
        value = _ve_value(k, num_inference_steps, sigma_min, sigma_max)
    else:
        value = _edm_value(k, num_inference_steps, sigma_min, sigma_max, rho)
    return torch.tensor(value, dtype=torch.float32, device=device)


def diffusers_schedule(num_inference_steps: int, sigma_min: float, sigma_max: float, device=None):
    """The reference's schedule, bit for bit, as diffusers computes it.

    diffusers' ``KarrasVeScheduler`` uses t_i of Table 1's VE column directly as sigma:
    ``schedule[i] = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (N - 1))`` in float32, so the
    sampler runs from sigma_max**2 down to sigma_min**2 (1e4 to 4e-4 with the defaults) while the
    initial noise has standard deviation sigma_max. The same torch ops as the reference, on
    ``device``, so that the float32 rounding is the reference's on every device.
    """
    timesteps = np.arange(0, num_inference_steps)[::-1].copy()
    timesteps = torch.from_numpy(timesteps).to(device)
    schedule = [_diffusers_value(i, num_inference_steps, sigma_min, sigma_max) for i in timesteps]
    return timesteps, torch.tensor(schedule, dtype=torch.float32, device=device)


def ve_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Table 1, VE column, as the paper means it: sigma_i = sqrt(t_i), i.e. a geometric sequence
    from sigma_max down to sigma_min (float64, descending)."""
    return np.array([_ve_value(k, num_inference_steps, sigma_min, sigma_max) for k in range(num_inference_steps)])


def edm_sigmas(num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """The paper's Eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    (float64, descending)."""
    return np.array([_edm_value(k, num_inference_steps, sigma_min, sigma_max, rho) for k in range(num_inference_steps)])


def make_schedule(name: str, num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  device=None):
    """``(timesteps, schedule)`` for ``name`` in the reference's layout (see the module docstring)."""
    if name == "diffusers":
        return diffusers_schedule(num_inference_steps, sigma_min, sigma_max, device)
    sigmas = ve_sigmas(num_inference_steps, sigma_min, sigma_max) if name == "ve" else \
        edm_sigmas(num_inference_steps, sigma_min, sigma_max, rho)
    timesteps = torch.arange(num_inference_steps - 1, -1, -1, device=device)
    schedule = torch.tensor(sigmas[::-1].copy(), dtype=torch.float32, device=device)
    return timesteps, schedule
