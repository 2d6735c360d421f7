"""A bit-exact, fused drop-in for NVlabs' EDM sampler (``generate.py``'s ``edm_sampler``, Karras et al. 2022).

    import kve_fast.edm
    images = kve_fast.edm.edm_sampler(net, latents, class_labels, randn_like=rnd.randn_like)  # was: edm_sampler(...)

``edm_sampler`` takes EDM's signature and means what EDM means (docs/edm-reading.md, our reading of the original,
operation by operation): the sigma range clamped to ``net.sigma_min`` / ``net.sigma_max``, every noise level and
every t_hat through ``net.round_sigma``, the state in float64 (the net's output cast to it), line 6 at every step
with the noise drawn from the caller's ``randn_like`` also where gamma is 0, ``net(x, t, class_labels)`` called
with the float64 sample, a 0-d float64 t on its device and the labels as given. The result equals the original's
bit for bit (dtype included) on the same device, and the generators end where the original leaves them, also when
the net raises (docs/edm.md says what is exact and what is not). It runs in kve_fast's one loop
(``kve_fast.sampler.execute``) in the ``kve_fast.convention.EDM`` convention, on fused float64 kernels
(``kve_fast.ops.edm_triton``) and CUDA graphs where asked; EDM's ``ablation_sampler`` is not served.

EDM2's sampler (``generate_images.py``) is ``kve_fast.edm2.edm_sampler``.
"""

from __future__ import annotations

import numbers

import torch

from . import graphs
from ._checks import check_bound, check_int, check_real
from .backends import edm_backend, make_backend
from .convention import EDM
from .edm_plan import edm_plan, levels
from .noise import CallerNoise
from .plan import check_churn_range
from .precision import Precision
from .sampler import Run, execute
from .spec import RunSpec

__all__ = ["edm_sampler"]


def check_input(name: str, x) -> None:
    """The latents / noise: a floating-point tensor ``(batch, ...)`` with a batch of at least 1, holding data."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got {got}")
    if x.dim() < 1 or x.shape[0] < 1 or x.numel() == 0:
        raise ValueError(f"`{name}` must be (batch, ...) with a batch of at least 1, got shape {tuple(x.shape)}")
    if x.device.type == "meta":
        raise ValueError(f"`{name}` is on 'meta', which holds no data")


def check_labels(name: str, labels, net, x: torch.Tensor) -> None:
    """None, or a tensor on ``x``'s device with one row per sample: ``(batch, net.label_dim)`` values where the net
    says its ``label_dim`` (as EDM's and EDM2's preconditioners reshape them), else a first dimension of ``batch``."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`{name}` must be None or a torch.Tensor, got {type(labels).__name__}")
    if labels.device != x.device:
        raise ValueError(f"`{name}` is on {labels.device}, the sample on {x.device}")
    batch, dim = x.shape[0], getattr(net, "label_dim", None)
    if isinstance(dim, numbers.Integral) and not isinstance(dim, bool) and dim > 0:
        if labels.dim() < 1 or labels.numel() != batch * dim:
            raise ValueError(f"`{name}` must hold (batch, net.label_dim) = ({batch}, {dim}) values, got shape "
                             f"{tuple(labels.shape)}")
    elif labels.dim() < 1 or labels.shape[0] != batch:
        raise ValueError(f"`{name}` must have one row per sample ({batch}), got shape {tuple(labels.shape)}")


def check_settings(num_steps, sigma_min, sigma_max, rho, s_churn, s_min, s_max, s_noise) -> tuple:
    """Both samplers' numeric arguments (names as theirs); returns ``(num_steps, S_min, S_max)`` as torch compares
    them."""
    num_steps = check_int("num_steps", num_steps, 2)  # (N = 1 divides by N - 1 = 0: the originals return NaN)
    check_real("sigma_min", sigma_min, positive=True)
    check_real("sigma_max", sigma_max, positive=True)
    check_real("rho", rho, positive=True)
    check_real("S_churn", s_churn, minimum=0)
    s_min, s_max = check_bound("S_min", s_min), check_bound("S_max", s_max)
    check_churn_range(s_min, s_max, ("S_min", "S_max"))
    check_real("S_noise", s_noise, minimum=0)
    return num_steps, s_min, s_max


def check_speed(backend, cuda_graph, progress, device: torch.device, dtype: torch.dtype, numel: int):
    """kve_fast's own options: ``(resolved backend, CUDA-graph mode)``."""
    mode = graphs.EDM_DEFAULT_MODE if cuda_graph is None else graphs.check_cuda_graph(cuda_graph)
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"`progress` must be True, False or a function wrapping the steps, got {type(progress).__name__}")
    return edm_backend(backend, device, dtype, numel), mode


def _net_range(net) -> tuple:
    """``(net.sigma_min, net.sigma_max)``, which EDM clamps its range to: real numbers."""
    for name in ("sigma_min", "sigma_max"):
        if not hasattr(net, name):
            raise TypeError(f"`net` has no `{name}`: EDM's sampler clamps its range to the net's (EDM's preconditioners "
                            "have one; for an EDM2 net use kve_fast.edm2.edm_sampler)")
        check_real(f"net.{name}", getattr(net, name), minimum=0, finite=name == "sigma_min")
    return net.sigma_min, net.sigma_max


def make_run(convention, model, x: torch.Tensor, labels, randn_like, plan, dtype: torch.dtype, resolved: str, mode,
             progress, s_noise, guidance: float | None = None) -> Run:
    """A ``Run`` of NVlabs' samplers (the fronts checked every argument and resolved the backend): the state in
    ``dtype`` with ``x``'s dense layout (as ``x.to(dtype) * t_0`` keeps it), the caller's ``randn_like`` called with
    it, the labels passed to the net as given (copied into a static buffer by a graph). The originals' side effects
    win over kve_fast's own rule: a failed call leaves the generators where its draws left them, as theirs."""
    device = x.device
    layout = torch.empty_like(x, dtype=dtype)
    stepper = make_backend(resolved, device, convention, shape=x.shape, layout=layout)
    extra = {"class_labels": labels}
    signature = graphs.extra_signature(extra)
    spec = RunSpec(convention=convention, backend=stepper.name, device=device, shape=tuple(x.shape),
                   strides=tuple(layout.stride()), noise="exact", solver="heun", hand_out=False, image=None,
                   precision=Precision(), fir="diffusers", extra=signature, s_noise=float(s_noise), dtype=dtype,
                   guidance=guidance)
    return Run(model=model, spec=spec, plan=plan, backend=stepper, like=layout,
               source=lambda: CallerNoise(randn_like, layout), initial=lambda _: x.to(dtype) * plan.levels[0],
               graphed=graphs.decide(mode, device, stepper.name, signature), cuda_graph=mode, progress=progress,
               restore_rng=False, extra=extra)


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, randn_like=torch.randn_like, num_steps=18, sigma_min=0.002,
                sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1,  # noqa: N803
                *, backend: str = "auto", cuda_graph=None, progress=False) -> torch.Tensor:
    """NVlabs' EDM ``edm_sampler`` (the module docstring): returns the float64 sample, bit for bit the original's.

    ``net(x, sigma, class_labels)`` is EDM's preconditioned denoiser (``sigma_min``, ``sigma_max``,
    ``round_sigma``); ``latents`` the float32 noise (the sample starts at ``latents.to(float64) * t_0``);
    ``randn_like(x)``: the churn noise, drawn at every step (EDM's script passes its per-seed generators'
    ``randn_like``). kve_fast's own options, keyword only: ``backend`` (``"auto"``: the Triton kernels on CUDA, the
    torch ops elsewhere; ``"torch"``; ``"triton"``), ``cuda_graph`` (``"auto"``/True: replay each step from CUDA
    graphs, Triton on CUDA; None, the default, is ``kve_fast.graphs.EDM_DEFAULT_MODE``: off until a GPU run
    confirms it bit for bit), ``progress`` (True: a tqdm bar; or a function wrapping the steps). Refused before any
    work (a ValueError or TypeError naming the argument): a net without ``round_sigma``, ``sigma_min`` or
    ``sigma_max``, ``num_steps`` < 2, a range that the net's does not meet, non-positive sigmas, negative
    ``S_churn`` or ``S_noise``, ``S_min`` > ``S_max``, labels of another batch or device.
    """
    if not callable(net) or not callable(getattr(net, "round_sigma", None)):
        raise TypeError("`net` must be EDM's preconditioned denoiser: callable, with a callable `round_sigma` "
                        "(for an EDM2 net use kve_fast.edm2.edm_sampler)")
    check_input("latents", latents)
    check_labels("class_labels", class_labels, net, latents)
    if not callable(randn_like):
        raise TypeError(f"`randn_like` must be callable, got {type(randn_like).__name__}")
    num_steps, S_min, S_max = check_settings(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise)
    net_min, net_max = _net_range(net)
    sigma_min, sigma_max = max(sigma_min, net_min), min(sigma_max, net_max)  # EDM's clamp, Python's max and min
    if not sigma_min <= sigma_max:
        raise ValueError(f"`sigma_min`..`sigma_max` clamped to the net's range is empty ({sigma_min} > {sigma_max})")
    resolved, mode = check_speed(backend, cuda_graph, progress, latents.device, torch.float64, latents.numel())
    t = levels(num_steps, sigma_min, sigma_max, rho, torch.float64, latents.device, round_sigma=net.round_sigma)
    plan = edm_plan(t, S_churn, S_min, S_max, S_noise, every_step=True, round_sigma=net.round_sigma)
    x = latents.detach()
    return execute(make_run(EDM, net, x, class_labels, randn_like, plan, torch.float64, resolved, mode, progress,
                            S_noise))
