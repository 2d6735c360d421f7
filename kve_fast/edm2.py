"""A bit-exact, fused drop-in for NVlabs' EDM2 sampler (``generate_images.py``'s ``edm_sampler``, Karras et al. 2024).

    import kve_fast.edm2
    generate_images(..., sampler_fn=kve_fast.edm2.edm_sampler)   # or sampler_fn='kve_fast.edm2.edm_sampler'

``edm_sampler`` takes EDM2's signature (its script passes every argument by keyword) and means what EDM2 means
(docs/edm-reading.md): the state and the levels in ``dtype`` on the noise's device, the call's range as given
(no clamp, no ``round_sigma``), line 6 and its draw from ``randn_like`` only where it churns (S_churn > 0 and
S_min <= t <= S_max, compared in ``dtype``), and guidance as EDM2 computes it: ``net(x, t, labels)``, then, unless
``guidance`` is 1, ``gnet(x, t, labels)`` and ``torch.lerp`` from the guiding net's output towards the net's
(with ``guidance`` 1 the guiding net is never called, although EDM2's script passes one). The result equals the
original's bit for bit (dtype included) on the same device; it runs in kve_fast's one loop in the
``kve_fast.convention.EDM2`` convention (docs/edm.md).
"""

from __future__ import annotations

import torch

from ._checks import check_real
from .convention import EDM2
from .edm import check_input, check_labels, check_settings, check_speed, make_run
from .edm_plan import edm_plan, levels
from .fingerprint import Nets
from .sampler import execute

__all__ = ["edm_sampler"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_guidance(net, gnet, guidance) -> float | None:
    """The lerp's weight where the guiding net is called (None where ``guidance`` is 1: EDM2 then returns the net's
    output alone)."""
    if not callable(net):
        raise TypeError(f"`net` must be callable (EDM2's preconditioned denoiser), got {type(net).__name__}")
    check_real("guidance", guidance)
    if guidance == 1:
        return None
    if not callable(gnet):
        raise TypeError(f"`guidance`={guidance} calls the guiding net, but `gnet` is {type(gnet).__name__}: pass "
                        "it (or guidance=1)")
    return float(guidance)


@torch.no_grad()
def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7, guidance=1,
                S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32,  # noqa: N803
                randn_like=torch.randn_like, *, backend: str = "auto", cuda_graph=None,
                progress=False) -> torch.Tensor:
    """NVlabs' EDM2 ``edm_sampler`` (the module docstring): returns the sample in ``dtype``, bit for bit the
    original's.

    ``net(x, sigma, labels)`` (and ``gnet``) are EDM2's preconditioned denoisers; ``noise`` the initial noise (the
    sample starts at ``noise.to(dtype) * t_0``); ``randn_like(x)``: the churn noise, drawn only where a step churns.
    kve_fast's own options, keyword only, as in ``kve_fast.edm.edm_sampler``: ``backend`` (``"triton"`` keeps a
    float32 or float64 state; ``"auto"`` runs other dtypes on the torch ops), ``cuda_graph``, ``progress``. Refused
    before any work (a ValueError or TypeError naming the argument): ``num_steps`` < 2, ``dtype`` not a floating
    dtype, ``guidance`` other than 1 without a callable ``gnet``, non-positive sigmas, negative ``S_churn`` or
    ``S_noise``, ``S_min`` > ``S_max``, labels of another batch or device.
    """
    weight = _check_guidance(net, gnet, guidance)
    check_input("noise", noise)
    check_labels("labels", labels, net, noise)
    if dtype not in DTYPES:
        raise TypeError(f"`dtype` must be one of {', '.join(map(str, DTYPES))}, got {dtype!r}")
    if not callable(randn_like):
        raise TypeError(f"`randn_like` must be callable, got {type(randn_like).__name__}")
    num_steps, S_min, S_max = check_settings(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise)
    if not sigma_min <= sigma_max:
        raise ValueError(f"`sigma_min` ({sigma_min}) must not be larger than `sigma_max` ({sigma_max})")
    resolved, mode = check_speed(backend, cuda_graph, progress, noise.device, dtype, noise.numel())
    plan = edm_plan(levels(num_steps, sigma_min, sigma_max, rho, dtype, noise.device), S_churn, S_min, S_max, S_noise,
                    every_step=False)
    model = net if weight is None else Nets((net, gnet))
    return execute(make_run(EDM2, model, noise.detach(), labels, randn_like, plan, dtype, resolved, mode, progress,
                            S_noise, guidance=weight))
