"""Our reading of NVlabs' two ``edm_sampler`` functions as plain torch: the oracles the drop-ins are compared
with by ``torch.equal`` (tests), and the published loop that ``kve-fast bench --edm`` times beside them.

Written from docs/edm-reading.md, not copied: the originals are CC BY-NC-SA 4.0. Each line says what it reads
in the original, quoting the expression it reads:

- EDM: NVlabs/edm ``generate.py``, ``edm_sampler`` (commit 0a2ff34f0b80415ace7af7311074bd2255da0d1e; the same
  function at 62072d2612c7da05165d6233d13d17d71f213fee).
- EDM2: NVlabs/edm2 ``generate_images.py``, ``edm_sampler`` (commit 4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc,
  which calls the guiding net with the labels; the earlier 52b98e1bed7656d7e6403d9517fc98d8508574d9 called
  ``gnet(x, t)`` without them).

The op order and dtypes are the originals' (they decide the bits): Python scalars stay Python scalars (torch
rounds them to the tensor's dtype in each op), every scalar of a step is a 0-d tensor on the latents' device,
the noise levels come from one whole-vector expression (CPU torch's vectorized ``pow`` differs from its
per-element one in the last bit), and the guidance combination is ``torch.lerp`` itself (an FMA).
"""

from __future__ import annotations

import numpy as np
import torch

GAMMA_CAP = np.sqrt(2) - 1  # both: "np.sqrt(2) - 1" (a numpy float64)


def karras_levels(num_steps, sigma_min, sigma_max, rho, dtype, device) -> torch.Tensor:
    """Both samplers' "Time step discretization" before t_N = 0: ``num_steps`` descending levels, ``dtype`` on
    ``device``, from one whole-vector expression."""
    # both: "step_indices = torch.arange(num_steps, dtype=..., device=...)" (EDM: float64; EDM2: dtype)
    index = torch.arange(num_steps, dtype=dtype, device=device)
    top = sigma_max ** (1 / rho)  # both: "sigma_max ** (1 / rho)", a Python float
    span = sigma_min ** (1 / rho) - sigma_max ** (1 / rho)  # both: "(sigma_min ** (1 / rho) - sigma_max ** (1 / rho))"
    # both: "(top + step_indices / (num_steps - 1) * span) ** rho": the division by the Python int first,
    # then the product, then the sum, then the power (all tensor ops with Python scalars, in dtype)
    return (top + index / (num_steps - 1) * span) ** rho


def edm_levels_reading(net, num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, device="cpu") -> torch.Tensor:
    """EDM's ``t_steps``: float64 on ``device``, clamped to the net's range, through ``net.round_sigma``, then 0."""
    # EDM generate.py edm_sampler: "sigma_min = max(sigma_min, net.sigma_min)"
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)  # EDM: "sigma_max = min(sigma_max, net.sigma_max)"
    levels = karras_levels(num_steps, sigma_min, sigma_max, rho, torch.float64, device)
    # EDM: "t_steps = torch.cat([net.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])"
    return torch.cat([net.round_sigma(levels), torch.zeros_like(levels[:1])])


def edm2_levels_reading(num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, dtype=torch.float32,
                        device="cpu") -> torch.Tensor:
    """EDM2's ``t_steps``: ``dtype`` on ``device``, the call's range as given (no clamp, no rounding), then 0."""
    levels = karras_levels(num_steps, sigma_min, sigma_max, rho, dtype, device)
    # EDM2 generate_images.py edm_sampler: "t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])"
    return torch.cat([levels, torch.zeros_like(levels[:1])])


def _heun_step(denoise, x_hat, sigma_hat, sigma_next, correct: bool) -> torch.Tensor:
    """Both samplers' "Euler step" and "Apply 2nd order correction" (``correct``: "if i < num_steps - 1")."""
    # both: "d_cur = (x_hat - denoised) / t_hat": a true division by a 0-d tensor on the state's device
    d = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
    # both: "x_next = x_hat + (t_next - t_hat) * d_cur": the 0-d difference first, then the product, then the sum
    x_next = x_hat + (sigma_next - sigma_hat) * d
    if not correct:
        return x_next
    # both: "d_prime = (x_next - denoised) / t_next", denoised = the net at (x_next, t_next)
    d_prime = (x_next - denoise(x_next, sigma_next)) / sigma_next
    # both: "x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)"
    return x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime)


def edm_sampler_reading(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                        sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):  # noqa: N803
    """Our reading of EDM's ``edm_sampler`` (the module docstring): returns the float64 sample."""
    levels = edm_levels_reading(net, num_steps, sigma_min, sigma_max, rho, latents.device)

    def denoise(x, sigma):
        return net(x, sigma, class_labels).to(torch.float64)  # EDM: "net(x_hat, t_hat, class_labels).to(torch.float64)"

    x = latents.to(torch.float64) * levels[0]  # EDM: "x_next = latents.to(torch.float64) * t_steps[0]"
    # EDM: "for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:]))": 0-d views of t_steps
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):
        # EDM: "gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0" (the range
        # test reads the device tensor: a host sync each step; in float64)
        gamma = min(S_churn / num_steps, GAMMA_CAP) if S_min <= sigma <= S_max else 0
        sigma_hat = net.round_sigma(sigma + gamma * sigma)  # EDM: "t_hat = net.round_sigma(t_cur + gamma * t_cur)"
        # EDM: "x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)": every step, also
        # where gamma is 0 (then the coefficient is 0 and the draw still advances the generators); the 0-d
        # coefficient times S_noise first, then times the float64 noise drawn like the float64 state
        x_hat = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * randn_like(x)
        x = _heun_step(denoise, x_hat, sigma_hat, sigma_next, i < num_steps - 1)
    return x


def edm2_guided_denoiser(net, gnet, labels, guidance, dtype):
    """EDM2's ``denoise(x, t)`` inside ``edm_sampler`` ("Guided denoiser")."""

    def denoise(x, sigma):
        main = net(x, sigma, labels).to(dtype)  # EDM2: "Dx = net(x, t, labels).to(dtype)"
        if guidance == 1:  # EDM2: "if guidance == 1: return Dx": the guiding net is not called
            return main
        reference = gnet(x, sigma, labels).to(dtype)  # EDM2: "ref_Dx = gnet(x, t, labels).to(dtype)"
        # EDM2: "return ref_Dx.lerp(Dx, guidance)": from the guiding net's output towards (and past) the main one
        return reference.lerp(main, guidance)

    return denoise


def edm2_sampler_reading(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                         guidance=1, S_churn=0, S_min=0, S_max=float("inf"),  # noqa: N803
                         S_noise=1, dtype=torch.float32, randn_like=torch.randn_like):  # noqa: N803
    """Our reading of EDM2's ``edm_sampler`` (the module docstring): returns the sample in ``dtype``."""
    denoise = edm2_guided_denoiser(net, gnet, labels, guidance, dtype)
    levels = edm2_levels_reading(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    x = noise.to(dtype) * levels[0]  # EDM2: "x_next = noise.to(dtype) * t_steps[0]"
    for i, (sigma, sigma_next) in enumerate(zip(levels[:-1], levels[1:])):  # EDM2: as EDM's loop
        # EDM2: "if S_churn > 0 and S_min <= t_cur <= S_max:" (no host sync without churn; the range test in dtype)
        if S_churn > 0 and S_min <= sigma <= S_max:
            gamma = min(S_churn / num_steps, GAMMA_CAP)  # EDM2: "gamma = min(S_churn / num_steps, np.sqrt(2) - 1)"
            sigma_hat = sigma + gamma * sigma  # EDM2: "t_hat = t_cur + gamma * t_cur" (no round_sigma)
            # EDM2: "x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)"
            x_hat = x + (sigma_hat**2 - sigma**2).sqrt() * S_noise * randn_like(x)
        else:
            sigma_hat, x_hat = sigma, x  # EDM2: "t_hat = t_cur; x_hat = x_cur": no draw
        x = _heun_step(denoise, x_hat, sigma_hat, sigma_next, i < num_steps - 1)
    return x
