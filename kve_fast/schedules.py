"""Noise-level schedules: the sigmas a sampler visits, highest first."""

from __future__ import annotations

import numpy as np
import torch


def diffusers_schedule(num_inference_steps: int, sigma_min: float, sigma_max: float, device=None):
    """The reference's schedule, bit for bit: ``(timesteps, schedule)`` as diffusers computes them.

    diffusers' ``KarrasVeScheduler`` uses t_i of Table 1's VE column directly as sigma:
    ``schedule[i] = sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (N - 1))`` in float32, so the
    sampler runs from sigma_max**2 down to sigma_min**2 (1e4 to 4e-4 with the defaults) while the
    initial noise has standard deviation sigma_max. ``schedule`` is ascending and indexed by
    ``timesteps = [N-1, ..., 0]``. The same torch ops as the reference, on ``device``, so that the
    float32 rounding is the reference's on every device.
    """
    timesteps = np.arange(0, num_inference_steps)[::-1].copy()
    timesteps = torch.from_numpy(timesteps).to(device)
    schedule = [
        (sigma_max**2 * (sigma_min**2 / sigma_max**2) ** (i / (num_inference_steps - 1)))
        for i in timesteps
    ]
    return timesteps, torch.tensor(schedule, dtype=torch.float32, device=device)
