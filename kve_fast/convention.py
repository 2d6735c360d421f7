"""The conventions the one sampler loop runs in: how the model is called, and how a step is rounded.

A convention is chosen once, at the front door (``kve_fast.sampler`` and ``kve_fast.pipeline`` pick
``REFERENCE``, ``kve_fast.k_diffusion`` picks ``K_DIFFUSION``, ``kve_fast.edm`` and ``kve_fast.edm2`` pick
``EDM`` and ``EDM2``), and everything that differs between them is asked of it here, in one place:

=====================  ==============================================  ==============================================
                       ``REFERENCE`` (diffusers' KarrasVePipeline)      ``K_DIFFUSION`` (k-diffusion's sample_heun)
=====================  ==============================================  ==============================================
the model              a score model in [0, 1] image space:            a denoiser: ``model(x_hat, sigma * s_in,
                       ``model((x_hat + 1) / 2, sigma / 2)``           **extra_args)`` returns D(x_hat; sigma)
noise-level argument   ``sigma / 2``, a 0-d float32 CPU tensor         ``sigma * s_in``, a (batch,) tensor on the
                                                                       sigmas' device
the step's scalars     ``kve_fast.plan.Step``: 0-d float32 CPU         ``kve_fast.plan.KStep``: 0-d tensors on the
                       tensors (the reference's ops)                   sigmas' device (k-diffusion's ops)
division by sigma      true division on the CPU; on CUDA torch         true division (k-diffusion divides by device
                       multiplies by the host's float32 reciprocal     tensors) on every device
line 6 (the churn)     every step (it adds 0 * eps where gamma = 0)    only where gamma > 0 (x_hat is x otherwise)
=====================  ==============================================  ==============================================

Both draw one churn noise per step, also where gamma = 0, as their originals do.

The third convention, ``EDMConvention`` (NVlabs' EDM and EDM2 ``edm_sampler``, docs/edm-reading.md), is a
denoiser convention with its own step arithmetic (``kve_fast.ops.step_torch.EDMTorchStep``,
``kve_fast.ops.edm_triton``) in the state's dtype (float64 in EDM, ``dtype`` in EDM2): the net is called
``net(x_hat, t_hat, class_labels)`` with t_hat a 0-d tensor of the state's dtype on its device
(``kve_fast.edm_plan.EStep``), EDM2's guiding net after it and ``torch.lerp`` between them; division is true;
line 6 runs at every step in ``EDM`` (adding 0 * eps where gamma = 0) and only where it churns in ``EDM2``, and
the noise is drawn only where line 6 runs, from the caller's ``randn_like`` between two model calls, where the
originals draw it (``kve_fast.stages.HostDraw``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .fingerprint import nets
from .precision import UNET_DTYPES

__all__ = ["Convention", "EDMConvention", "REFERENCE", "K_DIFFUSION", "EDM", "EDM2", "ModelOutputError",
           "raw_output"]


class ModelOutputError(ValueError):
    """The model returned something that is not a tensor shaped like its input."""


def raw_output(out):
    """The model's output tensor: ``.sample`` of a diffusers output, the first item of a tuple, or itself."""
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0] if len(out) else out
    return out


def _checked(out, x: torch.Tensor) -> torch.Tensor:
    if type(out) is not torch.Tensor:  # (raw_output inline: this runs twice a step)
        out = raw_output(out)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelOutputError(f"`model` must return a tensor shaped like its input {tuple(x.shape)}, got {got}")
    return out


@dataclass(frozen=True)
class Convention:
    """One of the two conventions (see the module docstring); compare with ``is``."""

    name: str
    denoiser: bool  # the model returns D itself (k-diffusion), else a score in [0, 1] image space
    churn_every_step: bool  # line 6 runs where gamma = 0 too (adding 0 * eps), as the reference does
    edm: ClassVar[bool] = False  # NVlabs' step arithmetic and noise draws (EDMConvention)

    def true_division(self, device: torch.device) -> bool:
        """Whether the step's divisions by sigma are true divisions on ``device`` (else a multiplication by
        the float32 reciprocal computed on the host: what torch on CUDA does with the reference's CPU 0-d
        ``sigma_hat``; measured on an H200: docs/exactness.md)."""
        return self.denoiser or device.type != "cuda"

    def churns(self, step) -> bool:
        """Whether line 6 runs at ``step`` (else x_hat is x itself)."""
        return self.churn_every_step or step.noise_coef is not None

    # -- the model call -------------------------------------------------------------------------------

    def caller(self, model, spec, extra: dict | None = None):
        """``denoise(x_in, level, extra=None)``: the model's raw output at ``x_in`` and noise-level argument
        ``level``, checked (a tensor shaped like ``x_in``), for the run of ``spec`` (``kve_fast.spec.RunSpec``);
        ``extra`` replaces the call's ``extra_args`` (k-diffusion's, for static copies in graphs)."""
        if self.denoiser:
            kwargs = {} if extra is None else extra

            def denoise(x, level, extra=None):
                # as it is: k-diffusion's arithmetic promotes with the output's dtype (a float64 D makes x float64)
                return _checked(model(x, level, **(kwargs if extra is None else extra)), x)

            return denoise
        forward = spec.precision.call(model, spec.device)

        def score(x, level, extra=None):
            out = _checked(forward(x, level), x)
            # float64, say: float32 like the state (low-precision outputs are read as they are)
            return out if out.dtype in UNET_DTYPES else out.to(torch.float32)

        return score

    def model_input_is_hat(self) -> bool:
        """A denoiser takes x_hat itself; a score model takes ``(x_hat + 1) / 2`` (written by the churn)."""
        return self.denoiser

    def noise_level(self, step, at: str, s_in: torch.Tensor | None = None) -> torch.Tensor:
        """The model's noise-level argument at sigma_hat (``at="hat"``) or sigma_{i+1} (``"next"``), as the
        original computes it: a new tensor on each call."""
        if self.denoiser:
            sigma = step.sigma_hat_on_device() if at == "hat" else step.sigma_next
            return sigma * s_in
        level = step.at_hat if at == "hat" else step.at_next
        return torch.tensor(level.half, dtype=torch.float32)

    def graph_noise_level(self, scalars: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """The same argument inside a CUDA graph, read from the device ``Level`` slots ``scalars``: a 0-d view
        of ``half`` (the value the reference computes), or ``sigma`` broadcast into the per-sample buffer
        ``out`` (an op of the graph)."""
        if not self.denoiser:
            return scalars[0]
        out.copy_(scalars[1].expand_as(out))
        return out


REFERENCE = Convention("reference", denoiser=False, churn_every_step=True)
K_DIFFUSION = Convention("k-diffusion", denoiser=True, churn_every_step=False)


@dataclass(frozen=True)
class EDMConvention(Convention):
    """NVlabs' samplers (the module docstring): ``EDM`` (line 6 and its draw at every step) and ``EDM2`` (only
    where it churns). A run's model is its net, or ``kve_fast.fingerprint.Nets((net, gnet))`` where EDM2 guides
    (``RunSpec.guidance``); ``extra`` is ``{"class_labels": labels}``, passed positionally as the originals pass
    them; the state's dtype is ``RunSpec.dtype``."""

    edm: ClassVar[bool] = True

    def churns(self, step) -> bool:
        return step.churned

    def caller(self, model, spec, extra: dict | None = None):
        """EDM's ``net(x, t, class_labels)``; EDM2's guided denoiser: ``net(x, t, labels)``, then, where it guides,
        ``gnet(x, t, labels)`` and ``torch.lerp(ref, D, guidance)`` in the state's dtype (an FMA inside torch:
        kept as torch's own op). Unguided, the net's output is returned as it is: the step casts it to the state's
        dtype (``.to(dtype)``, or the kernels' exact widening)."""
        members = nets(model)
        net, guide = members[0], (members[1] if len(members) > 1 else None)
        weight, dtype = spec.guidance, spec.dtype
        labels = None if extra is None else extra["class_labels"]

        def denoise(x, level, extra=None):
            y = labels if extra is None else extra["class_labels"]
            out = _checked(net(x, level, y), x)
            if guide is None:
                return out
            ref = _checked(guide(x, level, y), x)
            return torch.lerp(ref.to(dtype), out.to(dtype), weight)

        return denoise

    def noise_level(self, step, at: str, s_in: torch.Tensor | None = None) -> torch.Tensor:
        """t_hat (``at="hat"``) or t_{i+1}: the step's 0-d tensors, as the originals hand them to the net."""
        return step.t_hat if at == "hat" else step.t_next


EDM = EDMConvention("edm", denoiser=True, churn_every_step=True)
EDM2 = EDMConvention("edm2", denoiser=True, churn_every_step=False)
