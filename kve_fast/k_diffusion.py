"""A bit-exact, fused drop-in for k-diffusion's Algorithm 2 samplers.

    from kve_fast.k_diffusion import sample_heun, get_sigmas_karras   # instead of k_diffusion.sampling

``sample_heun`` and ``sample_euler`` take k-diffusion's signature and mean what k-diffusion means
(crowsonkb/k-diffusion 0.1.1.post1, ``k_diffusion/sampling.py``; ComfyUI and stable-diffusion-webui
carry the same loop): ``model(x, sigma * s_in, **extra_args)`` is a *denoiser* returning the denoised
image; the callback gets ``{'x': x_hat, 'i', 'sigma', 'sigma_hat', 'denoised'}`` after the first model
call of each step; noise is ``torch.randn_like(x)`` from the global RNG of x's device, drawn every step;
the scalar arithmetic is k-diffusion's (0-d tensors on the sigmas' device, true division). In float32
the output equals k-diffusion's bit for bit on the same device, with ``backend="torch"`` or
``"triton"`` (fused kernels; what ``"auto"`` picks on CUDA). kve_fast adds ``backend=`` and
``noise="fast"`` (noise generated inside the kernels: faster, not k-diffusion's stream).

The reference pipeline's score convention (``model((x + 1) / 2, sigma / 2)`` returning a score) is
``kve_fast.sample_karras_ve``; ``score_to_denoiser`` / ``denoiser_to_score`` adapt one model to the
other path.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import backends, graphs
from ._warn import warn_once
from ._checks import check_real
from .backends import make_backend
from .convention import K_DIFFUSION, raw_output
from .noise import DeviceNoise, RandnLikeNoise
from .options import NOISE_MODES
from .plan import kdiffusion_plan
from .precision import Precision
from .sampler import Run, execute
from .spec import RunSpec

__all__ = ["sample_heun", "sample_euler", "get_sigmas_karras", "get_sigmas_exponential", "append_zero",
           "score_to_denoiser", "denoiser_to_score"]


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """``sigmas`` with a final 0 appended (k-diffusion's helper)."""
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu") -> torch.Tensor:
    """The noise levels of Karras et al. (2022), Eq. 5, with a final 0: k-diffusion's values, bit for bit."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu") -> torch.Tensor:
    """Noise levels evenly spaced in log sigma, with a final 0: k-diffusion's values, bit for bit."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, device=device).exp()
    return append_zero(sigmas)


def score_to_denoiser(score_model: Callable) -> Callable:
    """A k-diffusion denoiser ``D(x, sigma)`` from a reference-convention score model.

    The reference pipeline computes ``D = x + sigma * (sigma / 2) * score((x + 1) / 2, sigma / 2)``;
    ``sigma`` may be a per-sample tensor (k-diffusion's ``sigma * s_in``).
    """

    def denoiser(x, sigma, **kwargs):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = sigma.reshape(-1, *([1] * (x.dim() - 1))) if sigma.dim() else sigma
        half = (sigma / 2) if sigma.dim() == 0 else sigma[0] / 2  # the model's noise level (one per batch)
        score = raw_output(score_model((x + 1) / 2, half, **kwargs))
        return x + s * ((s / 2) * score)

    return denoiser


def denoiser_to_score(denoiser: Callable) -> Callable:
    """A reference-convention score model ``score(y, sigma_y)`` (``y = (x + 1) / 2``, ``sigma_y = sigma / 2``)
    from a k-diffusion denoiser: ``score = (D(x, sigma) - x) / (sigma * sigma_y)``."""

    def score(y, sigma_y, **kwargs):
        sigma_y = torch.as_tensor(sigma_y, dtype=y.dtype, device=y.device)
        x, sigma = 2 * y - 1, 2 * sigma_y
        s_in = y.new_ones([y.shape[0]])
        denoised = raw_output(denoiser(x, sigma * s_in, **kwargs))
        return (denoised - x) / (sigma * sigma_y)

    return score


class KDiffusionCallback:
    """k-diffusion's callback at the ``HandOut`` after the first model call of each step:
    ``{'x': x_hat, 'i', 'sigma', 'sigma_hat', 'denoised'}``; what it returns is ignored, as there."""

    stop = False

    def __init__(self, callback):
        self.callback = callback

    def __call__(self, stage, step, state):
        self.callback({"x": state[stage.x], "i": step.index, "sigma": step.sigma,
                       "sigma_hat": step.sigma_hat_on_device(), "denoised": state[stage.denoised]})
        return None


def _fusable(x: torch.Tensor, sigmas: torch.Tensor, device: torch.device) -> str:
    """Why the fused float32 kernels cannot give k-diffusion's bits for this call on ``device`` (x's) ('' if they
    can)."""
    if x.dtype != torch.float32:
        return f"`x` is {x.dtype} (the kernels keep a float32 state)"
    if sigmas.dtype != torch.float32:
        return f"`sigmas` are {sigmas.dtype} (the kernels take float32 noise levels)"
    if sigmas.device != device:
        return (f"`sigmas` are on {sigmas.device} and `x` on {device} (k-diffusion then divides by a "
                "0-d tensor of another device)")
    return ""


def _fallback(backend: str):
    """Where the fused kernels cannot read the model's output (a float64 denoiser makes k-diffusion's state
    float64): with ``backend="auto"`` the torch ops go on (k-diffusion's own, its bits); else a ValueError."""
    def fallback(raw):
        why = (f"the model returned {raw.dtype}, which makes k-diffusion's state {raw.dtype}; the fused kernels "
               "keep it float32")
        if backend != "auto":
            raise ValueError(f"`backend`={backend!r} cannot run this call: {why}; use backend='torch' or 'auto'")
        warn_once(("k-diffusion", "dtype", str(raw.dtype)), f"kve_fast.k_diffusion: {why}: the torch ops run the rest "
                                                            "of the call (k-diffusion's bits, slower)")
        return make_backend("torch", raw.device, K_DIFFUSION)

    return fallback


def _sample(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, backend, noise,
            solver, cuda_graph=None) -> torch.Tensor:
    if not callable(model):
        raise TypeError(f"`model` must be callable (a denoiser), got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point torch.Tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"`x` must be (batch, ...) with a batch of at least 1, got shape {tuple(x.shape)}")
    if extra_args is not None and not isinstance(extra_args, dict):
        raise TypeError(f"`extra_args` must be None or a dict, got {type(extra_args).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable, got {type(callback).__name__}")
    check_real("s_noise", s_noise, minimum=0)
    if not isinstance(noise, str) or noise not in NOISE_MODES:
        raise ValueError(f"`noise` must be one of {NOISE_MODES}, got {noise!r}")
    device = x.device  # (a tensor's device carries its index)
    resolved = backends.check_backend(backend, device)
    plan = kdiffusion_plan(sigmas, s_churn, s_tmin, s_tmax)
    if len(plan) == 0:
        return x  # one noise level (SplitSigmas' last): no step, x as it is, as k-diffusion returns it
    return execute(_make_kdiffusion_run(model, x.detach(), sigmas, plan, device, backend, resolved, cuda_graph, noise, solver,
                               extra_args, callback, disable, s_noise))


def _make_kdiffusion_run(model, x, sigmas, plan, device, backend, resolved, cuda_graph, noise, solver, extra_args, callback,
                    disable, s_noise) -> Run:
    """A ``Run`` of k-diffusion's convention on ``x``'s ``device`` (``_sample`` checked the arguments and resolved
    ``backend`` for it into ``resolved``): its step backend, graphs and noise are decided here, once, and handed
    down."""
    why = _fusable(x, sigmas, device)
    if why and backend in ("triton", "cuda"):
        raise ValueError(f"`backend`={backend!r} cannot run this call: {why}; use backend='torch' or 'auto'")
    layout = torch.empty_like(x)  # the state keeps x's layout, as k-diffusion's tensors do
    stepper = make_backend("torch" if why else resolved, device, K_DIFFUSION, shape=x.shape, layout=layout)
    extra_args = {} if extra_args is None else extra_args
    extra = graphs.extra_signature(extra_args)
    # cuda_graph=None: graphs.KDIFFUSION_DEFAULT_MODE, off until a GPU run has confirmed this convention's
    # graphed output bit for bit ("auto"/True ask for them)
    mode = graphs.KDIFFUSION_DEFAULT_MODE if cuda_graph is None else graphs.check_cuda_graph(cuda_graph)
    graphed = graphs.decide(mode, device, stepper.name, extra)
    spec = RunSpec(convention=K_DIFFUSION, backend=stepper.name, device=device, shape=tuple(x.shape),
                   strides=tuple(layout.stride()), noise=noise, solver=solver, hand_out=callback is not None,
                   image=None, precision=Precision(), fir="diffusers", extra=extra, s_noise=float(s_noise))
    steps = len(plan)

    def source():
        return RandnLikeNoise(layout) if noise == "exact" else DeviceNoise(x.shape, None, device, steps)

    def progress(iterable):
        if disable is True:  # (tqdm(disable=True) shows nothing either)
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, disable=disable)  # k-diffusion's trange(..., disable=disable)

    # k-diffusion's side effects win over kve_fast's own rule: a failed call (an interrupt raised from the
    # callback, say) leaves the global RNG advanced by the draws it made, as k-diffusion leaves it
    return Run(model=model, spec=spec, plan=plan, backend=stepper, like=layout, source=source, initial=lambda _: x,
               graphed=graphed, cuda_graph=mode,
               hand_out=None if callback is None else KDiffusionCallback(callback), progress=progress,
               restore_rng=False, extra=extra_args, s_in=x.new_ones([x.shape[0]]), fallback=_fallback(backend))


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0, *, backend: str = "auto", noise: str = "exact",
                cuda_graph=None) -> torch.Tensor:
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022), as k-diffusion's ``sample_heun``.

    ``model(x, sigma * s_in, **extra_args)`` returns the denoised image; ``sigmas`` is descending and
    ends in 0 (``get_sigmas_karras``); ``x`` is the initial sample scaled to ``sigmas[0]``. Bit-identical
    to k-diffusion's function in float32 on the same device (``noise="exact"``, either backend).
    ``cuda_graph``: ``"auto"``/True replay each step from a CUDA graph (Triton or CUDA backend, on CUDA;
    ``extra_args``' tensors are copied into static buffers each call); None (the default) is
    ``kve_fast.graphs.KDIFFUSION_DEFAULT_MODE``, off until confirmed on a GPU.
    """
    return _sample(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, backend, noise,
                   "heun", cuda_graph)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0, *, backend: str = "auto", noise: str = "exact",
                 cuda_graph=None) -> torch.Tensor:
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022), as k-diffusion's ``sample_euler``
    (``cuda_graph`` as in ``sample_heun``)."""
    return _sample(model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise, backend, noise,
                   "euler", cuda_graph)
